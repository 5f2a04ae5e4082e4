"""The dataset card (README.md with Hub YAML) of a release.

Why the YAML lists `configs`: `datasets.load_dataset(DIR)` and the Hub viewer then read
exactly `data/{split}-*` and never touch `keys/` (which is Parquet too, and private).
Values are written as JSON strings, which are valid YAML scalars: no quoting surprises.
"""

from __future__ import annotations

import json

SCHEME_REF = "Labarbarie, Itier & Puech, arXiv:2510.01031"


def _q(s) -> str:
    return json.dumps(str(s), ensure_ascii=False)


def dataset_card(plan: dict, model: dict, counts: dict, license: str = "other") -> str:
    """plan: the job plan; model: {"model": model_info, "settings": settings}; counts:
    {"anonymized": n, "quarantined": m}."""
    splits = [s["name"] for s in plan["splits"]]
    lines = ["---", f"license: {_q(license)}"]
    if license == "other":
        lines += [f"license_name: {_q('see-source-dataset')}"]
    lines += [
        "tags:",
        "- anonymized",
        "- faces",
        "- anondata",
        "configs:",
        "- config_name: default",
        "  data_files:",
    ]
    for s in splits:
        lines += [f"  - split: {_q(s)}", f"    path: {_q(f'data/{s}-*')}"]
    lines += ["---", ""]
    info = model.get("model", {})
    settings = model.get("settings", {})
    faces = plan["options"]["faces"]
    src = plan["source"]
    rows = "\n".join(f"| {s['name']} | {s['rows']} | {len(s['shards'])} |" for s in plan["splits"])
    settings_rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(settings.items()))
    box = f", box {tuple(faces['box'])}" if faces.get("box") else ""
    dropped = plan["options"].get("drop_columns") or []
    kept = plan["options"].get("keep_columns") or []
    columns = "every input column is kept" + (
        f" except {', '.join(f'`{c}`' for c in dropped)} (left out of this release)" if dropped else "")
    if kept:
        columns += (f"; {', '.join(f'`{c}`' for c in kept)}: published unchanged, whoever ran the job stated "
                    "that no face is in it")
    skipped = (f"- skipped records: {counts['skipped']} (past the job's record limit; listed in `manifest.json`, "
               "not published)\n" if counts.get("skipped") else "")
    cross = f", cross-check: {faces['cross_check']}" if faces.get("cross_check") else ""
    # What was anonymized: in detect mode only the faces a detector found, and with --on-no-face keep
    # a photo without one is published as it is (not quarantined, as the card used to say).
    detect = faces["mode"] == "detect"
    why = "unreadable, too small"
    found = ""
    if detect:
        why += (", no face found" if faces["on_no_face"] == "quarantine" else "") + (
            ", a face only the cross-check found" if faces.get("cross_check") else "")
        found = (f"\n\nFaces were found by a detector (`{faces['detector']}`"
                 + (f", cross-checked by `{faces['cross_check']}`" if faces.get("cross_check") else "")
                 + f"): a face the detector{'s' if faces.get('cross_check') else ''} missed is published unchanged.")
        if faces["on_no_face"] == "keep":
            found += " Photos in which no face was found were published unchanged (`--on-no-face keep`)."
    body = f"""# Anonymized face dataset

Every face {"the detector found " if detect else ""}in this dataset was replaced by a stranger's with **anondata**: each face is inverted
to diffusion noise with a deterministic sampler, the signs of the face-region noise are flipped
with a secret per-record 256-bit key, and a new face is generated ({SCHEME_REF}). Pixels outside
the face regions are unchanged. Without the keys the original faces cannot be recovered.{found}

The keys are **not** part of this dataset. They are sealed (HPKE) to the data owner's public key
in `keys/`, which is kept private; the owner can restore chosen records with
`anondata restore`. Records that could not be anonymized safely ({why}) were
**quarantined**: they are not in the data files, and `manifest.json` lists them with the reason.

## Contents

| split | input records | shards |
| --- | --- | --- |
{rows}

- anonymized records: {counts.get('anonymized', 0)}
- quarantined records: {counts.get('quarantined', 0)} (listed in `manifest.json`, not published)
{skipped}- {columns}; the `{src['image_column']}` column holds the anonymized image (lossless PNG)
{"- `record_id` was added: the source had no id column, so ids are `{split}-{row}`" + chr(10) if not src.get('id_column') else ""}
## How it was anonymized

| | |
| --- | --- |
| model | {info.get('name', '?')} |
| model sha256 | `{info.get('sha256', '?')}` |
| faces | {faces['mode']}{box} (no face: {faces['on_no_face']}{cross}) |
| source | {src['kind']} |
| dataset id | `{plan['dataset_id']}` |

Sampler settings:

| setting | value |
| --- | --- |
{settings_rows}

## Verify

`manifest.json` lists every file with its SHA-256 and every input record with its status, and
`manifest.json.sig` is its Ed25519 signature by the release's signer (fingerprint
`{plan['signer']}`). Check both with:

```
anondata verify .
```

## Load

```python
from datasets import load_dataset
ds = load_dataset("path/or/hub-id")
```
"""
    return "\n".join(lines) + body
