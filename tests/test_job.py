"""End to end on CPU with the tiny model: anonymize -> verify -> load_dataset -> restore, the
quarantine path, other source forms, refusals, and the CLI surface."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from anondata.errors import AnondataError, InputError, IntegrityError, KeyError_
from anondata.images import decode_image
from conftest import FAST, ROOT, encode, subprocess_env, synthetic_faces, write_face_parquet


def _public_rows(out) -> list[dict]:
    return [r for p in sorted((out / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_release_layout_verify_and_load_dataset(release, identities):
    import datasets

    from anondata.identity import load_recipient
    from anondata.manifest import read_manifest, verify_release

    out, rows = release["dir"], release["rows"]
    assert release["result"].anonymized == 6 and release["result"].quarantined == 1
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "data", "keys", "manifest.json", "manifest.json.sig"]
    assert sorted(p.name for p in (out / "data").iterdir()) == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    assert sorted(p.name for p in (out / "keys").iterdir()) == [f"train-0000{i}-of-00003.keys.parquet" for i in range(3)]
    # public files readable by others, envelopes private
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in [out / "README.md", out / "manifest.json"]} == {
        "README.md": "0o644", "manifest.json": "0o644"}
    assert oct((out / "keys" / "train-00000-of-00003.keys.parquet").stat().st_mode & 0o777) == "0o600"
    summary = verify_release(out, load_recipient(identities["runner"][1]))
    assert summary["counts"] == {"anonymized": 6, "quarantined": 1, "skipped": 0, "total": 7}

    m = read_manifest(out)
    q = [r for r in m["records"] if r["status"] == "quarantined"]
    assert [r["id"] for r in q] == ["rec-002"] and "rec-002" in q[0]["reason"]
    assert [r["id"] for r in m["records"]] == [r["record_id"] for r in rows]  # every input record, in order
    assert (m["settings"]["scheme"], m["settings"]["sign_cell"], m["settings"]["background"]) == (
        "anondata-signflip/3", 0, "noised")  # the default
    import jsonschema  # what the job writes (settings.schedule, extra) fits the published schema
    from pathlib import Path

    jsonschema.validate(m, json.loads((Path(__file__).parents[1] / "schemas" / "manifest.schema.json").read_text()))

    ds = datasets.load_dataset(str(out), split="train")
    assert ds.column_names == ["record_id", "image", "label", "caption"]
    assert ds.features["image"].__class__.__name__ == "Image"
    by_id = {r["record_id"]: r for r in rows}
    assert ds["record_id"] == [r["record_id"] for r in rows if r["record_id"] != "rec-002"]
    for rec in ds:
        src = by_id[rec["record_id"]]
        assert (rec["label"], rec["caption"]) == (src["label"], src["caption"])
        pub = np.asarray(rec["image"].convert("RGB"))
        orig = decode_image(src["image"]["bytes"], "x")[0]
        assert pub.shape == orig.shape
        assert np.abs(pub.astype(int) - orig.astype(int)).mean() > 3  # the face changed
    for r in _public_rows(out):  # never an original byte string, never the input file name, always PNG
        assert r["image"]["bytes"] != by_id[r["record_id"]]["image"]["bytes"]
        assert r["image"]["path"] is None and r["image"]["bytes"][:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and 'path: "data/train-*"' in card


def _secret_forms(release_dir, identities) -> dict:
    """Each anonymized record's key, opened with the owner's identity, in the forms a leak could
    take (raw, hex, base64 and unpadded base64url), and its restore record (which with the
    lossless residual reconstructs the original face)."""
    import base64

    from anondata.envelope import open_records
    from anondata.identity import load_identity, load_recipient
    from anondata.manifest import open_release, release_envelopes

    rel = open_release(release_dir, load_recipient(identities["runner"][1]))
    opened = open_records(release_envelopes(rel), load_identity(identities["owner"][0]), rel.manifest["dataset_id"])
    return {rid: ([k, k.hex().encode(), base64.b64encode(k), base64.urlsafe_b64encode(k).rstrip(b"=")], rr)
            for rid, (k, rr) in opened.items()}


def test_record_keys_are_in_no_public_file(release, identities):
    """README: "Keys are never logged and never in public files". Every file a publish uploads
    (card, manifest, signature, shards, and every decoded public image's pixels) holds no record
    key in any common encoding and no restore record; the keys/ files hold them only sealed."""
    out = release["dir"]
    secrets_ = _secret_forms(out, identities)
    assert len(secrets_) == release["result"].anonymized == 6
    public = [out / "README.md", out / "manifest.json", out / "manifest.json.sig", *sorted((out / "data").glob("*"))]
    blobs = {str(p): p.read_bytes() for p in public}
    for r in _public_rows(out):
        blobs[f"pixels of {r['record_id']}"] = decode_image(r["image"]["bytes"], "x")[0].tobytes()
    private = {str(p): p.read_bytes() for p in sorted((out / "keys").glob("*"))}
    assert len(blobs) == len(public) + 6 and len(private) == 3
    for rid, (forms, rr) in secrets_.items():
        assert len(rr) > 100
        for name, data in blobs.items():
            assert not any(f in data for f in forms) and rr not in data and rr[:24] not in data, (rid, name)
        for name, data in private.items():
            assert forms[0] not in data and rr[:24] not in data, (rid, name)


def test_restore_selected_ids_bit_exact_and_refusals(release, identities, tiny_model, tmp_path):
    from anondata.job.restore import run_restore

    out, rows = release["dir"], release["rows"]
    by_id = {r["record_id"]: r for r in rows}
    res = run_restore(str(out), identities["owner"][0], str(tmp_path / "r"), ids=["rec-001", "rec-005"],
                      png=True, model=tiny_model, signer_path=identities["runner"][1], progress=False)
    assert res.restored == 2
    got = _public_rows(tmp_path / "r")
    assert [g["record_id"] for g in got] == ["rec-001", "rec-005"]
    for g in got:  # rec-001 was a JPEG: restore gives its exact decoded pixels back
        want = decode_image(by_id[g["record_id"]]["image"]["bytes"], "x")[0]
        assert np.array_equal(decode_image(g["image"]["bytes"], "x")[0], want)
        assert (g["label"], g["caption"]) == (by_id[g["record_id"]]["label"], by_id[g["record_id"]]["caption"])
        assert (tmp_path / "r" / "png" / "train" / f"{g['record_id']}.png").is_file()

    with pytest.raises(KeyError_, match="rec-001"):  # a key that is no recipient: refused by id
        run_restore(str(out), identities["stranger"][0], str(tmp_path / "s"), ids=["rec-001"], model=tiny_model, signer_path=identities["runner"][1])
    with pytest.raises(InputError, match="rec-002.*quarantined"):
        run_restore(str(out), identities["owner"][0], str(tmp_path / "s"), ids=["rec-002"], model=tiny_model, signer_path=identities["runner"][1])
    with pytest.raises(InputError, match="nope"):
        run_restore(str(out), identities["owner"][0], str(tmp_path / "s"), ids=["nope"], model=tiny_model, signer_path=identities["runner"][1])
    with pytest.raises(InputError, match="not empty"):
        run_restore(str(out), identities["owner"][0], str(tmp_path / "r"), ids=["rec-001"], model=tiny_model, signer_path=identities["runner"][1])


def test_restore_key_only_when_the_lossless_check_fails(release, identities, tiny_model, tmp_path, monkeypatch):
    """Lossless restore is exact only with the arithmetic that anonymized the release, up to the one
    level of drift its snap absorbs: another device or library version (here: resizing back two
    levels off) fails the hash check, and restore left the owner with nothing. The error points at --key-only, which restores from the keys alone: closer to
    the original than the public image, not bit-exact, and the card says so."""
    from anondata import faces
    from anondata.job.restore import run_restore

    rows = {r["record_id"]: r for r in release["rows"]}
    real_up = faces._up
    monkeypatch.setattr(faces, "_up", lambda diff, place: real_up(diff, place) + 2.0)
    args = dict(ids=["rec-001", "rec-005"], model=tiny_model, signer_path=identities["runner"][1], progress=False)
    with pytest.raises(IntegrityError, match="lossless restore does not reproduce.*pass --key-only"):
        run_restore(str(release["dir"]), identities["owner"][0], str(tmp_path / "r"), **args)
    assert not (tmp_path / "r").exists()
    run_restore(str(release["dir"]), identities["owner"][0], str(tmp_path / "k"), key_only=True, **args)
    public = {r["record_id"]: r for r in _public_rows(release["dir"])}
    for g in _public_rows(tmp_path / "k"):
        want = decode_image(rows[g["record_id"]]["image"]["bytes"], "x")[0].astype(float)
        got = decode_image(g["image"]["bytes"], "x")[0].astype(float)
        anon = decode_image(public[g["record_id"]]["image"]["bytes"], "x")[0].astype(float)
        assert not np.array_equal(got, want) and np.abs(got - want).mean() < np.abs(anon - want).mean() / 2
    assert "--key-only" in (tmp_path / "k" / "README.md").read_text()

    from anondata.errors import FormatError
    from anondata.job.restore import _key_only

    with pytest.raises(FormatError, match="record 'rec-9': photo record"):  # a damaged record named by id
        _key_only(b"{}", "rec-9")


def test_restore_refuses_the_weights_with_another_noise_schedule(release, identities, tiny_model, tmp_path):
    """The records pin the weights' sha256, which does not cover the scheduler config: the same
    weights with edited betas passed that check and key-only restore came out wrong. The manifest
    names the schedule; restore refuses another, before writing anything."""
    import json

    from anondata.job.restore import run_restore
    from anondata.testing import with_edited_schedule

    m = json.loads((release["dir"] / "manifest.json").read_text())
    assert len(m["settings"]["schedule"]) == 16
    edited = with_edited_schedule(tiny_model, tmp_path / "edited")
    with pytest.raises(InputError, match="another noise schedule"):
        run_restore(str(release["dir"]), identities["owner"][0], str(tmp_path / "r"), ids=["rec-001"],
                    model=edited, signer_path=identities["runner"][1], progress=False)
    assert not (tmp_path / "r").exists()


def test_restore_and_eval_refuse_other_weights_up_front(release, identities, tiny_model, tmp_path):
    """Restore and eval load the release's model in one place; other weights are refused there,
    in one line, before anything is written (eval's check had no test)."""
    from anondata.eval.run import evaluate_release
    from anondata.identity import load_recipient
    from anondata.job.restore import run_restore

    with pytest.raises(InputError, match="was anonymized with model sha256 .*restore with the same --model"):
        run_restore(str(release["dir"]), identities["owner"][0], str(tmp_path / "r"), ids=["rec-001"],
                    model="embedded", signer_path=identities["runner"][1], progress=False)
    assert not (tmp_path / "r").exists()
    with pytest.raises(InputError, match="was anonymized with model sha256"):
        evaluate_release(str(release["dir"]), str(release["source"]), signer=load_recipient(identities["runner"][1]),
                         identity_path=identities["owner"][0], model="embedded")


def test_restore_through_a_grant_and_through_a_copy_of_keys(release, identities, tiny_model, tmp_path):
    import shutil

    from anondata.cli import main
    from anondata.errors import IntegrityError
    from anondata.job.restore import run_restore

    out, runner_pub = release["dir"], identities["runner"][1]
    by_id = {r["record_id"]: r for r in release["rows"]}
    assert main(["grant", str(out), "--signer", runner_pub, "--identity", identities["owner"][0],
                 "--to", identities["stranger"][1], "--ids", "rec-001", "--out", str(tmp_path / "g")]) == 0
    from anondata.errors import KeyError_

    with pytest.raises(KeyError_, match="rec-001.*--keys GRANT_DIR"):  # the grantee forgot --keys
        run_restore(str(out), identities["stranger"][0], str(tmp_path / "r"), ids=["rec-001"],
                    model=tiny_model, signer_path=runner_pub, progress=False)
    run_restore(str(out), identities["stranger"][0], str(tmp_path / "r"), keys=str(tmp_path / "g"),
                model=tiny_model, signer_path=runner_pub, progress=False)
    (got,) = _public_rows(tmp_path / "r")  # exactly the granted record, exactly its original pixels
    assert got["record_id"] == "rec-001"
    assert np.array_equal(decode_image(got["image"]["bytes"], "x")[0],
                          decode_image(by_id["rec-001"]["image"]["bytes"], "x")[0])
    # the public copy, with the owner's keys/ kept elsewhere: each file checked against this manifest
    public, private = tmp_path / "public", tmp_path / "private"
    shutil.copytree(out, public, ignore=shutil.ignore_patterns("keys"))
    shutil.copytree(out / "keys", private / "keys")
    run_restore(str(public), identities["owner"][0], str(tmp_path / "r2"), keys=str(private), ids=["rec-005"],
                model=tiny_model, signer_path=runner_pub, progress=False)
    assert [g["record_id"] for g in _public_rows(tmp_path / "r2")] == ["rec-005"]
    env = sorted((private / "keys").glob("*.parquet"))[0]
    env.write_bytes(env.read_bytes()[:-1] + bytes([env.read_bytes()[-1] ^ 1]))
    with pytest.raises(IntegrityError, match="SHA-256|bytes|rows"):
        run_restore(str(public), identities["owner"][0], str(tmp_path / "r3"), keys=str(private), ids=["rec-005"],
                    model=tiny_model, signer_path=runner_pub, progress=False)
    assert not (tmp_path / "r3").exists()


def test_failed_restore_leaves_no_half_restored_folder(release, identities, tiny_model, tmp_path, monkeypatch):
    import anondata.faces as faces_mod
    from anondata.errors import IntegrityError
    from anondata.job.restore import run_restore

    real, calls = faces_mod.restore_photos, []

    def second_fails(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise IntegrityError("record rec-005: lossless restore does not reproduce the original (simulated)")
        return real(*a, **kw)

    monkeypatch.setattr(faces_mod, "restore_photos", second_fails)
    with pytest.raises(IntegrityError, match="rec-005"):
        run_restore(str(release["dir"]), identities["owner"][0], str(tmp_path / "r"), ids=["rec-001", "rec-005"],
                    png=True, model=tiny_model, signer_path=identities["runner"][1], progress=False, batch_size=1)
    assert len(calls) == 2 and os.listdir(tmp_path) == []  # no --out folder, no hidden work folder


def test_sigterm_during_restore_leaves_no_half_restored_folder(release, identities, tiny_model, tmp_path):
    """SIGTERM (kill, a scheduler, `timeout`) ends a command like Ctrl-C: one line, exit 143, and
    the hidden work folder (original faces) is deleted. Python's default left it behind."""
    script = (
        "import os, signal, sys, time\n"
        "import anondata.faces as f\n"
        "f.restore_photos = lambda *a, **k: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(60))\n"
        "from anondata.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "o"
    out.parent.mkdir(exist_ok=True)
    r = subprocess.run(
        [sys.executable, "-c", script, "restore", str(release["dir"]), "--identity", identities["owner"][0],
         "--signer", identities["runner"][1], "--ids", "rec-001", "--out", str(out), "--model", tiny_model,
         "--no-progress"],
        capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=240,
    )
    assert r.returncode == 143, r.stderr[-2000:]
    assert r.stderr.strip() == "anondata restore: terminated; nothing was written to --out"
    assert os.listdir(tmp_path) == []  # no --out folder, no hidden work folder


def test_restore_cli_with_ids_file(release, identities, tiny_model, tmp_path):
    (tmp_path / "ids.txt").write_text("# wanted\nrec-006\n\n")
    r = subprocess.run(
        [sys.executable, "-m", "anondata.cli", "restore", str(release["dir"]), "--identity", identities["owner"][0], "--signer", identities["runner"][1],
         "--ids-file", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "o"), "--model", tiny_model, "--no-progress"],
        capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=240,
    )
    assert r.returncode == 0, r.stderr
    assert [g["record_id"] for g in _public_rows(tmp_path / "o")] == ["rec-006"]
    forms, _ = _secret_forms(release["dir"], identities)["rec-006"]  # keys are never logged
    assert not any(f.decode("latin-1") in r.stdout + r.stderr for f in forms), r.stdout + r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "anondata.cli", "restore", str(release["dir"]), "--identity", identities["stranger"][0], "--signer", identities["runner"][1],
         "--ids", "rec-000", "--out", str(tmp_path / "p"), "--model", tiny_model],
        capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=240,
    )
    assert r.returncode == 2 and "rec-000" in r.stderr and "Traceback" not in r.stderr


def test_progress_bar_only_on_a_terminal(release, identities, tiny_model, tmp_path):
    """The bar redraws with carriage returns: in a log file or a pipe (a scheduler, CI, `2> log`)
    it left one line of bar frames per update. It is drawn on a terminal, not elsewhere."""
    import fcntl
    import pty
    import struct
    import termios

    argv = [sys.executable, "-m", "anondata.cli", "restore", str(release["dir"]), "--identity", identities["owner"][0],
            "--signer", identities["runner"][1], "--ids", "rec-006", "--model", tiny_model]
    r = subprocess.run([*argv, "--out", str(tmp_path / "piped")], capture_output=True, text=True, env=subprocess_env(),
                       cwd=ROOT, timeout=240)
    assert r.returncode == 0 and "rec/s" not in r.stderr and "\r" not in r.stderr, r.stderr
    main_fd, tty = pty.openpty()
    fcntl.ioctl(tty, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 wide: no bar fits
    try:
        p = subprocess.run([*argv, "--out", str(tmp_path / "tty")], stdout=subprocess.PIPE, stderr=tty,
                           env=subprocess_env(), cwd=ROOT, timeout=240)
        os.close(tty)
        shown = b""
        while True:
            try:
                chunk = os.read(main_fd, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(main_fd)
    assert p.returncode == 0 and b"restore: 100%" in shown, shown


def test_png_names_never_fold_into_one_file():
    """restore --png named files by id, so ids 'A' and 'a' became A.png and a.png: one file on a
    case-insensitive file system (macOS's default), the second restore written over the first."""
    from anondata.job.restore import png_names

    names = png_names(["Alice", "alice", "bob", "a/b", "a_b"])
    assert len({n.casefold() for n in names.values()}) == 5
    assert names["bob"] == "bob.png" and names["a_b"] == "a_b.png"  # plain where nothing folds
    assert names["Alice"].startswith("Alice-") and names["alice"].startswith("alice-")


def test_ids_file_lines_are_ids_exactly(tmp_path):
    """An id may have a comma or spaces at either end (docs/FORMAT.md); --ids-file used to trim
    them away, so such a record could not be named. Lines are now taken as written (a CRLF file
    and a BOM too); --ids stays trimmed; an id that only differs in spaces is pointed out."""
    from anondata.errors import InputError
    from anondata.job.restore import check_ids, parse_ids

    (tmp_path / "ids.txt").write_bytes("\ufeffrec 1 \r\n# a comment\r\n\r\n   \n a,b\nrec-2".encode())
    assert parse_ids(" x , y,,", str(tmp_path / "ids.txt")) == ["x", "y", "rec 1 ", " a,b", "rec-2"]
    m = {"records": [{"id": "rec 1 ", "status": "anonymized"}, {"id": "rec-2", "status": "anonymized"}]}
    check_ids(m, ["rec 1 ", "rec-2"])
    with pytest.raises(InputError, match=r"not in this release: 'rec 1' \(did you mean 'rec 1 '\? ids are compared exactly"):
        check_ids(m, ["rec 1"])


def test_image_folder_derived_ids_and_quarantine_reasons(ray_address, identities, tiny_model, tmp_path):
    """Derived ids become a record_id column; a too-small image and an unreadable file are
    quarantined with their reasons while the others go through."""
    import datasets

    from anondata.job.pipeline import JobOptions, run_anonymize
    from anondata.job.restore import run_restore
    from anondata.manifest import read_manifest, verify_release

    imgs = synthetic_faces(3, seed=5)
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "a.png").write_bytes(encode(imgs[0]))
    (d / "b.jpg").write_bytes(encode(imgs[1], "JPEG"))
    (d / "c.png").write_bytes(encode(np.zeros((4, 4, 3), np.uint8)))  # too small to hold a face
    (d / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (d / "e.png").write_bytes(encode(imgs[2]))
    res = run_anonymize(JobOptions(
        source=str(d), out=str(tmp_path / "out"), recipients=[identities["owner"][1]],
        signing_key=identities["runner"][0], model=tiny_model, shard_size=10, batch_size=4,
        progress=False, splits=["faces"], **FAST,
    ))
    assert (res.anonymized, res.quarantined) == (3, 2)
    verify_release(tmp_path / "out")
    m = read_manifest(tmp_path / "out")
    reasons = {r["id"]: r["reason"] for r in m["records"] if r["status"] == "quarantined"}
    assert set(reasons) == {"faces-000002", "faces-000003"}
    assert "too small" in reasons["faces-000002"]
    # the runner's terminal is told which files those are (JobResult.quarantine); the public manifest is not
    assert [(rid, where) for rid, _, where in res.quarantine] == [("faces-000002", str(d / "c.png")),
                                                                  ("faces-000003", str(d / "d.png"))]
    assert b"c.png" not in (tmp_path / "out" / "manifest.json").read_bytes()
    ds = datasets.load_dataset(str(tmp_path / "out"), split="faces")
    assert ds.column_names == ["record_id", "image"] and ds["record_id"] == ["faces-000000", "faces-000001", "faces-000004"]
    run_restore(str(tmp_path / "out"), identities["owner"][0], str(tmp_path / "r"), ids=["faces-000001"],
                model=tiny_model, signer_path=identities["runner"][1], progress=False)
    got = _public_rows(tmp_path / "r")[0]
    assert np.array_equal(decode_image(got["image"]["bytes"], "x")[0], decode_image(encode(imgs[1], "JPEG"), "x")[0])


def test_job_options_take_no_extra():
    """JobOptions.extra was read by nothing: what a caller put there reached neither the plan nor
    the manifest's `extra` (which the job fills with what restore reads), without a word."""
    from anondata.job.options import JobOptions

    with pytest.raises(TypeError, match="extra"):
        JobOptions(source="s", out="o", recipients=[], signing_key="k", extra={"note": 1})


def test_refusals_before_any_work(identities, tiny_model, tmp_path):
    from anondata.job.pipeline import JobOptions, run_anonymize

    write_face_parquet(tmp_path / "f.parquet", 2)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    base = dict(source=str(tmp_path / "f.parquet"), recipients=[identities["owner"][1]],
                signing_key=identities["runner"][0], model=tiny_model, progress=False)
    with pytest.raises(InputError, match="not empty.*new --out"):
        run_anonymize(JobOptions(out=str(tmp_path / "busy"), **base))
    with pytest.raises(InputError, match="no interrupted job"):
        run_anonymize(JobOptions(out=str(tmp_path / "busy"), resume=True, **base))
    with pytest.raises(AnondataError):  # a public key is not a signing key
        run_anonymize(JobOptions(out=str(tmp_path / "n1"), **{**base, "signing_key": identities["runner"][1]}))
    with pytest.raises(InputError, match="--cross-check only applies to --faces detect"):
        run_anonymize(JobOptions(out=str(tmp_path / "n3"), cross_check="haar", **base))
    assert not (tmp_path / "n3").exists()
    # a release inside a folder source would be read as part of it on --resume; beside a file source is fine
    (tmp_path / "src").mkdir()
    write_face_parquet(tmp_path / "src" / "f.parquet", 2)
    with pytest.raises(InputError, match="inside the source folder"):
        run_anonymize(JobOptions(out=str(tmp_path / "src" / "rel"), **{**base, "source": str(tmp_path / "src")}))
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == ["f.parquet"]
    # duplicate ids are refused while planning, naming the id
    rows = write_face_parquet(tmp_path / "dup.parquet", 3)
    import pyarrow as pa

    t = pq.read_table(tmp_path / "dup.parquet")
    t = t.set_column(0, "record_id", pa.array(["a", "b", "a"]))
    pq.write_table(t, tmp_path / "dup.parquet")
    with pytest.raises(InputError, match="'a' appears twice"):
        run_anonymize(JobOptions(out=str(tmp_path / "n2"), **{**base, "source": str(tmp_path / "dup.parquet")}))
    assert rows


def test_finished_release_resume_is_a_no_op(release, identities, tiny_model, tmp_path):
    """--resume on a finished release (a kill while cleaning up) reports it and changes no byte of
    it (the release is the session's shared fixture). It reports success only for a release that
    verifies against the --signing-key: a changed shard or a re-signed copy is refused, not called
    complete. (_finished reading the manifest without verifying it passed the old test.)"""
    import shutil

    from anondata.errors import IntegrityError
    from anondata.identity import load_identity
    from anondata.job.pipeline import JobOptions, run_anonymize
    from anondata.manifest import read_manifest, write_signed_manifest

    def files(d):
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    def resume(out):
        return run_anonymize(JobOptions(
            source=str(release["source"]), out=str(out), recipients=[identities["owner"][1]],
            signing_key=identities["runner"][0], model=tiny_model, resume=True, progress=False,
        ))

    before = files(release["dir"])
    res = resume(release["dir"])
    assert (res.anonymized, res.quarantined, res.dataset_id) == (6, 1, release["result"].dataset_id)
    assert files(release["dir"]) == before
    copy = tmp_path / "copy"
    shutil.copytree(release["dir"], copy)
    shard = copy / "data" / "train-00001-of-00003.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="train-00001"):
        resume(copy)
    shutil.rmtree(copy)
    shutil.copytree(release["dir"], copy)
    stranger = load_identity(identities["stranger"][0])
    m = read_manifest(copy)
    m["signer"] = stranger.recipient.to_json()
    write_signed_manifest(copy, m, stranger)
    with pytest.raises(IntegrityError, match="not by the expected signer"):
        resume(copy)


def test_cli_help_and_argument_errors():
    from anondata.cli import build_parser

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "anondata.cli", *argv], capture_output=True, text=True,
                              env=subprocess_env(), cwd=ROOT, timeout=120)

    h = run("anonymize", "--help")
    assert h.returncode == 0
    for opt in ("--recipient", "--signing-key", "--image-column", "--id-column", "--split", "--limit",
                "--gpus", "--batch-size", "--resume", "--faces", "--on-no-face", "RAY_ADDRESS",
                "--drop-column", "--keep-column"):
        assert opt in h.stdout
    assert run("restore", "--help").returncode == 0 and "--ids-file" in run("restore", "--help").stdout
    assert "--include-envelopes" in run("publish", "--help").stdout
    bad = run("anonymize", "x", "--out", "o", "--recipient", "a.pub", "--signing-key", "b.key", "--face-box", "1,2,3")
    assert bad.returncode == 2 and "X0,Y0,X1,Y1" in bad.stderr
    missing = run("anonymize", "nowhere.parquet", "--out", "o", "--recipient", "nowhere.pub", "--signing-key", "b.key")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    names = build_parser()._subparsers._group_actions[0].choices
    assert {"anonymize", "restore", "publish", "demo"} <= set(names)


@pytest.mark.slow
def test_demo_end_to_end(ray_address, tiny_model, tmp_path):
    from PIL import Image

    from anondata.demo import run_demo

    logs = []
    res = run_demo(str(tmp_path / "demo"), model=tiny_model, progress=False, log=logs.append, **FAST)
    assert res.exact and res.records >= 2
    grid = Image.open(res.grid)
    assert grid.width > 4 * 200 and grid.height >= 2 * 256
    assert any("verify" in line for line in logs)
    assert json.loads((tmp_path / "demo" / "release" / "manifest.json").read_bytes())["counts"]["anonymized"] >= 2
    assert io  # (keeps the import list honest for helpers above)


def test_worker_user_errors_come_back_as_anondata_errors(identities, tmp_path):
    from anondata.job.pipeline import JobOptions, _user_error, run_anonymize

    class RayLike(Exception):
        pass

    wrapped = RayLike("The actor died ... \nanondata.errors.InputError: --model x: no such folder\n  more")
    assert isinstance(_user_error(wrapped), InputError) and str(_user_error(wrapped)) == "--model x: no such folder"
    chained = RayLike("task failed")
    chained.cause = KeyError_("no envelope for 'a'")
    assert isinstance(_user_error(chained), KeyError_)
    assert _user_error(RayLike("a real bug")) is None
    # and the common ones never reach Ray: checked before the plan is written
    write_face_parquet(tmp_path / "f.parquet", 2)
    base = dict(source=str(tmp_path / "f.parquet"), out=str(tmp_path / "o"), recipients=[identities["owner"][1]],
                signing_key=identities["runner"][0], progress=False)
    with pytest.raises(InputError, match="--model /no/such"):
        run_anonymize(JobOptions(model="/no/such", **base))
    with pytest.raises(InputError, match="--face-box"):
        run_anonymize(JobOptions(model=str(tmp_path), faces="detect", face_box=(0, 0, 20, 20), **base))
    assert not (tmp_path / "o").exists()


def test_detect_mode_cross_checks_by_default_fail_closed():
    """A face the first detector misses would be published in the clear, so the CLI and the job
    run a second detector unless told `none`; the plan records the detector actually used."""
    from anondata.cli import build_parser
    from anondata.job.pipeline import JobOptions
    from anondata.job.plan import face_spec

    args = build_parser().parse_args(["anonymize", "SRC", "--out", "OUT", "--recipient", "o.pub", "--signing-key", "r.key"])
    assert args.cross_check == "auto"

    def spec(**kw):
        return face_spec(JobOptions(source="s", out="o", recipients=[], signing_key="k", **kw))["cross_check"]

    assert spec(faces="detect") == "haar:frontalface_alt2,2"  # the Haar setting too (see the test below)
    assert spec(faces="detect", detector="haar") == "hog"
    assert spec(faces="detect", cross_check="mmod") == "mmod"
    assert spec(faces="detect", cross_check="none") is None
    assert spec(faces="aligned") is None  # one aligned face per image: nothing to cross-check


def test_plan_records_the_haar_setting_and_an_older_plan_resumes_with_its_own():
    """The Haar setting decides which photos are quarantined (and, with --detector haar, which
    faces are anonymized), so the plan and the manifest record it. Plans written before it changed
    say a bare "haar", which meant frontalface_default with minNeighbors 5: a --resume finishes such
    a job with that setting, and refuses to be told the new one, naming the plan's."""
    import dataclasses

    from anondata.job.pipeline import JobOptions
    from anondata.job.plan import check_given_against_plan, face_spec, options_from_plan

    kw = dict(source="s", out="o", recipients=[], signing_key="k")
    new = face_spec(JobOptions(faces="detect", **kw))
    assert (new["detector"], new["cross_check"]) == ("hog", "haar:frontalface_alt2,2")
    assert face_spec(JobOptions(faces="detect", detector="haar", **kw))["detector"] == "haar:frontalface_alt2,2"
    base = {"model": "m", "steps": -1, "inversion_iters": 4, "lossless": True, "shard_size": 10,
            "limit": 0, "image_column": "image", "id_column": "", "splits": [], "license": "other"}
    old_faces = {"mode": "detect", "detector": "hog", "on_no_face": "quarantine", "box": None, "cross_check": "haar"}
    got = options_from_plan(JobOptions(**kw), {"options": {**base, "faces": old_faces}})
    assert got.cross_check == "haar:frontalface_default,5" and got.detector == "hog"
    assert face_spec(got)["cross_check"] == "haar:frontalface_default,5"  # what the resumed workers run
    old_faces = {**old_faces, "detector": "haar", "cross_check": "hog"}
    got = options_from_plan(JobOptions(**kw), {"options": {**base, "faces": old_faces}})
    assert got.detector == "haar:frontalface_default,5"
    got = options_from_plan(JobOptions(**kw), {"options": {**base, "faces": new}})
    assert face_spec(got) == new  # a new plan resumes as written
    planned = options_from_plan(JobOptions(**kw), {"options": {**base, "faces": {**new, "cross_check": "haar"}}})
    given = dataclasses.replace(planned, cross_check="haar", given=frozenset({"cross_check"}))
    with pytest.raises(InputError, match="--cross-check \\(the plan has cross_check 'haar:frontalface_default,5'\\)"):
        check_given_against_plan(given, planned)


def test_lossy_release_restores_every_record_close_or_exact(ray_address, identities, tiny_model, tmp_path):
    """--lossy-restore: records stay key-only where key-only restore is good, and a face whose
    key-only restore would fall below the floor (30 dB) keeps its residual, so no record comes
    back far from the original. 32 px photos: crop = photo, so the floor applies to the photo."""
    from anondata.anonymizer import RESTORE_FLOOR_DB, masked_psnr
    from anondata.job.pipeline import JobOptions, run_anonymize
    from anondata.job.restore import run_restore

    rows = write_face_parquet(tmp_path / "f.parquet", 3, size=(32, 32), jpeg_every=0)
    res = run_anonymize(JobOptions(
        source=str(tmp_path / "f.parquet"), out=str(tmp_path / "out"), recipients=[identities["owner"][1]],
        signing_key=identities["runner"][0], model=tiny_model, lossless=False, progress=False,
        steps=4, inversion_iters=0,  # plain DDIM inversion: key-only restore falls below the floor
    ))
    assert res.anonymized == 3
    ids = [r["record_id"] for r in rows]
    run_restore(str(tmp_path / "out"), identities["owner"][0], str(tmp_path / "r"), ids=ids, model=tiny_model, signer_path=identities["runner"][1],
                progress=False)
    got = {r["record_id"]: decode_image(r["image"]["bytes"], "x")[0] for r in _public_rows(tmp_path / "r")}
    anon = {r["record_id"]: decode_image(r["image"]["bytes"], "x")[0] for r in _public_rows(tmp_path / "out")}
    everywhere = np.ones((32, 32), bool)
    for r in rows:
        orig = decode_image(r["image"]["bytes"], "x")[0]
        assert masked_psnr(orig, got[r["record_id"]], everywhere) >= RESTORE_FLOOR_DB
        assert masked_psnr(orig, anon[r["record_id"]], everywhere) < RESTORE_FLOOR_DB  # it was anonymized


def test_resume_keeps_the_scheme_of_the_plan():
    """A job planned before scheme v2 (no sign_cell in its plan) resumes with v1 signs, and one
    planned before v3 (no background) with the inverted background, so one release never mixes
    schemes; a later plan keeps its cell (-1, written by the first v2 plans for the default, is 0)
    and its background."""
    from anondata.job.pipeline import JobOptions
    from anondata.job.plan import options_from_plan

    faces = {"mode": "aligned", "detector": "hog", "on_no_face": "quarantine", "box": None, "cross_check": None}
    base = {"model": "m", "steps": -1, "inversion_iters": 4, "faces": faces, "lossless": True, "shard_size": 10,
            "limit": 0, "image_column": "image", "id_column": "", "splits": [], "license": "other"}
    for extra, want in (({}, (0, "inverted")), ({"sign_cell": 2}, (2, "inverted")),
                        ({"sign_cell": -1, "background": "noised"}, (0, "noised")),
                        ({"sign_cell": 0, "background": "inverted"}, (0, "inverted"))):
        opts = JobOptions(source="s", out="o", recipients=[], signing_key="k", sign_cell=7, background="noised")
        got = options_from_plan(opts, {"options": {**base, **extra}})
        assert (got.sign_cell, got.background) == want
    opts = JobOptions(source="s", out="o", recipients=[], signing_key="k")
    got = options_from_plan(opts, {"options": {**base, "background": "noised", "flip_centre": "zero"}})
    assert got.flip_centre == "zero"


def test_other_picture_columns_and_rows_past_limit(ray_address, identities, tiny_model, tmp_path):
    """The audit's leak: a second Image column, raw bytes and a list of images went to the public
    shards with the real faces. The job refuses such a source before any work, naming the
    columns; with --drop-column / --keep-column the release holds exactly the kept ones, with
    features metadata `datasets` loads. And every input record is in the manifest: the rows
    --limit cuts as skipped."""
    import datasets
    import pyarrow as pa

    from anondata.job.pipeline import JobOptions, run_anonymize
    from anondata.manifest import read_manifest, verify_release

    imgs = synthetic_faces(4)
    rows = [{"record_id": f"rec-{i}", "image": {"bytes": encode(a), "path": None},
             "original": {"bytes": encode(a), "path": f"alice_{i}.png"}, "thumb": encode(a[::2, ::2]),
             "gallery": [{"bytes": encode(a), "path": None}], "file_name": f"alice_{i}.png"} for i, a in enumerate(imgs)]
    feats = datasets.Features({"record_id": datasets.Value("string"), "image": datasets.Image(), "original": datasets.Image(),
                               "thumb": datasets.Value("binary"), "gallery": datasets.Sequence(datasets.Image()),
                               "file_name": datasets.Value("string")})
    src = tmp_path / "src.parquet"
    # metadata a tool wrote, of the schema and of a field: not published (shards.output_schema)
    schema = feats.arrow_schema.with_metadata({**feats.arrow_schema.metadata, b"tool": b"/home/alice/photos"})
    i = schema.get_field_index("file_name")
    schema = schema.set(i, schema.field(i).with_metadata({b"origin": b"alice's phone"}))
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), src)
    base = dict(source=str(src), recipients=[identities["owner"][1]], signing_key=identities["runner"][0],
                model=tiny_model, shard_size=2, batch_size=2, progress=False, **FAST)
    with pytest.raises(InputError, match="original .*thumb .*gallery .*--drop-column NAME.*--keep-column NAME"):
        run_anonymize(JobOptions(out=str(tmp_path / "refused"), **base))
    assert not (tmp_path / "refused").exists()

    out = tmp_path / "out"
    res = run_anonymize(JobOptions(out=str(out), drop_columns=["original", "gallery"], keep_columns=["thumb"], limit=3,
                                   **base))
    assert (res.anonymized, res.quarantined, res.skipped) == (3, 0, 1)
    verify_release(out)
    m = read_manifest(out)
    assert [(r["id"], r["status"]) for r in m["records"]] == [
        ("rec-0", "anonymized"), ("rec-1", "anonymized"), ("rec-2", "anonymized"), ("rec-3", "skipped")]
    assert "beyond --limit 3" in m["records"][3]["reason"]
    # own cache: datasets' cache key for a local folder named "out" can match another test's release
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert ds.column_names == ["record_id", "image", "thumb", "file_name"]
    assert ds["thumb"] == [r["thumb"] for r in rows[:3]] and ds["file_name"] == [r["file_name"] for r in rows[:3]]
    for p in (out / "data").glob("*.parquet"):
        features = json.loads(pq.read_schema(p).metadata[b"huggingface"])["info"]["features"]
        assert set(features) == {"record_id", "image", "thumb", "file_name"}
        assert set(pq.read_schema(p).metadata) == {b"huggingface"} and not any(t in p.read_bytes() for t in (b"alice's phone", b"/home/alice"))
    card = (out / "README.md").read_text()
    assert "except `gallery`, `original`" in card and "`thumb`: published unchanged" in card
    assert "skipped records: 1" in card


