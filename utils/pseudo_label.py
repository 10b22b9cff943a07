"""Pseudo-labelling (the paper's Section 3.5, Table 3): label Val (and Test) with the ensemble, retrain on
Train + those slices, and compare each model with and without pseudo-labels on the same out-of-fold slices.

Pseudo-labels are the ensemble's unrounded mean, clipped to [0, 100] (a float label keeps more information
than the rounded submission value; utils.losses splits a float label between its two neighbouring bins).
Pseudo-labelled slices join the training part of every fold and are never validated on, so the OOF scores of
a retrained model stay comparable with its original.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from utils import ensemble
from utils.config import REPO_ROOT, RunPaths, atomic_write_text

PSEUDO_SUFFIX = "_pl"


def write_pseudo_labels(run_dir: str | Path, models: Sequence[str] | None = None) -> pd.DataFrame:
    """Label every Val/Test slice with the ensemble (unrounded); writes pseudo/pseudo_labels.csv (name, split, percentage)."""
    paths = RunPaths(run_dir)
    models = list(models) if models else ensemble.read_ensemble_models(paths.ensemble)
    per_model = ensemble.average_checkpoints_and_folds(ensemble.load_predictions(run_dir, models))
    unlabeled = per_model[per_model["split"].isin(["Val", "Test"])]
    if unlabeled.empty:
        return pd.DataFrame(columns=["name", "split", "percentage"])
    combined = ensemble.combine_models(unlabeled, models, rounding=False)
    labels = combined.rename(columns={"prediction": "percentage"})[["name", "split", "percentage"]]
    atomic_write_text(paths.pseudo_labels_csv, labels.to_csv(index=False))
    return labels


def retrain(run_dir: str | Path, retrain_params: Sequence[dict[str, Any]], kernel_name: str = "python3") -> list[str]:
    """Run notebooks/02_train.ipynb once per parameter dict (use_pseudo_labels=True); finished folds are reused."""
    import papermill

    paths = RunPaths(run_dir)
    notebook = REPO_ROOT / "notebooks" / "02_train.ipynb"
    declared = set(papermill.inspect_notebook(str(notebook)))
    names = []
    for params in retrain_params:
        params = {k: v for k, v in {**params, "use_pseudo_labels": True}.items() if k in declared}
        output = paths.notebooks / f"02_train__{params['model_name']}.ipynb"
        output.parent.mkdir(parents=True, exist_ok=True)
        print(f"retraining {params['model_name']} with pseudo-labels -> {output}", flush=True)
        papermill.execute_notebook(str(notebook), str(output), parameters=params, kernel_name=kernel_name,
                                   cwd=str(notebook.parent), progress_bar=False, log_output=True)
        names.append(params["model_name"])
    return names


def comparison_table(run_dir: str | Path, per_model: pd.DataFrame, truth: pd.DataFrame,
                     retrained: Sequence[str]) -> pd.DataFrame:
    """Table 3: OOF MAE/PC/RMSE of each retrained model next to its original, on the slices both predicted;
    written to pseudo/table3.csv (empty when nothing was retrained, e.g. data without Val/Test)."""
    rows = []
    for name in retrained:
        base = name.removesuffix(PSEUDO_SUFFIX)
        pair = per_model[per_model["model"].isin([base, name]) & (per_model["split"] == ensemble.OOF)]
        common = set.intersection(*(set(g["name"]) for _, g in pair.groupby("model"))) if len(pair) else set()
        table = ensemble.oof_table(pair[pair["name"].isin(common)], truth)
        rows.append(table.assign(pseudo_labels=table["model"] == name, base_model=base))
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["model", "MAE", "PC", "RMSE"])
    atomic_write_text(RunPaths(run_dir).pseudo / "table3.csv", table.to_csv(index=False))
    return table


def final_ensemble(run_dir: str | Path, per_model: pd.DataFrame, retrained: Sequence[str]) -> list[str]:
    """The submission's ensemble: the original ensemble with each retrained model in place of its original."""
    paths = RunPaths(run_dir)
    models = ensemble.read_ensemble_models(paths.ensemble)
    swapped = {name.removesuffix(PSEUDO_SUFFIX): name for name in retrained}
    final = [swapped.get(m, m) for m in models]
    ensemble.write_ensemble(ensemble.combine_models(per_model, final, rounding=True), paths.ensemble, final, stem="final")
    return final
