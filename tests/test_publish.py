"""publish: the exact file set, the upload patterns, refusals. The network call is replaced."""

from __future__ import annotations

import fnmatch
import shutil

import pytest

from anondata.errors import AnondataError, InputError, IntegrityError
from anondata.identity import load_recipient
from anondata.job import publish as pub


@pytest.fixture()
def runner(identities):
    """The key that signed the `release` fixture: publish pins it."""
    return load_recipient(identities["runner"][1])


def _all_files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_public_file_set_excludes_keys(release, runner):
    out = release["dir"]
    files = pub.public_files(out, runner)
    shards = [f"data/train-0000{i}-of-00003.parquet" for i in range(3)]
    assert files == ["README.md", "manifest.json", "manifest.json.sig", *shards]
    with_keys = pub.public_files(out, runner, include_envelopes=True)
    assert with_keys == files + [f"keys/train-0000{i}-of-00003.keys.parquet" for i in range(3)]
    # the patterns upload_folder gets admit exactly these files from the folder
    for chosen in (files, with_keys):
        pats = pub.allow_patterns(chosen)
        admitted = [f for f in _all_files(out) if any(fnmatch.fnmatch(f, p) for p in pats)]
        assert admitted == sorted(chosen)


def test_publish_calls_upload_once_with_that_set(release, runner):
    calls = []
    files = pub.publish(release["dir"], "someone/faces-anon", signer=runner, private=True,
                        uploader=lambda *a, **k: calls.append((a, k)))
    assert len(calls) == 1
    (folder, repo, sent), kw = calls[0]
    assert repo == "someone/faces-anon" and sent == files and kw["private"] is True
    assert not any(f.startswith("keys/") for f in sent)
    assert pub.publish(release["dir"], "someone/x", signer=runner, dry_run=True, uploader=lambda *a, **k: 1 / 0) == files


