"""Shared engine of the Per-COVID-19 notebook suite.

One module per idea of the paper ("Revitalizing regression tasks through modern training procedures"):
models (backbones, heads, hybrid pooling), losses (eq 1-3), sam, metrics, data, augment, phantoms,
folds, train (the one training loop), ensemble, submission, pipeline (papermill runner), bench.
"""
import os

# albumentations >= 1.4 checks PyPI for updates on import; never on our machines (no network, reproducible).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
