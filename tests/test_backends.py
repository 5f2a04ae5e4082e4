"""Latent and ControlNet backends on tiny models built here, saved with save_pretrained and loaded
through the same `Anonymizer.from_pretrained(folder)` path a user's folder takes.

The tiny models are random except where noted in `build_tiny_latent`; random denoisers make
anonymized images that are not faces, so these tests check the plumbing and the guarantees
(round trip, wrong key, background bit-identity, lossless exactness, identity and refusal), and
benchmarks/backend_cost.py measures fidelity with a briefly trained latent UNet.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anondata import Anonymizer
from anondata.backends import LatentBackend, load_backend, weights_sha256
from anondata.errors import FormatError, InputError, IntegrityError
from anondata.restore_record import RestoreRecord, latent_cells
from anondata.testing import build_tiny_latent, faces32

RES = 32
KINDS = ("vq", "kl", "controlnet")


# -- tests --------------------------------------------------------------------------------------
STEPS, ITERS, DECINV = 3, 2, 10


def fixed_keys(n, tag=b"k"):
    return [hashlib.sha256(tag + bytes([i])).digest() for i in range(n)]


def psnr_in(a, b, mask):
    m3 = np.broadcast_to(mask[..., None], a.shape)
    mse = np.mean((a[m3].astype(np.float64) - b[m3].astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine threads spin against each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("latent-models")


@pytest.fixture(scope="module")
def faces():
    return faces32()


@pytest.fixture(scope="module")
def masks(faces):
    yy, xx = np.mgrid[:RES, :RES]
    ellipse = ((yy - 15.5) / 11) ** 2 + ((xx - 15.5) / 9) ** 2 <= 1
    return np.stack([ellipse] * len(faces))


def make_anon(folder, decinv=DECINV):
    from anondata.scheme import Sampler

    return Anonymizer(load_backend(folder, decoder_inversion_iters=decinv), Sampler(steps=STEPS, inversion_iters=ITERS))


@pytest.fixture(scope="module")
def anons(root):
    return {kind: make_anon(build_tiny_latent(root, kind)) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_folder_loads_through_from_pretrained_with_identity(root, kind):
    folder = build_tiny_latent(root, kind)
    anon = Anonymizer.from_pretrained(folder, steps=STEPS, inversion_iters=ITERS)
    b = anon.backend
    assert isinstance(b, LatentBackend) and anon.resolution == RES and b.latent_size == RES // 4
    assert anon.sign_cell == 0 and anon.settings["scheme"] == "anondata-signflip/3"  # the default scheme
    assert b.is_vq == (kind == "vq") and (b.controlnet is not None) == (kind == "controlnet")
    assert anon.model_info == {"name": Path(folder).name, "sha256": weights_sha256(Path(folder)), "revision": ""}
    s = anon.settings
    assert s["latent"] == ("vq" if kind == "vq" else "kl") and s["controlnet"] == int(kind == "controlnet")
    assert s["decoder_inversion_iters"] > 0 and s["vq_quantize"] == int(kind == "vq")
    assert json.loads(json.dumps(s)) == s  # str/int only: goes into the manifest
    # every component's weights are part of the identity
    other = build_tiny_latent(root, kind, seed=1)
    assert load_backend(other).info["sha256"] != b.info["sha256"]


def test_latent_mask_covers_pixel_mask(anons):
    b = anons["kl"].backend
    mask = torch.zeros(2, RES, RES, dtype=torch.bool)
    mask[0, 5, 9] = True  # one pixel marks its whole 4x4 cell
    mask[1, 8:16, 4:12] = True
    m = b.latent_mask(mask)
    assert m.shape == (2, 1, RES // 4, RES // 4) and m.dtype == torch.bool
    assert m[0].sum() == 1 and m[0, 0, 1, 2]
    assert m[1].sum() == 4 and m[1, 0, 2:4, 1:3].all()
    up = m.repeat_interleave(4, -1).repeat_interleave(4, -2)[:, 0]
    assert not (mask & ~up).any()


@pytest.mark.parametrize("kind", KINDS)
def test_lossless_round_trip_background_and_wrong_key(anons, faces, masks, kind):
    anon = anons[kind]
    keys = fixed_keys(len(faces))
    out, recs = anon.anonymize(faces, keys, masks=masks, lossless=True)
    np.testing.assert_array_equal(out[~masks], faces[~masks])
    assert (out[masks] != faces[masks]).mean() > 0.5
    blobs = [r.to_bytes() for r in recs]
    np.testing.assert_array_equal(anon.restore(out, keys, blobs), faces)
    with pytest.raises(IntegrityError, match="lossless"):
        anon.restore(out, fixed_keys(len(faces), b"wrong"), blobs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", KINDS)
def test_latent_models_anonymize_and_restore_on_a_gpu(root, faces, masks, kind):
    """The restore record's carry is computed from what restore will see: the rounded face inside
    the mask (on the model's device) and the input outside it (built on the CPU). torch.where mixed
    the two devices, so on a GPU every latent record failed with a device-mismatch RuntimeError."""
    from anondata.scheme import Sampler

    anon = Anonymizer(load_backend(build_tiny_latent(root, kind), device="cuda", decoder_inversion_iters=DECINV),
                      Sampler(steps=STEPS, inversion_iters=ITERS))
    keys = fixed_keys(2)
    out, recs = anon.anonymize(faces[:2], keys, masks=masks[:2], lossless=True)
    np.testing.assert_array_equal(out[~masks[:2]], faces[:2][~masks[:2]])
    np.testing.assert_array_equal(anon.restore(out, keys, [r.to_bytes() for r in recs]), faces[:2])


@pytest.mark.parametrize("kind", KINDS)
def test_key_only_restore_is_deterministic_and_key_dependent(anons, faces, masks, kind):
    """Random autoencoders reconstruct poorly (~10 dB) and their decoders are not identifiable, so
    key-only fidelity is measured in benchmarks/backend_cost.py with trained tiny models; here:
    restore is a function of the key, a one-bit-different key is another key, the background holds."""
    anon = anons[kind]
    keys = fixed_keys(2)
    out, recs = anon.anonymize(faces[:2], keys, masks=masks[:2])
    right = anon.restore(out, keys, recs)
    np.testing.assert_array_equal(anon.restore(out, keys, recs), right)
    wrong = anon.restore(out, fixed_keys(2, b"wrong"), recs)
    near = anon.restore(out, [bytes([k[0] ^ 1]) + k[1:] for k in keys], recs)
    for other in (wrong, near):
        np.testing.assert_array_equal(other[~masks[:2]], faces[:2][~masks[:2]])
        assert (other[masks[:2]] != right[masks[:2]]).mean() > 0.5
    assert not np.array_equal(near, wrong)


@pytest.mark.parametrize("kind", KINDS)
def test_key_only_restore_reaches_the_autoencoders_ceiling(root, faces, masks, kind):
    """Decoding is many-to-one, so key-only restore must get the generated latent from the record's
    carry, not from the stored image. With the UNet's output zeroed (eps = 0: inversion is exact,
    so only the latent plumbing can lose anything) restore lands on decode(z0), the best the
    autoencoder can represent the original; without the carry, or with a wrong key, it does not."""
    anon = make_anon(build_tiny_latent(root, kind, zero_out=True))
    b, n = anon.backend, 4
    keys = fixed_keys(n)
    out, recs = anon.anonymize(faces[:n], keys, masks=masks[:n])
    x = torch.from_numpy(faces[:n]).permute(0, 3, 1, 2).float() / 127.5 - 1
    m = torch.from_numpy(masks[:n])
    _, z0, _ = b.prepare(x, m)
    ceiling = ((b._bound(m, restoring=True).decode(z0).double() + 1) * 127.5).round().clamp(0, 255)
    ceiling = ceiling.permute(0, 2, 3, 1).numpy().astype(np.uint8)
    assert recs[0].carry.shape == b.latent_shape and recs[0].carry.dtype == np.float16
    assert psnr_in(anon.restore(out, keys, recs), ceiling, masks[:n]) > 45
    assert psnr_in(anon.restore(out, fixed_keys(n, b"wrong"), recs), ceiling, masks[:n]) < 25
    zeroed = [RestoreRecord.from_bytes(r.to_bytes()) for r in recs]
    for r in zeroed:
        r.carry = np.zeros_like(r.carry)
    assert psnr_in(anon.restore(out, keys, zeroed), ceiling, masks[:n]) < 25


def test_latent_record_is_checked(anons, faces, masks):
    anon = anons["kl"]
    out, recs = anon.anonymize(faces[:1], fixed_keys(1), masks=masks[:1])
    rec = recs[0]
    assert RestoreRecord.from_bytes(rec.to_bytes()).carry.tobytes() == rec.carry.tobytes()
    outside = ~latent_cells(masks[0], RES // 4)
    assert outside.any() and not rec.carry[:, outside].any()
    bad = RestoreRecord.from_bytes(rec.to_bytes())
    bad.carry[0, outside] = 1
    with pytest.raises(FormatError, match="outside the latent mask"):
        RestoreRecord.from_bytes(bad.to_bytes())
    bad.carry[0, outside] = np.inf
    with pytest.raises(FormatError, match="non-finite"):
        RestoreRecord.from_bytes(bad.to_bytes())
    pixel_rec = RestoreRecord.from_bytes(rec.to_bytes())
    pixel_rec.carry = None
    with pytest.raises(InputError, match="made in pixel space"):
        anon.restore(out, fixed_keys(1), [pixel_rec])
    wrong_shape = RestoreRecord.from_bytes(rec.to_bytes())
    wrong_shape.carry = np.zeros((2, RES // 4, RES // 4), np.float16)
    with pytest.raises(InputError, match=r"latent space \(2, 8, 8\)"):
        anon.restore(out, fixed_keys(1), [wrong_shape])


def test_latent_out_of_float16_range_is_an_error_not_a_traceback(anons, faces, masks, monkeypatch):
    """The carry is stored in float16: a generated latent beyond its range cannot be restored. That is
    the model's output failing, as NaN is (anonymizer._non_finite), not a ValueError from inside."""
    from anondata import scheme
    from anondata.errors import AnondataError

    transform = scheme.transform

    def huge(*a, **kw):
        y, z = transform(*a, **kw)
        return y, z + 1e6  # the image stays in range; only the latent restore must carry leaves float16

    monkeypatch.setattr(scheme, "transform", huge)
    with pytest.raises(AnondataError, match="float16"):
        anons["kl"].anonymize(faces[:1], fixed_keys(1), masks=masks[:1])


