"""Regenerate tests/vectors/keystream.json (keystream v1), cell_signs.json (sign cells) and
background_noise.json (scheme v3's public noise), the known-answer vectors of docs/FORMAT.md.
The expected values were checked once against an independent computation (test_keystream.py
recomputes them with HKDF + ChaCha20 from `cryptography` step by step)."""

import json
from pathlib import Path

from anondata.keystream import BACKGROUND_INFO, KEY_BYTES, background_noise, cell_signs, face_key, keystream, signs

CASES = [
    {"key": bytes(range(32)), "shape": [3, 4, 4]},
    {"key": bytes(32), "shape": [1, 2, 5]},
    {"key": bytes([0xFF] * 32), "shape": [3, 8, 8]},
]

# v2: the plane (every channel has it) of a (C, H, W) latent; 6 x 7 at cell 4 has a partial last row/column.
CELL_CASES = [
    {"key": bytes(range(32)), "shape": [3, 8, 8], "cell": 2},
    {"key": bytes(32), "shape": [4, 6, 7], "cell": 4},
    {"key": bytes([0xFF] * 32), "shape": [3, 16, 16], "cell": 4},
]

# v3: an odd count (the last pair's sine is dropped) and a small latent
NOISE_SHAPES = [[1, 1, 3], [3, 4, 4]]


def main():
    out = []
    for c in CASES:
        n = 1
        for d in c["shape"]:
            n *= d
        s = signs(c["key"], tuple(c["shape"]))
        out.append({
            "key_hex": c["key"].hex(),
            "shape": c["shape"],
            "keystream_hex": keystream(c["key"], (n + 7) // 8).hex(),
            "signs": "".join("+" if v > 0 else "-" for v in s.reshape(-1)),
            "face_key_0_hex": face_key(c["key"], 0).hex(),
            "face_key_7_hex": face_key(c["key"], 7).hex(),
        })
    path = Path(__file__).with_name("keystream.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    cells = []
    for c in CELL_CASES:
        s = cell_signs(c["key"], tuple(c["shape"]), c["cell"])
        cells.append({"key_hex": c["key"].hex(), "shape": c["shape"], "cell": c["cell"],
                      "plane": "".join("+" if v > 0 else "-" for v in s[0].reshape(-1))})
    path = Path(__file__).with_name("cell_signs.json")
    path.write_text(json.dumps(cells, indent=1) + "\n")
    print(f"wrote {path}")
    noise = []
    for shape in NOISE_SHAPES:
        n = 1
        for d in shape:
            n *= d
        noise.append({"shape": shape, "stream_hex": keystream(bytes(KEY_BYTES), 8 * ((n + 1) // 2), BACKGROUND_INFO).hex(),
                      "values": [float(f"{v:.8e}") for v in background_noise(tuple(shape)).reshape(-1)]})
    path = Path(__file__).with_name("background_noise.json")
    path.write_text(json.dumps(noise, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
