r"""The CPU speed/accuracy front: which backbone, image size and number format buy the most accuracy per CPU-second.

    python -m utils.front speed --out docs/results/cpu_front_speed.csv            # ~45 min on 2 cores, resumable
    python -m utils.front speed --archs resnet10t --sizes 96 128 --formats fp32_cl bf16_cl --out front.csv
    python -m utils.front epochs --speed docs/results/cpu_front_speed.csv --seconds 300 --images 2244 \
        resnet10t:96:fp32_cl resnet10t:128:bf16_cl                                # epochs of equal training time
    python -m utils.front summary docs/results/cpu_front_speed.csv                 # formats side by side
    python -m utils.front plot runs/cpu_front --speed docs/results/cpu_front_speed.csv --out cpu_front.png --marked cpu

`speed` measures, for every (arch, img_size, format), the two figures a CPU recipe is made of:

* train img/s: the project's own optimisation step (`utils.train.StepRunner`: the `cpu` profile's reg head, avg
  pooling, AdamW, batch 32, 3-channel input) on a uint8 batch already in memory, after warm-up steps (oneDNN builds
  its kernels on the first calls), timed over at least `--seconds` and 3 steps;
* predict img/s: the eval forward pass (no gradients, batch 64) as `utils.train.predict` runs it, without TTA, on a
  model reparameterized for inference where it has branches to fuse (RepViT, FastViT, MobileOne: timm's
  `reparameterize_model`; a no-op for the others).

Formats: `fp32` / `fp32_cl` (float32, contiguous / channels_last), `bf16` / `bf16_cl` (bfloat16 autocast: oneDNN
computes convolutions in bf16 on CPUs with AVX-512 BF16 or AMX, and emulates it, slower, elsewhere), and
`fp32_cl_compile` / `bf16_cl_compile` (torch.compile of the training step, its compile seconds recorded; predict runs
eagerly). A format is TrainConfig settings (`amp_dtype`, `channels_last`, `compile`): a measured point is a recipe
the pipeline runs as measured.

Each point is measured in a process of its own (the same start for every model; a model that crashes torch is a row
whose note says so) and written to `--out` at once (one CSV writer, atomic): a stopped run keeps its rows and a rerun
measures only what is missing. Torch uses `--threads` threads (default: the usable cores): time nothing beside it.

`epochs` turns a training-time budget into each arm's epochs (budget x train img/s / training images), the way the
front's accuracy arms get equal seconds. `plot` draws the out-of-fold MAE of each model of a `utils.sweep` run
against its training seconds per fold on the front's machine (its epochs x training slices / the speed table's train
img/s for its arch, size and format: the sweep's own jobs share the cores, so their wall seconds are not the budget's),
with the front (the points no other point beats on both) and a marked model.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from utils import csvfiles, machine, train
from utils.config import REPO_ROOT, RunPaths, TrainConfig

# (amp_dtype, channels_last, compile) of each format
FORMATS: dict[str, tuple[str, bool, bool]] = {
    "fp32": ("auto", False, False), "fp32_cl": ("auto", True, False),
    "bf16": ("bfloat16", False, False), "bf16_cl": ("bfloat16", True, False),
    "fp32_cl_compile": ("auto", True, True), "bf16_cl_compile": ("bfloat16", True, True),
}
# At least 8 families of efficient timm CNNs, each at a size close to resnet10t's cost
DEFAULT_ARCHS = ("resnet10t", "resnet14t", "mobilenetv3_large_100", "mobilenetv4_conv_small", "efficientnet_b0",
                 "efficientnet_lite0", "ghostnet_100", "regnetx_004", "regnety_004", "repvit_m1", "fastvit_t8",
                 "mobileone_s0", "convnext_atto", "edgenext_xx_small", "lcnet_100")
DEFAULT_SIZES = (96, 128, 160, 224)
DEFAULT_FORMATS = ("fp32", "fp32_cl", "bf16", "bf16_cl")
SPEED_COLUMNS = ["model", "size", "format", "train_img_s", "predict_img_s", "params_m", "gmacs", "train_steps",
                 "compile_s", "batch", "threads", "cpu", "torch", "note"]
TRAIN_BATCH, PREDICT_BATCH, WARMUP_STEPS, MIN_STEPS = 32, 64, 3, 3


class FrontError(ValueError):
    """A point or budget the front cannot measure or plan (the message names the fix)."""


def recipe(arch: str, size: int, fmt: str) -> TrainConfig:
    """The `cpu` profile's training recipe for a (arch, size, format) point."""
    if fmt not in FORMATS:
        raise FrontError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
    amp_dtype, channels_last, compiled = FORMATS[fmt]
    return TrainConfig(model_name=f"front_{arch}", arch=arch, head="reg", pooling="avg", img_size=size, in_chans=3,
                       batch_size=TRAIN_BATCH, optimizer="adamw", sam="none", lr=3e-3, weight_decay=0.05,
                       device="cpu", amp_dtype=amp_dtype, channels_last=channels_last, compile=compiled)


