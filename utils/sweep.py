"""Cross-validate many models at once: every (model, fold) of one or more profiles, as Dask jobs.

The pipeline (utils.pipeline) trains a profile's models on the chosen folds and goes on to the ensemble and the
submission. An ablation or a recipe search wants something else: every model on all K folds, the out-of-fold (OOF)
scores, and nothing more, as fast as the machine allows. Each (model, fold) is a job of utils.jobs (the pipeline's
runner): side by side on a multi-core CPU (`--jobs`), packed onto GPUs (`--jobs-per-gpu`), or on a cluster
(`--scheduler`); each runs `utils.train.train_fold`.

    python -m utils.sweep run --profile ablation_cpu --data ../shared/per-covid19/crops --folds 0 1 2 3 4
    python -m utils.sweep pack --data ../shared/per-covid19/crops --sizes 96 128 --out crops.npz
    python -m utils.sweep run --profile ablation_cpu --images crops.npz --jobs-per-gpu 12 -p device cuda  # elsewhere
    python -m utils.sweep report runs/ablation_cpu [--plot cv.png]

`pack` decodes the Train split once (utils.data.pack_images) for a machine that lacks the raw slices (a rented GPU
box); `run --images` reads it instead of `--data`.

Output, under runs/<name>/ (the pipeline's layout, so utils.ensemble reads it too): folds.csv (utils.folds, the
same folds as notebook 01 for the same n_folds/fold_seed), models/<model>/fold<k>/ (config, history, kept
checkpoints, predictions.csv) and cv_summary.csv: one row per (model, fold) with the OOF MAE/PC/RMSE of the
checkpoint-averaged prediction, the training speed and seconds. A rerun reuses the finished (model, fold) pairs
(after checking that their recipe is unchanged) and resumes a killed one after its last finished epoch; a failing
job does not stop the others. `report` prints the per-model table (utils.ensemble.oof_table: OOF scores pooled over
folds, the mean +- sd over folds; `--plot` saves the figure of docs/results.md).
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from utils import csvfiles, files, jobs
from utils.config import (
    ROUNDINGS,
    ConfigError,
    RunPaths,
    TrainConfig,
    check_run_settings,
    default_cache_dir,
    load_profile,
    workdir,
)

log = logging.getLogger("utils.sweep")  # not __name__: "__main__" under python -m

class SweepError(ValueError):
    """A report asked of a run that cannot give it (its message says what to do)."""


SUMMARY_COLUMNS = ["model", "fold", "MAE", "PC", "RMSE", "MAE_balanced", "n", "train_images_per_s", "seconds"]
# What `report` prints of utils.ensemble.oof_table (all of it is in the returned table): the challenge's metrics
# first, then the class-balanced MAE, the fold spread, and each severity class's MAE and bias.
REPORT_COLUMNS = ["model", "MAE", "PC", "RMSE", "MAE_balanced", "fold_MAE_mean", "fold_MAE_std",
                  "fold_MAE_balanced_mean", "n_folds"]


def plan_models(profiles: Sequence[str], overrides: dict[str, Any], folds: Sequence[int],
                n_folds: int = 5) -> list[TrainConfig]:
    """Every model of the profiles, in profile order, each to train `folds` of `n_folds`; settings checked as the
    pipeline does (params < model entry < overrides)."""
    configs, seen = [], set()
    for name in profiles:
        profile = load_profile(name)
        for cfg in check_run_settings(profile, {**overrides, "folds": list(folds), "n_folds": n_folds})["train"]:
            if cfg.model_name in seen:
                raise ConfigError(f"model_name {cfg.model_name!r} appears in two profiles: rename one",
                                  key="model_name")
            seen.add(cfg.model_name)
            configs.append(cfg)
    return configs


def _labels(images: str | None, data_dir: str | None) -> pd.DataFrame:
    from utils import data

    return data.packed_labels(images) if images else data.load_split(data_dir, "Train", require_labels=True)


def _summary_row(paths: RunPaths, model_name: str, fold: int, truth: pd.DataFrame) -> dict[str, Any] | None:
    """The checkpoint-averaged OOF score of one finished (model, fold), its speed and time; None if unfinished."""
    from utils import ensemble

    fold_dir = paths.fold(model_name, fold)
    if not (fold_dir / "predictions.csv").is_file():
        return None
    per_model = ensemble.average_checkpoints_and_folds(ensemble.load_predictions(paths.root, [model_name])
                                                       .query("fold == @fold"))
    row = ensemble.oof_table(per_model, truth).iloc[0]
    history = csvfiles.read_frame(fold_dir / "history.csv", text_columns=())
    return {"model": model_name, "fold": fold, "MAE": row["MAE"], "PC": row["PC"], "RMSE": row["RMSE"],
            "MAE_balanced": row["MAE_balanced"], "n": row["n_slices"],
            "train_images_per_s": float(history["train_images_per_s"].mean()),
            "seconds": float(history["seconds"].sum())}


def _check_folds(paths: RunPaths, labels: pd.DataFrame, n_folds: int, fold_seed: int) -> None:
    from utils.folds import make_folds, read_folds, write_folds

    folds_table = make_folds(labels, n_folds=n_folds, seed=fold_seed)
    if paths.folds_csv.is_file():
        made = read_folds(paths.folds_csv)
        if not made[["name", "fold"]].equals(folds_table[["name", "fold"]]):
            raise SweepError(f"{paths.folds_csv} holds other folds than n_folds={n_folds}, fold_seed={fold_seed} give "
                             "for this data: use another run name (--name) or the run's own n_folds/fold_seed")
    else:
        write_folds(folds_table, paths.folds_csv)


def run_sweep(profiles: Sequence[str], run_dir: str | Path, folds: Sequence[int], data_dir: str | None = None,
              images: str | None = None, overrides: dict[str, Any] | None = None, n_folds: int = 5,
              fold_seed: int = 0, runner: jobs.Runner | None = None, time_limit: float | None = None,
              cache_dir: str | Path | None = None) -> pd.DataFrame:
    """Train every (model, fold) of `profiles` and return the summary (also in run_dir/cv_summary.csv).

    No job starts once `time_limit` seconds have passed (those running finish); a rerun carries on. Failed jobs are
    reported together at the end (jobs.JobFailed), after the summary of the others is written."""
    if (data_dir is None) == (images is None):
        raise ValueError("give exactly one of data_dir (an official-layout folder) or images (a packed .npz)")
    paths, cache_dir = RunPaths(run_dir), cache_dir or default_cache_dir()
    configs = plan_models(profiles, overrides or {}, folds, n_folds)
    runner = runner or jobs.Runner()
    if runner.jobs is not None and runner.jobs > len(configs) * len(folds):  # no idle worker processes
        runner.jobs = len(configs) * len(folds)
    # before the lock and any training, as the pipeline does: the folds the labels allow, the models' weights
    from utils import models
    from utils.pipeline import subjects_problem

    labels = _labels(images, data_dir)
    problem = subjects_problem(images or f"the Train labels of {data_dir}", labels, n_folds, "--n-folds")
    if problem:
        raise SweepError(problem)
    if runner.scheduler is None:  # an external scheduler's workers have their own weights cache
        models.check_model_weights(configs)
    with files.RunLock(paths.root):
        files.remove_debris(paths.root, cache_dir)
        _check_folds(paths, labels, n_folds, fold_seed)
        failure = None
        try:
            jobs.run_training(configs, paths.root, data_dir, cache_dir, runner, packed=images, predict=False,
                              time_limit=time_limit, keep_going=True)
        except jobs.JobFailed as error:
            failure = error
        summary_csv = paths.root / "cv_summary.csv"
        kept = csvfiles.read_frame(summary_csv, ("model",)).to_dict("records") if summary_csv.is_file() else []
        rows = {(r["model"], int(r["fold"])): r for r in kept}
        planned = [(cfg.model_name, fold) for cfg in configs for fold in folds]
        for model_name, fold in planned:
            row = _summary_row(paths, model_name, fold, labels)
            if row is not None:
                rows[(model_name, fold)] = row
        table = pd.DataFrame(list(rows.values()), columns=SUMMARY_COLUMNS).sort_values(["model", "fold"])
        csvfiles.write_frame(summary_csv, table)
    if failure is not None:
        raise failure
    return table[[(m, f) in set(planned) for m, f in zip(table["model"], table["fold"])]].reset_index(drop=True)


def cv_table(run_dir: str | Path, complete_only: bool = True) -> pd.DataFrame:
    """Per model: OOF MAE/PC/RMSE pooled over its folds and the fold MAE's mean, sample sd and range
    (utils.ensemble.oof_table); `complete_only` keeps models with every fold of the run's folds.csv."""
    from utils.ensemble import average_checkpoints_and_folds, load_predictions, oof_table
    from utils.folds import read_folds

    truth = read_folds(RunPaths(run_dir).folds_csv)
    table = oof_table(average_checkpoints_and_folds(load_predictions(run_dir)), truth, folds=truth)
    if complete_only:
        table = table[table["n_folds"] == truth["fold"].nunique()]
    return table.reset_index(drop=True)


