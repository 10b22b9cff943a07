"""Cross-validation folds grouped by subject and stratified by the Per-COVID-19 severity classes.

The paper trains one model per cross-validation fold (5 folds) and ensembles the fold models. Slices of one CT scan
are strongly correlated, so a subject never spans two folds; within that constraint the folds keep the share of each
severity class of the challenge paper (Bougourzi et al., J. Imaging 2021, 7(9):189, dataset description: Normal 0%,
Minimal 0-10%, Moderate 10-25%, Extent 25-50%, Severe 50-75%, Critical > 75%).

Class boundaries (the paper gives ranges, not which side the edges fall on; this is the convention used here):
    Normal    p == 0          Minimal  0 < p < 10       Moderate  10 <= p < 25
    Extent    25 <= p < 50    Severe   50 <= p <= 75    Critical  p > 75
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from utils import csvfiles

SEVERITY_CLASSES = ("Normal", "Minimal", "Moderate", "Extent", "Severe", "Critical")
FOLD_COLUMNS = ("name", "subject", "percentage", "severity", "fold")


def _class_codes(percentages: np.ndarray) -> np.ndarray:
    p = np.asarray(percentages, dtype=np.float64)
    bad = ~np.isfinite(p) | (p < 0) | (p > 100)
    if bad.any():
        raise ValueError(f"infection percentages must be in [0, 100]; got {p[bad][:5].tolist()}")
    codes = np.select(
        [p == 0, p < 10, p < 25, p < 50, p <= 75],
        [0, 1, 2, 3, 4],
        default=5,
    )
    return codes.astype(np.int64)


def severity_class(percentage: float | np.ndarray | pd.Series) -> str | pd.Categorical:
    """Severity class name of a percentage (scalar -> str, array -> ordered Categorical over SEVERITY_CLASSES)."""
    if np.ndim(percentage) == 0:
        return SEVERITY_CLASSES[int(_class_codes(np.array([percentage], dtype=np.float64))[0])]
    codes = _class_codes(np.asarray(percentage, dtype=np.float64).reshape(-1))
    return pd.Categorical.from_codes(codes, categories=list(SEVERITY_CLASSES), ordered=True)


def make_folds(labels: pd.DataFrame, n_folds: int = 5, seed: int = 0) -> pd.DataFrame:
    """Assign each slice a fold 0..n_folds-1: no subject in two folds, severity shares as even as grouping allows.

    `labels` needs columns name, percentage, subject (e.g. from utils.data.read_labels). Uses sklearn's
    StratifiedGroupKFold(shuffle=True, random_state=seed) on the slice severity with groups = subject; rows are
    sorted by name first so the result depends only on the data and the seed. Returns columns
    name, subject, percentage, severity (ordered Categorical), fold, sorted by name. When no class has n_folds
    slices (a tiny set) the folds are grouped by subject only.
    """
    missing = [c for c in ("name", "percentage", "subject") if c not in labels.columns]
    if missing:
        raise ValueError(f"labels need columns name, percentage, subject; missing {missing}")
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    if labels["subject"].isna().any():
        names = labels.loc[labels["subject"].isna(), "name"].tolist()
        raise ValueError(
            f"{len(names)} slice(s) have no subject id ({', '.join(map(str, names[:5]))}); folds are grouped by "
            f"subject, so the label CSV needs its third column (name,percentage,subject)"
        )
    if labels["name"].duplicated().any():
        raise ValueError(f"duplicate slice names: {labels.loc[labels['name'].duplicated(), 'name'].tolist()[:5]}")
    frame = labels.sort_values("name", kind="stable").reset_index(drop=True)
    subjects = frame["subject"].astype("int64").to_numpy()
    n_subjects = len(np.unique(subjects))
    if n_subjects < n_folds:
        raise ValueError(
            f"only {n_subjects} subject(s) for {n_folds} folds: every fold needs at least one subject; "
            f"use n_folds <= {n_subjects} or more data"
        )
    codes = _class_codes(frame["percentage"].to_numpy())
    # sklearn refuses when every class has fewer slices than folds (tiny sets): then group only, no strata.
    strata = codes if np.bincount(codes).max() >= n_folds else np.zeros_like(codes)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.full(len(frame), -1, dtype=np.int64)
    with warnings.catch_warnings():
        # Rare classes (e.g. Critical in a small set) cannot reach every fold; that is expected, not a problem.
        warnings.filterwarnings("ignore", message="The least populated class in y has only")
        for index, (_, held_out) in enumerate(splitter.split(np.zeros(len(frame)), strata, groups=subjects)):
            fold[held_out] = index
    return pd.DataFrame(
        {
            "name": frame["name"].astype(str),
            "subject": frame["subject"].astype("Int64"),
            "percentage": frame["percentage"].astype("float64"),
            "severity": pd.Categorical.from_codes(codes, categories=list(SEVERITY_CLASSES), ordered=True),
            "fold": fold,
        }
    )


def write_folds(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a fold table as CSV (header, LF) atomically (utils.files)."""
    missing = [c for c in FOLD_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"fold table lacks columns {missing}; build it with make_folds")
    return csvfiles.write_frame(path, frame.loc[:, list(FOLD_COLUMNS)])


def read_folds(path: str | os.PathLike) -> pd.DataFrame:
    """Read a table written by `write_folds` back with the same dtypes."""
    frame = csvfiles.read_frame(path)
    missing = [c for c in FOLD_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: not a fold table (missing columns {missing}); write it with write_folds")
    frame["subject"] = frame["subject"].astype("Int64")
    frame["percentage"] = frame["percentage"].astype("float64")
    frame["severity"] = pd.Categorical(frame["severity"], categories=list(SEVERITY_CLASSES), ordered=True)
    frame["fold"] = frame["fold"].astype("int64")
    return frame
