"""Cross-validate many models at once: every (model, fold) of one or more profiles, in parallel processes.

The pipeline (utils.pipeline) trains a profile's models one after another on the chosen folds and goes on to the
ensemble and the submission. An ablation or a recipe search wants something else: every model on all K folds,
the out-of-fold (OOF) scores, and nothing more, as fast as the machine allows. A small CNN at 96-128 px keeps a
big GPU mostly idle, so `--jobs` processes train side by side (each runs the same `utils.train.train_fold`).

    python -m utils.sweep run --profile ablation_cpu --data ../shared/per-covid19/crops --folds 0 1 2 3 4 --jobs 1
    python -m utils.sweep pack --data ../shared/per-covid19/crops --sizes 96 128 --out crops.npz
    python -m utils.sweep run --profile ablation_cpu --images crops.npz --folds 0 1 2 3 4 --jobs 8   # elsewhere

`pack` decodes the Train split once (utils.data.load_image, 1 channel: the slices are gray) into one compressed
file, for a machine that lacks the raw slices (a rented GPU box); `run --images` reads it instead of `--data`.

Output, under runs/<name>/ (the pipeline's layout, so utils.ensemble reads it too): folds.csv (utils.folds, the
same folds as notebook 01 for the same n_folds/fold_seed), models/<model>/fold<k>/ (config, history, kept
checkpoints, predictions.csv) and cv_summary.csv: one row per (model, fold) with the OOF MAE/PC/RMSE of the
checkpoint-averaged prediction, the training speed and seconds. A rerun reuses the finished (model, fold) pairs
(after checking that their recipe is unchanged) and resumes a killed one after its last finished epoch.
`report` prints the per-model table: OOF scores pooled over folds and the mean +- sd over folds (`--plot` saves
the README's figure).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from utils.config import RunPaths, TrainConfig, atomic_write_text, load_profile

REPO_ROOT = Path(__file__).resolve().parent.parent
SUMMARY_COLUMNS = ["model", "fold", "MAE", "PC", "RMSE", "n", "train_images_per_s", "seconds"]


# ----------------------------------------------------------------------------------------------- the data


def pack_images(data_dir: str | Path, sizes: Sequence[int], out: str | Path) -> Path:
    """Decode the labelled Train split at each size (1 channel) into one compressed .npz, written atomically."""
    from utils import data

    frame = data.load_split(data_dir, "Train", require_labels=True)
    arrays: dict[str, Any] = {"name": frame["name"].to_numpy(dtype=str),  # unicode, not object: no pickle
                              "percentage": frame["percentage"].to_numpy(np.float64),
                              "subject": frame["subject"].to_numpy(np.int64)}
    for size in sizes:
        arrays[f"images_{size}"] = np.stack([data.load_image(p, size, 1)[:, :, 0] for p in frame["path"]])
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.stem}.tmp-{os.getpid()}.npz")  # np.savez appends .npz otherwise
    try:
        np.savez_compressed(temporary, **arrays)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def _packed_labels(packed: Any) -> pd.DataFrame:
    return pd.DataFrame({"name": packed["name"], "percentage": packed["percentage"], "subject": packed["subject"]})


def _labels(images: str | None, data_dir: str | None) -> pd.DataFrame:
    if images:
        with np.load(images) as packed:
            return _packed_labels(packed)
    from utils import data

    return data.load_split(data_dir, "Train", require_labels=True)


_SPLIT_CACHE: dict[tuple, Any] = {}


def _train_split(cfg: TrainConfig, folds_csv: Path, images: str | None, data_dir: str | None, cache_dir: str):
    """The Train split with its folds at cfg.img_size / cfg.in_chans (one copy per process, source and size)."""
    from utils import train
    from utils.folds import read_folds

    key = (images, data_dir, str(folds_csv), cfg.img_size, cfg.in_chans)
    if key not in _SPLIT_CACHE:
        folds = read_folds(folds_csv)[["name", "fold"]]
        if images:
            with np.load(images) as packed:
                stored = f"images_{cfg.img_size}"
                if stored not in packed.files:
                    sizes = sorted(int(k.split("_")[1]) for k in packed.files if k.startswith("images_"))
                    raise ValueError(f"{images} has no {cfg.img_size} px images (it holds {sizes}): "
                                     f"pack it again with --sizes {cfg.img_size}")
                frame = _packed_labels(packed)
                pixels = np.repeat(packed[stored][:, :, :, None], cfg.in_chans, axis=3)
            frame = frame.merge(folds, on="name", how="left", validate="one_to_one")
            _SPLIT_CACHE[key] = train.SplitImages(frame, pixels)
        else:  # the Train split only: a sweep never predicts Val/Test, so it does not decode them
            from utils import data

            frame = data.load_split(data_dir, "Train", require_labels=True).merge(folds, on="name", how="left",
                                                                                  validate="one_to_one")
            decoded = data.cached_images(frame, cache_dir, cfg.img_size, cfg.in_chans, split="Train")
            _SPLIT_CACHE[key] = train.SplitImages(frame, decoded)
    return _SPLIT_CACHE[key]


# ----------------------------------------------------------------------------------------------- the jobs


def _oof_row(model_name: str, fold: int, predictions: pd.DataFrame, truth: pd.DataFrame) -> dict[str, Any]:
    """Score the checkpoint-averaged OOF prediction of one (model, fold)."""
    from utils.ensemble import OOF, average_checkpoints_and_folds
    from utils.metrics import score

    per_name = average_checkpoints_and_folds(predictions.assign(model=model_name, fold=fold))
    merged = per_name[per_name["split"] == OOF].merge(truth[["name", "percentage"]], on="name", validate="one_to_one")
    return {"model": model_name, "fold": fold, **score(merged["prediction"], merged["percentage"]), "n": len(merged)}


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One (model, fold): train (or reuse) it, return its summary row. Runs in a worker process."""
    import torch

    from utils import train

    torch.set_num_threads(job["threads"])
    cfg = TrainConfig.from_namespace(job["params"])
    split = _train_split(cfg, Path(job["folds_csv"]), job["images"], job["data_dir"], job["cache_dir"])
    paths = RunPaths(job["run_dir"])
    started = time.perf_counter()
    predictions = train.train_fold(cfg, job["fold"], split, paths.fold(cfg.model_name, job["fold"]), progress=False,
                                   log=lambda line: print(line, flush=True))
    history = pd.read_csv(paths.fold(cfg.model_name, job["fold"]) / "history.csv")
    row = _oof_row(cfg.model_name, job["fold"], predictions, split.frame)
    row.update(train_images_per_s=float(history["train_images_per_s"].mean()),
               seconds=float(history["seconds"].sum()) if len(history) else time.perf_counter() - started)
    return row


