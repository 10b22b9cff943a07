"""Averaging predictions: kept checkpoints -> folds -> models (the paper's Section 3.4 / Tables 1-2).

Each trained fold leaves `predictions.csv` (split, name, epoch, prediction) for its last-k checkpoints.
1. Checkpoints: the mean over a fold's kept epochs (the seed team averaged the last 5 epochs' predictions).
2. Folds: "oof" rows come from the one fold that held the slice out; Val/Test rows are the mean over folds.
3. Models: the mean over models, clipped to [0, 100], rounded half up (the seed's rule: 12.5 -> 13, not
   Python's banker's 12); rounding is switchable because the unrounded mean is what pseudo-labels want.

Rounding rules (`rounding`, utils.config.ROUNDINGS): `once` rounds the one mean above; `none` keeps it; `authors` is
the seed team's published code: each checkpoint's prediction rounded half up, a negative one to 0
(inference_method_*.py); one model: the mean of its checkpoints' integers truncated by int() (its inference script);
several: the mean of every checkpoint integer of every model, capped at 100 and rounded half up
(combine_results.py). Checkpoints 2.4, 2.4, 2.7: once gives round(2.5) = 3, authors int(mean(2, 2, 3)) = 2.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from utils import csvfiles, files
from utils.config import RunPaths, rounding_rule
from utils.metrics import class_balanced_mae, class_scores, score

OOF = "oof"


class EnsembleError(ValueError):
    """Predictions that cannot make an ensemble (non-finite values, no slice in common); nothing was written."""


def read_predictions(path: str | Path) -> pd.DataFrame:
    """A fold's predictions.csv (split, name, epoch, prediction), verified against its integrity record; a value
    that is not a finite number is an error (never averaged, clipped or rounded into a submission)."""
    path = Path(path)
    way_out = f"rerun that fold (delete {path.parent}) or the whole run with --force"
    files.verify(path, way_out=way_out)
    predictions = csvfiles.read_frame(path, text_columns=("split", "name"))
    values = pd.to_numeric(predictions["prediction"], errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        first = predictions.loc[bad, "name"].iloc[0]
        raise EnsembleError(f"{path}: {int(bad.sum())} of {len(values)} predictions are NaN or infinite (e.g. "
                            f"{first}): that training diverged; {way_out} with a lower lr")
    return predictions.assign(prediction=values)


def round_half_up(values: np.ndarray | pd.Series) -> np.ndarray:
    """0.5 always rounds up (np.round would send 12.5 to 12): the seed team's submission rule."""
    return np.floor(np.asarray(values, dtype=np.float64) + 0.5)


def load_predictions(run_dir: str | Path, model_names: Iterable[str] | None = None) -> pd.DataFrame:
    """Every kept checkpoint's predictions of a run: columns model, fold, split, name, epoch, prediction.
    Each predictions.csv is checked against its integrity record first (utils.files)."""
    frames = []
    for model_name, fold, path in RunPaths(run_dir).fold_files("predictions.csv"):
        if model_names is None or model_name in set(model_names):
            frames.append(read_predictions(path).assign(model=model_name, fold=fold))
    if not frames:
        raise FileNotFoundError(f"no predictions under {RunPaths(run_dir).models}/*/fold*/predictions.csv: "
                                "run notebooks/02_train.ipynb first")
    return pd.concat(frames, ignore_index=True)


def _authors_rounding(chosen: pd.DataFrame, index: pd.MultiIndex, n_models: int) -> np.ndarray:
    """The seed team's ensemble value of each (split, name) of `index` (module docstring): every checkpoint integer
    of every model weighs the same; one model's mean is truncated, several models' mean rounded half up."""
    integers = chosen.pivot_table(index=["split", "name"], columns="model", values="authors").loc[index]
    counts = chosen.pivot_table(index=["split", "name"], columns="model", values="checkpoints").loc[index]
    mean = np.clip(((integers * counts).sum(axis=1) / counts.sum(axis=1)).to_numpy(np.float64), 0.0, 100.0)
    return np.trunc(mean) if n_models == 1 else round_half_up(mean)


