r"""Training throughput benchmark: does the input pipeline keep the model busy, what does the project loop cost, and
how many jobs should share a GPU?

For one setting (arch, image size, batch, optimizer, device, bf16/channels_last) it prints, in images per second:

 (a) model step alone: `train.StepRunner` on one batch already on the device (the same tensors every step), after
     warm-up steps, CUDA synchronised before each clock read. The batch is made as training makes it: the eval
     transform's uint8 images (one channel for gray input) through `runner.to_device` (copy, channels_last,
     normalised to float32 on the device). The ceiling of everything below.
 (b) full pipeline: `train.make_loader` over a `SliceDataset` of a uint8 (N, H, W, C) image array with the TRAIN
     transform (RandAugment N=2, M=9), then `runner.to_device` + the step, as `train.train_fold` runs it.
     b/a is the share of the model's speed the input pipeline lets through (target >= 0.95). The loader queue
     holds up to 4 batches per worker (W workers); a stock left there when the clock starts counts as free, so the
     pipeline gets 4*W extra warm-up steps (they drain it when the workers are too slow) and at least 16*W timed
     steps (a leftover stock then inflates b by at most 1/4, in practice far less; raise --steps to shrink it).
 (c) bare PyTorch loop on the same normalised float batch and model: the same forward, the head's losses written out
     with F.smooth_l1_loss/F.kl_div, and for SAM the two passes inline (backward, w += e = rho g/||g|| with foreach
     ops, forward/backward with BN running stats frozen, w -= e, base step); tests/test_bench.py checks that it makes
     the same update as StepRunner. Overhead of the project loop = (c - a) / c in % (target <= 5 %). Gradient
     clipping is off in both.
 (d) per-process input throughput: decode = `data.load_image` (PIL decode + grayscale + bilinear resize) of 512x512
     RGBA PNGs like the challenge's (phantom slices written to a temp dir, or the first images of `--data`);
     augment = a memmapped cached array row + train RandAugment (uint8 out; normalising happens on the device)
     (`SliceDataset[i]`). Decoding happens once per run (utils.data.cached_images); augmentation every step, so the
     loader needs ceil(a / augment) workers to feed the model (plus cores for the main process).
 (e) the `paper` profile's wall time. Image-steps = sum over models of epochs x folds trained x training part of a
     fold (3054 x (n_folds-1)/n_folds, or the count of `--data`), plus each pseudo-label retrain on that training
     part + the 1301 Val slices (+ Test when `--data` has one). Each run is scaled by forward FLOPs (its arch at the
     profile's img_size over the measured arch/size; counted on the meta device). Two sums, as if the runs went one
     after another at (a)'s speed: every run costing like the measured setting, and FLOP-scaled. Then the wall time
     of the real schedule (`estimate_wall_hours`): every (model, fold) is a job of image-steps / folds; stage 1 is the
     profile's models' folds, stage 2 the pseudo-label retrains' folds (`<model>_pl`, they need stage 1's
     ensemble); jobs start longest first on gpus x K slots, each job's speed = aggregate(k) / k with k the jobs on
     its GPU at that moment, from the `--concurrent` measurement at the K of the highest aggregate (without it: K=1
     at (a)'s speed). Reported for 1 and 2 GPUs. FLOPs are a rough guide (small convs run below peak, SAM's
     optimizer arithmetic does not scale with pixels); validation, prediction and checkpoints are not included.

`--concurrent K [K ...]`: for each K (1 is always added: the speed-up's base), K processes (multiprocessing "spawn":
CUDA cannot fork) each build the model and optimizer of the setting on the same device and run (a)'s step loop on
(a)'s batch, copied to their device; a `multiprocessing.Barrier` starts their warm-up together and then their timed
steps together. Per K: aggregate img/s = the sum of each process's steps x batch / its own elapsed time, the
stricter all images / (latest end - earliest start), per-job img/s = aggregate / K, and the speed-up of the aggregate
over K=1. This is how `utils.jobs.Runner(jobs_per_gpu=K)` shares a GPU; choose K where the aggregate stops growing.
Each process gets max(1, T // K) torch threads, T = this process's threads (--threads, OMP_NUM_THREADS or torch's
default). A K whose processes fail (out of GPU memory) is reported as failed and larger K are skipped.

Run (CPU: the defaults take under a minute on 2 cores; torch.set_flush_denormal(True) as in training):
    python -m utils.bench [--optimizer sgd|adamw] [--sam sam|none] [--head exp] [--pooling hybrid] [--json out.json]
On a GPU box, the paper setting with 1, 2, 4 and 8 jobs sharing the GPU (bf16 + channels_last); the same with
torch.compile; and fp32 + contiguous for comparison:
    python -m utils.bench --arch resnest50d --img-size 512 --batch-size 8 --device cuda \
        --concurrent 1 2 4 8 --json out.json
    python -m utils.bench --arch resnest50d --img-size 512 --batch-size 8 --device cuda --compile --json compiled.json
    python -m utils.bench ... --compile reduce-overhead   # torch.compile with CUDA graphs (>= 3 warm-up steps)
    python -m utils.bench --arch resnest50d --img-size 512 --batch-size 8 --device cuda --no-amp --no-channels-last
Defaults: 30 timed + 5 warm-up steps on CUDA, 8 + 2 on CPU. On a busy CPU pass `--threads 1`: two OpenMP threads
on two cores shared with another process spin-wait for each other (measured here: 8.3 s vs 0.4 s per step).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import multiprocessing
import queue as queue_module
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from utils import augment, cli, data, files, losses, machine, models, phantoms, train
from utils.config import AMP_DTYPES, COMPILE_MODES, TrainConfig, load_profile, pseudo_label_name

N_TRAIN, N_VAL, N_FOLDS = 3054, 1301, 5  # the challenge's Train and Val slices; the paper's 5 folds
SOURCE_SIZE = 512  # the challenge PNGs are 512x512
PREFETCH = 4  # train.make_loader's prefetch_factor
BARRIER_TIMEOUT_S = 900.0  # a concurrent process waits this long at most for the others (then gives up)


def paper_image_steps(profile: dict[str, Any], n_train: int = N_TRAIN, n_val: int = N_VAL,
                      n_folds: int | None = None) -> dict[str, float]:
    """Images through one optimizer step, per training run of a profile ({model_name: ..., name_pl: ...}).

    Per model: epochs x len(folds) x n_train (n_folds-1)/n_folds; a pseudo-label retrain (`<name>_pl`,
    config.pseudo_label_name) trains the same folds on that part + n_val pseudo-labelled slices. n_folds defaults to
    the profile's `n_folds` (else 5).
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
            steps[pseudo_label_name(run["model_name"])] = per_epoch_fold * (training_part + n_val)
    return steps