def test_restore_refuses_a_shard_that_lacks_or_repeats_a_wanted_record():
    """The manifest names the shard each record is in, but verify checks only the shard's row
    count: restore picked the rows it found and reported every wanted record restored, so a shard
    without one (or with it twice) gave a silent loss under a "restored N records" line."""
    from anondata.errors import IntegrityError
    from anondata.job.restore import shard_rows

    assert shard_rows(["a", "b", "c"], {"a", "c"}, "data/x.parquet") == [0, 2]
    with pytest.raises(IntegrityError, match=r"data/x\.parquet.*'d'"):
        shard_rows(["a", "b", "c"], {"a", "d"}, "data/x.parquet")
    with pytest.raises(IntegrityError, match=r"data/x\.parquet.*'a'"):
        shard_rows(["a", "b", "a"], {"a"}, "data/x.parquet")


def test_refused_ids_are_named_with_their_own_status_and_reason():
    """restore and grant refused quarantined and skipped ids in one line under the first one's
    status: a skipped record was reported as quarantined (and the reverse), with another record's
    reason."""
    from anondata.job.restore import check_ids

    m = {"records": [
        {"id": "q", "split": "train", "status": "quarantined", "reason": "unreadable image"},
        {"id": "s", "split": "train", "status": "skipped", "reason": "beyond --limit 1: not processed, not published"},
        {"id": "a", "split": "train", "status": "anonymized", "shard": 0},
    ]}
    check_ids(m, ["a"])
    for ids in (["q", "s", "a"], ["s", "q"]):
        with pytest.raises(InputError) as e:
            check_ids(m, ids)
        msg = str(e.value)
        assert "'q' was quarantined (unreadable image)" in msg and "'s' was skipped (beyond --limit 1" in msg, msg
        assert "'a'" not in msg and msg.count("\n") == 0
