"""Where the model looked, and the totals per CT scan: saliency maps of the ensemble's regression output and
per-scan summaries.

    python -m utils.explain RUN_OR_EXPORT IMAGES... --out DIR [--interval 0.9] [--scans CSV] [--device D]
    python -m utils.explain cv RUN --model NAME --data DIR --out DIR [--interval 0.9]      # a utils.sweep run

For each image: `<name>.png`, an overlay (the slice, the heatmap, the predicted value and its interval) and
`<name>.npy`, the heatmap (float32, >= 0, the image's own height x width), `<name>` being the file name without its
extension (the full name where two images share a stem). The heatmap is Grad-CAM (the maintained `grad-cam`
package) on the last stage of each model's timm backbone, for the regression output f2 (`reg`), the mean of the
maps of every weight file of the ensemble (each scaled to [0, 1] by grad-cam) resized to the image. The output
folder is written whole or not at all (utils.files.atomic_path); bad input gets utils.predict's errors.

`per_scan` gives each scan's mean and maximum predicted percentage, the severity class of its mean, and, where the
truth is known, the scan's mean label and the absolute error of its mean prediction; `--scans CSV` (rows
`name,subject`, or a label file `name,percentage,subject`) writes it for the images as `per_scan.csv`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from utils import augment, cli, csvfiles, data, ensemble, files, intervals, machine, predict, train
from utils.config import TrainConfig
from utils.folds import severity_class

log = logging.getLogger("utils.explain")  # not __name__: "__main__" under python -m


class ExplainError(ValueError):
    """A per-scan table or an explanation cannot be made from what was given; the message says what is missing."""


class _RegressionOutput(nn.Module):
    """The model's f2 as a (B, 1) tensor: what grad-cam differentiates."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["reg"].unsqueeze(1)


def last_stage(model: nn.Module) -> nn.Module:
    """The backbone's last feature stage (timm's feature_info), the usual Grad-CAM layer of a CNN."""
    backbone = model.backbone
    name = backbone.feature_info[-1]["module"] if getattr(backbone, "feature_info", None) else None
    if not name:
        raise ValueError(f"{model.arch}: timm gives no feature stages to explain")
    return backbone.get_submodule(name)


def cannot_localise(models: Sequence[predict.EnsembleModel]) -> str | None:
    """Why these models' saliency maps cannot localise (the first model whose last feature map is 1x1: Grad-CAM
    upsamples that map, and grad-cam normalises a 1x1 one to 0 everywhere), naming its size and the size that can;
    None when every model can."""
    for model in models:
        reason = _one_by_one(model)
        if reason:
            return reason
    return None


def _one_by_one(model: predict.EnsembleModel) -> str | None:
    cfg = model.config
    net = train.build_model_for(TrainConfig(**{**cfg.to_dict(), "device": "cpu"}), torch.device("cpu"),
                                for_checkpoint=True).eval()
    shape = {}

    def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:  # None: the output unchanged
        shape["hw"] = tuple(output.shape[-2:])

    hook = last_stage(net).register_forward_hook(record)
    try:
        with torch.no_grad():
            net(torch.zeros(1, cfg.in_chans, cfg.img_size, cfg.img_size))
    finally:
        hook.remove()
    height, width = shape["hw"]
    if height * width > 1:
        return None
    reduction = int(net.backbone.feature_info[-1].get("reduction", cfg.img_size))
    return (f"model {model.name} sees {cfg.img_size} px and its last feature map ({cfg.arch}, stride {reduction}) is "
            f"{height}x{width}: a saliency map cannot localise there (it would be 0 everywhere); explain a model "
            f"trained at img_size >= {2 * reduction} (a 2x2 map or more)")


