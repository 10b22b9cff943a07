"""Challenge metrics (Per-COVID-19: ranked by MAE, then Pearson correlation PC, then RMSE) and a scoring CLI.

    MAE  = mean |pred - true|
    PC   = cov(pred, true) / (std(pred) std(true))      (nan when either side is constant: correlation undefined)
    RMSE = sqrt(mean (pred - true)^2)

``score`` works at slice level (what the challenge ranks); ``subject_scores`` scores each subject's mean over
its slices. By severity class of the truth (utils.folds: Normal 0, Minimal < 10, Moderate < 25, Extent < 50,
Severe <= 75, Critical > 75): ``class_scores`` gives each class's slices, MAE and bias (mean of pred - true: negative
= predicted too low), ``class_balanced_mae`` the mean of the classes' MAE (each class counts the same, whatever its
share of the slices: a score that a change of the severity mix between data sets does not move). CLI::

    python -m utils.metrics SUBMISSION.csv TRUTH.csv [--allow-extra]
    -> MAE 5.12345678 PC 0.936512345 RMSE 9.250000000        (the challenge's ranking, first and unchanged)
       class-balanced MAE 7.1234
       class     slices    MAE   bias
       Normal       ...

CSV files have columns ``name, value[, subject]``, with or without a header row, LF or CRLF line ends (read by
utils.csvfiles). Rows are matched by name and scored over the truth's rows. Strict like the challenge: a value that
is not a number in [0, 100], a duplicate name, a truth row without prediction or (without --allow-extra) a
prediction for an image the truth lacks is refused, naming the row.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from utils.csvfiles import CsvError, is_number, read_name_value_rows


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


def class_scores(pred, true) -> pd.DataFrame:
    """Per severity class of `true` (those present, in class order): slices, MAE, bias = mean(pred - true)."""
    from utils.folds import SEVERITY_CLASSES, severity_class

    pred, true = _as_pair(pred, true)
    classes = np.asarray(severity_class(true))
    rows = []
    for name in SEVERITY_CLASSES:
        mask = classes == name
        if mask.any():
            error = pred[mask] - true[mask]
            rows.append({"class": name, "slices": int(mask.sum()), "MAE": float(np.mean(np.abs(error))),
                         "bias": float(np.mean(error))})
    return pd.DataFrame(rows, columns=["class", "slices", "MAE", "bias"])


def class_balanced_mae(pred, true) -> float:
    """The mean of the severity classes' MAE (the classes present in `true`)."""
    return float(class_scores(pred, true)["MAE"].mean())


def format_class_scores(table: pd.DataFrame) -> str:
    """The CLI's class lines: the class-balanced MAE, then one row per class."""
    lines = [f"class-balanced MAE {table['MAE'].mean():.4f}", f"{'class':<9} {'slices':>6} {'MAE':>8} {'bias':>8}"]
    lines += [f"{r['class']:<9} {r['slices']:>6d} {r['MAE']:>8.3f} {r['bias']:>+8.3f}" for _, r in table.iterrows()]
    return "\n".join(lines)


def subject_scores(pred, true, subjects) -> dict[str, float]:
    """The same metrics on each subject's mean prediction vs mean truth over its slices."""
    pred, true = _as_pair(pred, true)
    subjects = np.asarray(subjects).ravel()
    if subjects.shape != pred.shape:
        raise ValueError(f"subjects has {subjects.size} entries for {pred.size} predictions")
    means = pd.DataFrame({"pred": pred, "true": true, "subject": subjects}).groupby("subject").mean()
    return score(means["pred"].to_numpy(), means["true"].to_numpy())


# The scorer's file errors are the CSV reader's (one reader for labels and submissions).
PredictionFileError = CsvError


def read_prediction_csv(path: str | Path, value_name: str = "value") -> pd.DataFrame:
    """Read a ``name, value[, subject]`` CSV (header optional, CRLF ok) into DataFrame[name, value(, subject)].

    Raises FileNotFoundError, or PredictionFileError naming the file and row for empty files, wrong field counts,
    values that are not numbers in [0, 100] and duplicate names (utils.csvfiles).
    """
    rows = read_name_value_rows(path, value_name=value_name,
                                range_hint="a percentage lies in [0, 100] (the challenge rejects anything else)")
    frame = pd.DataFrame({"name": rows.names, "value": rows.values})
    if rows.subjects is not None:
        integral = all(is_number(s) and float(s).is_integer() for s in rows.subjects)
        frame["subject"] = [int(float(s)) for s in rows.subjects] if integral else rows.subjects
    frame.attrs["rows"] = rows.lines  # the file's row of each line, for messages
    return frame


def matched_files(submission_path: str | Path, truth_path: str | Path,
                  allow_extra: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, truth) of a submission CSV and a truth CSV, in the truth's order. Every truth row needs its
    prediction; a prediction for an image the truth does not have is an error too (the challenge rejects such a
    file) unless `allow_extra`."""
    submission = read_prediction_csv(submission_path, "prediction")
    truth = read_prediction_csv(truth_path, "percentage")
    predicted = dict(zip(submission["name"], submission["value"]))
    missing = [(name, line) for name, line in zip(truth["name"], truth.attrs["rows"]) if name not in predicted]
    if missing:
        shown = ", ".join(f"{name} (truth row {line})" for name, line in missing[:5])
        raise PredictionFileError(f"{submission_path} lacks {len(missing)} of the {len(truth)} rows of "
                                  f"{truth_path}, e.g. {shown}")
    truth_names = set(truth["name"])
    extra = [(name, line) for name, line in zip(submission["name"], submission.attrs["rows"])
             if name not in truth_names]
    if extra and not allow_extra:
        shown = ", ".join(f"row {line}: {name}" for name, line in extra[:5])
        raise PredictionFileError(f"{submission_path} has {len(extra)} row(s) for images not in {truth_path} "
                                  f"({shown}); the challenge rejects such a file: remove them, or pass --allow-extra "
                                  "to score the file anyway")
    return np.array([predicted[name] for name in truth["name"]], dtype=np.float64), truth["value"].to_numpy(np.float64)


def score_files(submission_path: str | Path, truth_path: str | Path, allow_extra: bool = False) -> dict[str, float]:
    """Slice-level metrics of a submission CSV against a truth CSV (`matched_files`)."""
    return score(*matched_files(submission_path, truth_path, allow_extra))


def format_scores(scores: dict[str, float]) -> str:
    """The CLI's one line: ``MAE 5.12345678 PC 0.936512345 RMSE 9.250000000``."""
    return f"MAE {scores['MAE']:.8f} PC {scores['PC']:.9f} RMSE {scores['RMSE']:.9f}"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m utils.metrics", description="Score a submission: MAE, PC, RMSE.")
    parser.add_argument("submission", help="name,prediction rows (no header needed)")
    parser.add_argument("truth", help="name,percentage[,subject] rows, e.g. a Train.csv")
    parser.add_argument("--allow-extra", action="store_true", help="ignore predictions for images the truth lacks")
    args = parser.parse_args(argv)
    try:
        pred, true = matched_files(args.submission, args.truth, allow_extra=args.allow_extra)
    except (FileNotFoundError, PredictionFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_scores(score(pred, true)))
    print(format_class_scores(class_scores(pred, true)))
    return 0


if __name__ == "__main__":
    from utils import cli

    sys.exit(cli.run(main))