def test_upload_passes_explicit_allow_patterns_to_huggingface_hub(release, runner, monkeypatch):
    import huggingface_hub

    seen = {}

    class FakeApi:
        def __init__(self, token=None):
            seen["token"] = token

        def create_repo(self, repo_id, repo_type, private, exist_ok):
            seen["create"] = (repo_id, repo_type, private, exist_ok)

        def upload_folder(self, **kw):
            seen["upload"] = kw
            return type("Info", (), {"commit_url": "https://hub/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    files = pub.public_files(release["dir"], runner)
    assert pub.upload(release["dir"], "me/ds", files, private=False) == "https://hub/commit/1"
    assert seen["create"] == ("me/ds", "dataset", False, True)
    up = seen["upload"]
    assert up["repo_type"] == "dataset" and up["allow_patterns"] == pub.allow_patterns(files)
    assert "ignore_patterns" not in up

    class Offline(FakeApi):
        def create_repo(self, *a, **k):
            raise ConnectionError("offline")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    with pytest.raises(InputError, match="upload to me/ds failed"):
        pub.upload(release["dir"], "me/ds", files)


class FakeRepo:
    """A Hub dataset repo as `HfApi` changes it, offline: upload_folder adds the local files that
    huggingface_hub's own pattern filter admits (its default ignore patterns included) and deletes
    the remote ones its delete_patterns match, sparing .gitattributes and files being added."""

    def __init__(self, files=(), private=None):
        self.files, self.private, self.calls = set(files) | {".gitattributes"}, private, []
        repo = self

        class Api:
            def __init__(self, token=None):
                pass

            def create_repo(self, repo_id, repo_type, private, exist_ok):
                repo.calls.append("create_repo")
                if repo.private is None:
                    repo.private = private

            def repo_info(self, repo_id, repo_type):
                return type("Info", (), {"private": repo.private})()

            def upload_folder(self, *, folder_path, allow_patterns, delete_patterns=None, ignore_patterns=None, **kw):
                from pathlib import Path

                from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
                from huggingface_hub.utils import filter_repo_objects

                repo.calls.append("upload_folder")
                local = _all_files(Path(folder_path))
                ignore = [*(ignore_patterns or []), *DEFAULT_IGNORE_PATTERNS]
                added = set(filter_repo_objects(local, allow_patterns=allow_patterns, ignore_patterns=ignore))
                deleted = set(filter_repo_objects(sorted(repo.files), allow_patterns=delete_patterns)) if delete_patterns else set()
                repo.files = (repo.files - (deleted - {".gitattributes"})) | added
                return type("Info", (), {"commit_url": "https://hub/commit/2"})()

        self.Api = Api


def test_republishing_leaves_no_file_of_an_earlier_release(release, runner, monkeypatch):
    """An earlier release's shards (another shard count) and envelope files stayed in the repo beside
    the new manifest: load_dataset read them as data, and the Hub copy failed verify."""
    import huggingface_hub

    repo = FakeRepo(["README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00003.parquet",
                     "keys/train-00000-of-00002.keys.parquet", "images/banner.png"])
    monkeypatch.setattr(huggingface_hub, "HfApi", repo.Api)
    files = pub.publish(release["dir"], "me/ds", signer=runner)
    assert repo.files == set(files) | {".gitattributes", "images/banner.png"}  # files outside data/, keys/ are kept
    with_keys = pub.publish(release["dir"], "me/ds", signer=runner, include_envelopes=True)
    assert repo.files == set(with_keys) | {".gitattributes", "images/banner.png"}
    pub.publish(release["dir"], "me/ds", signer=runner)
    assert repo.files == set(files) | {".gitattributes", "images/banner.png"}


def test_private_refuses_an_existing_public_repo(release, runner, monkeypatch):
    """create_repo(private=True, exist_ok=True) does not change an existing repo's visibility: with
    --private the release was uploaded to a public repo without a word."""
    import huggingface_hub

    public = FakeRepo(["README.md"], private=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", public.Api)
    with pytest.raises(InputError, match="already exists and is public; nothing was uploaded"):
        pub.publish(release["dir"], "me/ds", signer=runner, private=True)
    assert "upload_folder" not in public.calls and public.files == {".gitattributes", "README.md"}
    pub.publish(release["dir"], "me/ds", signer=runner)  # without --private a public repo is what was asked
    for repo in (FakeRepo(), FakeRepo(["README.md"], private=True)):  # new (made private), or already private
        monkeypatch.setattr(huggingface_hub, "HfApi", repo.Api)
        files = pub.publish(release["dir"], "me/ds", signer=runner, private=True)
        assert repo.private is True and set(files) <= repo.files


def test_a_failed_upload_says_whether_part_of_it_may_be_on_the_hub(release, runner, monkeypatch):
    """huggingface_hub commits a large upload in parts; a failure midway said only 'check your
    network', not that the repo may hold part of the release and a rerun finishes it."""
    import huggingface_hub

    repo = FakeRepo()

    class Midway(repo.Api):
        def upload_folder(self, **kw):
            raise ConnectionError("reset by peer")

    class NoRepo(repo.Api):
        def create_repo(self, *a, **k):
            raise ConnectionError("offline")

    monkeypatch.setattr(huggingface_hub, "HfApi", Midway)
    with pytest.raises(InputError, match="part of it may be on the Hub.*run the same `anondata publish` again"):
        pub.publish(release["dir"], "me/ds", signer=runner)
    monkeypatch.setattr(huggingface_hub, "HfApi", NoRepo)
    with pytest.raises(InputError, match="failed") as e:
        pub.publish(release["dir"], "me/ds", signer=runner)
    assert "part of it" not in str(e.value)  # nothing was sent


def test_refuses_unfinished_tampered_or_bad_repo(release, runner, identities, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(release["dir"], copy)
    with pytest.raises(InputError, match="USER/NAME"):
        pub.publish(copy, "not a repo", signer=runner, dry_run=True)
    (copy / ".anondata-work").mkdir()
    with pytest.raises(InputError, match="--resume"):
        pub.public_files(copy, runner)
    (copy / ".anondata-work").rmdir()
    shard = copy / "data" / "train-00001-of-00003.parquet"
    shard.write_bytes(shard.read_bytes() + b"x")
    with pytest.raises(AnondataError, match="train-00001"):
        pub.public_files(copy, runner)
    shutil.rmtree(copy)
    shutil.copytree(release["dir"], copy)
    shutil.rmtree(copy / "keys")  # a public copy can be re-published, not with envelopes
    assert pub.public_files(copy, runner)[-1].startswith("data/")
    with pytest.raises(InputError, match="keys/"):
        pub.public_files(copy, runner, include_envelopes=True)
    owner = load_recipient(identities["owner"][1])  # a release signed by another key is not published
    with pytest.raises(IntegrityError, match="not by the expected signer"):
        pub.public_files(copy, owner)


def test_glob_characters_in_names_are_escaped():
    assert pub.allow_patterns(["data/a[1]-*.parquet"]) == ["data/a[[]1]-[*].parquet"]
    assert fnmatch.fnmatch("data/a[1]-*.parquet", "data/a[[]1]-[*].parquet")
    assert not fnmatch.fnmatch("data/a1-x.parquet", "data/a[[]1]-[*].parquet")


def test_refuses_a_linked_card_or_manifest(tmp_path):
    """upload_folder follows links: a README.md linked to a private file (here a key) was listed
    and uploaded with the link's target as its content."""
    from pathlib import Path

    vectors = Path(__file__).parent / "vectors"
    alice = load_recipient(vectors / "alice.pub")
    root = tmp_path / "rel"
    shutil.copytree(vectors / "release", root)
    secret = tmp_path / "owner.key"
    secret.write_text("secret\n")
    (root / "README.md").symlink_to(secret)
    with pytest.raises(InputError, match="README.md: is a symbolic link"):
        pub.publish(root, "someone/x", signer=alice, dry_run=True)
    (root / "README.md").unlink()
    (root / "README.md").write_text("card\n")
    assert pub.publish(root, "someone/x", signer=alice, dry_run=True)[0] == "README.md"


def _card(faces=None, model_name="tiny", splits=None, **options):
    """dataset_card for a plan as plan.make_plan writes one (only the fields the card reads)."""
    from anondata.job.card import dataset_card

    plan = {
        "dataset_id": "0" * 32, "signer": "1" * 32,
        "source": {"kind": "parquet", "image_column": "image", "id_column": "record_id"},
        "options": {"faces": faces or {"mode": "aligned", "box": None, "detector": "hog", "on_no_face": "quarantine",
                                       "cross_check": None}, "drop_columns": [], "keep_columns": [], **options},
        "splits": splits or [{"name": "train", "rows": 4, "shards": [{}], "skipped": []}],
    }
    model = {"model": {"name": model_name, "sha256": "2" * 64}, "settings": {"steps": 10}}
    counts = {"anonymized": 3, "quarantined": 1, "skipped": sum(len(s["skipped"]) for s in plan["splits"])}
    return dataset_card(plan, model, counts)


def test_card_says_which_photos_were_published_without_a_face_anonymized():
    """With --faces detect --on-no-face keep the card said photos with no face found were
    quarantined, while they were published unchanged; and in detect mode it said every face was
    replaced, while a face the detectors miss is published as it is (README, "fail closed")."""
    detect = {"mode": "detect", "box": None, "detector": "hog", "on_no_face": "keep", "cross_check": "haar:x,2"}
    card = _card(detect)
    assert "no face found) were" not in card.replace("\n", " ")
    assert "Photos in which no face was found were published unchanged (`--on-no-face keep`)" in card
    assert "a face the detectors missed is published unchanged" in card and "`hog`" in card
    quarantine = _card({**detect, "on_no_face": "quarantine"})
    assert "no face found, a face only the cross-check found) were" in quarantine.replace("\n", " ")
    assert "--on-no-face keep" not in quarantine and "a face the detectors missed is published unchanged" in quarantine
    aligned = _card()
    assert "missed" not in aligned and "--on-no-face" not in aligned


def test_card_says_the_embedded_priors_weights_are_for_research_only():
    """The default model's weights are under CelebA's non-commercial research licence (README,
    MODEL_CARD.md), and every replacement face of a release made with it comes from them; the card
    said nothing of it, under `license: other` / "see-source-dataset"."""
    card = _card(model_name="embedded")
    assert "non-commercial research only" in card and "CelebA" in card
    assert "research" not in _card(model_name="google/ddpm-celebahq-256")


def test_card_input_records_count_the_rows_past_the_limit():
    """With --limit the card's "input records" column gave only the rows processed: 4 input records
    for a split of 6, beside "skipped records: 2"."""
    card = _card(splits=[{"name": "train", "rows": 4, "shards": [{}], "skipped": ["a", "b"]}])
    assert "| train | 6 | 1 |" in card and "skipped records: 2" in card


def test_card_names_no_fact_a_rewrap_or_publish_can_change():
    """The card gave the signer's fingerprint, stale once `rewrap --signing-key` re-signed the
    release (and an unsigned card cannot pin a key anyway), and said keys/ is kept private, false
    for `publish --include-envelopes`."""
    card = _card()
    assert "1" * 32 not in card  # the plan's signer fingerprint
    assert "anondata verify . --signer OWNER.pub" in card and "not from this repository" in card
    assert "kept private" not in card and "--include-envelopes" in card


@pytest.mark.parametrize("repo", ["user/name\n", "usér/name", "user/naмe", "user/name/x", "/name"])
def test_repo_ids_the_hub_refuses_are_refused_here(repo):
    """`$` let a trailing newline through and `\\w` any Unicode letter: the upload failed after the
    release's check, as a network error."""
    with pytest.raises(InputError, match="USER/NAME"):
        pub.publish("unused", repo, signer=None, dry_run=True)