def heatmaps(models: list[predict.EnsembleModel], frame: pd.DataFrame, device: str = "auto",
             progress: bool = True) -> list[np.ndarray]:
    """The ensemble's Grad-CAM map of each image of `frame` (name, path), at the image's own size."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if frame.empty:
        return []
    reason = cannot_localise(models)  # before any image is decoded
    if reason:
        raise ExplainError(reason)
    sizes = [data.load_gray(path).shape for path in frame["path"]]  # every map at its image's own size
    sums = [np.zeros(size, dtype=np.float64) for size in sizes]
    count = 0
    weight_files = sum(len(paths) for model in models for paths in model.weights.values())
    bar = tqdm(total=weight_files * len(frame), desc="explaining", unit="map", disable=not progress)
    with tempfile.TemporaryDirectory(prefix="percovid_explain_") as decoded_dir:
        for model in models:
            cfg = TrainConfig(**{**model.config.to_dict(), "device": device, "num_workers": 0})
            images = data.cached_images(frame, decoded_dir, cfg.img_size, cfg.in_chans, split="explain")
            torch_device = machine.resolve_device(cfg.device)
            net = train.build_model_for(cfg, torch_device, for_checkpoint=True)
            transform = augment.build_transform(train=False, channels=cfg.in_chans)
            normalizer = augment.Normalizer(cfg.in_chans)
            for paths in model.weights.values():
                for path in paths:
                    net.load_state_dict(files.load_torch(path, model.way_out, map_location=torch_device))
                    cam = GradCAM(model=_RegressionOutput(net), target_layers=[last_stage(net)])
                    for index in range(len(frame)):
                        batch = transform(np.asarray(images[index]))[None]
                        batch = train.images_to_device(batch, cfg, torch_device, normalizer)
                        grid = cam(input_tensor=batch, targets=[ClassifierOutputTarget(0)])[0]
                        sums[index] += _resized(grid, sizes[index])  # models of other sizes add up
                        bar.update()
                    count += 1
    bar.close()
    return [np.maximum(total / max(count, 1), 0).astype(np.float32) for total in sums]


def _resized(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map resized (bilinear) to (height, width)."""
    if grid.shape == tuple(size):
        return grid.astype(np.float64)
    tensor = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(tensor, size=tuple(size), mode="bilinear",
                                           align_corners=False)[0, 0].double().numpy()


def output_stems(names: Sequence[str]) -> list[str]:
    """`<name>` of each output file, unique: the stem; the full name where two images share a stem; the full name
    and the image's position in `names` where two share the full name (the same name in two folders)."""
    stems = [Path(name).stem for name in names]
    shared_stems = {s for s in stems if stems.count(s) > 1}
    shared_names = {n for n in names if names.count(n) > 1}
    return [f"{name}.{index}" if name in shared_names else name if stem in shared_stems else stem
            for index, (name, stem) in enumerate(zip(names, stems))]


