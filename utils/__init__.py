"""Shared engine of the Per-COVID-19 notebook suite.

One module per idea of the paper ("Revitalizing regression tasks through modern training procedures"):
models (backbones, heads, hybrid pooling), losses (eq 1-3), sam, metrics, data, augment, phantoms, folds,
train (the one training loop), jobs (every (model, fold) a Dask job), ensemble, pseudo_label, submission,
predict (inference and export), selfsup (self-supervised pretraining), pipeline (papermill runner), sweep (K-fold
cross-validation of many models), bench; config (every setting), files (atomic writes, integrity, locks),
csvfiles (the one CSV reader), report (figures).

Importing the package sets the two process-wide things every entry point needs, here once:
* `NO_ALBUMENTATIONS_UPDATE=1`: albumentations >= 1.4 checks PyPI for updates on import; never on our machines.
* the engine's log format: messages of the `utils.*` loggers go to stdout (what papermill shows and the executed
  notebooks keep) as `HH:MM:SS message`, unless the application configured logging itself.
"""
import logging
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.2.0"


class _StdoutHandler(logging.StreamHandler):
    """Writes to the current sys.stdout (Jupyter and pytest swap it after import)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


_engine_log = logging.getLogger(__name__)
if not _engine_log.handlers and not logging.getLogger().handlers:
    _handler = _StdoutHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    _engine_log.addHandler(_handler)
    _engine_log.setLevel(logging.INFO)
