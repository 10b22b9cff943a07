"""Shared test fixtures. Real data is read from ../shared/per-covid19 when present, never copied."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PERCOVID_SHARED", REPO.parent / "shared" / "per-covid19"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The real Per-COVID-19 files; tests that need them skip cleanly where the folder is absent."""
    if not (SHARED / "Train.csv").is_file():
        pytest.skip(f"real data not found at {SHARED} (set PERCOVID_SHARED to its path)")
    return SHARED
