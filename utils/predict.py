"""Predict new slices with a trained run or its export: the challenge's Test phase, and a user's own scans.

    python -m utils.predict RUN_OR_EXPORT IMAGES... --out preds.csv [--no-round] [--batch-size N] [--device D]
                                                                     [--workers N]
    python -m utils.predict export RUN [--out DIR] [--average-checkpoints]

Prediction is the run's final ensemble exactly as 03-05 combine it (utils.ensemble's functions, in the same order):
every kept checkpoint predicts every image (with its model's h-flip TTA), the mean over a fold's checkpoints, the
mean over folds, the mean over models, clipped to [0, 100] and rounded by the run's rule (`rounding`: half up once,
or the seed team's way; `--no-round`: the unrounded mean).
The models are the final ensemble of the run (`ensemble/final_models.txt`, with the pseudo-label retrains, else
`ensemble/ensemble_models.txt`). Images: files or folders (searched recursively) of PNG/JPEG slices of any size and
mode, decoded by utils.data's reader at each model's size. Output: `name,prediction` rows sorted by name, no header,
numbers written as in the submission (the challenge's format); two images with one name are refused, naming both
(hidden files and folders such as `.ipynb_checkpoints` are skipped, symlinked folders followed). Written atomically
once everything is predicted: a failure leaves no output.

The export (`runs/<name>/export/`, written by 05_submit) holds what prediction needs and nothing else: every model's
config and kept checkpoints (hard links to the run's files where the file system allows, else copies), and
`manifest.json` with the ensemble's recipe, each model's preprocessing and the size and SHA-256 of every file. It
loads with `torch.load(weights_only=True)` on another machine, without the data or the run folder; every file is
verified against the manifest first. `--average-checkpoints` stores one weight set per fold instead (the mean of its
kept checkpoints' weights, BatchNorm statistics included): k times smaller, not the same predictions (docs/predict.md
gives the measured OOF difference). The export is closed: every file prediction loads (each model's config and
weights) must be listed in `files` with its digest, and a manifest that lists less, or lacks a key, is refused
naming what is missing.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from utils import cli, csvfiles, data, ensemble, files, intervals, machine, submission, train
from utils.config import RunPaths, TrainConfig

log = logging.getLogger("utils.predict")  # not __name__: "__main__" under python -m

EXPORT_FORMAT = 1
MANIFEST = "manifest.json"
SPLIT = "predict"  # the split name of new images in the ensemble's tables


class PredictError(ValueError):
    """Nothing to predict with, or nothing to predict; the message names the file and the fix."""


@dataclass
class EnsembleModel:
    """One model of the ensemble: its recipe and, per fold, the weight files whose predictions are averaged."""

    config: TrainConfig
    weights: dict[int, list[Path]]
    way_out: str = "retrain the run that made these weights"  # what a damaged weight file's error says to do

    @property
    def name(self) -> str:
        return self.config.model_name


# ----------------------------------------------------------------------------------------------- loading an ensemble


def _final_stem(run_dir: Path) -> str:
    """The run's final ensemble: after pseudo-labelling (`final`), else 03's (`ensemble`)."""
    ensemble_dir = RunPaths(run_dir).ensemble
    for stem in ("final", "ensemble"):
        if (ensemble_dir / f"{stem}_models.txt").is_file():
            return stem
    raise PredictError(f"no finished ensemble in {run_dir} ({ensemble_dir}/ensemble_models.txt is missing): run the "
                       "pipeline through 03_ensemble first (./run_all.sh --name <run> ...)")


def load_calibration(run_or_export: str | os.PathLike) -> intervals.Calibration:
    """The out-of-fold calibration of the final ensemble's intervals (a run's ensemble/, or an export's)."""
    path = Path(run_or_export)
    if (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        if not manifest.get("calibration"):
            raise intervals.IntervalError(f"{path} holds no interval calibration (its run's ensemble had none to "
                                          f"give): export the run again once 03_ensemble has written it "
                                          f"(python -m utils.predict export {manifest.get('run', 'RUN')})")
        way_out = "copy the export again, or export the run again"
        return intervals.Calibration.load(files.check_entry(path / manifest["calibration"],
                                                            manifest["files"][manifest["calibration"]], way_out))
    calibration = RunPaths(path).ensemble / ensemble.calibration_name(_final_stem(path))
    if calibration.is_file():
        files.verify(calibration, ensemble.ENSEMBLE_WAY_OUT, older_ok=True)
    return intervals.Calibration.load(calibration)


def ensemble_rounding(run_or_export: str | os.PathLike) -> str:
    """The rounding rule the run's final ensemble was written with (utils.config.ROUNDINGS)."""
    path = Path(run_or_export)
    if (path / MANIFEST).is_file():
        return ensemble.rounding_rule(read_manifest(path)["ensemble"].get("rounding", "once"))
    return ensemble.read_ensemble_rounding(RunPaths(path).ensemble, _final_stem(path))


def final_models(run_dir: str | os.PathLike) -> list[str]:
    """The models of the run's final ensemble (after pseudo-labelling, else 03's)."""
    return ensemble.read_ensemble_models(RunPaths(run_dir).ensemble, _final_stem(run_dir))


def _from_run(run_dir: Path) -> list[EnsembleModel]:
    """The run's final ensemble; every finished fold's files are verified against their integrity records."""
    paths, models = RunPaths(run_dir), []
    for name in final_models(run_dir):
        weights, config = {}, None
        for model_name, fold, predictions_csv in paths.fold_files("predictions.csv"):
            if model_name == name:
                fold_dir = predictions_csv.parent
                way_out = f"rerun that fold (delete {fold_dir}) or the run with --force"
                files.verify_folder(fold_dir, way_out)
                ensemble.read_predictions(predictions_csv)  # a diverged fold (NaN predictions) is never exported
                # the recipe the model is rebuilt from: an edited one would predict otherwise, without a word
                config = TrainConfig.load_yaml(files.verify(fold_dir / "config.yaml", way_out, older_ok=True))
                weights[fold] = [train.checkpoint_path(fold_dir, epoch) for epoch in train.kept_epochs(config)]
        if config is None:
            raise PredictError(f"model {name} of the ensemble of {run_dir} has no finished fold: rerun the pipeline")
        models.append(EnsembleModel(config, weights, f"rerun its fold (delete its folder under {paths.models}) or "
                                                     f"the run with --force"))
    return models


def read_manifest(export_dir: Path) -> dict[str, Any]:
    """An export's manifest, its shape checked: a missing key or a file that prediction loads without a digest in
    `files` is a PredictError naming it (the export is closed: nothing unlisted is ever loaded)."""
    manifest_path = export_dir / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise PredictError(f"{manifest_path} is unreadable ({error}): export the run again "
                           "(python -m utils.predict export RUN)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise PredictError(f"{manifest_path}: export format {found!r}, this version reads "
                           f"{EXPORT_FORMAT}: export the run again with this version")
    way_out = f"export the run again (python -m utils.predict export {manifest.get('run', 'RUN')})"
    shapes = {"files": dict, "models": list, "ensemble": dict, "run": str}
    missing = [key for key, kind in shapes.items() if not isinstance(manifest.get(key), kind)]
    if missing:
        raise PredictError(f"{manifest_path} has no {', '.join(repr(k) for k in missing)}: it is incomplete or was "
                           f"edited; {way_out}")
    calibration = manifest.get("calibration")
    if calibration and calibration not in manifest["files"]:
        raise PredictError(f"{manifest_path}: {export_dir / calibration} (the intervals' calibration) has no size and "
                           f"digest in the manifest's files, so it cannot be checked: refused; {way_out}")
    for index, model in enumerate(manifest["models"]):
        if not isinstance(model, dict) or not {"name", "config", "folds"} <= set(model) or \
                not isinstance(model["folds"], dict) or not all(isinstance(v, list) for v in model["folds"].values()):
            raise PredictError(f"{manifest_path}: models[{index}] lacks a name, a config or its folds (a mapping of "
                               f"fold -> weight files); {way_out}")
        loaded = [model["config"]] + [name for names in model["folds"].values() for name in names]
        unlisted = [name for name in loaded if name not in manifest["files"]]
        if unlisted:
            raise PredictError(f"{manifest_path}: {export_dir / unlisted[0]} (model {model['name']}) is loaded for "
                               f"prediction but has no size and digest in the manifest's files, so it cannot be "
                               f"checked: refused; {way_out}")
    return manifest


def _from_export(export_dir: Path) -> list[EnsembleModel]:
    manifest = read_manifest(export_dir)
    way_out = f"copy the export again, or export the run again (python -m utils.predict export {manifest['run']})"
    for relative, entry in manifest["files"].items():
        files.check_entry(export_dir / relative, entry, way_out)
    return [EnsembleModel(TrainConfig.load_yaml(export_dir / model["config"]),
                          {int(fold): [export_dir / f for f in names] for fold, names in model["folds"].items()},
                          way_out)
            for model in manifest["models"]]


def load_ensemble(run_or_export: str | os.PathLike) -> list[EnsembleModel]:
    """The ensemble of a run folder (runs/<name>/) or of an export folder (with manifest.json)."""
    path = Path(run_or_export)
    if (path / MANIFEST).is_file():
        return _from_export(path)
    if (path / "models").is_dir():
        return _from_run(path)
    raise PredictError(f"{path} is neither a run folder (runs/<name>/ with models/ and ensemble/) nor an export "
                       f"(a folder with {MANIFEST}, made by 05_submit or `python -m utils.predict export RUN`)")


# ----------------------------------------------------------------------------------------------- predicting


def find_images(inputs: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """name, path of every image among `inputs` (files, or folders searched recursively: hidden files and folders
    skipped, symlinked folders followed), sorted by name. A name is a row of the output: two images with one name
    (the same slice in two folders) are a PredictError naming both paths."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            images, others = data.images_below(item)
            data.warn_skipped(item, others)
            if not images:
                raise PredictError(f"{item}: no .png/.jpg/.jpeg images in it or below it (hidden folders such as "
                                   f".ipynb_checkpoints are skipped); point at the slices")
            found += images
        elif item.is_file():
            found.append(item)
        else:
            raise PredictError(f"{item}: no such file or folder")
    data.check_image_names(found)
    frame = pd.DataFrame({"name": [p.name for p in found], "path": [str(p.absolute()) for p in found]})
    frame = frame.drop_duplicates("path").sort_values(["name", "path"], kind="stable").reset_index(drop=True)
    twice = frame[frame["name"].duplicated(keep=False)]
    if not twice.empty:
        first, second = twice["path"].iloc[:2]
        raise PredictError(f"two images are named {twice['name'].iloc[0]!r} ({first} and {second}): the output has "
                           f"one row per name; predict the folders one at a time, or rename one")
    return frame


def checkpoint_predictions(models: list[EnsembleModel], frame: pd.DataFrame, device: str = "auto",
                           batch_size: int | None = None, workers: int = 0, progress: bool = True) -> pd.DataFrame:
    """Every weight file's prediction of every image (columns model, fold, split, name, epoch, prediction), in the
    row order of a run's predictions files, so that utils.ensemble averages them in the same order as 03-05."""
    frames = []
    with tempfile.TemporaryDirectory(prefix="percovid_predict_") as decoded_dir:
        decoded: dict[tuple[int, int], np.ndarray] = {}
        for model in models:
            cfg = TrainConfig(**{**model.config.to_dict(), "device": device, "num_workers": workers})
            key = (cfg.img_size, cfg.in_chans)
            if key not in decoded:
                decoded[key] = data.cached_images(frame, decoded_dir, cfg.img_size, cfg.in_chans, split=SPLIT,
                                                  num_workers=workers, progress=progress)
            torch_device = machine.resolve_device(cfg.device)
            net = train.build_model_for(cfg, torch_device, for_checkpoint=True)
            for fold in sorted(model.weights):
                for epoch, path in enumerate(model.weights[fold]):
                    net.load_state_dict(files.load_torch(path, model.way_out, map_location=torch_device))
                    values = train.check_finite(
                        train.predict(net, decoded[key], cfg, torch_device, batch_size=batch_size, progress=progress),
                        f"{path}", "these weights are broken (a diverged training): retrain with a lower lr")
                    frames.append(pd.DataFrame({"model": model.name, "fold": fold, "split": SPLIT,
                                                "name": frame["name"], "epoch": epoch, "prediction": values}))
    return pd.concat(frames, ignore_index=True)


def predict_images(run_or_export: str | os.PathLike, inputs: Sequence[str | os.PathLike], rounding: bool = True,
                   device: str = "auto", batch_size: int | None = None, workers: int = 0,
                   progress: bool = True, level: float | None = None) -> pd.DataFrame:
    """name, path, prediction of every image of `inputs` by the ensemble of a run or export (module docstring),
    rounded as the run's ensemble rounds (`rounding=False`: the unrounded mean);
    with `level`, also `low` and `high`: the conformal interval of that coverage around the unrounded prediction
    (utils.intervals, calibrated on the run's out-of-fold residuals)."""
    models = load_ensemble(run_or_export)
    calibration = load_calibration(run_or_export) if level is not None else None
    if level is not None:
        intervals.check_level(level)
    frame = find_images(inputs)
    predictions = checkpoint_predictions(models, frame, device, batch_size, workers, progress)
    per_model = ensemble.average_checkpoints_and_folds(predictions)
    names = [m.name for m in models]
    combined = ensemble.combine_models(per_model, names, rounding=ensemble_rounding(run_or_export) if rounding
                                       else "none")
    out = frame.merge(combined[["name", "prediction"]], on="name", validate="1:1")
    columns = ["name", "path", "prediction"]
    if calibration is not None:
        unrounded = ensemble.combine_models(per_model, names, rounding=False).set_index("name")["prediction"]
        out["low"], out["high"] = calibration.intervals(unrounded.loc[out["name"]].to_numpy(), level)
        columns += ["low", "high"]
    return out[columns]


def format_predictions(rows: pd.DataFrame) -> str:
    """The submission format (`name,prediction`, no header), then `low,high` when intervals were asked for."""
    if "low" not in rows:
        return submission.format_submission(rows)
    return csvfiles.format_rows([row["name"], *(f"{float(row[c]):.10g}" for c in ("prediction", "low", "high"))]
                                for _, row in rows.iterrows())


# ----------------------------------------------------------------------------------------------- the export


def _average_weights(paths: list[Path], way_out: str) -> dict[str, Any]:
    """The mean of state dicts (floating tensors; integer buffers such as num_batches_tracked: the last one's)."""
    states = [files.load_torch(p, way_out) for p in paths]
    averaged = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            averaged[key] = sum(s[key].double() for s in states).div(len(states)).to(last.dtype)
        else:
            averaged[key] = last
    return averaged


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # the run's files are replaced by rename, never rewritten: a link stays valid
    except OSError:
        shutil.copy2(source, target)


def check_export_destination(run_dir: str | os.PathLike, out: str | os.PathLike) -> None:
    """What an export may replace: nothing but an earlier export (a folder whose every file its manifest lists) or
    an empty folder; never a run or anything inside one but the run's own export/, never a folder that contains
    the run. A PredictError names the destination, what it holds, and the way out."""
    out, run_dir = Path(out), Path(run_dir)
    default = RunPaths(run_dir).export
    if out.is_symlink():
        raise PredictError(f"--out {out} is a symbolic link: give a real folder (a new one, or an earlier export)")
    target, run = out.resolve(), run_dir.resolve()
    if target != default.resolve():
        if target == run or target in run.parents:
            raise PredictError(f"--out {out} contains the run {run_dir}: the export would replace it; give a new "
                               f"folder outside every run (default: {default})")
        inside = next((folder for folder in target.parents if RunPaths(folder).is_run), None)
        if inside is not None:
            raise PredictError(f"--out {out} lies inside the run {inside}: the export would overwrite part of it; "
                               f"give a folder outside every run (default for this run: {default})")
    if not out.exists():
        return
    if not out.is_dir():
        raise PredictError(f"--out {out} is a file, not a folder: give a new folder (or an earlier export)")
    contents = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_symlink() or not p.is_dir())
    if not contents:
        return
    try:
        listed = set(json.loads((out / MANIFEST).read_text())["files"]) | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        raise PredictError(f"--out {out} exists and is not an export of this project (no readable {MANIFEST} "
                           f"listing its files): it would be replaced whole; give a new folder, or move it away "
                           f"yourself") from None
    unlisted = [name for name in contents if name not in listed]
    if unlisted:
        raise PredictError(f"--out {out} is an earlier export that now also holds {out / unlisted[0]} (not in its "
                           f"manifest): the new export would delete it; give a new folder, or move that file away")


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
               average_checkpoints: bool = False) -> dict[str, Any]:
    """Write the run's export folder (module docstring); returns its manifest."""
    run_dir = Path(run_dir)
    out = Path(out) if out else RunPaths(run_dir).export
    check_export_destination(run_dir, out)  # before any work: a refusal costs nothing
    rounding = ensemble_rounding(run_dir)
    if average_checkpoints and rounding == "authors":
        raise PredictError(f"--average-checkpoints: {run_dir} rounds the seed team's way (each checkpoint's "
                           "prediction to an integer), which one averaged weight set per fold cannot repeat: export "
                           "it without --average-checkpoints")
    models = _from_run(run_dir)
    manifest: dict[str, Any] = {
        "format": EXPORT_FORMAT, "run": str(run_dir.resolve()), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "ensemble": {"models": [m.name for m in models],
                     "combine": "mean over each fold's weight files, then over folds, then over models; clip to "
                                "[0, 100]; round by `rounding` (utils.ensemble)",
                     "rounding": rounding, "checkpoints_averaged": average_checkpoints},
        "models": [], "files": {}, "calibration": None}
    calibration = RunPaths(run_dir).ensemble / ensemble.calibration_name(_final_stem(run_dir))
    with files.atomic_path(out) as temporary:
        temporary.mkdir(parents=True)
        if calibration.is_file():
            files.verify(calibration, ensemble.ENSEMBLE_WAY_OUT, older_ok=True)  # an edit is refused, not exported
            shutil.copy2(calibration, temporary / intervals.CALIBRATION_FILE)
            manifest["calibration"] = intervals.CALIBRATION_FILE
        else:  # an ensemble without out-of-fold labels to calibrate on: the export predicts, without --interval
            log.warning("%s is missing: the export of %s carries no interval calibration (--interval will be "
                        "refused with it)", calibration, run_dir)
        for model in models:
            folder = Path("models") / model.name
            model.config.save_yaml(temporary / folder / "config.yaml")
            entry = {"name": model.name, "config": str(folder / "config.yaml"), "folds": {},
                     "preprocessing": {"img_size": model.config.img_size, "in_chans": model.config.in_chans,
                                       "gray": "luminance, bilinear resize, replicated to in_chans",
                                       "normalisation": "ImageNet mean/std (their means for 1 channel)",
                                       "tta_hflip": model.config.tta_hflip}}
            for fold, paths in sorted(model.weights.items()):
                if average_checkpoints:
                    names = [str(folder / f"fold{fold}" / "averaged.pt")]
                    files.save_torch(_average_weights(paths, "rerun that fold"), temporary / names[0])
                else:
                    names = [str(folder / f"fold{fold}" / p.name) for p in paths]
                    for source, name in zip(paths, names):
                        _link_or_copy(source, temporary / name)
                entry["folds"][str(fold)] = names
            manifest["models"].append(entry)
        for path in sorted(p for p in temporary.rglob("*") if p.is_file()):
            manifest["files"][str(path.relative_to(temporary))] = {"size": path.stat().st_size,
                                                                   "sha256": files.file_digest(path)}
        files.write_text(temporary / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)  # an earlier export (check_export_destination): the new one replaces it whole
    return manifest