def test_batches_match_singles(anons, faces, masks):
    """Lossless restore compares hashes, so a face must not depend on its batch-mates."""
    anon = anons["controlnet"]
    keys = fixed_keys(len(faces), b"batch")
    out, _ = anon.anonymize(faces, keys, masks=masks)
    singles = np.concatenate([anon.anonymize(faces[i : i + 1], keys[i : i + 1], masks=masks[i : i + 1])[0] for i in range(len(faces))])
    np.testing.assert_array_equal(singles, out)


def test_model_mismatch_is_refused(anons, root, faces):
    keys = fixed_keys(2)
    out, recs = anons["vq"].anonymize(faces[:2], keys)
    for other in (anons["kl"], make_anon(build_tiny_latent(root, "vq", seed=1))):
        with pytest.raises(InputError, match="same --model"):
            other.restore(out, keys, recs)


def test_controlnet_hint_is_the_mask(anons):
    b = anons["controlnet"].backend
    z = torch.randn(1, b.latent_channels, RES // 4, RES // 4)
    full, half = torch.ones(1, RES, RES, dtype=torch.bool), torch.zeros(1, RES, RES, dtype=torch.bool)
    half[:, :, : RES // 2] = True
    e_full, e_half = b._bound(full).eps(z, 500), b._bound(half).eps(z, 500)
    assert not torch.allclose(e_full, e_half)
    torch.testing.assert_close(b._bound(full).eps(z, 500), e_full)
    with pytest.raises(RuntimeError, match="prepare"):
        b.eps(z, 500)


def test_v_prediction_is_converted_to_eps(root):
    b = load_backend(build_tiny_latent(root, "kl", prediction_type="v_prediction"))
    assert b.prediction_type == "v_prediction"
    z = torch.randn(1, b.latent_channels, RES // 4, RES // 4)
    v = b.unet(z, torch.tensor([300])).sample
    a = float(b.alphas_cumprod[300])
    torch.testing.assert_close(b.eps(z, 300), a**0.5 * v + (1 - a) ** 0.5 * z)


def test_scheduler_betas_are_honoured(root, anons):
    from diffusers import DDIMScheduler

    b = anons["kl"].backend
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0015, beta_end=0.0195).alphas_cumprod
    torch.testing.assert_close(b.alphas_cumprod, ref.double())


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_layouts_are_clear_errors(root, tmp_path):
    kl = Path(build_tiny_latent(root, "kl"))
    cn = Path(build_tiny_latent(root, "controlnet"))
    # ControlNet without an autoencoder
    d = _copy(cn, tmp_path / "cn-no-vae")
    import shutil

    shutil.rmtree(d / "vae")
    with pytest.raises(InputError, match="controlnet/ without vae"):
        load_backend(d)
    # ControlNet next to a UNet2DModel
    d = _copy(kl, tmp_path / "kl-cn")
    shutil.copytree(cn / "controlnet", d / "controlnet")
    with pytest.raises(InputError, match="UNet2DConditionModel"):
        load_backend(d)
    # UNet and autoencoder from different pipelines
    d = _copy(kl, tmp_path / "mixed")
    shutil.rmtree(d / "vae")
    shutil.copytree(Path(build_tiny_latent(root, "vq")) / "vqvae", d / "vqvae")
    with pytest.raises(InputError, match="not from the same pipeline"):
        load_backend(d)
    # an autoencoder class anondata does not run
    d = _copy(kl, tmp_path / "odd")
    cfg = json.loads((d / "vae" / "config.json").read_text())
    cfg["_class_name"] = "AutoencoderTiny"
    (d / "vae" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="AutoencoderTiny"):
        load_backend(d)
    # weights missing
    d = _copy(kl, tmp_path / "noweights")
    (d / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(InputError, match="no weight file"):
        load_backend(d)


@pytest.mark.parametrize("change", [{"cross_attention_dim": 12}, {"block_out_channels": (8, 16), "norm_num_groups": 4}])
def test_controlnet_not_made_for_the_unet_is_refused_at_load(root, tmp_path, change):
    """A ControlNet made for another UNet (another text width, other block widths) loaded and then
    failed on the first model call, mid-job, with a shape-mismatch traceback on every record."""
    import shutil

    from diffusers import ControlNetModel, UNet2DConditionModel

    d = _copy(Path(build_tiny_latent(root, "controlnet")), tmp_path / "other-controlnet")
    shutil.rmtree(d / "controlnet")
    cfg = dict(sample_size=RES // 4, in_channels=4, out_channels=4, block_out_channels=(16, 32),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               layers_per_block=1, norm_num_groups=8, cross_attention_dim=8, attention_head_dim=4)
    other = UNet2DConditionModel(**{**cfg, **change})
    ControlNetModel.from_unet(other, conditioning_channels=1, conditioning_embedding_out_channels=(8, 8, 16)).save_pretrained(
        d / "controlnet")
    with pytest.raises(InputError, match=f"ControlNet.*{next(iter(change))}.*not made for this UNet"):
        load_backend(d)


@pytest.mark.parametrize("kind, part", [("vq", "vqvae"), ("controlnet", "controlnet")])
def test_pipeline_missing_a_part_its_model_index_names_is_refused(root, tmp_path, kind, part):
    """A pipeline folder copied or cached without its autoencoder (CompVis/ldm-celebahq-256's UNet
    takes 3 channels) loaded as a pixel model at the latent size and made noise for faces; without
    its ControlNet it ran the UNet alone. model_index.json says what the pipeline holds."""
    import shutil

    from anondata.backends import check_model, model_sha256

    d = _copy(Path(build_tiny_latent(root, kind)), tmp_path / f"no-{part}")
    (d / "model_index.json").write_text(json.dumps({
        "_class_name": "LDMPipeline", "_diffusers_version": "0.42.1", "scheduler": ["diffusers", "DDIMScheduler"],
        "unet": ["diffusers", "UNet2DModel"], "safety_checker": [None, None],
        **{p: ["diffusers", "X"] for p in ("vqvae", "vae", "controlnet") if (d / p).is_dir()}}))
    load_backend(d)  # complete: loads
    shutil.rmtree(d / part)
    for load in (load_backend, check_model, model_sha256):
        with pytest.raises(InputError, match=f"model_index.json names {part}/.*no {part}/config.json"):
            load(str(d))


def test_unet_needing_added_conditions_is_refused_at_load(root, tmp_path):
    """An SDXL-style UNet (addition_embed_type text_time) failed on its first call, mid-job."""
    import shutil

    from diffusers import UNet2DConditionModel

    d = _copy(Path(build_tiny_latent(root, "kl")), tmp_path / "sdxl-like")
    shutil.rmtree(d / "unet")
    UNet2DConditionModel(
        sample_size=RES // 4, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, norm_num_groups=8, cross_attention_dim=8, attention_head_dim=4,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=32,
    ).save_pretrained(d / "unet")
    with pytest.raises(InputError, match="added conditions.*text_time"):
        load_backend(d)


def test_identity_ignores_files_that_are_not_loaded(root, tmp_path):
    """A Hub snapshot and a `huggingface-cli download` copy of the same model may differ in extra
    files (flax weights, .ckpt); only what from_pretrained reads is the model."""
    kl = Path(build_tiny_latent(root, "kl"))
    d = _copy(kl, tmp_path / "extra")
    (d / "vae" / "diffusion_flax_model.msgpack").write_bytes(b"x")
    (d / "model.ckpt").write_bytes(b"y")
    assert weights_sha256(d) == weights_sha256(kl)
    (d / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"changed")
    assert weights_sha256(d) != weights_sha256(kl)


def test_identity_is_of_the_shards_diffusers_loads(tiny_model, tmp_path):
    """diffusers loads a sharded checkpoint's index before a single file beside it: the sha256 hashed
    the single file, so the same sha256 named a folder whose shards held other weights, and restore
    could not refuse them."""
    import shutil

    from diffusers import UNet2DModel

    d = _copy(Path(tiny_model), tmp_path / "both")
    unet = UNet2DModel.from_pretrained(Path(tiny_model) / "unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(1.0)
    unet.save_pretrained(d / "unet", max_shard_size="200KB")
    shutil.copy(Path(tiny_model) / "unet" / "diffusion_pytorch_model.safetensors", d / "unet")
    assert (d / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    z = torch.randn(1, 3, RES, RES)
    assert not torch.equal(load_backend(d).eps(z, 100), load_backend(tiny_model).eps(z, 100))
    assert weights_sha256(d) != weights_sha256(Path(tiny_model))
    shards_only = _copy(d, tmp_path / "shards")
    (shards_only / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert weights_sha256(d) == weights_sha256(shards_only)


@pytest.mark.parametrize("kind", ["pixel", "embedded", *KINDS])
def test_the_model_info_of_an_actor_is_known_without_its_weights(root, tiny_model, kind):
    """--resume compares what this run's workers would record with the written shards' markers
    (pipeline._same_marker_as_committed), on the driver, which may have no GPU: building the actor
    there loaded a whole model (a large Hub model: minutes, gigabytes). The model built without
    weights (on PyTorch's meta device, weights only hashed) gives the actor's string exactly, for
    each layout and scheme, and holds no weights."""
    from anondata.job.worker import AnonymizerActor, actor_model_json

    model = {"pixel": tiny_model, "embedded": "embedded"}.get(kind) or build_tiny_latent(root, kind)
    for sign_cell, background, centre in ((0, "noised", "mean-face"), (2, "inverted", "mean-face"), (0, "noised", "zero")):
        kw = dict(model=model, device="cpu", steps=3, inversion_iters=None, sign_cell=sign_cell, background=background,
                  flip_centre=centre, model_batch=1, face_spec={"mode": "aligned"}, lossless=True, recipients=[],
                  dataset_id="d")
        assert actor_model_json(**kw) == AnonymizerActor(**kw).model_json
    bare = load_backend(model, weights=False)
    modules = [bare.unet] + [getattr(bare, m) for m in ("vae", "controlnet") if getattr(bare, m, None) is not None]
    assert {p.device.type for m in modules for p in m.parameters()} == {"meta"}


def test_schedule_id_is_what_format_md_says():
    """docs/FORMAT.md, settings.schedule, gives the embedded prior's JSON text and id so that the
    id can be computed without anondata: the loader must produce exactly that."""
    text = ('{"beta_end":0.02,"beta_schedule":"squaredcos_cap_v2","beta_start":0.0001,"num_train_timesteps":1000,'
            '"prediction_type":"v_prediction","rescale_betas_zero_snr":true,"trained_betas":null}')
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == "9a8c88e50d46dfc5"
    assert load_backend("embedded", weights=False).schedule == "9a8c88e50d46dfc5"
    assert text in (Path(__file__).parents[1] / "docs" / "FORMAT.md").read_text()


def _fp32_flags() -> list[tuple]:
    """(object, attribute) of each setting backends.exact_float32 fixes inside model calls."""
    bk = torch.backends
    return [(bk.cuda.matmul, "fp32_precision"), (bk.cudnn.conv, "fp32_precision"), (bk.mkldnn.matmul, "fp32_precision"),
            (bk.mkldnn.conv, "fp32_precision"), (bk.cudnn, "deterministic"), (bk.cudnn, "benchmark")]


def _read_flags() -> tuple:
    return tuple(getattr(obj, name) for obj, name in _fp32_flags())


def _write_flags(values) -> None:
    for (obj, name), v in zip(_fp32_flags(), values):
        setattr(obj, name, v)


@pytest.mark.parametrize("kind", ["pixel", "controlnet"])
def test_model_calls_run_in_exact_float32_and_give_the_callers_flags_back(anons, tiny_model, faces, masks, kind):
    """dtype float32 in the manifest must mean IEEE float32 whatever the process set: a caller that
    turned on TF32 (GPU), bfloat16 oneDNN inner products (CPUs with bf16 units, as
    torch.set_float32_matmul_precision("medium") does) and cuDNN autotuning gets, inside every model
    call (UNet, ControlNet, autoencoder, decoder inversion's backward), IEEE float32 and deterministic
    cuDNN, the same bytes as under torch's defaults, and its own settings back afterwards."""
    if not hasattr(torch.backends.cudnn, "conv"):
        pytest.skip("torch < 2.9 has no per-operator fp32_precision")
    if kind == "pixel":
        anon = Anonymizer.from_pretrained(tiny_model, steps=STEPS, inversion_iters=ITERS)
        components = {"unet": anon.backend.unet}
    else:
        anon = anons[kind]
        components = {m: getattr(anon.backend, m) for m in ("unet", "controlnet", "vae")}
    keys, x, m = fixed_keys(2), faces[:2], masks[:2]
    ref_out, ref_recs = anon.anonymize(x, keys, masks=m)
    ref_back = anon.restore(ref_out, keys, ref_recs)

    seen: dict[tuple, set] = {}

    def record(where):
        seen.setdefault(where, set()).add(_read_flags())

    def hook(name):
        def fwd(module, args, out):
            record((name, "forward"))
            if out.requires_grad:  # decoder inversion: its backward runs after the forward returned
                out.register_hook(lambda g: record((name, "backward")))
        return fwd

    handles = [mod.register_forward_hook(hook(name)) for name, c in components.items()
               for mod in c.modules() if isinstance(mod, torch.nn.Conv2d)]
    callers = _read_flags()
    hostile = ("tf32", "tf32", "bf16", "bf16", False, True)
    assert all(h != c for h, c in zip(hostile, ("ieee", "ieee", "ieee", "ieee", True, False)))
    try:
        _write_flags(hostile)
        out, recs = anon.anonymize(x, keys, masks=m)
        back = anon.restore(out, keys, recs)
        after = _read_flags()
    finally:
        for h in handles:
            h.remove()
        _write_flags(callers)
    assert after == hostile
    expected = {(name, "forward") for name in components} | ({("vae", "backward")} if kind != "pixel" else set())
    assert set(seen) == expected
    assert all(v == {("ieee", "ieee", "ieee", "ieee", True, False)} for v in seen.values()), seen
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(back, ref_back)
    assert [r.to_bytes() for r in recs] == [r.to_bytes() for r in ref_recs]


def test_exact_float32_gives_a_legacy_api_caller_its_flags_back():
    """torch >= 2.9 raises when code reads its legacy allow_tf32 flags after a mix of the legacy and
    the per-operator API; exact_float32 uses the per-operator one, and a caller that set the legacy
    flags (as most training scripts do) must still read its own values after a model call."""
    from anondata.backends import exact_float32

    bk = torch.backends
    callers = (bk.cuda.matmul.allow_tf32, bk.cudnn.allow_tf32, bk.cudnn.benchmark)
    try:
        for on in (True, False):
            bk.cuda.matmul.allow_tf32 = bk.cudnn.allow_tf32 = bk.cudnn.benchmark = on
            with exact_float32():
                assert not bk.cudnn.benchmark and bk.cudnn.deterministic
            assert (bk.cuda.matmul.allow_tf32, bk.cudnn.allow_tf32, bk.cudnn.benchmark) == (on, on, on)
            assert torch.get_float32_matmul_precision() == ("high" if on else "highest")
    finally:
        bk.cuda.matmul.allow_tf32, bk.cudnn.allow_tf32, bk.cudnn.benchmark = callers
