"""`anondata keygen | verify | grant | rewrap` end to end, through the real CLI dispatcher."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anondata.cli import main
from anondata.envelope import open_records, seal_records, write_envelope_table
from anondata.errors import IntegrityError, KeyError_
from anondata.identity import load_identity, load_recipient
from anondata.manifest import (
    build_manifest,
    file_entry,
    open_release,
    read_manifest,
    release_envelopes,
    verify_release,
    write_grant,
    write_signed_manifest,
)

REPO = Path(__file__).parents[1]


def envelopes(root, signer_pub, keys=None):
    """Envelope tables the way restore gets them: through a release verified against a pinned signer."""
    return release_envelopes(open_release(root, load_recipient(signer_pub)), keys)


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture()
def release(tmp_path, capsys):
    """Keys for owner/other/new and a 6-record release sealed to the owner."""
    return _release(tmp_path, capsys, [f"r{i}" for i in range(6)])


def _release(tmp_path, capsys, ids, shard="data/train-00000-of-00001.parquet",
             keys="keys/train-00000-of-00001.keys.parquet"):
    for name, extra in (("owner", []), ("other", ["--pq"]), ("new", [])):
        code, out, _ = cli(capsys, "keygen", tmp_path / name, *extra)
        assert code == 0 and "fingerprint" in out
    owner = load_identity(tmp_path / "owner.key")
    root = tmp_path / "rel"
    (root / shard).parent.mkdir(parents=True)
    did = secrets.token_hex(16)
    secrets_by_id = {i: (secrets.token_bytes(32), os.urandom(50)) for i in ids}
    pq.write_table(pa.table({"id": ids, "image": [b"png"] * len(ids)}), root / shard)
    write_envelope_table(root / keys, seal_records([owner.recipient], did, [(i, *secrets_by_id[i]) for i in ids]))
    m = build_manifest(root, dataset_id=did, model={"name": "m", "sha256": "0" * 64}, settings={"steps": 2},
                       recipients=[owner.recipient], signer=owner.recipient, shard_paths=[shard], envelope_paths=[keys],
                       records=[{"id": i, "split": "train", "status": "anonymized", "shard": shard} for i in ids])
    write_signed_manifest(root, m, owner)
    return tmp_path, root, did, secrets_by_id


def test_keygen_files(tmp_path, capsys):
    code, out, _ = cli(capsys, "keygen", tmp_path / "k" / "alice", "--pq")
    assert code == 0
    assert stat.S_IMODE(os.stat(tmp_path / "k/alice.key").st_mode) == 0o600
    assert load_recipient(tmp_path / "k/alice.pub").kem == "MLKEM768-X25519"
    assert load_identity(tmp_path / "k/alice.key").fingerprint in out
    code, _, err = cli(capsys, "keygen", tmp_path / "k" / "alice")
    assert code == 2 and "already exists" in err and "Traceback" not in err


@pytest.mark.parametrize("name", [".key", "k/.pub"])
def test_keygen_name_that_is_only_a_suffix_is_one_error_line(tmp_path, capsys, monkeypatch, name):
    """NAME `.key` (or `dir/.pub`) leaves no name once the suffix is dropped: it ended in a
    ValueError traceback from Path.with_name('')."""
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "keygen", name)
    assert code == 2 and "not a usable NAME" in err and err.count("\n") == 1, err
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_verify_ok_and_failures(release, capsys):
    tmp, root, did, _ = release
    code, out, _ = cli(capsys, "verify", root, "--signer", tmp / "owner.pub")
    assert code == 0 and out.startswith("ok: 1 shards, 1 envelope files, 6 records")
    assert load_identity(tmp / "owner.key").fingerprint in out
    code, out, _ = cli(capsys, "verify", root)
    assert code == 0 and "not pinned" in out
    code, _, err = cli(capsys, "verify", root, "--signer", tmp / "new.pub")
    assert code == 2 and "not by the expected signer" in err
    shard = root / "data/train-00000-of-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(data)
    code, _, err = cli(capsys, "verify", root)
    assert code == 2 and "shard data/train-00000-of-00001.parquet" in err and "SHA-256" in err
    assert err.count("\n") == 1


def test_grant_then_restore_exactly_those(release, capsys):
    tmp, root, did, secrets_by_id = release
    grant = tmp / "grant"
    code, out, err = cli(capsys, "grant", root, "--identity", tmp / "owner.key", "--to", tmp / "other.pub",
                         "--ids", "r1,r4", "--out", grant, "--signer", tmp / "owner.pub")
    assert code == 0, err
    assert sorted(os.listdir(grant)) == ["grant.json", "grant.json.sig", "grant.keys.parquet"]
    other = load_identity(tmp / "other.key")
    tables = envelopes(root, tmp / "owner.pub", grant)
    assert open_records(tables, other, did) == {i: secrets_by_id[i] for i in ("r1", "r4")}
    with pytest.raises(KeyError_, match="r2"):
        open_records(tables, other, did, ids=["r2"])
    with pytest.raises(KeyError_):  # nothing of the full release either
        open_records(envelopes(root, tmp / "owner.pub"), other, did)
    # a grant signed by someone who is not a recipient of the release (HPKE base mode lets anyone
    # seal to other.pub): refused, naming the granter
    forged = tmp / "forged"
    write_grant(forged, tables[0], load_identity(tmp / "new.key"), [other.recipient], did,
                verify_release(root)["manifest_sha256"])
    with pytest.raises(IntegrityError, match="not a recipient of this release"):
        envelopes(root, tmp / "owner.pub", forged)
    # tampered grant file: caught by the signed hash
    gfile = grant / "grant.keys.parquet"
    b = bytearray(gfile.read_bytes())
    b[len(b) // 2] ^= 1
    gfile.write_bytes(b)
    with pytest.raises(IntegrityError, match="SHA-256"):
        envelopes(root, tmp / "owner.pub", grant)
    # bad ids, non-owner, existing out dir: one clear line each
    for argv, msg in [
        (["--identity", tmp / "owner.key", "--ids", "nope", "--out", tmp / "g2"], "'nope'"),
        (["--identity", tmp / "new.key", "--ids", "r1", "--out", tmp / "g3"], "no envelope"),
        (["--identity", tmp / "owner.key", "--ids", "r1", "--out", grant], "not empty"),
        (["--identity", tmp / "owner.pub", "--ids", "r1", "--out", tmp / "g4"], "public key"),
    ]:
        code, _, err = cli(capsys, "grant", root, "--to", tmp / "other.pub", "--signer", tmp / "owner.pub", *argv)
        assert code == 2 and msg in err and "Traceback" not in err, err
    # the grant folder given where the release goes: says which is which
    for cmd in (["verify", grant], ["grant", grant, "--identity", tmp / "other.key", "--to", tmp / "new.pub", "--ids",
                                    "r1", "--out", tmp / "g5", "--signer", tmp / "owner.pub"]):
        code, _, err = cli(capsys, *cmd)
        assert code == 2 and "a grant folder, not a release" in err and "--keys" in err, err


def test_a_grant_is_authenticated_by_its_signature(release, capsys):
    """A grant folder travels to the grantee by any channel, and HPKE base mode lets anyone seal
    keys of their choosing to the grantee. Only grant.json.sig stops someone who can write the
    folder from swapping in such a table, fixing grant.json's hash to match and keeping the
    owner as `granted_by`: restore would then give back faces of their choosing. Every byte change
    of grant.json or grant.json.sig is refused too. (read_grant without its signature check passed
    every other test: only a grant by a non-recipient and a changed table file were tried.)"""
    import hashlib
    import json
    import random

    from anondata import canonical
    from anondata.errors import FormatError

    tmp, root, did, secrets_by_id = release
    grant = tmp / "grant"
    code, _, err = cli(capsys, "grant", root, "--identity", tmp / "owner.key", "--to", tmp / "other.pub",
                       "--ids", "r1,r4", "--out", grant, "--signer", tmp / "owner.pub")
    assert code == 0, err
    other = load_identity(tmp / "other.key")
    rel = open_release(root, load_recipient(tmp / "owner.pub"))
    assert open_records(release_envelopes(rel, grant), other, did) == {i: secrets_by_id[i] for i in ("r1", "r4")}
    gjson, gsig, gtable = (grant / n for n in ("grant.json", "grant.json.sig", "grant.keys.parquet"))
    good = {p: p.read_bytes() for p in (gjson, gsig, gtable)}

    rng = random.Random(5)
    for path in (gjson, gsig):
        size = len(good[path])
        for pos in (range(size) if size <= 300 else rng.sample(range(size), 300)):
            bad = bytearray(good[path])
            bad[pos] ^= rng.randrange(1, 256)
            path.write_bytes(bytes(bad))
            with pytest.raises((IntegrityError, FormatError)):
                release_envelopes(rel, grant)
                pytest.fail(f"{path.name} byte {pos} changed, grant accepted")
        path.write_bytes(good[path])

    evil = seal_records([other.recipient], did, [(i, b"\xee" * 32, b"evil") for i in ("r1", "r4")])
    write_envelope_table(gtable, evil)
    doc = json.loads(good[gjson])
    doc["envelopes"] = [{"bytes": gtable.stat().st_size, "path": "grant.keys.parquet", "rows": 2,
                         "sha256": hashlib.sha256(gtable.read_bytes()).hexdigest()}]
    gjson.write_bytes(canonical.dumps(doc) + b"\n")  # valid, consistent, still "granted by" the owner
    with pytest.raises(IntegrityError, match="signature does not verify"):
        release_envelopes(rel, grant)
    for p, data in good.items():
        p.write_bytes(data)
    assert open_records(release_envelopes(rel, grant), other, did) == {i: secrets_by_id[i] for i in ("r1", "r4")}


def test_commands_that_use_a_release_need_its_signer_pinned(release, capsys):
    tmp, root, did, _ = release
    grant = ["grant", root, "--identity", tmp / "owner.key", "--to", tmp / "other.pub", "--ids", "r1", "--out", tmp / "g"]
    for argv in (grant,
                 ["restore", root, "--identity", tmp / "owner.key", "--out", tmp / "r"],
                 ["rewrap", root, "--identity", tmp / "owner.key", "--to", tmp / "new.pub"],
                 ["publish", root, "--repo", "someone/x", "--dry-run"],
                 ["eval", root, "--source", root / "data", "--report", tmp / "e"]):
        code, _, err = cli(capsys, *argv)
        assert code == 2 and "--signer" in err and "Traceback" not in err, (argv[0], err)
    assert not any((tmp / d).exists() for d in ("g", "r", "e"))
    # mallory re-signs the release over envelopes of her own (anyone can seal to owner.pub): refused
    mallory = tmp / "mallory"
    assert cli(capsys, "keygen", mallory)[0] == 0
    env = root / "keys/train-00000-of-00001.keys.parquet"
    write_envelope_table(env, seal_records([load_recipient(tmp / "owner.pub")], did,
                                           [(f"r{i}", b"\xee" * 32, b"evil") for i in range(6)]))
    m = read_manifest(root)
    m["envelopes"] = [file_entry(root, "keys/train-00000-of-00001.keys.parquet", "envelopes")]
    m["signer"] = load_recipient(tmp / "mallory.pub").to_json()
    write_signed_manifest(root, m, load_identity(tmp / "mallory.key"))
    code, _, err = cli(capsys, *grant, "--signer", tmp / "owner.pub")
    assert code == 2 and "not by the expected signer" in err and not (tmp / "g").exists(), err
    code, out, err = cli(capsys, *grant, "--any-signer")  # on purpose: it opens, and says it did not check
    assert code == 0 and "not checked" in err, err


def test_rewrap_rotates_and_resigns(release, capsys):
    tmp, root, did, secrets_by_id = release
    shard_before = (root / "data/train-00000-of-00001.parquet").read_bytes()
    code, out, err = cli(capsys, "rewrap", root, "--identity", tmp / "owner.key", "--to", tmp / "new.pub",
                         "--signing-key", tmp / "new.key", "--signer", tmp / "owner.pub")
    assert code == 0, err
    assert (root / "data/train-00000-of-00001.parquet").read_bytes() == shard_before
    new = load_identity(tmp / "new.key")
    s = verify_release(root, new.recipient)
    assert s["signer"] == new.fingerprint
    assert open_records(envelopes(root, tmp / "new.pub"), new, did) == secrets_by_id
    with pytest.raises(KeyError_):
        open_records(envelopes(root, tmp / "new.pub"), load_identity(tmp / "owner.key"), did)
    assert [r["fingerprint"] for r in read_manifest(root)["recipients"]] == [new.fingerprint]
    assert oct(os.stat(root / "keys/train-00000-of-00001.keys.parquet").st_mode & 0o777) == "0o600"
    # the old key can no longer rewrap
    code, _, err = cli(capsys, "rewrap", root, "--identity", tmp / "owner.key", "--to", tmp / "other.pub",
                       "--signer", tmp / "new.pub")
    assert code == 2 and "no envelope" in err
    # default signing key is --identity's
    code, _, err = cli(capsys, "rewrap", root, "--identity", tmp / "new.key", "--to", tmp / "other.pub", "--to", tmp / "new.pub",
                       "--signer", tmp / "new.pub")
    assert code == 0, err
    verify_release(root, new.recipient)
    assert open_records(envelopes(root, tmp / "new.pub"), load_identity(tmp / "other.key"), did) == secrets_by_id


def test_rewrap_by_a_key_that_lost_access_changes_nothing(release, capsys):
    tmp, root, did, _ = release
    assert cli(capsys, "rewrap", root, "--identity", tmp / "owner.key", "--to", tmp / "new.pub",
               "--signing-key", tmp / "new.key", "--signer", tmp / "owner.pub")[0] == 0
    before = {p: p.read_bytes() for p in (root / "manifest.json", root / "manifest.json.sig")}
    code, _, err = cli(capsys, "rewrap", root, "--identity", tmp / "owner.key", "--to", tmp / "new.pub",
                       "--signer", tmp / "new.pub")
    assert code == 2 and "nothing to rewrap" in err and "owner" in err, err
    assert all(p.read_bytes() == b for p, b in before.items())  # not re-signed by the revoked key


def test_id_and_path_mistakes_get_one_line_errors(release, capsys):
    tmp, root, did, _ = release
    base = ["--identity", tmp / "owner.key", "--signer", tmp / "owner.pub"]
    code, _, err = cli(capsys, "restore", root, *base, "--ids", "", "--out", tmp / "all")  # an empty $IDS is not "all"
    assert code == 2 and "no record ids" in err and not (tmp / "all").exists()
    code, _, err = cli(capsys, "grant", root, *base, "--to", tmp / "other.pub", "--ids", "nosuch", "--out", tmp / "g")
    assert code == 2 and "not in this release" in err and "'nosuch'" in err
    (tmp / "afile").write_text("")
    code, _, err = cli(capsys, "grant", root, *base, "--to", tmp / "other.pub", "--ids", "r1", "--out", tmp / "afile" / "g")
    assert code == 2 and "afile" in err and "Traceback" not in err and err.count("\n") == 1, err
    m = (root / "manifest.json").read_bytes()
    (root / "manifest.json").write_bytes(m.replace(b'"counts":{', b'"counts":{"total":1,', 1))
    code, _, err = cli(capsys, "verify", root)
    assert code == 2 and "manifest.json" in err and "duplicate object key 'total'" in err, err


def test_ids_with_spaces_or_commas_are_granted_through_ids_file(tmp_path, capsys):
    """Record ids may begin or end with a space (docs/FORMAT.md); --ids-file used to strip every
    line, so such a record could not be granted or restored by id at all."""
    tmp, root, did, secrets_by_id = _release(tmp_path, capsys, [" lead", "trail ", "a,b", "r1", "#c"])
    base = ["--identity", tmp / "owner.key", "--signer", tmp / "owner.pub", "--to", tmp / "other.pub"]
    (tmp / "ids.txt").write_text("# comment\n lead\ntrail \n\na,b\n")
    code, out, err = cli(capsys, "grant", root, *base, "--ids-file", tmp / "ids.txt", "--out", tmp / "g")
    assert code == 0, err
    opened = open_records(envelopes(root, tmp / "owner.pub", tmp / "g"), load_identity(tmp / "other.key"), did)
    assert opened == {i: secrets_by_id[i] for i in (" lead", "trail ", "a,b")}
    code, _, err = cli(capsys, "grant", root, *base, "--ids", " lead", "--out", tmp / "g2")  # --ids items are stripped
    assert code == 2 and "'lead'" in err and "did you mean ' lead'" in err and err.count("\n") == 1, err


def test_rewrap_of_envelope_files_in_subfolders(tmp_path, capsys):
    """Envelope paths may have folders (docs/FORMAT.md); roll_forward listed only the top of
    .rewrap/keys/, took the folder for an unlisted file, and every such rewrap failed and left
    .rewrap/ behind (so publish refused the release) however often it was rerun."""
    tmp, root, did, secrets_by_id = _release(tmp_path, capsys, ["r0", "r1"], shard="data/train/a.parquet",
                                             keys="keys/train/a.keys.parquet")
    code, out, err = cli(capsys, "rewrap", root, "--identity", tmp / "owner.key", "--to", tmp / "new.pub",
                         "--signer", tmp / "owner.pub")
    assert code == 0 and "rewrapped 2 records" in out, err
    assert not (root / ".rewrap").exists()
    assert open_records(envelopes(root, tmp / "owner.pub"), load_identity(tmp / "new.key"), did) == secrets_by_id


def test_an_output_path_that_is_a_file_is_named_as_one(release, capsys):
    """--out / --report naming a file was refused as "folder is not empty"."""
    tmp, root, _, _ = release
    (tmp / "afile").write_text("")
    base = ["--identity", tmp / "owner.key", "--signer", tmp / "owner.pub"]
    for argv in (["grant", root, *base, "--to", tmp / "other.pub", "--ids", "r1", "--out", tmp / "afile"],
                 ["restore", root, *base, "--out", tmp / "afile"],
                 ["eval", root, *base, "--source", root, "--report", tmp / "afile"]):
        code, _, err = cli(capsys, *argv)
        assert code == 2 and "afile: is a file, not a folder" in err and err.count("\n") == 1, err
        # a file on the way was mkdir's "File exists" after the release had been read
        argv[-1] = tmp / "afile" / "sub"
        code, _, err = cli(capsys, *argv)
        assert code == 2 and "afile is a file, not a folder" in err and err.count("\n") == 1, err
    (tmp / "full").mkdir()
    (tmp / "full" / "x").write_text("")
    code, _, err = cli(capsys, "restore", root, *base, "--out", tmp / "full")
    assert code == 2 and "full: folder is not empty" in err, err


def test_outputs_inside_the_release_folder_are_refused(release, capsys):
    """Restored originals, granted keys or a report's grid of real faces written inside the release
    folder would be published with it (or break its verify); refused before any work, also through
    a link to it."""
    tmp, root, _, _ = release
    (tmp / "link").symlink_to(root)
    base = ["--identity", tmp / "owner.key", "--signer", tmp / "owner.pub"]
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    for out in (root / "restored", root / "data" / "x", tmp / "link" / "y", root):
        for argv in (["grant", root, *base, "--to", tmp / "other.pub", "--ids", "r1", "--out", out],
                     ["restore", root, *base, "--out", out],
                     ["eval", root, *base, "--source", root, "--report", out]):
            code, _, err = cli(capsys, *argv)
            assert code == 2 and "inside the release folder" in err and err.count("\n") == 1, (argv, err)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_interrupted_grant_leaves_nothing_behind(release, capsys, monkeypatch):
    import anondata.manifest as manifest_mod

    tmp, root, _, _ = release
    real = manifest_mod._write_grant_files

    def half_then_fail(out, table, *a):
        real(out, table, *a)
        raise KeyError_("disk full (simulated)")

    monkeypatch.setattr(manifest_mod, "_write_grant_files", half_then_fail)
    code, _, err = cli(capsys, "grant", root, "--identity", tmp / "owner.key", "--to", tmp / "other.pub",
                       "--ids", "r1", "--out", tmp / "g", "--signer", tmp / "owner.pub")
    assert code == 2 and "disk full" in err
    assert not (tmp / "g").exists() and not [p for p in os.listdir(tmp) if p.startswith(".g.")]
    monkeypatch.undo()
    code, _, err = cli(capsys, "grant", root, "--identity", tmp / "owner.key", "--to", tmp / "other.pub",
                       "--ids", "r1", "--out", tmp / "g", "--signer", tmp / "owner.pub")
    assert code == 0 and sorted(os.listdir(tmp / "g")) == ["grant.json", "grant.json.sig", "grant.keys.parquet"], err


def _rewrap_killed(tmp, root, crash_at=None):
    """Run rewrap in a child process, SIGKILLed at `crash_at` (anondata.job.journal.crash_hook)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if crash_at:
        env["ANONDATA_TEST_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-c", "import sys; from anondata.cli import main; sys.exit(main(sys.argv[1:]))",
                           "rewrap", str(root), "--identity", str(tmp / "owner.key"), "--to", str(tmp / "new.pub"),
                           "--signer", str(tmp / "owner.pub")],
                          env=env, capture_output=True, text=True, timeout=120)