def overlay(image: np.ndarray, heatmap: np.ndarray, title: str):
    """The slice in gray, the heatmap over it, the prediction as the title."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4.3))
    ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    ax.imshow(heatmap, cmap="jet", alpha=0.35, vmin=0, vmax=max(float(heatmap.max()), 1e-6))
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    return fig


def read_scans(path: str | os.PathLike) -> pd.DataFrame:
    """name, subject[, percentage] of a CSV mapping images to scans: `name,subject` rows (with that header or
    none; a subject is an identifier, kept as written), or a label file (`name,percentage,subject`, the
    challenge's format: its labels then score each scan's mean)."""
    rows = csvfiles.text_rows(path)
    if not rows:
        raise csvfiles.CsvError(f"{path} is empty: expected name,subject rows (which scan each image belongs to)")
    first = [field.strip().lower() for field in rows[0][1]]
    if len(first) != 2:
        return data.read_labels(path)[["name", "subject", "percentage"]]
    body = rows[1:] if first[1] in ("subject", "scan") else rows  # a header: name,subject (Image,Subject, ...)
    for line, fields in body:
        if len(fields) != 2 or not fields[0] or not fields[1].strip():
            raise csvfiles.CsvError(f"{path}, line {line}: {','.join(fields)!r} is not a name,subject row "
                                    f"(e.g. Image_0001.png,scan_12)")
    return pd.DataFrame({"name": [f[0] for _, f in body], "subject": [f[1].strip() for _, f in body]})


def explain_images(run_or_export: str | os.PathLike, inputs: Sequence[str | os.PathLike], out: str | os.PathLike,
                   level: float | None = 0.9, device: str = "auto", progress: bool = True,
                   scans: pd.DataFrame | None = None) -> pd.DataFrame:
    """Write the overlays and heatmaps of every image of `inputs` to `out` (module docstring); returns the
    predictions (name, path, prediction[, low, high])."""
    import matplotlib.pyplot as plt

    models = predict.load_ensemble(run_or_export)
    if level is not None:
        predict.load_calibration(run_or_export)  # a missing calibration is refused before the maps are made
    maps = heatmaps(models, predict.find_images(inputs), device, progress)  # first: a refusal comes before the work
    rows = predict.predict_images(run_or_export, inputs, rounding=True, device=device, progress=progress,
                                  level=level)
    with files.atomic_path(out) as folder:
        folder.mkdir()
        for stem, (_, row), heatmap in zip(output_stems(list(rows["name"])), rows.iterrows(), maps):
            np.save(folder / f"{stem}.npy", heatmap)
            gray = data.load_gray(row["path"])
            interval = f" [{row['low']:.0f}, {row['high']:.0f}]" if "low" in rows else ""
            fig = overlay(gray, heatmap, f"{row['name']}: {row['prediction']:.0f} %{interval}")
            fig.savefig(folder / f"{stem}.png", dpi=100)
            plt.close(fig)
        csvfiles.write_frame(folder / "predictions.csv", rows.drop(columns=["path"]))
        if scans is not None:
            csvfiles.write_frame(folder / "per_scan.csv", per_scan(rows.merge(scans, on="name", how="left")))
    return rows


def per_scan(frame: pd.DataFrame) -> pd.DataFrame:
    """Per scan (`subject`): slices, mean and max predicted percentage, the severity class of the mean; with a
    `percentage` column (the truth) also the scan's mean label and the absolute error of its mean prediction."""
    if "subject" not in frame.columns or frame["subject"].isna().all():
        raise ExplainError("per-scan summaries need each slice's scan: a `subject` column (Train's label file, or a "
                           "CSV mapping images to scans: --scans)")
    groups = frame.dropna(subset=["subject"]).groupby("subject")
    table = groups.agg(slices=("prediction", "size"), mean_prediction=("prediction", "mean"),
                       max_prediction=("prediction", "max"))
    table["severity"] = np.asarray(severity_class(np.clip(table["mean_prediction"].to_numpy(), 0, 100)))
    if "percentage" in frame.columns and frame["percentage"].notna().any():
        table["mean_truth"] = groups["percentage"].mean()
        table["abs_error"] = (table["mean_prediction"] - table["mean_truth"]).abs()
    return table.reset_index()


def out_of_fold(run_dir: str | os.PathLike, models: Sequence[str]) -> pd.DataFrame:
    """The ensemble of `models`' out-of-fold predictions, clipped and unrounded as 03 calibrates on, with each
    slice's label, subject, severity and fold (folds.csv)."""
    from utils.config import RunPaths
    from utils.folds import read_folds

    per_model = ensemble.average_checkpoints_and_folds(ensemble.load_predictions(run_dir, list(models)))
    oof = ensemble.combine_models(per_model[per_model["split"] == ensemble.OOF], models, rounding=False)
    return oof.merge(read_folds(RunPaths(run_dir).folds_csv), on="name")


