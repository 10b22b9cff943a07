"""Pseudo-labelling (the paper's Section 3.5, Table 3): label Val (and Test) with the ensemble, retrain on
Train + those slices, and compare each model with and without pseudo-labels on the same out-of-fold slices.

Pseudo-labels are the ensemble's unrounded mean, clipped to [0, 100] (a float label keeps more information
than the rounded submission value; utils.losses splits a float label between its two neighbouring bins); with the
seed team's rounding (`rounding: authors`) they are their integers, as their extended_train_folding.json holds.
Pseudo-labelled slices join the training part of every fold and are never validated on, so the OOF scores of
a retrained model stay comparable with its original.

The retraining itself is planned by utils.pipeline like every training (02_train with use_pseudo_labels, model
`<name>_pl`, utils.config.pseudo_label_name); 04_pseudo_label runs before it (writes the labels) and after it (shows
Table 3, writes the final ensemble with each retrained model in place of its original).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from utils import csvfiles, ensemble
from utils.config import PSEUDO_SUFFIX, PathSettings, RunPaths, TrainConfig, pseudo_label_name


def write_pseudo_labels(run_dir: str | Path, models: Sequence[str] | None = None,
                        rounding: bool | str = True) -> pd.DataFrame:
    """Label every Val/Test slice with the ensemble: pseudo/pseudo_labels.csv (name, split, percentage). Unrounded,
    unless `rounding` is the seed team's ("authors"): their pseudo-labels were their ensemble's integers."""
    paths = RunPaths(run_dir)
    models = list(models) if models else ensemble.read_ensemble_models(paths.ensemble)
    per_model = ensemble.average_checkpoints_and_folds(ensemble.load_predictions(run_dir, models))
    unlabeled = per_model[per_model["split"].isin(["Val", "Test"])]
    if unlabeled.empty:
        return pd.DataFrame(columns=["name", "split", "percentage"])
    combined = ensemble.combine_models(unlabeled, models,
                                       rounding="authors" if ensemble.rounding_rule(rounding) == "authors" else False)
    labels = combined.rename(columns={"prediction": "percentage"})[["name", "split", "percentage"]]
    csvfiles.write_frame(paths.pseudo_labels_csv, labels)
    return labels


def retrained_models(per_model: pd.DataFrame, ensemble_models: Sequence[str]) -> list[str]:
    """The pseudo-label retrains (`<name>_pl`) of ensemble models that have out-of-fold predictions."""
    trained = set(per_model["model"])
    return [pseudo_label_name(m) for m in ensemble_models if pseudo_label_name(m) in trained]


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
    csvfiles.write_frame(RunPaths(run_dir).pseudo / "table3.csv", table)
    return table


def final_ensemble(run_dir: str | Path, per_model: pd.DataFrame, retrained: Sequence[str],
                   truth: pd.DataFrame | None = None, rounding: bool | str = True) -> list[str]:
    """The submission's ensemble: the original ensemble with each retrained model in place of its original,
    rounded by `rounding` (utils.ensemble.combine_models)."""
    paths = RunPaths(run_dir)
    models = ensemble.read_ensemble_models(paths.ensemble)
    swapped = {name.removesuffix(PSEUDO_SUFFIX): name for name in retrained}
    final = [swapped.get(m, m) for m in models]
    combined = ensemble.combine_models(per_model, final, rounding=rounding)
    if truth is not None:
        ensemble.write_calibration(per_model, final, truth, paths.ensemble, stem="final")
    ensemble.write_ensemble(combined, paths.ensemble, final, stem="final", rounding=rounding)
    return final


def retrain_here(configs: Sequence[TrainConfig], paths: PathSettings) -> None:
    """04 in Jupyter (role 'train'): train the pseudo-label retrains in this process, as 02 trains its models (the
    pipeline trains them as Dask jobs instead). The training loop is imported here, not with this module: 04 run
    as a report never needs torch."""
    from utils import train

    train.run_models(configs, paths)