def average_checkpoints_and_folds(predictions: pd.DataFrame) -> pd.DataFrame:
    """One prediction per (model, split, name): the mean over kept epochs, then over folds (OOF: its one fold).
    Also what the `authors` rounding combines: `authors`, the mean of the seed team's checkpoint integers (each
    checkpoint rounded half up, a negative one to 0) over all the model's checkpoints, and their number."""
    rounded = predictions.assign(authors=round_half_up(np.maximum(predictions["prediction"], 0.0)))
    per_fold = rounded.groupby(["model", "split", "name", "fold"], as_index=False)["prediction"].mean()
    per_model = per_fold.groupby(["model", "split", "name"], as_index=False).agg(
        prediction=("prediction", "mean"), n_folds=("fold", "nunique"))
    integers = rounded.groupby(["model", "split", "name"], as_index=False).agg(
        authors=("authors", "mean"), checkpoints=("authors", "size"))
    return per_model.merge(integers, on=["model", "split", "name"], validate="1:1")


def combine_models(per_model: pd.DataFrame, models: Sequence[str] | None = None, rounding: bool | str = True
                   ) -> pd.DataFrame:
    """The ensemble: mean over models, clipped to [0, 100], rounded half up unless `rounding` is false / "none"
    ("authors": from the seed team's checkpoint integers, module docstring).

    Only slices that every chosen model predicted are kept (OOF coverage differs when models trained other folds).
    """
    models = list(models) if models is not None else sorted(per_model["model"].unique())
    chosen = per_model[per_model["model"].isin(models)]
    missing = sorted(set(models) - set(chosen["model"]))
    if missing:
        raise ValueError(f"no predictions for models {missing}; available: {sorted(per_model['model'].unique())}")
    if not np.isfinite(chosen["prediction"].to_numpy(np.float64)).all():
        raise EnsembleError("NaN or infinite predictions cannot be averaged into an ensemble (a diverged training): "
                            "rerun the run with a lower lr and --force")
    rule = rounding_rule(rounding)
    wide = chosen.pivot_table(index=["split", "name"], columns="model", values="prediction").dropna()
    if wide.empty:
        raise EnsembleError(f"the models {models} predicted no slice in common: nothing to ensemble (did they train "
                            "on other folds, or on other data?)")
    values = np.clip(wide.mean(axis=1).to_numpy(), 0.0, 100.0)
    if rule == "once":
        values = round_half_up(values)
    elif rule == "authors":
        values = _authors_rounding(chosen, wide.index, len(set(models)))
    return pd.DataFrame({"split": wide.index.get_level_values("split"), "name": wide.index.get_level_values("name"),
                         "prediction": values}).reset_index(drop=True)


def oof_table(per_model: pd.DataFrame, truth: pd.DataFrame, ensemble_oof: pd.DataFrame | None = None,
              folds: pd.DataFrame | None = None) -> pd.DataFrame:
    """Tables 1-2 of the paper on out-of-fold slices, one row per model (and the ensemble), sorted by MAE: MAE, PC,
    RMSE pooled over the held-out slices, then the class-balanced MAE (`MAE_balanced`) and each severity class's
    MAE and bias (`MAE_<class>`, `bias_<class>`: mean of prediction - truth, negative = too low); with `folds`
    (name, fold) also each metric's mean and sample sd (ddof=1, NaN for one fold) over folds, the fold MAE range
    (plain and class-balanced) and the number of folds. The one OOF table of the project (03_ensemble, 04's Table 3,
    utils.sweep's cross-validation report)."""
    rows = []
    candidates = [(m, g) for m, g in per_model[per_model["split"] == OOF].groupby("model", sort=False)]
    if ensemble_oof is not None:
        candidates.append(("ensemble", ensemble_oof[ensemble_oof["split"] == OOF]))
    for model_name, group in candidates:
        merged = group.merge(truth[["name", "percentage"]], on="name")
        pred, true = merged["prediction"].to_numpy(), merged["percentage"].to_numpy()
        row = {"model": model_name, "n_slices": len(merged), **score(pred, true)}
        classes = class_scores(pred, true)
        row["MAE_balanced"] = float(classes["MAE"].mean())
        for _, c in classes.iterrows():
            row[f"MAE_{c['class']}"], row[f"bias_{c['class']}"] = c["MAE"], c["bias"]
        if folds is not None:
            merged = merged.merge(folds[["name", "fold"]], on="name")
            per_fold = pd.DataFrame([{**score(g["prediction"].to_numpy(), g["percentage"].to_numpy()),
                                      "MAE_balanced": class_balanced_mae(g["prediction"].to_numpy(),
                                                                         g["percentage"].to_numpy())}
                                     for _, g in merged.groupby("fold")])
            row["n_folds"] = len(per_fold)
            for metric in ("MAE", "PC", "RMSE", "MAE_balanced"):
                row[f"fold_{metric}_mean"] = per_fold[metric].mean()
                row[f"fold_{metric}_std"] = per_fold[metric].std(ddof=1)
            row["fold_MAE_min"], row["fold_MAE_max"] = per_fold["MAE"].min(), per_fold["MAE"].max()
        rows.append(row)
    return pd.DataFrame(rows).sort_values("MAE", kind="stable").reset_index(drop=True)