def estimate_hours(image_steps: dict[str, float], images_per_s: float,
                   cost_ratio: dict[str, float] | None = None) -> float:
    """Training hours: sum of image-steps (each times its cost relative to the measured model) / images_per_s."""
    if images_per_s <= 0:
        raise ValueError(f"images_per_s={images_per_s}: must be > 0")
    ratio = cost_ratio or {}
    return sum(steps * ratio.get(name, 1.0) for name, steps in image_steps.items()) / images_per_s / 3600


def profile_stages(profile: dict[str, Any], image_steps: Mapping[str, float],
                   cost_ratio: Mapping[str, float] | None = None) -> list[dict[str, float]]:
    """The profile's training jobs by stage, {"<run> fold <k>": image-steps x cost ratio}: stage 1 every (model, fold),
    stage 2 the pseudo-label retrains' folds (`<model>_pl`: they train on stage 1's ensemble's pseudo-labels).

    A job's image-steps are its run's figure (`paper_image_steps`) / the run's number of folds; empty stages are left
    out."""
    defaults, params, ratio = TrainConfig(), profile.get("params", {}), cost_ratio or {}
    first: dict[str, float] = {}
    second: dict[str, float] = {}
    for model in profile["models"]:
        run = {**params, **model}
        folds = run.get("folds", defaults.folds)
        for name, stage in ((run["model_name"], first), (pseudo_label_name(run["model_name"]), second)):
            if name in image_steps:
                for fold in folds:
                    stage[f"{name} fold {fold}"] = image_steps[name] / len(folds) * ratio.get(name, 1.0)
    return [stage for stage in (first, second) if stage]