def plan_jobs(profiles: Sequence[str], overrides: dict[str, Any], folds: Sequence[int]) -> list[dict[str, Any]]:
    """Every (model, fold) of the profiles, model-major in profile order (the order they start in)."""
    jobs, seen = [], set()
    for name in profiles:
        profile = load_profile(name)
        for model in profile["models"]:
            params = {**profile["params"], **model, **overrides}
            TrainConfig.from_namespace(params)  # a wrong field fails here, before any process starts
            if model["model_name"] in seen:
                raise ValueError(f"model_name {model['model_name']!r} appears in two profiles: rename one")
            seen.add(model["model_name"])
            jobs += [{"params": {**params, "folds": [fold]}, "fold": fold} for fold in folds]
    return jobs


def run_sweep(profiles: Sequence[str], run_dir: str | Path, folds: Sequence[int], data_dir: str | None = None,
              images: str | None = None, overrides: dict[str, Any] | None = None, n_folds: int = 5,
              fold_seed: int = 0, jobs: int = 1, threads: int | None = None, time_limit: float | None = None,
              cache_dir: str | Path = REPO_ROOT / "data" / "cache") -> pd.DataFrame:
    """Train every (model, fold) of `profiles` and return the summary (also in run_dir/cv_summary.csv).

    `jobs` processes train side by side, each with `threads` torch threads (default: cores // jobs). No new job
    starts once `time_limit` seconds have passed (those running finish); a rerun carries on.
    """
    from utils.folds import make_folds, read_folds, write_folds

    if (data_dir is None) == (images is None):
        raise ValueError("give exactly one of data_dir (an official-layout folder) or images (a packed .npz)")
    paths = RunPaths(run_dir)
    folds_table = make_folds(_labels(images, data_dir), n_folds=n_folds, seed=fold_seed)
    if paths.folds_csv.is_file():
        made = read_folds(paths.folds_csv)
        if made["name"].tolist() != folds_table["name"].tolist() or made["fold"].tolist() != folds_table["fold"].tolist():
            raise ValueError(f"{paths.folds_csv} holds other folds than n_folds={n_folds}, fold_seed={fold_seed} give "
                             "for this data: use another run name (--name) or the run's own n_folds/fold_seed")
    else:
        write_folds(folds_table, paths.folds_csv)
    planned = plan_jobs(profiles, overrides or {}, folds)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    shared = {"folds_csv": str(paths.folds_csv), "images": images, "data_dir": data_dir, "cache_dir": str(cache_dir),
              "run_dir": str(paths.root), "threads": threads}
    summary_csv = paths.root / "cv_summary.csv"
    # Finished folds are not skipped here but by train_fold, which first checks that their recipe and held-out
    # slices are still this sweep's (a stale row would otherwise survive an edited profile); it reuses them cheaply.
    previous = pd.read_csv(summary_csv).to_dict("records") if summary_csv.is_file() else []
    rows = {(r["model"], int(r["fold"])): r for r in previous}
    todo = [{**job, **shared} for job in planned]
    started = time.monotonic()

    def record(row: dict[str, Any]) -> None:
        rows[(row["model"], int(row["fold"]))] = row
        table = pd.DataFrame(list(rows.values()), columns=SUMMARY_COLUMNS).sort_values(["model", "fold"])
        atomic_write_text(summary_csv, table.to_csv(index=False))
        print(f"[sweep] {row['model']} fold {row['fold']}: MAE {row['MAE']:.3f} PC {row['PC']:.3f} "
              f"RMSE {row['RMSE']:.3f} ({row['seconds']:.0f} s)", flush=True)

    def within_time() -> bool:
        return time_limit is None or time.monotonic() - started < time_limit

    failures: list[str] = []

    def collect(job: dict[str, Any], get_row) -> None:
        try:
            record(get_row())
        except Exception as error:  # one broken model must not cost the others' results: report all at the end
            failures.append(f"{job['params']['model_name']} fold {job['fold']}: {type(error).__name__}: {error}")
            print(f"[sweep] FAILED {failures[-1]}", flush=True)

    if jobs <= 1:
        for job in todo:
            if not within_time():
                break
            collect(job, lambda: _run_job(job))
    else:
        # spawn: CUDA cannot be used in forked children; maxtasksperchild=None keeps each worker's decoded data.
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            pending = []
            queue = list(todo)
            while queue or pending:
                while queue and len(pending) < jobs and within_time():
                    job = queue.pop(0)
                    pending.append((job, pool.apply_async(_run_job, (job,))))
                if not within_time():
                    queue.clear()
                for job, result in [p for p in pending if p[1].ready()]:
                    pending.remove((job, result))
                    collect(job, result.get)
                time.sleep(0.5)
    if failures:
        raise RuntimeError(f"{len(failures)} (model, fold) job(s) failed (the others are in {summary_csv}):\n  "
                           + "\n  ".join(failures))
    planned_keys = {(job["params"]["model_name"], job["fold"]) for job in planned}
    return pd.DataFrame([row for key, row in rows.items() if key in planned_keys], columns=SUMMARY_COLUMNS)