def test_rewrap_killed_after_staging_completes_on_rerun(release):
    tmp, root, did, secrets_by_id = release
    before = {p: p.read_bytes() for p in [root / "manifest.json", root / "keys/train-00000-of-00001.keys.parquet"]}
    r = _rewrap_killed(tmp, root, "rewrap-staged:0")
    assert r.returncode == -9, r.stderr
    assert all(p.read_bytes() == b for p, b in before.items())  # nothing renamed yet
    assert (root / ".rewrap/manifest.json.sig").is_file()
    verify_release(root)  # the release as it was still verifies
    r = _rewrap_killed(tmp, root)
    assert r.returncode == 0 and "completed an interrupted rewrap" in r.stdout, r.stderr
    assert not (root / ".rewrap").exists()
    verify_release(root)
    assert open_records(envelopes(root, tmp / "owner.pub"), load_identity(tmp / "new.key"), did) == secrets_by_id


def test_rewrap_half_staged_or_half_renamed_recovers(release, capsys):
    from anondata.commands.rewrap import roll_forward

    tmp, root, did, secrets_by_id = release
    # an interrupted staging (no staged signature): the leftovers are dropped, the release is as it was
    (root / ".rewrap/keys").mkdir(parents=True)
    (root / ".rewrap/keys/train-00000-of-00001.keys.parquet").write_bytes(b"partial")
    (root / ".rewrap/manifest.json").write_bytes(b"{")
    assert roll_forward(root) is False and not (root / ".rewrap").exists()
    verify_release(root)
    # killed between renames (envelopes and manifest moved, signature still staged): rerun completes
    assert _rewrap_killed(tmp, root, "rewrap-staged:0").returncode == -9
    for name in ("keys/train-00000-of-00001.keys.parquet", "manifest.json"):
        os.replace(root / ".rewrap" / name, root / name)
    with pytest.raises(IntegrityError, match="interrupted rewrap is staged in .rewrap/: run the same `anondata rewrap`"):
        verify_release(root)  # the old signature over the new manifest: loud, never a silent pass, and says why
    # the same command again (the staged manifest is signed by its --signing-key, here --identity's)
    code, out, err = cli(capsys, "rewrap", root, "--identity", tmp / "owner.key", "--to", tmp / "new.pub",
                         "--signer", tmp / "owner.pub")
    assert code == 0 and "completed an interrupted rewrap" in out, err
    verify_release(root)
    assert open_records(envelopes(root, tmp / "owner.pub"), load_identity(tmp / "new.key"), did) == secrets_by_id