def _per_job_speed(aggregate_img_s: Mapping[Any, float]) -> Callable[[int], float]:
    """k -> one job's img/s when k jobs share a GPU: aggregate(k) / k, the aggregate interpolated linearly between
    the measured k and clamped outside them."""
    measured = sorted((int(k), float(v)) for k, v in aggregate_img_s.items())
    if not measured:
        raise ValueError("aggregate_img_s is empty: give the aggregate img/s of at least one k")
    if any(k < 1 or not (math.isfinite(v) and v > 0) for k, v in measured):
        raise ValueError(f"aggregate_img_s={dict(measured)}: need k >= 1 and finite speeds > 0")
    ks, speeds = [k for k, _ in measured], [v for _, v in measured]
    return lambda k: float(np.interp(k, ks, speeds)) / k


def _stage_seconds(jobs: Sequence[float], gpus: int, jobs_per_gpu: int, speed: Callable[[int], float]) -> float:
    """Seconds until the last job of one stage ends: event simulation of `estimate_wall_hours`' schedule."""
    pending = sorted((float(w) for w in jobs), reverse=True)
    if any(not (math.isfinite(w) and w >= 0) for w in pending):
        raise ValueError(f"job image-steps must be finite and >= 0, got {list(jobs)}")
    load = [0] * gpus  # jobs running on each GPU
    running: list[tuple[float, int]] = []  # (image-steps left, its GPU)
    elapsed = 0.0
    while pending or running:
        while pending and min(load) < jobs_per_gpu:  # the next longest job on the least busy GPU
            gpu = load.index(min(load))
            running.append((pending.pop(0), gpu))
            load[gpu] += 1
        rates = [speed(load[gpu]) for _, gpu in running]
        ends = [left / rate for (left, _), rate in zip(running, rates, strict=True)]
        step = min(ends)  # until the next job ends; then its GPU's other jobs speed up
        elapsed += step
        still = []
        for (left, gpu), rate, end in zip(running, rates, ends, strict=True):
            if end <= step * (1 + 1e-12):
                load[gpu] -= 1
            else:
                still.append((left - rate * step, gpu))
        running = still
    return elapsed


def estimate_wall_hours(stages: Sequence[Sequence[float]], gpus: int, jobs_per_gpu: int,
                        aggregate_img_s: Mapping[int, float]) -> float:
    """Wall hours of training jobs run stage after stage, each stage's jobs on gpus x jobs_per_gpu slots.

    `stages`: lists of jobs, each its image-steps (FLOP-scaled to the measured setting); a stage starts when the
    previous one has ended. `aggregate_img_s`: k -> measured img/s of k jobs sharing one GPU, all together (keys may
    be strings, as in the JSON); one job's speed is aggregate(k) / k, interpolated linearly between measured k and
    clamped outside them. Jobs start longest first, each on a free slot of the GPU with the fewest running jobs; a
    job's speed follows the number of jobs on its GPU at each moment (when one ends, the others speed up)."""
    if gpus < 1 or jobs_per_gpu < 1:
        raise ValueError(f"gpus={gpus}, jobs_per_gpu={jobs_per_gpu}: need at least 1")
    speed = _per_job_speed(aggregate_img_s)
    return sum(_stage_seconds(stage, gpus, jobs_per_gpu, speed) for stage in stages) / 3600


def overhead_percent(bare_img_s: float, project_img_s: float) -> float:
    """How much slower the project loop is than the bare loop, in % of the bare speed: (bare - project) / bare."""
    return 100.0 * (bare_img_s - project_img_s) / bare_img_s


def workers_needed(model_img_s: float, augment_img_s: float) -> int:
    """Loader workers that keep up with the model: ceil(model img/s / one worker's augment img/s)."""
    return math.ceil(model_img_s / augment_img_s)