# ----------------------------------------------------------------------------------------------- the table


def cv_table(run_dir: str | Path, complete_only: bool = True) -> pd.DataFrame:
    """Per model: OOF MAE/PC/RMSE pooled over its folds (checkpoint-averaged predictions), and the fold MAE's mean,
    sample sd (ddof=1: over 5 folds; utils.ensemble.oof_table gives the population sd of its 2-fold runs) and range.
    `complete_only` keeps models with every fold of the run's folds.csv."""
    from utils.ensemble import OOF, average_checkpoints_and_folds, load_predictions
    from utils.folds import read_folds
    from utils.metrics import score

    truth = read_folds(RunPaths(run_dir).folds_csv)
    n_folds = truth["fold"].nunique()
    per_model = average_checkpoints_and_folds(load_predictions(run_dir))  # OOF: each slice has its one fold
    oof = per_model[per_model["split"] == OOF].merge(truth[["name", "percentage", "fold"]], on="name")
    rows = []
    for model_name, group in oof.groupby("model", sort=False):
        per_fold = [score(g["prediction"], g["percentage"])["MAE"] for _, g in group.groupby("fold")]
        if complete_only and len(per_fold) < n_folds:
            continue
        rows.append({"model": model_name, "folds": len(per_fold), **score(group["prediction"], group["percentage"]),
                     "fold_MAE_mean": np.mean(per_fold), "fold_MAE_std": np.std(per_fold, ddof=1) if len(per_fold) > 1
                     else float("nan"), "fold_MAE_min": np.min(per_fold), "fold_MAE_max": np.max(per_fold)})
    columns = ["model", "folds", "MAE", "PC", "RMSE", "fold_MAE_mean", "fold_MAE_std", "fold_MAE_min", "fold_MAE_max"]
    return pd.DataFrame(rows, columns=columns).sort_values("MAE").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
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
    run.add_argument("--jobs", type=int, default=1, help="processes training side by side")
    run.add_argument("--threads", type=int, help="torch threads per process (default: cores // jobs)")
    run.add_argument("--time-limit", type=float, help="seconds after which no new (model, fold) starts")
    run.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="override a TrainConfig field for every model, e.g. -p device cuda")
    report = commands.add_parser("report", help="print the per-model cross-validation table of a run")
    report.add_argument("run_dir")
    report.add_argument("--all", action="store_true", help="also models with missing folds")
    report.add_argument("--plot", help="also save the figure (pooled MAE bars, per-fold dots) to this PNG")
    args = parser.parse_args(argv)

    if args.command == "pack":
        print(f"wrote {pack_images(args.data, args.sizes, args.out)}")
    elif args.command == "run":
        name = args.name or Path(load_profile(args.profile[0])["path"]).stem
        run_dir = REPO_ROOT / "runs" / name
        run_sweep(args.profile, run_dir, args.folds, data_dir=args.data, images=args.images,
                  overrides=parse_overrides(args.param), n_folds=args.n_folds, fold_seed=args.fold_seed,
                  jobs=args.jobs, threads=args.threads, time_limit=args.time_limit)
        print(cv_table(run_dir, complete_only=False).to_string(index=False, float_format="%.3f"))
    else:
        table = cv_table(args.run_dir, complete_only=not args.all)
        if table.empty:
            print(f"no model of {args.run_dir} has finished every fold of its folds.csv yet; --all lists partial ones")
            return 1
        print(table.to_string(index=False, float_format="%.3f"))
        if args.plot:
            from utils import report as figures

            per_fold = pd.read_csv(Path(args.run_dir) / "cv_summary.csv")
            figures.cross_validation(table, per_fold).savefig(args.plot, dpi=100, bbox_inches="tight")
            print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
