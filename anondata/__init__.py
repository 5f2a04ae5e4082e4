"""anondata: secure, reversible face anonymization of datasets.

The scheme (Labarbarie, Itier & Puech, arXiv 2510.01031): invert a face to diffusion
noise with a deterministic sampler, flip the signs of the face-region noise with a
per-record secret key, and generate again. Restoring runs the same steps with the same key.
"""

__version__ = "0.3.0"

__all__ = ["Anonymizer", "__version__"]


def __getattr__(name):
    # Lazy: `anondata keygen` and `anondata verify` must not pay for importing torch.
    if name == "Anonymizer":
        from .anonymizer import Anonymizer

        return Anonymizer
    raise AttributeError(name)