@functools.cache
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
    kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    base = torch.optim.AdamW(params, **kwargs) if cfg.optimizer == "adamw" else \
        torch.optim.SGD(params, momentum=cfg.momentum, **kwargs)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    autocast = machine.autocast_context(cfg, images.device)
    scaler = machine.grad_scaler(cfg, images.device)  # fp16: torch's loss scaling, as the project's step
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

    def backward(value: torch.Tensor) -> None:
        (value if scaler is None else scaler.scale(value)).backward()

    def step() -> None:
        model.train()
        base.zero_grad(set_to_none=True)
        backward(loss())
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
            backward(loss())
            for m, momentum in zip(norms, momenta, strict=True):
                m.momentum = momentum
            with torch.no_grad():
                torch._foreach_sub_(live, climb)
        if scaler is None:
            base.step()
        else:
            scaler.step(base)
            scaler.update()

    return step


# ----------------------------------------------------------------------------------------------- --concurrent K


def _concurrent_worker(cfg: TrainConfig, threads: int, images: np.ndarray, targets: np.ndarray, steps: int,
                       warmup_steps: int, barrier: Any, results: Any, index: int) -> None:
    """One of K spawned processes: (a)'s step loop on its own model, timed between the others' barrier waits."""
    cli.worker_init()  # Ctrl-C is the parent's (it stops these), and a SIGTERM from it ends this one quietly
    try:
        torch.set_num_threads(threads)
        device = machine.resolve_device(cfg.device)
        machine.prepare_device(device)
        torch.manual_seed(cfg.seed)
        runner = _build_runner(cfg, device)
        batch = runner.to_device(torch.from_numpy(images), torch.from_numpy(targets))
        barrier.wait(BARRIER_TIMEOUT_S)  # every process has built its model: warm up together
        for _ in range(warmup_steps):
            runner(*batch)
        _sync(device)
        barrier.wait(BARRIER_TIMEOUT_S)  # and time together
        started = time.perf_counter()  # CLOCK_MONOTONIC on Linux: comparable across the processes
        for _ in range(steps):
            runner(*batch)
        _sync(device)
        results.put(("done", index, {"started": started, "ended": time.perf_counter()}))
    except threading.BrokenBarrierError:  # another process failed (it reports why) or the wait timed out
        results.put(("aborted", index, f"waited at the barrier in vain (at most {BARRIER_TIMEOUT_S:.0f} s)"))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        results.put(("failed", index, traceback.format_exc()))
        barrier.abort()  # the others stop waiting