def cv_report(run_dir: str | os.PathLike, model: str, data_dir: str | os.PathLike, out: str | os.PathLike,
              level: float = 0.9, per_class: int = 2) -> dict[str, pd.DataFrame]:
    """For a cross-validation run (utils.sweep, two folds or more trained): the intervals' coverage on held-out
    folds (each fold calibrated on the others; Mondrian against one interval for all) of the model's clipped
    out-of-fold predictions (what 03 calibrates on), the per-scan table, and a grid of held-out slices (`per_class`
    per severity class) with their own fold's heatmaps. Writes intervals_cv.csv, per_scan_cv.csv and the figures
    interval_coverage.png, per_scan.png, saliency_grid.png to `out`, once all are made (the grid is left out, with a
    warning, for a model whose last feature map is 1x1: utils.explain.cannot_localise)."""
    import matplotlib.pyplot as plt

    from utils import report
    from utils.config import RunPaths
    from utils.folds import SEVERITY_CLASSES

    paths = RunPaths(run_dir)
    known = sorted({name for name, _, _ in paths.fold_files("predictions.csv")})
    if model not in known:
        raise ExplainError(f"--model {model}: {run_dir} has no trained fold of it; its models: {', '.join(known)}")
    oof = out_of_fold(run_dir, [model])
    tables, low, high = intervals.out_of_fold_coverage(oof, level)
    if not tables:
        raise intervals.IntervalError(f"{run_dir}: the cv report needs two trained folds or more (a utils.sweep "
                                      f"run); the out-of-fold slices of {model} come from one")
    oof = oof.assign(low=low, high=high)
    coverage = pd.concat(tables, names=["method"]).reset_index(level=0)
    scans = per_scan(oof)
    slices = data.load_split(data_dir, "Train", require_labels=True)[["name", "path"]]
    picked = pd.concat([group.sample(min(per_class, len(group)), random_state=0)
                        for _, group in oof.merge(slices, on="name").groupby("severity", observed=True)])
    fold_models = {}
    for fold in picked["fold"].unique():
        fold_dir = paths.fold(model, fold)
        cfg = TrainConfig.load_yaml(files.verify(fold_dir / "config.yaml", train.fold_way_out(fold_dir),
                                                 older_ok=True))
        weights = {fold: [train.checkpoint_path(fold_dir, e) for e in train.kept_epochs(cfg)]}
        fold_models[fold] = predict.EnsembleModel(cfg, weights, train.fold_way_out(fold_dir))
    figures = {"interval_coverage": report.coverage_by_class(tables, level), "per_scan": report.per_scan(scans)}
    no_maps = cannot_localise(list(fold_models.values()))
    if no_maps:  # the coverage and per-scan figures stand without it
        log.warning("saliency grid skipped: %s", no_maps)
    else:
        maps = {}
        for fold, group in picked.groupby("fold", sort=False):
            maps.update(zip(group["name"], heatmaps([fold_models[fold]], group[["name", "path"]], progress=False)))
        order = [n for c in SEVERITY_CLASSES for n in picked.loc[picked["severity"] == c, "name"]]
        rows = picked.set_index("name").loc[order]
        titles = [f"{n}: {r['percentage']:.0f} %, pred. {r['prediction']:.0f} [{r['low']:.0f}, {r['high']:.0f}]"
                  for n, r in rows.iterrows()]
        figures["saliency_grid"] = report.heatmap_grid([data.load_gray(p) for p in rows["path"]],
                                                       [maps[n] for n in order], titles)
    out = Path(out)
    csvfiles.write_frame(out / "intervals_cv.csv", coverage)
    csvfiles.write_frame(out / "per_scan_cv.csv", scans)
    for name, fig in figures.items():
        report.save(fig, out, name, dpi=70 if name == "saliency_grid" else 110)  # the grid: a photo, kept small
        plt.close(fig)
    return {"coverage": coverage, "per_scan": scans}


def _cv_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.explain cv", description=cv_report.__doc__.split(":")[0])
    parser.add_argument("run", help="runs/<name>/ of a utils.sweep run")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="its data folder (the slices of the saliency grid)")
    parser.add_argument("--out", required=True, help="the folder for the tables and figures")
    parser.add_argument("--interval", type=float, default=0.9)
    args = parser.parse_args(argv)
    result = cv_report(args.run, args.model, args.data, args.out, intervals.check_level(args.interval))
    print(result["coverage"].to_string(index=False, float_format="%.3f"))
    print(f"per-scan MAE {result['per_scan']['abs_error'].mean():.3f} over {len(result['per_scan'])} scans")
    return 0


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["cv"]:
        return _cv_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m utils.explain", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run folder (runs/<name>/) or an export folder")
    parser.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--out", required=True, help="the folder to write (overlays, heatmaps, predictions.csv)")
    parser.add_argument("--interval", type=float, default=0.9, help="coverage level of the intervals shown "
                        "(default 0.9; 0 for none)")
    parser.add_argument("--scans", help="name,subject rows (or a label file) mapping the images to their scans: "
                        "writes per_scan.csv")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    machine.check_device(args.device, "--device")
    if args.interval:
        intervals.check_level(args.interval)
    scans = read_scans(args.scans) if args.scans else None
    if Path(args.out).exists():
        raise predict.PredictError(f"--out {args.out} exists: give a new folder (it is written whole or not at all)")
    level = args.interval or None
    rows = explain_images(args.source, args.images, args.out, level, args.device, progress=sys.stderr.isatty(),
                          scans=scans)
    print(f"wrote {args.out}: {len(rows)} overlays and heatmaps")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv, errors=(predict.PredictError, data.DataError, FileNotFoundError,
                                        ensemble.EnsembleError, train.TrainingDiverged, csvfiles.CsvError,
                                        intervals.IntervalError, ExplainError))


if __name__ == "__main__":
    sys.exit(main())
