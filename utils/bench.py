"""Training throughput benchmark: does the input pipeline keep the model busy, and what does the project loop cost?

For one setting (arch, image size, batch, optimizer, device, bf16/channels_last) it prints, in images per second:

 (a) model step alone: `train.StepRunner` on one batch already on the device (the same tensors every step), after
     warm-up steps, CUDA synchronised before each clock read. The ceiling of everything below.
 (b) full pipeline: `train.make_loader` over a `SliceDataset` of a uint8 (N, H, W, C) image array with the TRAIN
     transform (RandAugment N=2, M=9), then `runner.to_device` + the step, as `train.train_fold` runs it.
     b/a is the share of the model's speed the input pipeline lets through (target >= 0.95). The loader queue
     holds up to 4 batches per worker (W workers); a stock left there when the clock starts counts as free, so the
     pipeline gets 4*W extra warm-up steps (they drain it when the workers are too slow) and at least 16*W timed
     steps (a leftover stock then inflates b by at most 1/4, in practice far less; raise --steps to shrink it).
 (c) bare PyTorch loop on the same tensors and model: the same forward, the head's losses written out with
     F.smooth_l1_loss/F.kl_div, and for SAM the two passes inline (backward, w += e = rho g/||g|| with foreach ops,
     forward/backward with BN running stats frozen, w -= e, base step); tests/test_bench.py checks that it makes
     the same update as StepRunner. Overhead of the project loop =
     (c - a) / c in % (target <= 5 %). Gradient clipping is off in both.
 (d) per-process input throughput: decode = `data.load_image` (PIL decode + grayscale + bilinear resize) of 512x512
     RGBA PNGs like the challenge's (phantom slices written to a temp dir, or the first images of `--data`);
     augment = a memmapped cached array row + train RandAugment + normalise (`SliceDataset[i]`). Decoding happens
     once per run (utils.data.cached_images); augmentation every step, so the loader needs
     ceil(a / augment) workers to feed the model (plus cores for the main process).
 (e) the `paper` profile's wall time from (a): image-steps = sum over models of epochs x folds trained x training
     part of a fold (3054 x (n_folds-1)/n_folds, or the count of `--data`), plus each pseudo-label retrain on that
     training part + the 1301 Val slices (+ Test when `--data` has one). Two figures: every run costing like the
     measured setting, and each run scaled by forward FLOPs (its arch at the profile's img_size over the measured
     arch/size; counted on the meta device). FLOPs are a rough guide (small convs run below peak, SAM's optimizer
     arithmetic does not scale with pixels); validation, prediction and checkpoints are not included.

Run (CPU: the defaults take under a minute on 2 cores; torch.set_flush_denormal(True) as in training):
    python -m utils.bench [--optimizer sgd|adamw] [--sam sam|none] [--head exp] [--pooling hybrid] [--json out.json]
On a GPU box, the paper setting, bf16 + channels_last against fp32 + contiguous, batch 8 then 32:
    python -m utils.bench --arch resnest50d --img-size 512 --batch-size 8 --device cuda --json b8.json
    python -m utils.bench --arch resnest50d --img-size 512 --batch-size 8 --device cuda --no-amp --no-channels-last
    python -m utils.bench --arch resnest50d --img-size 512 --batch-size 32 --device cuda
Defaults: 30 timed + 5 warm-up steps on CUDA, 8 + 2 on CPU. On a busy CPU pass `--threads 1`: two OpenMP threads
on two cores shared with another process spin-wait for each other (measured here: 8.3 s vs 0.4 s per step).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from utils import augment, data, losses, models, phantoms, train  # noqa: E402
from utils.config import TrainConfig, atomic_write_text, load_profile  # noqa: E402

N_TRAIN, N_VAL, N_FOLDS = 3054, 1301, 5  # the challenge's Train and Val slices; the paper's 5 folds
SOURCE_SIZE = 512  # the challenge PNGs are 512x512
PREFETCH = 4  # train.make_loader's prefetch_factor


def paper_image_steps(profile: dict[str, Any], n_train: int = N_TRAIN, n_val: int = N_VAL,
                      n_folds: int | None = None) -> dict[str, float]:
    """Images through one optimizer step, per training run of a profile ({model_name: ..., name_pl: ...}).

    Per model: epochs x len(folds) x n_train (n_folds-1)/n_folds; a pseudo-label retrain (`<name>_pl`) trains the
    same folds on that part + n_val pseudo-labelled slices. n_folds defaults to the profile's `n_folds` (else 5).
    """
    defaults, params = TrainConfig(), profile.get("params", {})
    n_folds = int(n_folds or params.get("n_folds", N_FOLDS))
    if n_folds < 2:
        raise ValueError(f"n_folds={n_folds}: cross-validation needs at least 2 folds")
    training_part = n_train * (n_folds - 1) / n_folds
    names = [m["model_name"] for m in profile["models"]]
    unknown = sorted(set(profile.get("pseudo_label_models") or []) - set(names))
    if unknown:
        raise ValueError(f"pseudo_label_models {unknown} are not among the profile's models {names}")
    steps: dict[str, float] = {}
    for model in profile["models"]:
        run = {**params, **model}
        per_epoch_fold = run.get("epochs", defaults.epochs) * len(run.get("folds", defaults.folds))
        steps[run["model_name"]] = per_epoch_fold * training_part
        if run["model_name"] in (profile.get("pseudo_label_models") or []):
            steps[run["model_name"] + "_pl"] = per_epoch_fold * (training_part + n_val)
    return steps


def estimate_hours(image_steps: dict[str, float], images_per_s: float,
                   cost_ratio: dict[str, float] | None = None) -> float:
    """Training hours: sum of image-steps (each times its cost relative to the measured model) / images_per_s."""
    if images_per_s <= 0:
        raise ValueError(f"images_per_s={images_per_s}: must be > 0")
    ratio = cost_ratio or {}
    return sum(steps * ratio.get(name, 1.0) for name, steps in image_steps.items()) / images_per_s / 3600


def overhead_percent(bare_img_s: float, project_img_s: float) -> float:
    """How much slower the project loop is than the bare loop, in % of the bare speed: (bare - project) / bare."""
    return 100.0 * (bare_img_s - project_img_s) / bare_img_s


def workers_needed(model_img_s: float, augment_img_s: float) -> int:
    """Loader workers that keep up with the model: ceil(model img/s / one worker's augment img/s)."""
    return math.ceil(model_img_s / augment_img_s)


def forward_macs(arch: str, img_size: int, in_chans: int = 3) -> float:
    """Multiply-adds of one backbone forward pass at img_size (torch's FLOP counter on the meta device: no memory)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        backbone = models.build_model(arch, in_chans=in_chans).backbone.eval()
        image = torch.empty(1, in_chans, img_size, img_size)
    counter = FlopCounterMode(display=False)
    with counter:
        backbone(image)
    return counter.get_total_flops() / 2


class _TiledRows:
    """n rows that cycle through a few images (no n-row copy), like train's lazy row views of the cache."""

    def __init__(self, images: np.ndarray, n: int):
        self.images, self.shape = images, (n,) + tuple(images.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.images[i % len(self.images)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images_per_s(step: Callable[[], Any], steps: int, warmup: int, batch: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - started)


def _bare_step(model: nn.Module, forward: Callable, cfg: TrainConfig, images: torch.Tensor,
               targets: torch.Tensor) -> Callable[[], None]:
    """The same step written with plain torch: no StepRunner, losses, sam modules (see the module docstring, c)."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    base = torch.optim.AdamW(params, **kwargs) if cfg.optimizer == "adamw" else \
        torch.optim.SGD(params, momentum=cfg.momentum, **kwargs)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    autocast = train.autocast_context(cfg, images.device)
    target_dist = losses.target_distribution(targets.cpu()).to(images.device) if cfg.head == "ldl" else None

    def loss() -> torch.Tensor:
        with autocast():
            out = forward(images)
        total = F.smooth_l1_loss(out["reg"].float(), targets)
        if "expectation" in out:
            total = total + F.smooth_l1_loss(out["expectation"].float(), targets)
        if target_dist is not None:
            total = total + cfg.kl_weight * F.kl_div(F.log_softmax(out["logits"].float(), 1), target_dist,
                                                     reduction="batchmean")
        return total

    def step() -> None:
        model.train()
        base.zero_grad(set_to_none=True)
        loss().backward()
        if cfg.sam == "sam":
            with torch.no_grad():
                live = [p for p in params if p.grad is not None]
                grads = [p.grad for p in live]
                scale = cfg.sam_rho / (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) + 1e-12)
                climb = torch._foreach_mul(grads, scale)
                torch._foreach_add_(live, climb)
            base.zero_grad(set_to_none=True)
            for m in norms:
                m.momentum = 0.0
            loss().backward()
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
            with torch.no_grad():
                torch._foreach_sub_(live, climb)
        base.step()

    return step


def _source_pngs(data_dir: str | Path | None, folder: Path, count: int) -> list[Path]:
    """`count` images of --data (its Train images, or the folder itself), else phantom slices written as RGBA PNGs."""
    if data_dir is not None:
        split = data.find_split_dir(data_dir, "Train")
        images_dir = data.find_images_dir(split if split is not None else Path(data_dir))
        if images_dir is None:
            raise data.DataNotFoundError(f"no .png/.jpg images in {data_dir}: pass a folder of slices or a data set")
        return sorted(p for p in images_dir.iterdir() if p.suffix.lower() in data.IMAGE_EXTENSIONS)[:count]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        gray, _, _ = phantoms.render_slice(rng, SOURCE_SIZE, z=rng.uniform(0.2, 0.8), infection=rng.uniform(0, 0.5))
        paths.append(folder / f"Image_{i:04d}.png")
        Image.fromarray(gray).convert("RGBA").save(paths[-1])  # the challenge files are RGBA with R = G = B
    return paths


def _split_counts(data_dir: str | Path | None) -> tuple[int, int]:
    """(labelled Train slices, unlabelled Val + Test slices) of --data when it is a data set; else the challenge's."""
    if data_dir is None or data.find_split_dir(data_dir, "Train") is None:
        return N_TRAIN, N_VAL
    unlabelled = [data.load_split(data_dir, s) for s in ("Val", "Test")]
    return len(data.load_split(data_dir, "Train")), sum(len(f) for f in unlabelled if f is not None)


def run_bench(cfg: TrainConfig, steps: int | None = None, warmup_steps: int | None = None,
              data_dir: str | Path | None = None, profile: str = "paper", n_images: int = 16,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure (a)-(e) of the module docstring for `cfg`'s setting; returns them as a JSON-ready dict."""
    if cfg.sam == "asam":
        raise ValueError("sam='asam': the bare loop (c) writes out SAM only; use sam='sam' or 'none'")
    device = train.resolve_device(cfg)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no GPU: use --device cpu (or auto)")
    cuda = device.type == "cuda"
    steps, warmup_steps = steps or (30 if cuda else 8), warmup_steps if warmup_steps is not None else (5 if cuda else 2)
    if cuda:
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_flush_denormal(True)  # as train_fold: denormal weights run ~10x slower on x86
    batch, workers = cfg.batch_size, train.loader_workers(cfg, device)
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        # (d) decode, then the decoded images become the "cache" every other measurement reads
        paths = _source_pngs(data_dir, Path(tmp), n_images)
        data.load_image(paths[0], cfg.img_size, cfg.in_chans)  # first call imports PIL plugins
        started = time.perf_counter()
        decoded = np.stack([data.load_image(p, cfg.img_size, cfg.in_chans) for p in paths])
        decode_img_s = len(paths) / (time.perf_counter() - started)
        np.save(Path(tmp) / "cache.npy", decoded)
        cache = np.load(Path(tmp) / "cache.npy", mmap_mode="r")
        transform = augment.build_transform(train=True, channels=cfg.in_chans, n_ops=cfg.randaug_n,
                                            magnitude=cfg.randaug_m, seed=cfg.seed)
        rows = max(4 * batch, 32)
        dataset = data.SliceDataset(_TiledRows(cache, rows), np.linspace(0, 100, rows, dtype=np.float32), transform)
        order = itertools.count()
        augment_img_s = _images_per_s(lambda: dataset[next(order) % rows], rows, 4, 1, torch.device("cpu"))

        # (a) and (c): one batch on the device, the same model
        torch.manual_seed(cfg.seed)
        model = train.build_model_for(cfg, device)
        runner = train.StepRunner(model, train.build_optimizer(model, cfg), cfg, device)
        eval_transform = augment.build_transform(train=False, channels=cfg.in_chans)
        images = torch.stack([eval_transform(np.asarray(cache[i % len(cache)])) for i in range(batch)])
        images, targets = runner.to_device(images, torch.linspace(0, 100, batch))
        model_img_s = _images_per_s(lambda: runner(images, targets), steps, warmup_steps, batch, device)
        bare_img_s = _images_per_s(_bare_step(model, runner.forward, cfg, images, targets), steps, warmup_steps,
                                   batch, device)

        # (b) the loader of train_fold over N cached rows, then to_device + step
        pipe_warmup, pipe_steps = warmup_steps + PREFETCH * workers, max(steps, 4 * PREFETCH * workers)
        n_rows = (pipe_warmup + pipe_steps + 1) * batch
        train_set = data.SliceDataset(_TiledRows(cache, n_rows), np.linspace(0, 100, n_rows, dtype=np.float32),
                                       transform)
        loader = train.make_loader(train_set, cfg, device, train=True, seed=cfg.seed)
        batches = iter(loader)
        pipeline_img_s = _images_per_s(lambda: runner(*runner.to_device(*next(batches))), pipe_steps, pipe_warmup,
                                       batch, device)
        del batches, loader  # stops the workers

    # (e) the paper profile's training time from (a)
    n_train, n_val = _split_counts(data_dir)
    prof = load_profile(profile)
    image_steps = paper_image_steps(prof, n_train, n_val)
    runs = {m["model_name"]: {**prof["params"], **m} for m in prof["models"]}
    runs.update({f"{name}_pl": run for name, run in list(runs.items())})
    measured = forward_macs(cfg.arch, cfg.img_size, cfg.in_chans)
    cost_ratio = {name: forward_macs(runs[name].get("arch", cfg.arch), runs[name].get("img_size", cfg.img_size),
                                     cfg.in_chans) / measured for name in image_steps}
    result = dict(
        arch=cfg.arch, head=cfg.head, pooling=cfg.pooling, img_size=cfg.img_size, batch_size=batch,
        optimizer=cfg.optimizer, sam=cfg.sam, device=str(device), amp=cfg.amp and cuda,
        channels_last=cfg.channels_last and cuda, compile=cfg.compile, workers=workers,
        threads=torch.get_num_threads(), steps=steps, warmup_steps=warmup_steps,
        pipeline_steps=pipe_steps, model_img_s=model_img_s, pipeline_img_s=pipeline_img_s,
        pipeline_ratio=pipeline_img_s / model_img_s, bare_img_s=bare_img_s,
        overhead_pct=overhead_percent(bare_img_s, model_img_s), decode_img_s=decode_img_s,
        decode_source="--data " + str(data_dir) if data_dir else f"{SOURCE_SIZE}px RGBA phantom PNGs",
        augment_img_s=augment_img_s, workers_needed=workers_needed(model_img_s, augment_img_s),
        profile=Path(prof["path"]).stem, n_train=n_train, n_val=n_val, image_steps=image_steps,
        cost_ratio=cost_ratio, hours_as_measured=estimate_hours(image_steps, model_img_s),
        hours_flop_scaled=estimate_hours(image_steps, model_img_s, cost_ratio))
    log(format_table(result))
    return result


def format_table(r: dict[str, Any]) -> str:
    """The printed summary of a run_bench result."""
    precision = "bf16" if r["amp"] else "fp32"
    layout = "channels_last" if r["channels_last"] else "contiguous"
    return "\n".join([
        f"{r['arch']} {r['head']}/{r['pooling']}  {r['img_size']} px  batch {r['batch_size']}  "
        f"{r['optimizer']}{'+SAM' if r['sam'] == 'sam' else ''}  "
        f"{r['device']} {precision} {layout}{' compiled' if r['compile'] else ''}  {r['threads']} threads  "
        f"{r['workers']} loader workers  ({r['steps']} steps, {r['warmup_steps']} warm-up)",
        f" (a) model step alone     {r['model_img_s']:9.1f} img/s",
        f" (b) full input pipeline  {r['pipeline_img_s']:9.1f} img/s   b/a = {r['pipeline_ratio']:.3f}"
        "  (target >= 0.95)",
        f" (c) bare PyTorch loop    {r['bare_img_s']:9.1f} img/s   overhead (c-a)/c = {r['overhead_pct']:.1f} %"
        "  (target <= 5 %)",
        f" (d) decode ({r['decode_source']})  {r['decode_img_s']:.1f} img/s per process;"
        f"  cached row + augment + normalise {r['augment_img_s']:.1f} img/s per process"
        f"  -> workers to feed (a): {r['workers_needed']}",
        f" (e) '{r['profile']}' profile: {sum(r['image_steps'].values()):,.0f} image-steps "
        f"({len(r['image_steps'])} runs, {r['n_train']} Train / {r['n_val']} pseudo-labelled slices): "
        f"{r['hours_as_measured']:.1f} h if every run cost like (a); {r['hours_flop_scaled']:.1f} h scaled by "
        f"forward FLOPs to each run's arch and img_size"])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m utils.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="resnest14d")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="the base optimizer")
    parser.add_argument("--sam", choices=("sam", "none"), default="sam", help="SAM around it (the paper) or not")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 30 on CUDA, 8 on CPU)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="default 5 on CUDA, 2 on CPU")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--workers", type=int, default=-1, help="loader workers (default: train.loader_workers)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--head", default="exp", choices=models.HEADS)
    parser.add_argument("--pooling", default="hybrid", choices=models.POOLINGS)
    parser.add_argument("--data", default=None, help="real images (a folder or a data set) to time decoding")
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(model_name=f"bench_{args.arch}", arch=args.arch, head=args.head, pooling=args.pooling,
                      img_size=args.img_size, batch_size=args.batch_size, optimizer=args.optimizer, sam=args.sam,
                      device=args.device, amp=args.amp, channels_last=args.channels_last, compile=args.compile,
                      num_workers=args.workers)
    result = run_bench(cfg, args.steps, args.warmup_steps, args.data, args.profile)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