def _run_processes(cfg: TrainConfig, k: int, threads: int, images: np.ndarray, targets: np.ndarray, steps: int,
                   warmup_steps: int) -> list[dict[str, float]]:
    """Start K `_concurrent_worker` processes; their timings, or RuntimeError with the first failure's traceback."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    barrier, results = context.Barrier(k), context.Queue()
    processes = [context.Process(target=_concurrent_worker, daemon=True, name=f"bench-concurrent-{k}-{i}",
                                 args=(cfg, threads, images, targets, steps, warmup_steps, barrier, results, i))
                 for i in range(k)]
    for process in processes:
        process.start()
    timings: dict[int, dict[str, float]] = {}
    silent: set[int] = set()  # processes seen ended without a report (it may still be in the pipe: one more wait)
    aborted: dict[int, str] = {}  # processes whose barrier broke: the one that broke it says why
    failed = True
    try:
        while len(timings) < k:
            try:
                outcome, index, payload = results.get(timeout=1.0)
            except queue_module.Empty:
                for i, process in enumerate(processes):
                    if i not in timings and process.exitcode is not None:
                        if i in silent:
                            raise RuntimeError(aborted.get(i) or f"{process.name} exited with code "
                                               f"{process.exitcode} before reporting") from None
                        silent.add(i)
                continue
            if outcome == "failed":
                raise RuntimeError(f"process {index + 1} of {k}:\n{payload}")
            if outcome == "aborted":
                aborted[index] = f"process {index + 1} of {k}: {payload}"
            else:
                timings[index] = payload
        failed = False
    finally:
        if failed:
            barrier.abort()  # the others stop waiting; their figures would be worthless now
        for process in processes:
            if failed:
                process.terminate()
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
    return [timings[i] for i in range(k)]


def concurrency_figures(timings: Sequence[Mapping[str, float]], steps: int, batch: int) -> dict[str, Any]:
    """K processes' (started, ended) clocks -> aggregate img/s (sum of each one's rate), the stricter all images /
    (latest end - earliest start), and per-job img/s (aggregate / K)."""
    per_process = [steps * batch / (t["ended"] - t["started"]) for t in timings]
    span = max(t["ended"] for t in timings) - min(t["started"] for t in timings)
    aggregate = sum(per_process)
    return {"processes": len(timings), "aggregate_img_s": aggregate,
            "aggregate_wall_img_s": len(timings) * steps * batch / span, "per_job_img_s": aggregate / len(timings),
            "per_process_img_s": per_process}


def measure_concurrent(cfg: TrainConfig, ks: Sequence[int], images: torch.Tensor, targets: torch.Tensor,
                       steps: int, warmup_steps: int, cores: int | None = None,
                       log: Callable[[str], None] = print) -> dict[int, dict[str, Any]]:
    """`--concurrent`: for each K (and 1), K processes running (a)'s step loop on `images` (the uint8 batch before
    `to_device`) at once; {K: figures} with the speed-up of the aggregate over K=1 (see the module docstring).

    Threads per process: max(1, cores // K), cores defaulting to this process's torch threads. K=1 failing raises;
    a larger K that fails (out of GPU memory) is recorded as {"processes": K, "error": ...} and larger K skipped."""
    if any(k < 1 for k in ks):
        raise ValueError(f"--concurrent {list(ks)}: every K must be >= 1")
    cores = cores or torch.get_num_threads()
    figures: dict[int, dict[str, Any]] = {}
    for k in sorted({1, *ks}):
        threads = max(1, cores // k)
        try:
            timings = _run_processes(cfg, k, threads, images.numpy(), targets.numpy(), steps, warmup_steps)
        except RuntimeError as error:
            if k == 1:
                raise
            log(f"--concurrent {k} failed, larger K skipped: {error}")
            figures[k] = {"processes": k, "threads": threads, "error": str(error).strip().splitlines()[-1]}
            break
        figures[k] = {**concurrency_figures(timings, steps, cfg.batch_size), "threads": threads}
        figures[k]["speedup"] = figures[k]["aggregate_img_s"] / figures[1]["aggregate_img_s"]
        log(f"--concurrent {k}: aggregate {figures[k]['aggregate_img_s']:.1f} img/s, "
            f"speed-up {figures[k]['speedup']:.2f}")
    return figures


# ----------------------------------------------------------------------------------------------- the measurements


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


def _train_transform(cfg: TrainConfig) -> augment.SliceTransform:
    return augment.training_transform(cfg, seed=cfg.seed)


def _build_runner(cfg: TrainConfig, device: torch.device) -> train.StepRunner:
    model = train.build_model_for(cfg, device)
    return train.StepRunner(model, train.build_optimizer(model, cfg), cfg, device)


def _model_batch(cfg: TrainConfig, cache: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(a)'s batch on the host as the loader gives it: the eval transform's uint8 images, targets 0..100."""
    eval_transform = augment.build_transform(train=False, channels=cfg.in_chans)
    images = torch.stack([eval_transform(np.asarray(cache[i % len(cache)])) for i in range(cfg.batch_size)])
    return images, torch.linspace(0, 100, cfg.batch_size)


def _measure_inputs(cfg: TrainConfig, data_dir: str | Path | None, n_images: int,
                    folder: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """(d): decode `n_images` PNGs into a memmapped array (the "cache" every other measurement reads), then time a
    cached row + train augmentation; returns (the cache, the figures)."""
    paths = _source_pngs(data_dir, folder, n_images)
    data.load_image(paths[0], cfg.img_size, cfg.in_chans)  # first call imports PIL plugins
    started = time.perf_counter()
    decoded = np.stack([data.load_image(p, cfg.img_size, cfg.in_chans) for p in paths])
    decode_img_s = len(paths) / (time.perf_counter() - started)
    np.save(folder / "cache.npy", decoded)
    cache = np.load(folder / "cache.npy", mmap_mode="r")
    rows = max(4 * cfg.batch_size, 32)
    dataset = data.SliceDataset(_TiledRows(cache, rows), np.linspace(0, 100, rows, dtype=np.float32),
                                _train_transform(cfg))
    order = itertools.count()
    augment_img_s = _images_per_s(lambda: dataset[next(order) % rows], rows, 4, 1, torch.device("cpu"))
    source = "--data " + str(data_dir) if data_dir else f"{SOURCE_SIZE}px RGBA phantom PNGs"
    return cache, {"decode_img_s": decode_img_s, "decode_source": source, "augment_img_s": augment_img_s}


def _measure_model_step(cfg: TrainConfig, device: torch.device, images: torch.Tensor, targets: torch.Tensor,
                        steps: int, warmup_steps: int) -> tuple[train.StepRunner, dict[str, float]]:
    """(a) StepRunner and (c) the bare loop, one model, on the same normalised float batch on the device."""
    torch.manual_seed(cfg.seed)
    runner = _build_runner(cfg, device)
    images, targets = runner.to_device(images, targets)
    model_img_s = _images_per_s(lambda: runner(images, targets), steps, warmup_steps, cfg.batch_size, device)
    bare_img_s = _images_per_s(_bare_step(runner.model, runner.forward, cfg, images, targets), steps, warmup_steps,
                               cfg.batch_size, device)
    return runner, {"model_img_s": model_img_s, "bare_img_s": bare_img_s,
                    "overhead_pct": overhead_percent(bare_img_s, model_img_s)}


def _measure_pipeline(cfg: TrainConfig, device: torch.device, runner: train.StepRunner, cache: np.ndarray,
                      steps: int, warmup_steps: int, workers: int) -> dict[str, float]:
    """(b): train_fold's loader over cached rows with the train transform, then to_device + the step."""
    batch = cfg.batch_size
    pipe_warmup, pipe_steps = warmup_steps + PREFETCH * workers, max(steps, 4 * PREFETCH * workers)
    n_rows = (pipe_warmup + pipe_steps + 1) * batch
    train_set = data.SliceDataset(_TiledRows(cache, n_rows), np.linspace(0, 100, n_rows, dtype=np.float32),
                                  _train_transform(cfg))
    loader = train.make_loader(train_set, cfg, device, train=True, seed=cfg.seed)
    batches = iter(loader)  # its workers stop when the loader and this iterator go, on return
    pipeline_img_s = _images_per_s(lambda: runner(*runner.to_device(*next(batches))), pipe_steps, pipe_warmup,
                                   batch, device)
    return {"pipeline_steps": pipe_steps, "pipeline_img_s": pipeline_img_s}


def _paper_estimate(cfg: TrainConfig, data_dir: str | Path | None, profile: str, model_img_s: float,
                    concurrent: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """(e): the profile's image-steps and FLOP cost ratios, the hours of its runs one after another at (a)'s speed,
    and the wall hours of its two stages on 1 and 2 GPUs at the K of the highest measured aggregate img/s
    (K=1 at (a)'s speed without --concurrent)."""
    n_train, n_val = _split_counts(data_dir)
    prof = load_profile(profile)
    image_steps = paper_image_steps(prof, n_train, n_val)
    runs = {m["model_name"]: {**prof["params"], **m} for m in prof["models"]}
    runs.update({pseudo_label_name(name): run for name, run in list(runs.items())})
    measured = forward_macs(cfg.arch, cfg.img_size, cfg.in_chans)
    cost_ratio = {name: forward_macs(runs[name].get("arch", cfg.arch), runs[name].get("img_size", cfg.img_size),
                                     cfg.in_chans) / measured for name in image_steps}
    stages = profile_stages(prof, image_steps, cost_ratio)
    speeds = {k: c["aggregate_img_s"] for k, c in concurrent.items() if "aggregate_img_s" in c} or {1: model_img_s}
    best_k = max(speeds, key=lambda k: (speeds[k], -k))
    one_gpu, two_gpus = (estimate_wall_hours([list(s.values()) for s in stages], gpus, best_k, speeds)
                         for gpus in (1, 2))
    return {"profile": Path(prof["path"]).stem, "n_train": n_train, "n_val": n_val, "image_steps": image_steps,
            "cost_ratio": cost_ratio, "hours_as_measured": estimate_hours(image_steps, model_img_s),
            "hours_flop_scaled": estimate_hours(image_steps, model_img_s, cost_ratio), "stages": stages,
            "jobs_per_gpu": best_k, "wall_aggregate_img_s": speeds, "wall_hours_1gpu": one_gpu,
            "wall_hours_2gpu": two_gpus, "wall_ratio_2gpu": two_gpus / one_gpu}


def run_bench(cfg: TrainConfig, steps: int | None = None, warmup_steps: int | None = None,
              data_dir: str | Path | None = None, profile: str = "paper", n_images: int = 16,
              concurrent: Sequence[int] = (), log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure (a)-(e) of the module docstring for `cfg`'s setting, with `concurrent` K's the K-process figures too;
    prints `format_table` and returns the figures as a JSON-ready dict."""
    if cfg.sam == "asam":
        raise ValueError("sam='asam': the bare loop (c) writes out SAM only; use sam='sam' or 'none'")
    device = machine.resolve_device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no GPU: use --device cpu (or auto)")
    cuda = device.type == "cuda"
    steps, warmup_steps = steps or (30 if cuda else 8), warmup_steps if warmup_steps is not None else (5 if cuda else 2)
    machine.prepare_device(device)  # as train_fold: cudnn.benchmark; on CPU flushed denormals (~10x slower on x86)
    workers = train.loader_workers(cfg, device)
    # One progress line per measurement as it ends: a bench stopped by a time limit still says what it measured.
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        cache, inputs = _measure_inputs(cfg, data_dir, n_images, Path(tmp))  # (d)
        log(f"(d) decode {inputs['decode_img_s']:.1f} img/s, augment {inputs['augment_img_s']:.1f} img/s per process")
        images, targets = _model_batch(cfg, cache)
        runner, step = _measure_model_step(cfg, device, images, targets, steps, warmup_steps)  # (a), (c)
        log(f"(a) model step {step['model_img_s']:.1f} img/s, (c) bare loop {step['bare_img_s']:.1f} img/s")
        pipeline = _measure_pipeline(cfg, device, runner, cache, steps, warmup_steps, workers)  # (b)
        log(f"(b) full input pipeline {pipeline['pipeline_img_s']:.1f} img/s ({workers} loader workers)")
        del runner, cache
    if cuda:
        torch.cuda.empty_cache()  # leave the GPU's memory to the concurrent processes
    parallel = measure_concurrent(cfg, concurrent, images, targets, steps, warmup_steps, log=log) if concurrent else {}
    model_img_s = step["model_img_s"]
    result = dict(
        arch=cfg.arch, head=cfg.head, pooling=cfg.pooling, img_size=cfg.img_size, batch_size=cfg.batch_size,
        optimizer=cfg.optimizer, sam=cfg.sam, device=str(device),
        precision=str(machine.amp_dtype(cfg, device) or torch.float32).removeprefix("torch."),
        channels_last=cfg.channels_last, compile_mode=cfg.compile_mode, workers=workers,
        threads=torch.get_num_threads(),
        steps=steps, warmup_steps=warmup_steps, **step, **pipeline,
        pipeline_ratio=pipeline["pipeline_img_s"] / model_img_s, **inputs,
        workers_needed=workers_needed(model_img_s, inputs["augment_img_s"]), concurrent=parallel,
        **_paper_estimate(cfg, data_dir, profile, model_img_s, parallel))
    log(format_table(result))
    return result


# ----------------------------------------------------------------------------------------------- output


def _concurrent_table(r: dict[str, Any]) -> list[str]:
    if not r["concurrent"]:
        return []
    lines = [f" --concurrent: K processes on one {r['device']} device, each (a)'s step on its own model, started "
             "together",
             "      K  threads/process  aggregate img/s  all/(last end - first start)  per job img/s  speed-up"]
    for k, c in sorted(r["concurrent"].items(), key=lambda item: int(item[0])):
        if "error" in c:
            lines.append(f"   {int(k):4d}  {c['threads']:15d}  failed: {c['error']}")
            continue
        lines.append(f"   {int(k):4d}  {c['threads']:15d}  {c['aggregate_img_s']:15.1f}  "
                     f"{c['aggregate_wall_img_s']:28.1f}  {c['per_job_img_s']:13.1f}  {c['speedup']:8.2f}")
    return lines


def format_table(r: dict[str, Any]) -> str:
    """The printed summary of a run_bench result."""
    precision = {"bfloat16": "bf16", "float16": "fp16 + GradScaler", "float32": "fp32"}[r["precision"]]
    layout = "channels_last" if r["channels_last"] else "contiguous"
    speed = "--concurrent's aggregate" if r["concurrent"] else "(a)'s speed"
    compiled = f" compiled ({r['compile_mode']})" if r["compile_mode"] else ""
    return "\n".join([
        f"{r['arch']} {r['head']}/{r['pooling']}  {r['img_size']} px  batch {r['batch_size']}  "
        f"{r['optimizer']}{'+SAM' if r['sam'] == 'sam' else ''}  "
        f"{r['device']} {precision} {layout}{compiled}  {r['threads']} threads  "
        f"{r['workers']} loader workers  ({r['steps']} steps, {r['warmup_steps']} warm-up)",
        f" (a) model step alone     {r['model_img_s']:9.1f} img/s",
        f" (b) full input pipeline  {r['pipeline_img_s']:9.1f} img/s   b/a = {r['pipeline_ratio']:.3f}"
        "  (target >= 0.95)",
        f" (c) bare PyTorch loop    {r['bare_img_s']:9.1f} img/s   overhead (c-a)/c = {r['overhead_pct']:.1f} %"
        "  (target <= 5 %)",
        f" (d) decode ({r['decode_source']})  {r['decode_img_s']:.1f} img/s per process;"
        f"  cached row + augment {r['augment_img_s']:.1f} img/s per process"
        f"  -> workers to feed (a): {r['workers_needed']}",
        f" (e) '{r['profile']}' profile: {sum(r['image_steps'].values()):,.0f} image-steps "
        f"({len(r['image_steps'])} runs, {r['n_train']} Train / {r['n_val']} pseudo-labelled slices): "
        f"{r['hours_as_measured']:.1f} h one after another if every run cost like (a); {r['hours_flop_scaled']:.1f} h "
        f"scaled by forward FLOPs to each run's arch and img_size",
        f"     wall time of its {len(r['stages'])} stages ({' then '.join(str(len(s)) for s in r['stages'])} "
        f"(model, fold) jobs, longest first) at {r['jobs_per_gpu']} job(s) per GPU ({speed}), FLOP-scaled: "
        f"1 GPU {r['wall_hours_1gpu']:.1f} h, 2 GPUs {r['wall_hours_2gpu']:.1f} h "
        f"(2 GPUs / 1 GPU = {r['wall_ratio_2gpu']:.2f})",
        *_concurrent_table(r)])


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
    parser.add_argument("--amp-dtype", default="auto", choices=AMP_DTYPES,
                        help="auto: bf16 where the GPU computes it, else fp16 with a GradScaler")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", nargs="?", const="default", default=False, choices=COMPILE_MODES,
                        metavar="MODE", help="torch.compile the step: default, or reduce-overhead (CUDA graphs), "
                                             "max-autotune, max-autotune-no-cudagraphs")
    parser.add_argument("--workers", type=int, default=-1, help="loader workers (default: train.loader_workers)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--head", default="exp", choices=models.HEADS)
    parser.add_argument("--pooling", default="hybrid", choices=models.POOLINGS)
    parser.add_argument("--data", default=None, help="real images (a folder or a data set) to time decoding")
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--concurrent", type=int, nargs="+", default=(), metavar="K",
                        help="also time K processes sharing the device, for each K (1 is always added)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if any(k < 1 for k in args.concurrent):
        parser.error(f"--concurrent {args.concurrent}: every K must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(model_name=f"bench_{args.arch}", arch=args.arch, head=args.head, pooling=args.pooling,
                      img_size=args.img_size, batch_size=args.batch_size, optimizer=args.optimizer, sam=args.sam,
                      device=args.device, amp=args.amp, amp_dtype=args.amp_dtype, channels_last=args.channels_last,
                      compile=args.compile, num_workers=args.workers)
    result = run_bench(cfg, args.steps, args.warmup_steps, args.data, args.profile, concurrent=args.concurrent)
    if args.json:
        files.write_text(args.json, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
