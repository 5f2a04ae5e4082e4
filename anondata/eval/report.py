"""OUT/metrics.json (every number), OUT/*.png (figures, sample grid) and OUT/report.html.

The HTML has no script, no stylesheet link and no font download: it opens offline from the folder,
next to the PNGs it shows. The grid holds real faces of the evaluated data: OUT is as private as
the source and the restored records.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np

from ..errors import InputError
from .identity import SAME_PERSON
from .run import EvalResult

SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "metrics.schema.json"
COLUMNS = ("original", "anonymized", "restored", "wrong_key")
TILE = 128


def validate(metrics: dict) -> None:
    """Check `metrics` against schemas/metrics.schema.json (needs jsonschema). The schema lives in
    the source repository (schemas/ is the format's home), not in an installed wheel."""
    import jsonschema

    if not SCHEMA.is_file():
        raise FileNotFoundError(f"{SCHEMA} is missing: validate() needs a source checkout of anondata (schemas/)")
    jsonschema.validate(metrics, json.loads(SCHEMA.read_text()))


def write_report(result: EvalResult, out: str) -> dict:
    """Write the report folder; returns {"html", "json", "images": [file names]}.

    Written in a hidden sibling folder renamed into place at the end (files.new_folder): a failure
    or Ctrl-C midway leaves no half-written OUT, which would hold real faces (grid.png) and block
    the rerun ("not empty")."""
    from ..files import check_new_folder, new_folder

    out_dir = check_new_folder(out, "--report", InputError)
    import matplotlib

    matplotlib.use("Agg")
    with new_folder(out_dir) as work:
        images = [_histogram(result, work)]
        # no point when no face was in the bit-flip and leakage runs (attack_sample or restore_sample 0)
        if any(r["identity_distance"]["mean"] is not None for r in result.metrics["leakage"] or []):
            images.append(_leakage(result, work))
        images.append(_grid(result, work))
        (work / "metrics.json").write_text(json.dumps(result.metrics, indent=1, allow_nan=False) + "\n")
        (work / "report.html").write_text(_html(result.metrics, images), encoding="utf-8")
    return {"html": str(out_dir / "report.html"), "json": str(out_dir / "metrics.json"), "images": images}


# ------------------------------------------------------------------------------ figures


def _histogram(result: EvalResult, out_dir: Path) -> str:
    import matplotlib.pyplot as plt

    series = [("original vs anonymized", [f["distance_anonymized"] for f in result.per_face])]
    for name, label in (("restored", "original vs restored"), ("wrong_key", "original vs wrong-key restore")):
        vals = [f[name]["distance"] for f in result.per_face if name in f]
        if vals:
            series.append((label, vals))
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    top = max(1.2, max(max(v) for _, v in series) * 1.05)
    bins = np.linspace(0, top, 41)
    for label, vals in series:
        ax.hist(vals, bins=bins, alpha=0.55, label=f"{label} (n={len(vals)})")
    ax.axvline(SAME_PERSON, color="k", ls="--", lw=1, label="dlib same-person threshold 0.6")
    ax.set_xlabel("dlib face embedding distance to the original photo")
    ax.set_ylabel("faces")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    name = "distances.png"
    fig.savefig(out_dir / name)
    plt.close(fig)
    return name


def _leakage(result: EvalResult, out_dir: Path) -> str:
    import matplotlib.pyplot as plt

    rows = result.metrics["leakage"]
    p = [r["p"] for r in rows]
    mean = [r["identity_distance"]["mean"] for r in rows]
    share = [r["identity_distance"]["share_beyond_0_6"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    ax.plot(p, mean, "o-", label="mean distance to the original")
    ax.axhline(SAME_PERSON, color="k", ls="--", lw=1, label="same-person threshold 0.6")
    ax.set_xlabel("share p of the face's sign flips guessed right (0.5 = random key, 1 = the key)")
    ax.set_ylabel("dlib distance")
    ax.set_ylim(0, max(0.8, max(v for v in mean if v is not None) * 1.1))
    ax2 = ax.twinx()
    ax2.plot(p, share, "s:", color="tab:red", label="share of faces beyond 0.6")
    ax2.set_ylim(-0.02, 1.02)
    ax2.set_ylabel("share beyond 0.6", color="tab:red")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower left")
    fig.tight_layout()
    name = "leakage.png"
    fig.savefig(out_dir / name)
    plt.close(fig)
    return name


def _tile(img: np.ndarray, box) -> np.ndarray:
    """The face box widened by a quarter each side (clipped), resized to TILE x TILE."""
    from PIL import Image

    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    H, W = img.shape[:2]
    a, b = max(0, x0 - w // 4), max(0, y0 - h // 4)
    c, d = min(W, x1 + w // 4), min(H, y1 + h // 4)
    return np.array(Image.fromarray(img[b:d, a:c]).resize((TILE, TILE), Image.BICUBIC))


def _grid(result: EvalResult, out_dir: Path) -> str:
    from PIL import Image

    cols = [c for c in COLUMNS if result.grid and c in result.grid[0]]
    rows = []
    for g in result.grid:
        rows.append(np.concatenate([_tile(g[c], g["box"]) for c in cols], axis=1))
    canvas = np.concatenate(rows, axis=0) if rows else np.zeros((TILE, TILE, 3), np.uint8)
    name = "grid.png"
    Image.fromarray(canvas).save(out_dir / name)
    return name


# ------------------------------------------------------------------------------ HTML


def _fmt(v, pct: bool = False, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)) and not pct:
        return str(v)
    return f"{100 * v:.1f}%" if pct else f"{v:.{digits}f}"


def _table(head: list[str], rows: list[list]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _tar_label(far: float) -> str:
    """"TAR@FAR=0.1%" for the FAR measured (EvalOptions.far), not the default's."""
    return f"TAR@FAR={100 * far:g}%"


def _verdicts(m: dict) -> list[tuple[str, str, str]]:
    """(check, evidence, verdict) lines for the summary. Thresholds are stated, not hidden."""
    out = []
    d = m["identity"]["original_vs_anonymized"]
    share = d["share_beyond_0_6"]
    out.append(("anonymized faces are other people to dlib (distance > 0.6)",
                f"{_fmt(share, True)} of {d['n']} faces{_ci(share, d['n'])}; mean distance {_fmt(d['mean'])}",
                "pass" if share is not None and share >= 0.95 else "FAIL"))
    reid = m["identity"]["reidentification"]
    if reid and "anonymized" in reid:
        o, a = reid["original"], reid["anonymized"]
        # TAR@FAR is null when it cannot be measured (no genuine pair, or fewer than 1/FAR impostor
        # pairs): that is a gap in the evidence to look at (CHECK), not a measured failure
        why = "" if a["tar_at_far"] is not None else (
            " (not measurable: no other photo of the probes' people)" if not a["genuine_pairs"] else
            f" (not measurable: {a['impostor_pairs']} impostor pairs, {_tar_label(a['far'])} needs at least "
            f"{math.ceil(1 / a['far'])}: a larger gallery)")
        out.append(("anonymized faces are not re-identified against other photos of the person",
                    f"rank-1 {_fmt(a['rank1'], True)} (originals {_fmt(o['rank1'], True)}), {_tar_label(a['far'])} "
                    f"{_fmt(a['tar_at_far'], True)} (originals {_fmt(o['tar_at_far'], True)}){why}",
                    "CHECK" if a["tar_at_far"] is None else "pass" if a["tar_at_far"] <= 0.05 else "FAIL"))
    r = m["restore"]
    if r:
        k = r["restored"]
        out.append(("restore with the key gives back the original",
                    f"bit-exact {_fmt(k['bit_exact_share'], True)}, face PSNR {_fmt(k['psnr_face']['mean'], digits=1)} dB "
                    "(n/a = identical, or no face pixel in the photo), identity distance "
                    f"{_fmt(k['identity_distance']['mean'])}; lossless failures {len(r['lossless_failures'])}",
                    # every record, as the footnote says: a bar under 1 passed a failure in 1,000 or more
                    "pass" if k["bit_exact_share"] == 1.0 else "CHECK"))
        w = m["wrong_key"]["random"]["identity_distance"]
        shares = [w["share_beyond_0_6"]] + [b["identity_distance"]["share_beyond_0_6"] for b in m["wrong_key"]["bits"]]
        bits = ", ".join(f"{b['bits']} bit(s): {_fmt(b['identity_distance']['share_beyond_0_6'], True)}"
                         for b in m["wrong_key"]["bits"])
        out.append(("a wrong key does not restore the person",
                    f"random key: {_fmt(w['share_beyond_0_6'], True)} beyond 0.6{_ci(w['share_beyond_0_6'], w['n'])}; "
                    f"key off by {bits}",
                    # keys a few bits off too: a key derivation that ignored some bits would pass on random keys
                    # alone. null: no face in that run (restore_sample or attack_sample 0), nothing to judge
                    "FAIL" if any(s is not None and s < 0.95 for s in shares) else
                    "CHECK" if None in shares else "pass"))
    return out


def _html(m: dict, images: list[str]) -> str:
    info = m["info"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>anondata evaluation</title><style>",
        "body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:left}"
        "th{background:#eee}.pass{color:#070}.FAIL{color:#b00;font-weight:bold}.CHECK{color:#a60}"
        "img{max-width:100%;border:1px solid #ccc}small{color:#666}",
        "</style></head><body>",
        "<h1>anondata evaluation report</h1>",
        "<p><b>Private:</b> the grid below shows real faces from the source. Keep this folder with the source data.</p>",
        _table(["", ""], [
            ["release", info.get("release", "(in memory)")], ["source", info.get("source", "")],
            ["dataset id", info.get("dataset_id", "")],
            ["release check", info.get("release_verified", "n/a")],
            ["records in release / quarantined", f"{info.get('records_in_release', 'n/a')} / "
                                                 f"{info.get('quarantined_in_release', 'n/a')}"],
            ["faces evaluated", m["faces"]["evaluated"]],
            ["distinct people", _fmt(m["faces"]["identities"])],
            ["faces restored (right key, random wrong key)", m["faces"]["restore_sample"]],
            ["faces in bit-flip/leakage runs", m["faces"]["attack_sample"]],
            ["model", f"{info.get('model', {}).get('name', '')} sha256 {str(info.get('model', {}).get('sha256', ''))[:16]}…"],
            ["settings", json.dumps(info.get("settings", {}), sort_keys=True)],
            ["tool", f"anondata {m['tool']['version']}"],
            ["run time", f"{m['timing']['seconds']} s, {m['timing']['restore_transforms']} restore transforms"],
        ]),
        "<h2>Summary for sign-off</h2>",
        "<table><tr><th>check</th><th>evidence</th><th>verdict</th></tr>" + "".join(
            f"<tr><td>{html.escape(c)}</td><td>{html.escape(e)}</td><td class='{v}'>{v}</td></tr>"
            for c, e, v in _verdicts(m)) + "</table>",
        "<p><small>Thresholds: pass if at least 95% of anonymized (or wrong-key) faces are beyond dlib's 0.6, "
        f"re-identification {_tar_label(m['options']['far'])} at most 5%, restore bit-exact for every record. dlib is one face "
        "recogniser; a stronger one (ArcFace) may separate more. This is evidence, not a proof.</small></p>",
        "<h2>Identity</h2>",
        _dist_table(m),
        f"<img src='{images[0]}' alt='distance histograms'>",
    ]
    close = [f for f in m["per_face"] if f["distance_anonymized"] <= SAME_PERSON]
    parts.append("<p>Anonymized faces dlib still calls the same person (inspect these records): "
                 + (html.escape(", ".join(f"{f['id']} ({f['distance_anonymized']:.3f})" for f in close)) or "none")
                 + "</p>")
    reid = m["identity"]["reidentification"]
    if reid:
        parts += ["<h3>Re-identification against other photos of each person</h3>",
                  "<p><small>Probe: the evaluated photo in each version; gallery: the originals of the other photos "
                  "(never the probe's own photo), other people as distractors. TAR@FAR: threshold set on this "
                  "probe set's impostor pairs. The restored, key-only and wrong-key rows cover only the "
                  f"{m['faces']['restore_sample']} restored faces, so compare them with each other rather than with "
                  "the original row.</small></p>",
                  _gallery_note(info.get("gallery")),
                  _table(["probe version", "rank-1", _tar_label(m["options"]["far"]), "TAR at 0.6", "FAR at 0.6", "genuine pairs",
                          "impostor pairs", "gallery"],
                         [[k, _fmt(v["rank1"], True), _fmt(v["tar_at_far"], True), _fmt(v["tar_at_0_6"], True),
                           _fmt(v["far_at_0_6"], True), v["genuine_pairs"], v["impostor_pairs"], v["gallery"]]
                          for k, v in reid.items()])]
    if m["restore"]:
        r = m["restore"]
        rows = [[k.replace("_", "-"), v["n"], _fmt(v["bit_exact_share"], True), _fmt(v["psnr_face"]["mean"], digits=2),
                 _fmt(v["psnr_face"]["min"], digits=2), _fmt(v["ssim_face"]["mean"], digits=4),
                 _fmt(v["identity_distance"]["mean"]), _fmt(v["identity_distance"]["share_beyond_0_6"], True)]
                for k, v in (("restored (release)", r["restored"]), ("key only (no residual)", r["key_only"]))]
        parts += ["<h2>Restore fidelity</h2>",
                  "<p><small>PSNR/SSIM over the face box (PSNR n/a: identical to the original, or an empty "
                  "face-box crop). 'key only' drops the "
                  "lossless residual: what the scheme alone gives back.</small></p>",
                  _table(["restore", "n", "bit-exact", "PSNR mean", "PSNR min", "SSIM mean", "distance mean",
                          "beyond 0.6"], rows)]
        if r["lossless_failures"]:
            parts.append("<p class='FAIL'>Lossless restore failed for: "
                         + html.escape("; ".join(r["lossless_failures"][:20])) + "</p>")
        w = m["wrong_key"]
        wrows = [["random key", *_wk(w["random"])]] + [[f"key with {b['bits']} bit(s) flipped", *_wk(b)] for b in w["bits"]]
        parts += ["<h2>Wrong keys</h2>",
                  _table(["key", "n", "distance mean", "beyond 0.6", "PSNR mean", "bit-exact"], wrows),
                  "<h3>Leakage: partly right sign guesses</h3>",
                  "<p><small>Restore with the right signs except a random (1 - p) share. Magnitudes of the noise are "
                  "public (docs/SCHEME.md); this shows how much of the identity the signs alone hold back.</small></p>",
                  _table(["p", "n", "distance mean", "beyond 0.6", "PSNR mean"],
                         [[f"{x['p']:g}", x["n"], _fmt(x["identity_distance"]["mean"]),
                           _fmt(x["identity_distance"]["share_beyond_0_6"], True), _fmt(x["psnr_face"]["mean"], digits=2)]
                          for x in m["leakage"]])]
        if "leakage.png" in images:
            parts.append("<img src='leakage.png' alt='leakage curve'>")
    u = m["utility"]
    parts += ["<h2>Utility of the anonymized data</h2>", _table(["measure", "value"], [
        ["face detection rate, originals", _fmt(u["detection_rate_original"], True)],
        ["face detection rate, anonymized", _fmt(u["detection_rate_anonymized"], True)],
        ["landmark displacement (mean / median, inter-ocular units)",
         f"{_fmt(u['landmark_displacement']['mean'])} / {_fmt(u['landmark_displacement']['median'])}"],
        ["mean colour shift in the face box R/G/B/luma (8-bit levels)",
         " / ".join(f"{u['colour_shift_mean'][c]:+.1f}" for c in ("r", "g", "b", "luma"))],
        ["mean |colour shift| per face R/G/B/luma",
         " / ".join(f"{u['colour_shift_mean_abs'][c]:.1f}" for c in ("r", "g", "b", "luma"))],
        ["share of the photo's pixels changed (mean / max)",
         f"{_fmt(u['changed_pixel_share']['mean'], True)} / {_fmt(u['changed_pixel_share']['max'], True)}"],
        ["detector / landmarks", f"{u['detector']}; {u['landmark_predictor']}"],
    ])]
    cols = " | ".join(c.replace("_", " ") for c in COLUMNS if c != "restored" or m["restore"])
    if not m["restore"]:
        cols = "original | anonymized"
    parts += ["<h2>Sample</h2>", f"<p>{html.escape(cols)}</p>", "<img src='grid.png' alt='sample grid'>",
              "<p><small>All numbers: metrics.json (schema schemas/metrics.schema.json).</small></p></body></html>"]
    return "\n".join(parts)


def _gallery_note(g: dict | None) -> str:
    """States a gallery smaller than --gallery-limit asked for (the source has no more labelled photos)."""
    if not g or g.get("limit") is None or g["other_photos"] >= g["limit"]:
        return ""
    return (f"<p>The gallery holds {g['other_photos']} other photos of the source, fewer than --gallery-limit "
            f"{g['limit']}: the source has no more photos with a person label.</p>")


def _ci(share, n) -> str:
    from .metrics import wilson

    ci = wilson(share, n)
    return "" if ci is None else f" (95% CI {100 * ci[0]:.0f}-{100 * ci[1]:.0f}%)"


def _dist_table(m: dict) -> str:
    rows = [["original vs anonymized", m["identity"]["original_vs_anonymized"]]]
    if m["restore"]:
        rows += [["original vs restored", m["restore"]["restored"]["identity_distance"]],
                 ["original vs wrong-key restore", m["wrong_key"]["random"]["identity_distance"]]]
    return _table(["pair", "n", "mean", "median", "min", "max", "beyond 0.6"],
                  [[k, d["n"], _fmt(d["mean"]), _fmt(d["median"]), _fmt(d["min"]), _fmt(d["max"]),
                    _fmt(d["share_beyond_0_6"], True)] for k, d in rows])


def _wk(b: dict) -> list:
    d = b["identity_distance"]
    return [b["n"], _fmt(d["mean"]), _fmt(d["share_beyond_0_6"], True), _fmt(b["psnr_face"]["mean"], digits=2),
            _fmt(b["bit_exact_share"], True)]