def _timed(step: Callable[[], Any], seconds: float, batch: int) -> tuple[float, int]:
    """img/s of `step` over at least `seconds` and MIN_STEPS calls, after WARMUP_STEPS untimed ones."""
    for _ in range(WARMUP_STEPS):
        step()
    steps, started = 0, time.perf_counter()
    while steps < MIN_STEPS or time.perf_counter() - started < seconds:
        step()
        steps += 1
    return steps * batch / (time.perf_counter() - started), steps


def measure_point(arch: str, size: int, fmt: str, seconds: float = 6.0) -> dict[str, Any]:
    """One row of the speed front (see the module docstring)."""
    from timm.utils import reparameterize_model

    from utils.bench import forward_macs

    cfg = recipe(arch, size, fmt)
    device = torch.device("cpu")
    machine.prepare_device(device)
    torch.manual_seed(0)
    model = train.build_model_for(cfg, device)
    runner = train.StepRunner(model, train.build_optimizer(model, cfg), cfg, device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (TRAIN_BATCH, 3, size, size), dtype=torch.uint8, generator=generator)
    targets = torch.rand(TRAIN_BATCH, generator=generator) * 100
    images, targets = runner.to_device(images, targets)
    compile_s = math.nan
    if cfg.compile_mode:  # the first step compiles: timed apart
        started = time.perf_counter()
        runner(images, targets)
        compile_s = time.perf_counter() - started
    train_img_s, train_steps = _timed(lambda: runner(images, targets), seconds, TRAIN_BATCH)

    inference = reparameterize_model(model).eval()
    batch = torch.cat([images] * (PREDICT_BATCH // TRAIN_BATCH))
    autocast = machine.autocast_context(cfg, device)

    @torch.no_grad()
    def forward() -> None:
        with autocast():
            inference(batch)

    predict_img_s, _ = _timed(forward, seconds / 2, PREDICT_BATCH)
    return {"model": arch, "size": size, "format": fmt, "train_img_s": round(train_img_s, 2),
            "predict_img_s": round(predict_img_s, 2),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
            "gmacs": round(forward_macs(arch, size) / 1e9, 4), "train_steps": train_steps,
            "compile_s": round(compile_s, 1), "batch": TRAIN_BATCH, "threads": torch.get_num_threads(),
            "cpu": cpu_name(), "torch": torch.__version__}


def cpu_name() -> str:
    """The CPU's model name, and whether it computes bf16 natively."""
    return f"{machine.cpu_model()}{' (bf16 native)' if machine.cpu_computes_bf16() else ''}"


def read_speed(path: str | Path) -> pd.DataFrame:
    """A speed table written by `speed`; anything else is a FrontError (so `--out` never overwrites another file)."""
    way_out = "name a new file for --out (or the speed table to add rows to)"
    try:
        table = csvfiles.read_frame(path, ("model", "format", "cpu", "torch", "note"))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise FrontError(f"{path} cannot be read as a speed table ({type(error).__name__}): {way_out}") from None
    missing = [c for c in ("model", "size", "format", "train_img_s", "predict_img_s") if c not in table.columns]
    if missing:
        raise FrontError(f"{path} is not a speed table of utils.front (no column {', '.join(missing)}): {way_out}")
    return table


def _measure_apart(arch: str, size: int, fmt: str, seconds: float, threads: int) -> dict[str, Any]:
    """`measure_point` in a fresh process: every point starts from the same state (no allocator or oneDNN caches of
    the models before it), and a model that crashes torch (fastvit_t8 in fp32 on this CPU: "double free") is a row
    with a note instead of the end of the run."""
    command = [sys.executable, "-m", "utils.front", "point", arch, str(size), fmt, "--seconds", str(seconds),
               "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return {"model": arch, "size": size, "format": fmt, "batch": TRAIN_BATCH, "threads": threads, "cpu": cpu_name(),
            "torch": torch.__version__, "note": f"failed (exit {done.returncode}): {last[:200]}"}


def measure_front(archs: Sequence[str], sizes: Sequence[int], formats: Sequence[str], out: str | Path,
                  seconds: float = 6.0, threads: int | None = None,
                  log: Callable[[str], None] = print) -> pd.DataFrame:
    """Every missing (arch, size, format) row of `out`, each measured in its own process and written as soon as
    measured (a failure is a row whose note says why); returns the table."""
    for fmt in formats:
        recipe(archs[0], sizes[0], fmt)  # unknown formats refused before the first measurement
    out, threads = Path(out), threads or machine.usable_cores()
    table = read_speed(out) if out.exists() else pd.DataFrame(columns=SPEED_COLUMNS)
    done = set(zip(table["model"], table["size"].astype(int), table["format"]))
    for arch in archs:
        for size in sizes:
            for fmt in formats:
                if (arch, size, fmt) in done:
                    continue
                row = _measure_apart(arch, size, fmt, seconds, threads)
                table = pd.concat([table.astype(object), pd.DataFrame([row]).astype(object)], ignore_index=True)
                csvfiles.write_frame(out, table.reindex(columns=SPEED_COLUMNS))
                if row.get("note"):
                    log(f"{arch} {size} px {fmt}: {row['note']}")
                else:
                    log(f"{arch:24s} {size:4d} px {fmt:16s} train {row['train_img_s']:8.1f}  predict "
                        f"{row['predict_img_s']:8.1f} img/s")
    return table


def epochs_for(seconds: float, train_img_s: float, train_images: int) -> int:
    """The epochs that fill `seconds` of training at `train_img_s` over `train_images` per epoch (at least 1)."""
    if seconds <= 0 or train_img_s <= 0 or train_images <= 0:
        raise FrontError(f"seconds={seconds}, train_img_s={train_img_s}, train_images={train_images}: all must be > 0")
    return max(1, round(seconds * train_img_s / train_images))


def speed_of(table: pd.DataFrame, arch: str, size: int, fmt: str) -> pd.Series:
    """The measured row of a point, or a ValueError naming what the table holds."""
    rows = table[(table["model"] == arch) & (table["size"].astype(int) == size) & (table["format"] == fmt)]
    if rows.empty:
        raise FrontError(f"{arch}:{size}:{fmt} is not in the speed table (measure it: python -m utils.front speed "
                         f"--archs {arch} --sizes {size} --formats {fmt})")
    return rows.iloc[-1]


def format_of(cfg: TrainConfig) -> str:
    """The front's format name of a recipe on this CPU (bf16: amp_dtype bfloat16, or cpu_bf16 where it is native)."""
    bf16 = machine.amp_dtype(cfg, torch.device("cpu")) == torch.bfloat16  # the dtype training itself takes
    return ("bf16" if bf16 else "fp32") + ("_cl" if cfg.channels_last else "") + ("_compile" if cfg.compile else "")


def planned_seconds(run_dir: str | Path, speed: pd.DataFrame) -> pd.DataFrame:
    """Per (model, fold) of a sweep run: the training seconds its recipe costs on the front's machine, epochs x the
    fold's training slices / the front's train img/s of its (arch, img_size, format)."""
    from utils.folds import read_folds

    paths = RunPaths(run_dir)
    folds = read_folds(paths.folds_csv)
    rows = []
    for model, fold, config in paths.fold_files("config.yaml"):
        cfg = TrainConfig.load_yaml(config)
        img_s = float(speed_of(speed, cfg.arch, cfg.img_size, format_of(cfg))["train_img_s"])
        rows.append({"model": model, "fold": fold, "format": format_of(cfg), "train_img_s": img_s,
                     "planned_seconds": cfg.epochs * int((folds["fold"] != fold).sum()) / img_s})
    return pd.DataFrame(rows, columns=["model", "fold", "format", "train_img_s", "planned_seconds"])


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The rows no other row beats on both (lower `x` and lower `y`), sorted by `x`."""
    ordered = points.sort_values([x, y])
    best, kept = math.inf, []
    for index, value in ordered[y].items():
        if value < best:
            kept.append(index)
            best = value
    return ordered.loc[kept]


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, size): train img/s in each measured format, the best format, its speed-up over fp32
    (contiguous) and its predict img/s, fastest first within each size."""
    table = table.assign(size=table["size"].astype(int), train_img_s=table["train_img_s"].astype(float),
                         predict_img_s=table["predict_img_s"].astype(float))
    table = table[table["train_img_s"].notna()]  # points that failed (their note says why)
    wide = table.pivot_table(index=["model", "size"], columns="format", values="train_img_s", aggfunc="last")
    best = table.loc[table.groupby(["model", "size"])["train_img_s"].idxmax()].set_index(["model", "size"])
    out = wide.assign(best=best["format"], best_train_img_s=best["train_img_s"],
                      best_predict_img_s=best["predict_img_s"], params_m=best["params_m"], gmacs=best["gmacs"])
    if "fp32" in wide:
        out["speedup_vs_fp32"] = out["best_train_img_s"] / wide["fp32"]
    return out.reset_index().sort_values(["size", "best_train_img_s"], ascending=[True, False]).reset_index(drop=True)


def _point(text: str) -> tuple[str, int, str]:
    arch, size, fmt = (text.split(":") + ["", ""])[:3]
    if not size.isdigit() or fmt not in FORMATS:
        raise argparse.ArgumentTypeError(f"{text!r}: write ARCH:SIZE:FORMAT, e.g. resnet10t:128:bf16_cl "
                                         f"(formats: {', '.join(FORMATS)})")
    return arch, int(size), fmt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.front", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    speed = commands.add_parser("speed", help="measure train and predict img/s per (arch, size, format)")
    speed.add_argument("--out", required=True, help="the CSV (rows already there are not measured again)")
    speed.add_argument("--archs", nargs="+", default=list(DEFAULT_ARCHS))
    speed.add_argument("--sizes", nargs="+", type=int, default=list(DEFAULT_SIZES))
    speed.add_argument("--formats", nargs="+", default=list(DEFAULT_FORMATS), choices=list(FORMATS))
    speed.add_argument("--seconds", type=float, default=6.0, help="timed seconds of training per point (predict: half)")
    speed.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable cores)")
    point = commands.add_parser("point", help="measure one point and print its row as JSON (what `speed` runs)")
    point.add_argument("arch")
    point.add_argument("size", type=int)
    point.add_argument("format", choices=list(FORMATS))
    point.add_argument("--seconds", type=float, default=6.0)
    point.add_argument("--threads", type=int, default=None)
    epochs = commands.add_parser("epochs", help="epochs of equal training time for each ARCH:SIZE:FORMAT")
    epochs.add_argument("--speed", required=True, help="a CSV written by `speed`")
    epochs.add_argument("--seconds", type=float, required=True, help="training seconds per fold")
    epochs.add_argument("--images", type=int, required=True, help="training images per epoch")
    epochs.add_argument("points", nargs="+", type=_point)
    table_parser = commands.add_parser("summary", help="print the speed table: formats side by side, the best one")
    table_parser.add_argument("speed", help="a CSV written by `speed`")
    plot = commands.add_parser("plot", help="OOF MAE against training seconds of a sweep run, with the front")
    plot.add_argument("run_dir")
    plot.add_argument("--speed", required=True, help="the speed CSV the run's epochs were planned from")
    plot.add_argument("--out", required=True, help="the PNG")
    plot.add_argument("--marked", help="the model to mark (the baseline every arm is paired against)")
    args = parser.parse_args(argv)

    if args.command == "speed":
        measure_front(args.archs, args.sizes, args.formats, args.out, args.seconds, args.threads)
    elif args.command == "point":
        torch.set_num_threads(args.threads or machine.usable_cores())
        print(json.dumps(measure_point(args.arch, args.size, args.format, args.seconds)))
    elif args.command == "summary":
        table = summary(read_speed(args.speed))
        print(table.to_string(index=False, float_format="%.1f"))
    elif args.command == "epochs":
        table = read_speed(args.speed)
        for arch, size, fmt in args.points:
            img_s = float(speed_of(table, arch, size, fmt)["train_img_s"])
            print(f"{arch}:{size}:{fmt}  {img_s:.1f} img/s  epochs {epochs_for(args.seconds, img_s, args.images)}")
    else:
        from utils import report
        from utils.sweep import cv_table

        speed_table = read_speed(args.speed)
        seconds = planned_seconds(args.run_dir, speed_table).groupby("model")["planned_seconds"].mean()
        points = cv_table(args.run_dir).set_index("model").join(seconds.rename("seconds"), how="inner").reset_index()
        front = pareto_front(points, "seconds", "MAE")
        report.save_png(report.speed_accuracy_front(points, front, args.marked), args.out, dpi=100)
        print(points[["model", "seconds", "MAE", "MAE_balanced"]].to_string(index=False, float_format="%.2f"))
        print(f"front: {', '.join(front['model'])}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    from utils import cli

    raise SystemExit(cli.run(main, errors=(FrontError,), code=1))
