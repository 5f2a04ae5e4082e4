"""Envelope cost: seal and open per second on one core, bytes per envelope, and the crypto's
share of a record's anonymization cost.

    PYTHONPATH=. python benchmarks/envelope_throughput.py [--records 300] [--restore-bytes 400]
        [--anon-seconds S | --measure-tiny] [--json OUT]

The anonymization cost per record is taken from --anon-seconds, or measured with the tiny core
model (anondata.testing.tiny_model_dir, 32x32, the sampler's default steps) with --measure-tiny
(a lower bound: real models are far slower, so the real crypto share is smaller still).
Single-threaded on purpose: numbers are per core.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from anondata.envelope import envelope_table_bytes, open_records, seal_records  # noqa: E402
from anondata.identity import generate_identity  # noqa: E402


def bench(pq: bool, n: int, restore_bytes: int, recipients: int) -> dict:
    idents = [generate_identity(pq=pq, name=f"r{i}") for i in range(recipients)]
    did = secrets.token_hex(16)
    items = [(f"rec-{i:06d}", secrets.token_bytes(32), os.urandom(restore_bytes)) for i in range(n)]
    open_records([seal_records([i.recipient for i in idents], did, items[:10])], idents[0], did)  # warm-up
    seal_s = open_s = float("inf")
    for _ in range(3):  # best of 3: the machine is shared, the minimum is the cost
        t0 = time.perf_counter()
        table = seal_records([i.recipient for i in idents], did, items)
        seal_s = min(seal_s, (time.perf_counter() - t0) / n)
        t0 = time.perf_counter()
        out = open_records([table], idents[0], did)
        open_s = min(open_s, (time.perf_counter() - t0) / n)
    assert len(out) == n
    file_bytes = len(envelope_table_bytes(table))
    wrap = len(table["wraps"][0].as_py()[0]["sealed"])
    payload = len(table["payload"][0].as_py())
    return {
        "kem": idents[0].kem,
        "recipients": recipients,
        "restore_record_bytes": restore_bytes,
        "seal_per_s": 1 / seal_s,
        "open_per_s": 1 / open_s,
        "seal_ms_per_record": seal_s * 1e3,
        "open_ms_per_record": open_s * 1e3,
        "sealed_key_bytes_per_recipient": wrap,
        "payload_bytes": payload,
        "overhead_bytes_per_record": payload - restore_bytes + wrap * recipients,
        "parquet_bytes_per_record": file_bytes / n,
    }


def tiny_anon_seconds(batch: int = 8) -> tuple[float, str]:
    import tempfile

    import numpy as np

    from anondata.anonymizer import Anonymizer
    from anondata.testing import tiny_model_dir

    with tempfile.TemporaryDirectory() as d:
        anon = Anonymizer.from_pretrained(tiny_model_dir(d), device="cpu")
        rng = np.random.default_rng(0)
        r = anon.resolution
        imgs = rng.integers(0, 256, (batch, r, r, 3), dtype=np.uint8)
        keys = [secrets.token_bytes(32) for _ in range(batch)]
        anon.anonymize(imgs[:1], keys[:1])  # warm-up
        t0 = time.perf_counter()
        _, recs = anon.anonymize(imgs, keys)
        per = (time.perf_counter() - t0) / batch
        rec_bytes = len(recs[0].to_bytes())
    return per, f"tiny core model {r}x{r}, settings {anon.settings}, restore record {rec_bytes} B"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=300)
    ap.add_argument("--restore-bytes", type=int, default=400, help="restore record size (no residual)")
    ap.add_argument("--residual-bytes", type=int, default=0, help="also bench a lossless-size payload")
    ap.add_argument("--recipients", type=int, default=1)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--anon-seconds", type=float, help="anonymization cost per record, seconds")
    g.add_argument("--measure-tiny", action="store_true", help="measure it with the tiny core model")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()

    rows = []
    for pq in (False, True):
        rows.append(bench(pq, args.records, args.restore_bytes, args.recipients))
        if args.residual_bytes:
            rows.append(bench(pq, max(20, args.records // 10), args.residual_bytes, args.recipients))
    anon_s, source = None, None
    if args.anon_seconds:
        anon_s, source = args.anon_seconds, "--anon-seconds"
    elif args.measure_tiny:
        anon_s, source = tiny_anon_seconds()
    print(f"{'kem':16} {'rr B':>7} {'seal/s':>8} {'open/s':>8} {'wrap B':>7} {'overhead B':>10} {'parquet B/rec':>13}")
    for r in rows:
        print(f"{r['kem']:16} {r['restore_record_bytes']:7d} {r['seal_per_s']:8.0f} {r['open_per_s']:8.0f} "
              f"{r['sealed_key_bytes_per_recipient']:7d} {r['overhead_bytes_per_record']:10d} {r['parquet_bytes_per_record']:13.0f}")
    if anon_s:
        print(f"anonymization: {anon_s * 1e3:.1f} ms/record ({source})")
        for r in rows:
            r["crypto_over_anonymization"] = (r["seal_ms_per_record"] / 1e3) / anon_s
            print(f"  {r['kem']:16} rr {r['restore_record_bytes']:7d} B: seal is {100 * r['crypto_over_anonymization']:.3f}% of it")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "anon_seconds": anon_s, "anon_source": source}, f, indent=1)


if __name__ == "__main__":
    main()