def greedy_selection(per_model: pd.DataFrame, truth: pd.DataFrame, max_models: int | None = None) -> list[str]:
    """Forward selection on OOF MAE (Caruana et al. 2004, without replacement): add the model that lowers the
    ensemble's OOF MAE most; stop when none does."""
    remaining = sorted(per_model["model"].unique())
    chosen: list[str] = []
    best = np.inf
    while remaining and (max_models is None or len(chosen) < max_models):
        trials = {}
        for candidate in remaining:
            oof = combine_models(per_model[per_model["split"] == OOF], chosen + [candidate], rounding=True)
            merged = oof.merge(truth[["name", "percentage"]], on="name")
            if len(merged):
                trials[candidate] = float(np.mean(np.abs(merged["prediction"] - merged["percentage"])))
        if not trials:
            break
        candidate, mae = min(trials.items(), key=lambda kv: kv[1])
        if mae >= best:
            break
        chosen.append(candidate)
        remaining.remove(candidate)
        best = mae
    return chosen


def write_ensemble(combined: pd.DataFrame, out_dir: str | Path, models: Sequence[str], stem: str = "ensemble",
                   rounding: bool | str = True) -> Path:
    """Save the ensemble's predictions (split, name, prediction), its rounding rule (what utils.predict repeats) and
    the models it averaged; the model list last: it marks the ensemble finished (utils.predict, 04), so a kill
    between them never leaves a stale csv behind it."""
    out_dir = Path(out_dir)
    if combined.empty or not np.isfinite(combined["prediction"].to_numpy(np.float64)).all():
        raise EnsembleError(f"refusing to write {out_dir / stem}.csv: the ensemble has no slices or non-finite values")
    csvfiles.write_frame(out_dir / f"{stem}.csv", combined, record=True)
    files.write_text(out_dir / f"{stem}_rounding.txt", rounding_rule(rounding) + "\n", record=True)
    files.write_text(out_dir / f"{stem}_models.txt", "\n".join(models) + "\n", record=True)
    return out_dir / f"{stem}.csv"


# What a changed or damaged file of a run's ensemble/ folder calls for.
ENSEMBLE_WAY_OUT = "rerun the notebook that wrote it (03_ensemble, or 04_pseudo_label for final_*): ./run_all.sh " \
                   "--name <run> resumes the run and rewrites it"


def calibration_name(stem: str = "ensemble") -> str:
    """The file of an ensemble's interval calibration in the run's ensemble/ folder (utils.intervals)."""
    return f"{stem}_calibration.csv"


def write_calibration(per_model: pd.DataFrame, models: Sequence[str], truth: pd.DataFrame, out_dir: str | Path,
                      stem: str = "ensemble") -> Path | None:
    """The ensemble's unrounded out-of-fold predictions with their labels: what utils.intervals calibrates on
    (None, and nothing written, when no slice has an out-of-fold prediction). Columns prediction, percentage: what
    utils.intervals.Calibration.load reads (written here without importing crepes into every 03 run)."""
    oof = per_model[per_model["split"] == OOF]
    if oof.empty:
        return None
    combined = combine_models(oof, models, rounding=False).merge(truth[["name", "percentage"]], on="name")
    return csvfiles.write_frame(Path(out_dir) / calibration_name(stem), combined[["prediction", "percentage"]],
                                record=True)


def read_ensemble_rounding(out_dir: str | Path, stem: str = "ensemble") -> str:
    """The rounding rule the ensemble was written with ("once" for a run written before the rule was recorded)."""
    path = Path(out_dir) / f"{stem}_rounding.txt"
    if not path.is_file():
        return "once"
    files.verify(path, ENSEMBLE_WAY_OUT)
    return rounding_rule(path.read_text().strip())


def read_ensemble_models(out_dir: str | Path, stem: str = "ensemble") -> list[str]:
    path = Path(out_dir) / f"{stem}_models.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run notebooks/03_ensemble.ipynb first")
    # an edited model list would change every prediction without a word
    files.verify(path, ENSEMBLE_WAY_OUT, older_ok=True)
    return [line for line in path.read_text().splitlines() if line]