# ----------------------------------------------------------------------------------------------- CLI


def check_arguments(args: argparse.Namespace) -> None:
    """Every argument of a prediction, before anything is loaded or decoded: a mistake costs nothing."""
    if Path(args.out).is_dir():
        raise PredictError(f"--out {args.out} is a folder: give the CSV file to write, e.g. "
                           f"{Path(args.out) / 'preds.csv'}")
    if args.batch_size is not None and args.batch_size < 1:
        raise PredictError(f"--batch-size {args.batch_size}: give 1 or more (or leave it out: max(the model's "
                           "batch, 32))")
    if args.workers < 0:
        raise PredictError(f"--workers {args.workers}: give 0 (decode in this process) or more")
    machine.check_device(args.device, "--device")
    if args.interval is not None:
        intervals.check_level(args.interval)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        parser = argparse.ArgumentParser(prog="python -m utils.predict export",
                                         description="Write a run's portable export (what prediction needs).")
        parser.add_argument("run", help="runs/<name>/ of a finished run")
        parser.add_argument("--out", help="export folder (default: runs/<name>/export)")
        parser.add_argument("--average-checkpoints", action="store_true",
                            help="one weight set per fold (the mean of its kept checkpoints) instead of all of them")
        args = parser.parse_args(argv[1:])
    else:
        parser = argparse.ArgumentParser(prog="python -m utils.predict", description=__doc__.split("\n\n")[0])
        parser.add_argument("source", help="a run folder (runs/<name>/) or an export folder")
        parser.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
        parser.add_argument("--out", required=True, help="the CSV to write (name,prediction rows, no header)")
        parser.add_argument("--no-round", action="store_true", help="write the unrounded ensemble mean")
        parser.add_argument("--batch-size", type=int, default=None, help="default: max(the model's batch, 32)")
        parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
        parser.add_argument("--workers", type=int, default=0, help="processes decoding and loading images")
        parser.add_argument("--interval", type=float, default=None, metavar="LEVEL",
                            help="also write each prediction's conformal interval of this coverage, e.g. 0.9 "
                                 "(rows name,prediction,low,high)")
        args = parser.parse_args(argv)
    if argv[:1] == ["export"]:
        manifest = export_run(args.run, args.out, args.average_checkpoints)
        print(f"wrote {args.out or RunPaths(args.run).export}: {len(manifest['files'])} files, models "
              f"{', '.join(manifest['ensemble']['models'])}")
        return 0
    check_arguments(args)
    started = time.perf_counter()
    rows = predict_images(args.source, args.images, rounding=not args.no_round, device=args.device,
                          batch_size=args.batch_size, workers=args.workers, progress=sys.stderr.isatty(),
                          level=args.interval)
    files.write_text(args.out, format_predictions(rows))
    seconds = time.perf_counter() - started
    print(f"wrote {args.out}: {len(rows)} slices in {seconds:.1f} s ({len(rows) / seconds:.1f} slices/s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv, errors=(PredictError, data.DataError, FileNotFoundError, ensemble.EnsembleError,
                                         train.TrainingDiverged, csvfiles.CsvError, intervals.IntervalError))


if __name__ == "__main__":
    sys.exit(main())
