"""Challenge metrics (Per-COVID-19: ranked by MAE, then Pearson correlation PC, then RMSE) and a scoring CLI.

    MAE  = mean |pred - true|
    PC   = cov(pred, true) / (std(pred) std(true))      (nan when either side is constant: correlation undefined)
    RMSE = sqrt(mean (pred - true)^2)

``score`` works at slice level (what the challenge ranks); ``subject_scores`` scores each subject's mean over
its slices. CLI::

    python -m utils.metrics SUBMISSION.csv TRUTH.csv
    -> MAE 5.12345678 PC 0.936512345 RMSE 9.250000000

CSV files have columns ``name, value[, subject]``, with or without a header row (a header is detected when the
first row's second field is not a number), LF or CRLF line ends. Rows are matched by name; scored over the
truth's rows.
"""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd


class PredictionFileError(ValueError):
    """A prediction/truth CSV that cannot be scored (missing rows, duplicates, non-numeric values ...)."""


def _as_pair(pred, true) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64).ravel()
    true = np.asarray(true, dtype=np.float64).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"pred and true differ in length: {pred.size} vs {true.size}")
    if pred.size == 0:
        raise ValueError("cannot score empty arrays")
    return pred, true


def mae(pred, true) -> float:
    """Mean absolute error."""
    pred, true = _as_pair(pred, true)
    return float(np.mean(np.abs(pred - true)))


def rmse(pred, true) -> float:
    """Root mean squared error."""
    pred, true = _as_pair(pred, true)
    return float(np.sqrt(np.mean((pred - true) ** 2)))


def pearson(pred, true) -> float:
    """Pearson correlation; nan (no warning, no crash) when pred or true is constant, where it is undefined."""
    pred, true = _as_pair(pred, true)
    pred_centered, true_centered = pred - pred.mean(), true - true.mean()
    denominator = math.sqrt(float(np.sum(pred_centered ** 2)) * float(np.sum(true_centered ** 2)))
    if denominator == 0.0:
        return float("nan")
    return float(np.clip(np.sum(pred_centered * true_centered) / denominator, -1.0, 1.0))


def score(pred, true) -> dict[str, float]:
    """Slice-level challenge metrics: dict(MAE, PC, RMSE)."""
    return {"MAE": mae(pred, true), "PC": pearson(pred, true), "RMSE": rmse(pred, true)}


def subject_scores(pred, true, subjects) -> dict[str, float]:
    """The same metrics on each subject's mean prediction vs mean truth over its slices."""
    pred, true = _as_pair(pred, true)
    subjects = np.asarray(subjects).ravel()
    if subjects.shape != pred.shape:
        raise ValueError(f"subjects has {subjects.size} entries for {pred.size} predictions")
    means = pd.DataFrame({"pred": pred, "true": true, "subject": subjects}).groupby("subject").mean()
    return score(means["pred"].to_numpy(), means["true"].to_numpy())


def is_number(text: str) -> bool:
    """Whether a CSV field parses as a float (header detection of the challenge's CSVs)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_prediction_csv(path: str | Path) -> pd.DataFrame:
    """Read a ``name, value[, subject]`` CSV (header optional, CRLF ok) into DataFrame[name, value(, subject)].

    Raises FileNotFoundError, or PredictionFileError naming the file and line for empty files, wrong field
    counts, non-numeric or non-finite values and duplicate names.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prediction file not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = [(line_number, row) for line_number, row in enumerate(csv.reader(handle), start=1)
                if any(field.strip() for field in row)]
    if rows and (len(rows[0][1]) < 2 or not is_number(rows[0][1][1])):
        rows = rows[1:]  # header
    if not rows:
        raise PredictionFileError(f"{path}: no data rows")
    num_fields = len(rows[0][1])
    if num_fields not in (2, 3):
        raise PredictionFileError(f"{path}, line {rows[0][0]}: expected 2 or 3 fields (name, value[, subject]), "
                                  f"got {num_fields}")
    names, values, subjects = [], [], []
    for line_number, row in rows:
        if len(row) != num_fields:
            raise PredictionFileError(f"{path}, line {line_number}: expected {num_fields} fields, got {len(row)}")
        name, value_text = row[0].strip(), row[1].strip()
        try:
            value = float(value_text)
        except ValueError:
            raise PredictionFileError(f"{path}, line {line_number}: value {value_text!r} of {name!r} "
                                      "is not a number") from None
        if not math.isfinite(value):
            raise PredictionFileError(f"{path}, line {line_number}: value of {name!r} is {value_text}")
        names.append(name)
        values.append(value)
        if num_fields == 3:
            subjects.append(row[2].strip())
    frame = pd.DataFrame({"name": names, "value": values})
    if num_fields == 3:
        frame["subject"] = pd.Series(subjects)
        if all(is_number(s) and float(s).is_integer() for s in subjects):
            frame["subject"] = [int(float(s)) for s in subjects]
    duplicated = frame["name"][frame["name"].duplicated()].unique()
    if len(duplicated):
        raise PredictionFileError(f"{path}: {len(duplicated)} duplicate names, e.g. {list(duplicated[:5])}")
    return frame


def score_files(submission_path: str | Path, truth_path: str | Path) -> dict[str, float]:
    """Slice-level metrics of a submission CSV against a truth CSV, over the truth's rows."""
    submission = read_prediction_csv(submission_path).set_index("name")["value"]
    truth = read_prediction_csv(truth_path).set_index("name")["value"]
    missing = truth.index.difference(submission.index, sort=False)
    if len(missing):
        raise PredictionFileError(f"{submission_path} lacks {len(missing)} of the {len(truth)} rows of "
                                  f"{truth_path}, e.g. {list(missing[:5])}")
    return score(submission.loc[truth.index].to_numpy(), truth.to_numpy())


def format_scores(scores: dict[str, float]) -> str:
    """The CLI's one line: ``MAE 5.12345678 PC 0.936512345 RMSE 9.250000000``."""
    return f"MAE {scores['MAE']:.8f} PC {scores['PC']:.9f} RMSE {scores['RMSE']:.9f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m utils.metrics SUBMISSION.csv TRUTH.csv", file=sys.stderr)
        return 2
    try:
        scores = score_files(argv[0], argv[1])
    except (FileNotFoundError, PredictionFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_scores(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
