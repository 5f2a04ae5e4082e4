"""Manifest cost at dataset scale: bytes, and the time and memory to write, sign, parse and check it.

    PYTHONPATH=. python benchmarks/manifest_scale.py [--records 10000,100000,1000000] [--json OUT]

Why: the manifest lists every input record (nothing lost, each with its status), so it grows with
the dataset and every release command reads all of it. This measures the manifest alone, as the
job's commit step builds it (98% anonymized in shards of 1,000 rows, 2% quarantined with a reason),
without the shards and key tables it names (their hashing is disk-bound and measured by nothing
here). Each size runs in a fresh process, so peak memory (ru_maxrss) is that size's own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def one(n: int) -> dict:
    from anondata import canonical
    from anondata.identity import generate_identity
    from anondata.manifest import VERSION, manifest_bytes, parse_manifest, validate_manifest

    ident = generate_identity(name="runner")
    per_shard = 1000
    records, rows = [], []
    for i in range(n):
        if i % 50 == 49:
            records.append({"id": f"rec-{i:09d}", "split": "train", "status": "quarantined",
                            "reason": "no face found (--faces detect, detectors: hog); --on-no-face keep publishes it"})
            continue
        if not rows or rows[-1] == per_shard:
            rows.append(0)
        rows[-1] += 1
        records.append({"id": f"rec-{i:09d}", "split": "train", "status": "anonymized", "shard": len(rows) - 1})

    def files(kind, folder, ext):
        return [{"bytes": 1 << 20, "path": f"{folder}/train-{i:05d}-of-{len(rows):05d}{ext}", "rows": r,
                 "sha256": secrets.token_hex(32)} for i, r in enumerate(rows)]

    anonymized = sum(rows)
    m = {"counts": {"anonymized": anonymized, "quarantined": n - anonymized, "skipped": 0, "total": n},
         "dataset_id": secrets.token_hex(16), "envelopes": files("envelopes", "keys", ".keys.parquet"),
         "extra": {}, "format": "anondata-manifest", "model": {"name": "embedded", "sha256": secrets.token_hex(32)},
         "recipients": [{"fingerprint": ident.recipient.fingerprint, "kem": ident.recipient.kem, "name": "owner"}],
         "records": records, "settings": {"steps": 10}, "shards": files("shards", "data", ".parquet"),
         "signer": ident.recipient.to_json(), "tool": {"name": "anondata", "version": "bench"}, "version": VERSION}
    t0 = time.perf_counter()
    validate_manifest(m)
    data = manifest_bytes(m)
    t1 = time.perf_counter()
    sig = ident.sign(data)
    t2 = time.perf_counter()
    ident.recipient.verify(sig, data, "manifest")
    t3 = time.perf_counter()
    back = parse_manifest(data)
    t4 = time.perf_counter()
    assert back == canonical.loads(data[:-1]) and len(back["records"]) == n
    return {"records": n, "manifest_MB": round(len(data) / 1e6, 2), "bytes_per_record": round(len(data) / n, 1),
            "check_and_write_s": round(t1 - t0, 2), "sign_s": round(t2 - t1, 3), "verify_signature_s": round(t3 - t2, 3),
            "parse_and_check_s": round(t4 - t3, 2), "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", default="10000,100000,1000000", help="comma-separated record counts")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process's size
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one)))
        return 0
    out = []
    for n in (int(x) for x in a.records.split(",")):
        r = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True, check=True)
        out.append(json.loads(r.stdout.splitlines()[-1]))
        print(json.dumps(out[-1]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
