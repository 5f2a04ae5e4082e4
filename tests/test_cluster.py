"""A local 2-node Ray cluster (`ray start --head` + `ray start --address` on this machine) runs
the job, and the job survives one worker node being killed mid-job.

Each `ray start --block` runs in its own process group, so the test stops exactly the
processes it started (os.killpg on those groups) and never touches other Ray instances on
the machine, as a global `ray stop` would. The GCS health check is shortened so the dead
node is noticed in seconds."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

import pytest

from conftest import FAST, ROOT, subprocess_env, write_face_parquet
from test_resume import CORRUPT, check_exactly_once

N = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([_ray_bin(), "start", "--block", *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def _wait_started(proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if "Ray runtime started" in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"ray start failed:\n{log.read_text(errors='replace')[-3000:]}")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this test created: only its processes
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


ACTOR = "ray::MapWorker(MapBatches(AnonymizerActor))"  # Ray's process title for the job's actors


def _node_actors(node: subprocess.Popen) -> dict[int, str]:
    """pid -> process title of the job's actors on the node that this `ray start` runs. Ray's
    worker processes leave the node's process group (each is a session of its own) but are
    children of the node's raylet, which stays in it."""
    ps = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,pgid=,args="], capture_output=True, text=True, check=True)
    table = [(int(f[0]), int(f[1]), int(f[2]), f[3] if len(f) > 3 else "")
             for f in (line.split(None, 3) for line in ps.stdout.splitlines())]
    raylets = {pid for pid, _, pgid, args in table if pgid == node.pid and args.split(None, 1)[0].endswith("raylet")}
    return {pid: args for pid, ppid, _, args in table if ppid in raylets and args.startswith(ACTOR)}


def _alive(pid: int) -> bool:
    """Running, not a zombie (a process whose parent died may stay one where nothing reaps it)."""
    ps = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True)
    return ps.stdout.strip()[:1] not in ("", "Z")


@pytest.mark.slow
def test_two_node_cluster_survives_losing_a_worker_node(identities, tiny_model, tmp_path):
    """Each node has one CPU and a CPU actor asks for one (pipeline._dataset), so each holds one of
    the job's two actors (with two CPUs each, Ray's default placement may put both on the head, and
    the kill then lost no actor at all). Whichever actor loads its model first could do every record while
    the other still loads: so once a shard is committed the head's actor is paused (SIGSTOP) until
    the worker node's actor is in the middle of a call, and the node is killed then, with records
    in flight on it. Those records must be redone, not dropped nor quarantined as crashes."""
    temp = Path(tempfile.mkdtemp(prefix="adray-", dir="/tmp"))  # short: Unix socket paths are limited
    port = _free_port()
    env = subprocess_env(RAY_health_check_period_ms=500, RAY_health_check_failure_threshold=3,
                         RAY_health_check_initial_delay_ms=0, RAY_USAGE_STATS_ENABLED=0)
    env.pop("RAY_ADDRESS", None)
    common = ["--num-cpus", "1", "--object-store-memory", str(100 * 2**20), "--disable-usage-stats"]
    head = worker = job = None
    paused: list[int] = []  # the head's actors while the worker node's actor takes records
    try:
        head = _start(["--head", "--port", str(port), "--temp-dir", str(temp), "--include-dashboard", "false",
                       "--node-ip-address", "127.0.0.1", *common], tmp_path / "head.log", env)
        _wait_started(head, tmp_path / "head.log")
        worker = _start(["--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1", *common],
                        tmp_path / "worker.log", env)
        _wait_started(worker, tmp_path / "worker.log")

        src = tmp_path / "faces.parquet"
        rows = write_face_parquet(src, N, corrupt=CORRUPT)
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "anondata.cli", "anonymize", str(src), "--out", str(out),
               "--recipient", identities["owner"][1], "--signing-key", identities["runner"][0],
               "--model", tiny_model, "--steps", str(FAST["steps"]), "--inversion-iters", str(FAST["inversion_iters"]),
               "--shard-size", "2", "--batch-size", "1", "--workers", "2", "--no-progress"]
        job = subprocess.Popen(cmd, env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        done = out / ".anondata-work" / "done"
        busy: list[int] = []  # the worker node's actors in the middle of a call: records in flight
        deadline = time.time() + 150
        while time.time() < deadline and job.poll() is None and not busy:
            if done.is_dir() and any(done.iterdir()):
                if not paused:
                    paused = list(_node_actors(head))
                    for pid in paused:
                        os.kill(pid, signal.SIGSTOP)
                busy = [pid for pid, title in _node_actors(worker).items() if title.startswith(f"{ACTOR}.submit")]
            time.sleep(0.1)
        assert job.poll() is None, "the job ended before the node could be killed"
        assert busy, "the worker node's actor never took a record: killing the node would lose nothing"
        committed_at_kill = len(list(done.iterdir()))
        _stop(worker)  # the worker node dies mid-job: raylet, its actor with its records, its objects
        worker = None
        for pid in paused:
            os.kill(pid, signal.SIGCONT)
        paused = []
        _, err = job.communicate(timeout=180)
        assert job.returncode == 0, err[-4000:]
        assert 0 < committed_at_kill < N // 2  # it really was mid-job
        assert not any(_alive(pid) for pid in busy), "the worker node's actor outlived its node"
        # every record once, anonymized or (the corrupt ones) quarantined: those in flight on the
        # lost actor were redone, neither dropped nor quarantined as a worker crash
        check_exactly_once(out, rows)
    finally:
        for pid in paused:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if job is not None and job.poll() is None:
            job.kill()
        _stop(worker)
        _stop(head)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_address_where_no_cluster_answers_fails_at_once(identities, tiny_model, tmp_path):
    """A stale RAY_ADDRESS: one line naming it, exit 2, no job folder left, in seconds. ray.init
    retried such an address for about 13 minutes with a C++ warning every few seconds (and with
    RAY_ADDRESS=auto and no cluster it raised a traceback, leaving a plan that demanded --resume)."""
    src = tmp_path / "faces.parquet"
    write_face_parquet(src, 2)
    with socket.socket() as s:  # a port where nothing listens: bound, never listening
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
        r = subprocess.run(
            [sys.executable, "-m", "anondata.cli", "anonymize", str(src), "--out", str(tmp_path / "out"),
             "--recipient", identities["owner"][1], "--signing-key", identities["runner"][0], "--model", tiny_model,
             "--no-progress"],
            env=subprocess_env(RAY_ADDRESS=address), cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and f"RAY_ADDRESS={address}: no Ray cluster answers there" in r.stderr
    assert not (tmp_path / "out").exists()
