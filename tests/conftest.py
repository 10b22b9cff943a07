"""Shared test fixtures. Real data is read from ../shared/per-covid19 when present, never copied.

Markers: `slow` for the end-to-end runs (the pipeline, its fault suite, Dask jobs, sweeps: minutes each on 2 cores);
`./run_all.sh --test -m "not slow"` is the fast lane for daily work, CI runs everything.
"""
import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PERCOVID_SHARED", REPO.parent / "shared" / "per-covid19"))
# The one phantom set of the end-to-end tests: 8 subjects (5 Train: 40 slices, 2 Val: 22, 1 Test: 8) at 48 px.
PHANTOMS = {"subjects": 8, "size": 48, "seed": 7}


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The real Per-COVID-19 files; tests that need them skip cleanly where the folder is absent."""
    if not (SHARED / "Train.csv").is_file():
        pytest.skip(f"real data not found at {SHARED} (set PERCOVID_SHARED to its path)")
    return SHARED


@pytest.fixture(scope="session")
def phantom_set(tmp_path_factory) -> Path:
    """A tiny phantom CT set in the official layout (Train/, Val/, Test/, labels/), made once per test session;
    read-only for the tests (copy or link it to change it)."""
    from utils import phantoms

    folder = tmp_path_factory.mktemp("phantom_set") / "phantoms"
    phantoms.generate_phantoms(folder, **PHANTOMS)
    return folder