def paired_table(run_dir: str | Path, base: str, models: Sequence[str] | None = None,
                 roundings: Sequence[str] = ()) -> pd.DataFrame:
    """Each model (of `models`, default all) against `base`, fold by fold, on the folds both finished: per fold the
    plain and the class-balanced MAE and their differences (negative: better than the base), how many folds each
    improved, and the pooled out-of-fold MAE, class-balanced MAE and per-class bias of each model (the paired CV
    table). `roundings` (utils.config.ROUNDINGS): also the base's own predictions rounded by each rule, as models
    `<base>@<rule>` (the same checkpoints: what the rounding alone changes)."""
    from utils.ensemble import average_checkpoints_and_folds, combine_models, load_predictions, oof_table
    from utils.folds import read_folds

    truth = read_folds(RunPaths(run_dir).folds_csv)
    per_model = average_checkpoints_and_folds(load_predictions(run_dir))
    if roundings and base in set(per_model["model"]):
        own = per_model[per_model["model"] == base]
        per_model = pd.concat([per_model] + [combine_models(own, [base], rounding=rule).assign(model=f"{base}@{rule}")
                                             for rule in roundings], ignore_index=True)
        models = [*models, *(f"{base}@{rule}" for rule in roundings)] if models else None
    oof = per_model[per_model["split"] == "oof"].merge(truth[["name", "fold"]], on="name")
    if base not in set(oof["model"]):
        raise SweepError(f"--base {base!r}: no out-of-fold predictions in {run_dir} (models: "
                         f"{sorted(set(oof['model']))})")
    unknown = sorted(set(models or ()) - set(oof["model"]))
    if unknown:
        raise SweepError(f"--models {unknown[0]!r}: no out-of-fold predictions in {run_dir} (models: "
                         f"{sorted(set(oof['model']))})")
    if models:
        oof = oof[oof["model"].isin({base, *models})]
        per_model = per_model[per_model["model"].isin({base, *models})]
    per_fold = {(model, fold): oof_table(group, truth).iloc[0] for (model, fold), group in oof.groupby(["model",
                                                                                                       "fold"])}
    pooled = oof_table(per_model, truth).set_index("model")
    base_folds = {fold for model, fold in per_fold if model == base}
    rows = []
    for model in sorted({model for model, _ in per_fold}, key=lambda m: (m != base, m)):
        folds = sorted(base_folds & {fold for m, fold in per_fold if m == model})
        row = {"model": model, "folds": len(folds), "MAE": pooled.loc[model, "MAE"],
               "MAE_balanced": pooled.loc[model, "MAE_balanced"]}
        for metric, short in (("MAE", "d_MAE"), ("MAE_balanced", "d_balanced")):
            deltas = [per_fold[(model, f)][metric] - per_fold[(base, f)][metric] for f in folds]
            for fold, delta in zip(folds, deltas):
                row[f"{short}_fold{fold}"] = delta
            row[f"{short}_mean"] = float(np.mean(deltas)) if deltas else float("nan")  # no fold shared
            row[f"{short}_helped"] = int(sum(d < 0 for d in deltas))
        for column in pooled.columns:
            if column.startswith("bias_") or (column.startswith("MAE_") and column != "MAE_balanced"):
                row[column] = pooled.loc[model, column]
        rows.append(row)
    return pd.DataFrame(rows)