_KILL_AT_NTH_CALL = """
import os, shutil, signal, sys
n, calls = int(os.environ["KILL_AT"]), [0]
def counted(real):
    def call(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    return call
os.replace, shutil.rmtree = counted(os.replace), counted(shutil.rmtree)
from anondata.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signing", ["identity", "new"])
def test_rewrap_killed_at_any_rename_or_removal_is_finished_by_the_same_command(tmp_path, capsys, signing):
    """Killed after the staged signature was renamed into place but before the stage was removed,
    rewrap left a .rewrap/ without a signature: publish said to run the same rewrap again, and
    that rerun took the leftover for an unfinished staging, dropped it and failed ("nothing to
    rewrap", or with --signing-key "signed by new, not by the expected signer owner", which reads
    as tampering). Every kill point (each rename and removal) must leave the release as it was,
    a stage the same command finishes, or the finished release (that publish takes); and then the
    new key opens everything, the old nothing."""
    import shutil

    from anondata.errors import AnondataError
    from anondata.job.publish import public_files

    tmp, root, did, secrets_by_id = _release(tmp_path, capsys, ["r0", "r1", "r2"])
    (root / "README.md").write_text("card\n")
    pristine = tmp / "pristine"
    shutil.copytree(root, pristine)
    argv = ["rewrap", str(root), "--identity", str(tmp / "owner.key"), "--to", str(tmp / "new.pub"),
            "--signer", str(tmp / "owner.pub")] + (["--signing-key", str(tmp / "new.key")] if signing == "new" else [])
    signer = load_recipient(tmp / ("new.pub" if signing == "new" else "owner.pub"))
    new, old = load_identity(tmp / "new.key"), load_identity(tmp / "owner.key")

    def as_it_was() -> bool:
        try:
            rel = open_release(root, load_recipient(tmp / "owner.pub"))
            return open_records(release_envelopes(rel), old, did) == secrets_by_id
        except AnondataError:
            return False

    def finished() -> bool:
        try:
            rel = open_release(root, signer)
            assert open_records(release_envelopes(rel), new, did) == secrets_by_id
        except AnondataError:
            return False
        with pytest.raises(KeyError_):
            open_records(release_envelopes(rel), old, did)
        return not (root / ".rewrap").exists()

    env = dict(os.environ, PYTHONPATH=str(REPO))
    for n in range(1, 30):
        shutil.rmtree(root)
        shutil.copytree(pristine, root)
        r = subprocess.run([sys.executable, "-c", _KILL_AT_NTH_CALL, *argv], env=dict(env, KILL_AT=str(n)),
                           capture_output=True, text=True, timeout=120)
        if r.returncode == 0:
            break  # past the last kill point
        assert r.returncode == -9, r.stderr
        if not (root / ".rewrap").exists():  # nothing staged to finish: the release as it was, or finished
            assert as_it_was() or finished(), n
        if not finished():
            code, _, err = cli(capsys, *argv)
            assert code == 0, (n, err)
        assert finished(), n
        public_files(root, signer)  # publish takes it
    else:
        pytest.fail("rewrap never ran to the end")
    assert n > 6  # it was killed at every rename: 3 staged files, then the renames into place


def test_rewrap_on_public_copy_fails_cleanly(release, capsys):
    import shutil

    tmp, root, _, _ = release
    shutil.rmtree(root / "keys")
    code, _, err = cli(capsys, "rewrap", root, "--identity", tmp / "owner.key", "--to", tmp / "new.pub",
                       "--signer", tmp / "owner.pub")
    assert code == 2 and "keys/" in err


def test_keygen_and_verify_do_not_import_torch(release):
    tmp, root, _, _ = release
    code = (
        "import sys; from anondata.cli import main; "
        f"rc = main(['verify', {str(root)!r}]); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_help_texts(capsys):
    for cmd in ("keygen", "verify", "grant", "rewrap", "restore", "publish", "eval"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert len(capsys.readouterr().out) > 300


def test_every_help_fits_a_terminal(monkeypatch):
    """No --help line runs on for hundreds of characters: descriptions given to the raw formatter
    (kept for the epilogs' tables) came out as one line each (anonymize, grant, eval)."""
    from anondata.cli import build_parser

    monkeypatch.setenv("COLUMNS", "80")
    parser = build_parser()
    subs = parser._subparsers._group_actions[0].choices
    for name, sub in [("", parser), *subs.items()]:
        longest = max(sub.format_help().splitlines(), key=len)
        assert len(longest) <= 120, f"anondata {name} --help: {longest[:80]}..."


def test_errors_escape_control_and_bidi_characters_from_names(tmp_path, capsys):
    """Error lines carry names taken from the data (an image folder's file names, column names) that
    the person running the command did not choose: an ESC sequence there could rewrite the screen
    or the window title, a bidi override reorder the line. They are shown escaped."""
    from anondata.errors import shown

    assert shown("a\x1b]0;t\x07b \u202eexe.png é 中") == "a\\x1b]0;t\\x07b \\u202eexe.png é 中"
    code, _, err = cli(capsys, "verify", tmp_path / "rel\x1b[2J\u202e")
    assert code == 2 and "rel\\x1b[2J\\u202e" in err and "\x1b" not in err and "\u202e" not in err


def test_rewrap_renames_are_durable_before_the_stage_is_removed(tmp_path, capsys, monkeypatch):
    """roll_forward renamed the staged envelopes, manifest and signature into place, deleted the
    stage and reported success without an fsync of the folders renamed into: a power cut soon
    after could bring back the old envelopes (sealed to OLD.key only, which a rotation away
    from a compromised key then destroys) with no stage left to finish from."""
    import shutil

    import anondata.files as files_mod
    from anondata.commands.rewrap import roll_forward

    tmp, root, did, secrets_by_id = _release(tmp_path, capsys, ["r0", "r1"], shard="data/train/a.parquet",
                                             keys="keys/train/a.keys.parquet")
    assert _rewrap_killed(tmp, root, "rewrap-staged:0").returncode == -9
    events = []
    real_replace, real_fsync, real_rmtree = os.replace, files_mod.fsync_dir, shutil.rmtree
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", Path(b).parent)) or real_replace(a, b))
    monkeypatch.setattr(files_mod, "fsync_dir", lambda p: events.append(("fsync", Path(p))) or real_fsync(p))
    monkeypatch.setattr(shutil, "rmtree", lambda p, *a, **kw: events.append(("rmtree", Path(p))) or real_rmtree(p, *a, **kw))
    assert roll_forward(root) is True
    monkeypatch.undo()
    gone = events.index(("rmtree", root / ".rewrap.done"))  # the stage, renamed away once finished
    into = {d for kind, d in events if kind == "replace"}
    assert into == {root / "keys" / "train", root}
    for d in into:
        last = max(i for i, e in enumerate(events) if e == ("replace", d))
        assert ("fsync", d) in events[last:gone], (d, events)
    verify_release(root)
    assert open_records(envelopes(root, tmp / "owner.pub"), load_identity(tmp / "new.key"), did) == secrets_by_id


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_keygen_help_says_which_key_file_modes_are_refused(tmp_path, capsys):
    """The help said a key file is refused if group/others "can read it"; the code (and
    docs/FORMAT.md) refuses any group/others permission bit, e.g. a group-writable 0620 file."""
    with pytest.raises(SystemExit):
        main(["keygen", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "can read" not in text and "any permission for group or others" in text
    assert cli(capsys, "keygen", tmp_path / "alice")[0] == 0
    for mode in (0o620, 0o601, 0o610):
        os.chmod(tmp_path / "alice.key", mode)
        with pytest.raises(KeyError_, match="chmod 600"):
            load_identity(tmp_path / "alice.key")


def test_a_key_file_passed_as_ids_file_is_never_printed(release, capsys):
    """--ids-file and --identity both take a file: swapped, the identity's JSON line became one
    unknown id, and the error printed it whole, secrets included, to the terminal (and any log)."""
    import json

    tmp, root, _, _ = release
    secrets_ = list(json.loads((tmp / "owner.key").read_text()).values())
    pem = tmp / "pem.key"  # another tool's private key
    pem.write_text("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIBz1q4Yh0aMa1n6X2b7Hf5nGqvVZ8pSWk3n1RDnWmV0c\n"
                   "-----END PRIVATE KEY-----\n")
    base = ["--identity", tmp / "owner.key", "--signer", tmp / "owner.pub"]
    for ids in (["--ids-file", tmp / "owner.key"], ["--ids-file", pem], ["--ids", (tmp / "owner.key").read_text()]):
        for argv in (["grant", root, *base, "--to", tmp / "other.pub", *ids, "--out", tmp / "g"],
                     ["restore", root, *base, *ids, "--out", tmp / "r"]):
            code, out, err = cli(capsys, *argv)
            assert code == 2 and "key" in err and err.count("\n") == 1, err
            for s in [*secrets_, "MC4CAQAwBQYDK2VwBCIEIBz1q4Yh0aMa1n6X2b7Hf5nGqvVZ8pSWk3n1RDnWmV0c"]:
                if s not in ("owner", "X25519", "anondata-identity", 1):
                    assert str(s) not in out + err, err
    assert not (tmp / "g").exists() and not (tmp / "r").exists()


def test_anonymize_and_demo_out_that_is_a_file_is_named_as_one(release, capsys):
    """anonymize --out FILE said "FILE: File exists; check the path (its folders must exist and be
    writable)", demo "Not a directory": neither says the path is a file, which grant, restore and
    eval do. Refused before any work, the file untouched."""
    tmp, root, _, _ = release
    (tmp / "afile").write_text("x")
    for resume in ([], ["--resume"]):
        code, _, err = cli(capsys, "anonymize", root / "data", "--out", tmp / "afile", "--recipient", tmp / "owner.pub",
                           "--signing-key", tmp / "owner.key", *resume)
        assert code == 2 and "afile: is a file, not a folder" in err and err.count("\n") == 1, err
    code, _, err = cli(capsys, "demo", "--out", tmp / "afile")
    assert code == 2 and "afile: is a file, not a folder" in err and err.count("\n") == 1, err
    assert (tmp / "afile").read_text() == "x"


def test_a_failed_demo_leaves_no_folder_in_the_way(tmp_path, capsys):
    """A demo that failed (a mistyped --model, Ctrl-C) left its folder with the sample photos and
    keys in it, and the rerun was refused as "not empty" until the user removed it by hand. The
    folder it made is removed; one that was there (empty) is left empty."""
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new" / "demo", tmp_path / "empty"):
        code, _, err = cli(capsys, "demo", "--out", out, "--model", tmp_path / "nosuch", "--no-progress")
        assert code == 2 and "nosuch" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]
    assert list((tmp_path / "new").iterdir()) == [] and list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("signal_exc", ["KeyboardInterrupt", "Terminated"])
def test_an_interrupted_command_says_what_is_left_and_what_to_do(release, capsys, monkeypatch, signal_exc):
    """Ctrl-C (or SIGTERM) printed only "anondata anonymize: interrupted": nothing said that the
    finished shards are kept and --resume finishes the job, nor that restore wrote nothing."""
    import anondata.cli as cli_mod
    import anondata.job.pipeline as pipeline
    import anondata.job.restore as restore_mod

    exc = cli_mod.Terminated if signal_exc == "Terminated" else KeyboardInterrupt

    def stop(*a, **kw):
        raise exc()

    monkeypatch.setattr(pipeline, "run_anonymize", stop)
    monkeypatch.setattr(restore_mod, "run_restore", stop)
    tmp, root, _, _ = release
    code, _, err = cli(capsys, "anonymize", root / "data", "--out", tmp / "a", "--recipient", tmp / "owner.pub",
                       "--signing-key", tmp / "owner.key")
    assert code in (130, 143) and err.count("\n") == 1 and "--resume" in err, err
    code, _, err = cli(capsys, "restore", root, "--identity", tmp / "owner.key", "--signer", tmp / "owner.pub",
                       "--out", tmp / "r")
    assert code in (130, 143) and err.count("\n") == 1 and "nothing was written" in err, err


def test_every_command_help_shows_an_example_that_parses():
    """Only anonymize and eval showed an example; keygen, verify, restore, grant, rewrap, publish
    and demo did not. Each example line must also parse with the command's own parser (so it
    cannot drift from the options), and the top-level help names the workflow's order."""
    import shlex

    from anondata.cli import build_parser

    parser = build_parser()
    subs = parser._subparsers._group_actions[0].choices
    assert "anondata keygen" in parser.format_help() and "anondata anonymize" in parser.format_help()
    for name, sub in subs.items():
        text = sub.format_help()
        assert "\nexamples:\n" in text, f"anondata {name} --help has no examples"
        lines = text.split("\nexamples:\n", 1)[1].replace("\\\n", " ").splitlines()
        examples = [ln.strip() for ln in lines if ln.strip().startswith(f"anondata {name}")]
        assert examples, name
        for ex in examples:
            argv = shlex.split(ex.split("  #")[0])[2:]
            sub.parse_args(argv)  # SystemExit (with usage on stderr) if an example does not parse


def test_an_unwritable_output_folder_is_named_not_a_temp_file(release, capsys, monkeypatch):
    """In a folder it cannot write, keygen said "/abs/path/.alice.key.m49wutdo.tmp: Permission
    denied" and grant/restore "ro/.g1.1194b03c.tmp: ...": hidden temp names the user never typed.
    The error names the path they gave (restore and eval write through the same files.new_folder as
    grant). mkstemp/mkdtemp fail here as they do there: run as root, a chmod 555 folder would not
    stop them."""
    import errno
    import tempfile

    def refused(*a, prefix="", suffix="", dir=None, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(str(dir), f"{prefix}x1y2z3{suffix}"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    tmp, root, _, _ = release
    base = ["--identity", tmp / "owner.key", "--signer", tmp / "owner.pub"]
    for argv, named in ((["keygen", tmp / "ro" / "alice"], "alice.key"),
                        (["grant", root, *base, "--to", tmp / "other.pub", "--ids", "r1", "--out", tmp / "ro" / "g"], "g")):
        code, _, err = cli(capsys, *argv)
        assert code == 2 and f"{tmp / 'ro' / named}: Permission denied" in err and ".tmp" not in err, err
        assert err.count("\n") == 1, err
