"""The competition file: validated first, written atomically, or not at all.

Format (Per-COVID-19 / the organisers' evaluation): no header, one `name,prediction` row per image of the
scored split, sorted by name; the upload is a zip holding `predictions.csv`.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from utils import csvfiles, ensemble, files

ZIP_MEMBER = "predictions.csv"


class SubmissionError(ValueError):
    """The predictions would make an invalid submission; nothing was written."""


def validate_submission(predictions: pd.DataFrame, expected_names: Iterable[str]) -> pd.DataFrame:
    """Every expected image exactly once, nothing else, no NaN, values in [0, 100]. Returns the rows sorted by name."""
    expected = pd.Index(sorted(set(expected_names)))
    if predictions.empty or expected.empty:
        raise SubmissionError(f"nothing to submit: {len(predictions)} predictions for {len(expected)} images")
    problems = []
    duplicated = predictions["name"][predictions["name"].duplicated()].unique()
    if len(duplicated):
        problems.append(f"{len(duplicated)} names appear twice (first: {list(duplicated[:5])})")
    missing = expected.difference(predictions["name"])
    if len(missing):
        problems.append(f"{len(missing)} images have no prediction (first: {list(missing[:5])})")
    extra = pd.Index(predictions["name"]).difference(expected)
    if len(extra):
        problems.append(f"{len(extra)} predictions are for images not in the split (first: {list(extra[:5])})")
    values = pd.to_numeric(predictions["prediction"], errors="coerce")
    if values.isna().any():
        bad = predictions["name"][values.isna()].tolist()
        problems.append(f"{len(bad)} predictions are NaN or not numbers (first: {bad[:5]})")
    out_of_range = predictions["name"][(values < 0) | (values > 100)].tolist()
    if out_of_range:
        problems.append(f"{len(out_of_range)} predictions outside [0, 100] (first: {out_of_range[:5]})")
    if problems:
        raise SubmissionError("refusing to write an invalid submission: " + "; ".join(problems))
    return predictions[["name", "prediction"]].sort_values("name", kind="stable").reset_index(drop=True)


def format_submission(rows: pd.DataFrame) -> str:
    """`name,prediction` lines, no header; numbers in their shortest exact form (13.0 -> 13, 12.25 -> 12.25); a name
    with a comma, a quote or a line break quoted as the csv module quotes it (utils.csvfiles, the one writer)."""
    return csvfiles.format_rows((name, f"{float(value):.10g}") for name, value in zip(rows["name"], rows["prediction"]))


def write_submission(predictions: pd.DataFrame, expected_names: Iterable[str], csv_path: str | Path,
                     zip_path: str | Path | None = None) -> pd.DataFrame:
    """Validate, then write the CSV (and the zip holding it as predictions.csv) atomically; returns the rows written."""
    rows = validate_submission(predictions, expected_names)
    text = format_submission(rows)
    files.write_text(csv_path, text)
    if zip_path is not None:
        files.write_zip(zip_path, {ZIP_MEMBER: text})
    return rows


@dataclass
class SubmissionResult:
    csv_path: Path
    zip_path: Path
    rows: pd.DataFrame
    split: str
    message: str
    scores: dict[str, float] | None


def reference_labels(data_dir: str | Path, split: str) -> pd.DataFrame | None:
    """Labels to score a split locally: the split's own CSV, or labels/<split>.csv (the phantom set's answer key)."""
    from utils import data

    frame = data.load_split(data_dir, split)  # labels are required for Train, optional elsewhere
    if frame is not None and frame["percentage"].notna().all():
        return frame[["name", "percentage"]]
    answer_key = Path(data_dir) / "labels" / f"{split}.csv"
    return data.read_labels(answer_key)[["name", "percentage"]] if answer_key.is_file() else None


def make_submission(run_dir: str | Path, data_dir: str | Path, split: str, csv_path: str | Path) -> SubmissionResult:
    """Write the submission of `split` from the run's final ensemble (after pseudo-labelling) or its ensemble.

    Data with no such split (e.g. the Train-only crops): the ensemble's out-of-fold predictions on Train are
    written instead, and the message says so.
    """
    from utils import data
    from utils.config import RunPaths
    from utils.metrics import score

    ensemble_dir = RunPaths(run_dir).ensemble
    source = next((p for p in (ensemble_dir / "final.csv", ensemble_dir / "ensemble.csv") if p.is_file()), None)
    if source is None:
        raise FileNotFoundError(f"no ensemble predictions in {ensemble_dir}: run notebooks/03_ensemble.ipynb first")
    files.verify(source, ensemble.ENSEMBLE_WAY_OUT, older_ok=True)  # an edited ensemble is refused, never submitted
    predictions = csvfiles.read_frame(source, text_columns=("split", "name"))
    frame = data.load_split(data_dir, split) if split in ("Val", "Test") else None
    if frame is not None:
        expected, scored_split = frame["name"], split
        message = f"{split}: {len(frame)} images from {source.name}"
    else:
        scored_split = "oof"
        expected = predictions.loc[predictions["split"] == "oof", "name"]
        total = len(data.load_split(data_dir, "Train", require_labels=True))
        message = (f"no {split} split in {data_dir}: wrote the OUT-OF-FOLD predictions on Train instead "
                   f"({len(expected)} of {total} slices: those in the trained folds), from {source.name}")
    rows = predictions[predictions["split"] == scored_split]
    csv_path = Path(csv_path)
    zip_path = csv_path.with_suffix(".zip")
    written = write_submission(rows, expected, csv_path, zip_path)
    truth = reference_labels(data_dir, split if scored_split != "oof" else "Train")
    scores = None
    if truth is not None:
        merged = rows.merge(truth, on="name")
        if len(merged) == len(rows):
            scores = score(merged["prediction"].to_numpy(), merged["percentage"].to_numpy())
            message += "; scored against " + ("Train labels" if scored_split == "oof" else f"{split} labels") + ": " + \
                " ".join(f"{k} {v:.4f}" for k, v in scores.items())
    return SubmissionResult(csv_path, zip_path, written, split, message, scores)