def format_report(table: pd.DataFrame) -> str:
    """The per-model table as printed: the challenge's metrics, the class-balanced MAE and the fold spread, then
    each severity class's MAE and bias (negative: predicted too low)."""
    classes = [c for c in table.columns if c.startswith(("MAE_", "bias_")) and c != "MAE_balanced"]
    main = table[[c for c in REPORT_COLUMNS if c in table.columns]].to_string(index=False, float_format="%.3f")
    per_class = table[["model", *classes]].to_string(index=False, float_format="%.2f")
    return f"{main}\n\nper severity class (MAE, bias = mean of prediction - truth):\n{per_class}"


def main(argv: Sequence[str] | None = None) -> int:
    from utils.data import pack_images
    from utils.pipeline import parse_overrides

    parser = argparse.ArgumentParser(prog="python -m utils.sweep", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pack = commands.add_parser("pack", help="decode the Train split once into a compressed .npz")
    pack.add_argument("--data", required=True, help="official-layout folder (Train/ with its labels)")
    pack.add_argument("--sizes", type=int, nargs="+", required=True, help="image sizes to store, e.g. 96 128")
    pack.add_argument("--out", required=True)
    run = commands.add_parser("run", help="train every (model, fold) of the profiles, write cv_summary.csv")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="official-layout folder")
    source.add_argument("--images", help="a .npz written by `pack`")
    run.add_argument("--profile", action="append", required=True, help="profile name or path (repeatable)")
    run.add_argument("--name", help="run name (default: the first profile's) -> runs/<name>/")
    run.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    run.add_argument("--n-folds", type=int, default=5)
    run.add_argument("--fold-seed", type=int, default=0)
    run.add_argument("--jobs", type=int, default=None, help="jobs side by side on a CPU-only machine (default 1)")
    run.add_argument("--jobs-per-gpu", type=int, default=2, help="jobs sharing each GPU")
    run.add_argument("--threads", type=int, help="torch threads per job (default: cores // jobs)")
    run.add_argument("--scheduler", help="address of a running Dask scheduler (default: a local cluster)")
    run.add_argument("--time-limit", type=float, help="seconds after which no new (model, fold) starts")
    run.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="override a TrainConfig field for every model, e.g. -p device cuda")
    report = commands.add_parser("report", help="print the per-model cross-validation table of a run")
    report.add_argument("run_dir")
    report.add_argument("--all", action="store_true", help="also models with missing folds")
    report.add_argument("--plot", help="also save the figure (pooled MAE bars, per-fold dots) to this PNG")
    compare = commands.add_parser("compare", help="paired per-fold differences of each model against a base model")
    compare.add_argument("run_dir")
    compare.add_argument("--base", required=True, help="the model the others are compared with")
    compare.add_argument("--models", nargs="+", help="only these models (default: every model of the run)")
    compare.add_argument("--roundings", nargs="+", default=[], choices=ROUNDINGS,
                         help="also the base's predictions rounded by these rules, as models BASE@RULE")
    compare.add_argument("--csv", help="also write the table to this CSV")
    args = parser.parse_args(argv)

    if args.command == "pack":
        print(f"wrote {pack_images(args.data, args.sizes, args.out)}")
    elif args.command == "run":
        name = args.name or Path(load_profile(args.profile[0])["path"]).stem
        run_dir = workdir() / "runs" / name
        runner = jobs.Runner(scheduler=args.scheduler, jobs=args.jobs, jobs_per_gpu=args.jobs_per_gpu,
                             threads=args.threads)
        run_sweep(args.profile, run_dir, args.folds, data_dir=args.data, images=args.images,
                  overrides=parse_overrides(args.param), n_folds=args.n_folds, fold_seed=args.fold_seed,
                  runner=runner, time_limit=args.time_limit)
        print(format_report(cv_table(run_dir, complete_only=False)))
    elif args.command == "compare":
        table = paired_table(args.run_dir, args.base, args.models, args.roundings)
        print(table.to_string(index=False, float_format="%.3f"))
        if args.csv:
            csvfiles.write_frame(args.csv, table)
            print(f"wrote {args.csv}")
    else:
        table = cv_table(args.run_dir, complete_only=not args.all)
        if table.empty:
            print(f"no model of {args.run_dir} has finished every fold of its folds.csv yet; --all lists partial ones")
            return 1
        print(format_report(table))
        if args.plot:
            from utils import report as figures

            per_fold = csvfiles.read_frame(Path(args.run_dir) / "cv_summary.csv", ("model",))
            figures.save_png(figures.cross_validation(table, per_fold), args.plot, dpi=100)
            print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    from utils import cli, data

    raise SystemExit(cli.run(main, errors=(jobs.JobFailed, data.DataError, SweepError), code=1))
