"""The one training loop: a fold of one model, from a TrainConfig, resumable, with the last-k checkpoints kept.

Per fold (`train_fold`): build the model (utils.models), SGD (or AdamW) wrapped in SAM (utils.sam) or plain, timm's
CosineLRScheduler stepped per update (warm-up then cosine, as in the paper), RandAugment (utils.augment) on the
decoded-image cache (utils.data); each epoch validates on the held-out fold (the out-of-fold, OOF, slices) and
saves a resume state; the last `save_last_k` epochs' weights are kept as plain state dicts. With `ema_decay` > 0
the weights validated, kept and predicted with are timm's exponential moving average of the trained ones. At the
end each kept checkpoint predicts the OOF slices and every extra split (Val, Test): `predictions.csv` (split, name,
epoch, prediction). The ensemble stage (utils.ensemble) averages those over checkpoints, folds and models.

Batches travel as uint8 and are normalised on the device (utils.augment.Normalizer): 4x less to pin and copy than
float32 (12x with gray slices, replicated to 3 channels there). channels_last on both devices (measured on this
project's 2-core CPU: 5-15 % faster for resnet10t/18 at 64-96 px). On a GPU: bf16 autocast where the GPU computes
bf16 (no GradScaler: bf16 has fp32's range), fp16 with a GradScaler on older GPUs (T4, V100, P100; `amp_dtype`),
pinned memory, non-blocking copies, persistent workers, cudnn.benchmark. On a CPU: fp32, no loader workers by
default (they would compete with the model for the cores).

Resume: a killed run, rerun, continues after the last finished epoch (`state.pt`: optimizer incl. SAM's base
optimizer momentum, scheduler, history, and the weights, or at a kept epoch the name of its checkpoint: the
checkpoint bytes are written once; with EMA both the trained weights and their average). Data order is a function
of (seed, fold, epoch), so a resumed epoch sees the same order it would have seen. Checkpoints, states and
predictions are recorded with their hash when written and verified before reuse (utils.files). A finished fold (its
`predictions.csv`) is reused; slices of Val/Test that it has not predicted yet (a split added after training: the
challenge's Test phase) are predicted with its kept checkpoints, without training.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from tqdm.auto import tqdm

from utils import augment, csvfiles, data, ensemble, files, losses, machine, mixup, models, sam
from utils.config import PathSettings, RunPaths, TrainConfig
from utils.metrics import score

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ["split", "name", "epoch", "prediction"]
OOF = "oof"


@dataclass
class SplitImages:
    """One split's rows (name, percentage, subject[, fold]) and its decoded uint8 images (N, H, W, C), same order."""

    frame: pd.DataFrame
    images: np.ndarray

    def __post_init__(self) -> None:
        if len(self.frame) != len(self.images):
            raise ValueError(f"{len(self.frame)} rows but {len(self.images)} images: frame and cache are out of step")

    def subset(self, mask: np.ndarray) -> SplitImages:
        index = np.flatnonzero(mask)
        return SplitImages(self.frame.iloc[index].reset_index(drop=True), data.RowSubset(self.images, index))


# ----------------------------------------------------------------------------------------------- hardware


def loader_workers(cfg: TrainConfig, device: torch.device) -> int:
    if cfg.num_workers >= 0:
        return cfg.num_workers
    return min(8, max(1, machine.usable_cores() - 1)) if device.type == "cuda" else 0


# ----------------------------------------------------------------------------------------------- parts


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The paper: SAM (rho 0.05) wrapping SGD (momentum 0.9, weight decay 5e-3); `sam="none"` for the ablation."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        base, kwargs = torch.optim.SGD, dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        base, kwargs = torch.optim.AdamW, dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.sam == "none":
        return base(params, **kwargs)
    return sam.SAM(params, base, rho=cfg.sam_rho, adaptive=cfg.sam == "asam", **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """timm cosine schedule in optimizer updates: linear warm-up over `warmup_epochs`, then cosine to min_lr."""
    from timm.scheduler import CosineLRScheduler

    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=cfg.min_lr, warmup_t=warmup,
                             warmup_lr_init=cfg.warmup_lr, warmup_prefix=True, t_in_epochs=False)


def build_model_for(cfg: TrainConfig, device: torch.device, for_checkpoint: bool = False) -> nn.Module:
    """The model of `cfg` on `device`; `for_checkpoint`: no pretrained weights fetched (a checkpoint replaces them)."""
    pretrained = cfg.pretrained and not for_checkpoint
    pretrained_file = None if for_checkpoint else cfg.pretrained_file
    model = models.build_model(cfg.arch, head=cfg.head, pooling=cfg.pooling, in_chans=cfg.in_chans,
                               drop_rate=cfg.drop_rate, pretrained=pretrained, pretrained_file=pretrained_file,
                               f2_input=cfg.f2_input)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A permutation that is a pure function of (seed, epoch): a resumed epoch replays the same order, and
    one DataLoader (with persistent workers) serves every epoch via `set_epoch`."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


# Loader workers start by fork where the OS has it (PyTorch's default on Linux; they only augment on the CPU and
# never touch CUDA), also inside a Dask worker, whose default is spawn: a spawned loader worker imports torch and
# the project again, seconds each time an evaluation loader starts (each epoch).
_LOADER_START = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def make_loader(dataset: Dataset, cfg: TrainConfig, device: torch.device, train: bool, seed: int = 0,
                batch_size: int | None = None) -> DataLoader:
    """Training: shuffled by EpochShuffleSampler, full batches only, persistent workers on GPU boxes.
    Inference: in order, batches of `batch_size` (default max(cfg.batch_size, 32))."""
    workers = loader_workers(cfg, device)
    if batch_size is None:
        batch_size = cfg.batch_size if train else max(cfg.batch_size, 32)
    return DataLoader(dataset, batch_size=batch_size,
                      sampler=EpochShuffleSampler(len(dataset), seed) if train else None,
                      drop_last=train and len(dataset) > cfg.batch_size, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=train and workers > 0,
                      prefetch_factor=4 if workers else None, worker_init_fn=augment.worker_init if workers else None,
                      multiprocessing_context=_LOADER_START if workers else None)


def images_to_device(images: torch.Tensor, cfg: TrainConfig, device: torch.device,
                     normalizer: augment.Normalizer) -> torch.Tensor:
    """A uint8 batch from the loader -> the model's float32 input on `device`, normalised, in its layout."""
    return normalizer(images.to(device, non_blocking=True), channels_last=cfg.channels_last)


class StepRunner:
    """One optimisation step on a batch already on the device: the hot path shared by training and benchmarks."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, device: torch.device,
                 weight_table: torch.Tensor | None = None):
        self.model, self.optimizer, self.cfg, self.device = model, optimizer, cfg, device
        # LDS: per-bin loss weights (utils.losses.lds_weights of the fold's training labels), None: unweighted
        self.weight_table = None if weight_table is None else weight_table.to(device)
        self.autocast = machine.autocast_context(cfg, device)
        # "reduce-overhead" records CUDA graphs; SAM's two passes need no manual step marks: each forward follows
        # the previous pass's backward, which is when torch starts a new graph iteration by itself.
        self.forward = torch.compile(model, mode=cfg.compile_mode) if cfg.compile_mode else model
        self.normalizer = augment.Normalizer(cfg.in_chans)
        self.scaler = machine.grad_scaler(cfg, device)

    def to_device(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        losses.check_targets(targets)  # on the host: a NaN/out-of-range label fails here, with no GPU sync
        return (images_to_device(images, self.cfg, self.device, self.normalizer),
                targets.to(self.device, non_blocking=True).float())

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Returns the first pass's loss parts as detached device tensors (no host sync on the hot path)."""
        parts: dict[str, torch.Tensor] = {}
        weights = None if self.weight_table is None else losses.sample_weights(self.weight_table, targets)

        def compute_loss() -> torch.Tensor:
            with self.autocast():
                outputs = self.forward(images)
            loss, loss_parts = losses.head_loss(outputs, targets, self.cfg.head, kl_weight=self.cfg.kl_weight,
                                                check=False, weights=weights,
                                                regression_loss=self.cfg.regression_loss,
                                                bmse_sigma=self.cfg.bmse_sigma,
                                                ranksim_weight=self.cfg.ranksim_weight,
                                                ranksim_lambda=self.cfg.ranksim_lambda)
            if not parts:
                parts.update(loss_parts)
            return loss

        if not self.model.training:  # predict() leaves it in eval mode; walking the modules every step is waste
            self.model.train()
        if isinstance(self.optimizer, sam.SAM):
            sam.sam_train_step(self.model, self.optimizer, compute_loss, clip_grad_norm=self.cfg.clip_grad,
                               scaler=self.scaler, bn_update=self.cfg.sam_bn_update)
            return parts
        self.optimizer.zero_grad(set_to_none=True)
        loss = compute_loss()
        if self.scaler is None:
            loss.backward()
        else:  # torch's AMP recipe: scaled backward, unscale before clipping, a step skipped on inf/NaN gradients
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        if self.cfg.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return parts


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, cfg: TrainConfig, device: torch.device,
            batch_size: int | None = None, progress: bool = False) -> np.ndarray:
    """The regression output f2 (utils.models: out["reg"]) for each image, optionally averaged with its h-flip.
    Batches of max(batch_size, 32) unless `batch_size` is given."""
    transform = augment.build_transform(train=False, channels=cfg.in_chans)
    loader = make_loader(data.SliceDataset(images, None, transform), cfg, device, train=False, batch_size=batch_size)
    autocast = machine.autocast_context(cfg, device)
    normalizer = augment.Normalizer(cfg.in_chans)
    model.eval()
    outputs = []
    for batch, _ in tqdm(loader, desc="predicting", unit="batch", disable=not progress, leave=False):
        batch = images_to_device(batch, cfg, device, normalizer)
        with autocast():
            pred = model(batch)["reg"].float()
            if cfg.tta_hflip:
                pred = 0.5 * (pred + model(augment.hflip_tta(batch))["reg"].float())
        outputs.append(pred.cpu())
    return torch.cat(outputs).numpy().astype(np.float64) if outputs else np.zeros(0)


# ----------------------------------------------------------------------------------------------- a fold's files


class TrainingDiverged(RuntimeError):
    """A training's loss or held-out score became non-finite (or absurd): the message names model, fold, epoch
    and the usual fixes; nothing of that epoch is kept."""


class FoldMismatch(ValueError):
    """A fold on disk was trained with another recipe, other held-out slices or other data than asked for now."""


class FoldNotTrained(RuntimeError):
    """A report was asked of a fold that is not trained (02/04 with role='report')."""


# A held-out MAE above this is no training (percentages lie in 0..100): predictions of 1e19 count as divergence.
DIVERGED_MAE = 1000.0
INPUTS_FILE = "inputs.json"
# How inputs_digest reads the data; a record of another format cannot be compared (a record without one is 1)
INPUTS_FORMAT = 1


def checkpoint_path(fold_dir: Path, epoch: int) -> Path:
    return fold_dir / f"checkpoint_epoch{epoch:03d}.pt"


def kept_epochs(cfg: TrainConfig) -> range:
    return range(cfg.epochs - cfg.save_last_k, cfg.epochs)


def fold_way_out(fold_dir: Path) -> str:
    return f"rerun that fold (delete {fold_dir}) or the whole run with --force"


def load_checkpoint(fold_dir: Path, epoch: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A kept checkpoint's state dict, verified against its integrity record."""
    return files.load_torch(checkpoint_path(fold_dir, epoch), fold_way_out(fold_dir), map_location=device)


# Fields that change how a run executes but not what it learns: a fold may be resumed with other values.
EXECUTION_ONLY_FIELDS = {"folds", "num_workers", "compile", "device", "amp_dtype", "cpu_bf16"}


def _has_results(fold_dir: Path) -> bool:
    """Whether a fold folder holds anything trained (a stale config.yaml alone is not a result)."""
    return (fold_dir / "state.pt").is_file() or (fold_dir / "predictions.csv").is_file() or \
        any(fold_dir.glob("checkpoint_epoch*.pt"))


def _refused(fold_dir: Path, what: str) -> FoldMismatch:
    return FoldMismatch(f"{fold_dir} was trained with {what}; use another model_name or run name (--name), or "
                        "rerun with --force to discard the run")


def check_same_recipe(cfg: TrainConfig, saved_config: Path) -> None:
    """Refuse to reuse or resume a fold that was trained with another recipe (a silently stale result)."""
    if not saved_config.is_file() or not _has_results(saved_config.parent):
        return
    # an edit of the saved recipe must not make a fold look like another recipe's: it is refused, never compared
    saved = TrainConfig.load_yaml(files.verify(saved_config, fold_way_out(saved_config.parent), older_ok=True))
    saved = saved.to_dict()
    changed = {k: (saved[k], v) for k, v in cfg.to_dict().items()
               if k not in EXECUTION_ONLY_FIELDS and saved.get(k) != v}
    if changed:
        listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise _refused(saved_config.parent, f"another recipe ({listed})")


def check_same_held_out(names: Iterable[str], saved_list: Path) -> None:
    """Refuse to reuse or resume a fold whose held-out slices changed (folds remade with another seed or K)."""
    if saved_list.is_file() and _has_results(saved_list.parent) and saved_list.read_text().split() != sorted(names):
        raise _refused(saved_list.parent, f"other held-out slices than fold {saved_list.parent.name} of the current "
                                          "folds.csv (01_folds rerun with another n_folds/fold_seed or data?)")


def inputs_digest(parts: dict[str, SplitImages | None]) -> dict[str, Any]:
    """What a fold learns from, as one digest: every (name, label, image digest) of its training part, its
    pseudo-labelled part and its held-out part; the images by content (utils.data.image_digests), not by name."""
    digest, counts = hashlib.sha256(), {}
    for role, split in parts.items():
        if split is None:
            continue
        labels = split.frame["percentage"].to_numpy(np.float64)
        rows = sorted(zip(split.frame["name"], labels, data.image_digests(split.images)))
        for name, label, image in rows:
            digest.update(f"{role}\t{name}\t{float(label)!r}\t{image}\n".encode("utf-8", "surrogateescape"))
        counts[role] = len(rows)
    return {"digest": digest.hexdigest(), "slices": counts, "format": INPUTS_FORMAT}


def _saved_inputs(fold_dir: Path) -> dict[str, Any] | None:
    path = fold_dir / INPUTS_FILE
    if not path.is_file():
        return None
    files.verify(path, fold_way_out(fold_dir))
    return json.loads(path.read_text())


def check_same_inputs(inputs: dict[str, Any], fold_dir: Path) -> None:
    """Refuse to reuse or resume a fold whose training or held-out data differ (images or labels changed under the
    same names), as a changed recipe is refused."""
    if not _has_results(fold_dir):
        return
    saved = _saved_inputs(fold_dir)
    if saved is None:
        raise _refused(fold_dir, "data it holds no record of (no inputs.json: trained by an older version), so "
                                 "whether the data changed cannot be told")
    if saved.get("format", 1) != inputs["format"]:
        raise _refused(fold_dir, f"data recorded by another version of this suite (digest format "
                                 f"{saved.get('format', 1)}, this version's {inputs['format']}), so whether the data "
                                 "changed cannot be told")
    if saved["digest"] != inputs["digest"]:
        counts = ", ".join(f"{n} {role}" for role, n in inputs["slices"].items())
        before = ", ".join(f"{n} {role}" for role, n in saved["slices"].items())
        raise _refused(fold_dir, f"other data: its training and held-out images and labels differ from those asked "
                                 f"for now (now {counts}; then {before}; images or labels changed under the same "
                                 "names?)")


def _write_inputs(fold_dir: Path, inputs: dict[str, Any], predicted: dict[str, dict[str, str]]) -> None:
    files.write_text(fold_dir / INPUTS_FILE, json.dumps({**inputs, "predicted": predicted}, sort_keys=True) + "\n",
                     record=True)


def _predicted_digests(splits: dict[str, SplitImages]) -> dict[str, dict[str, str]]:
    return {split: dict(zip(images.frame["name"], data.image_digests(images.images)))
            for split, images in splits.items()}


def _training_dataset(train: SplitImages, pseudo: SplitImages | None, transform: augment.SliceTransform) -> Dataset:
    parts = [data.SliceDataset(train.images, train.frame["percentage"].to_numpy(np.float32), transform)]
    if pseudo is not None and len(pseudo.frame):
        parts.append(data.SliceDataset(pseudo.images, pseudo.frame["percentage"].to_numpy(np.float32), transform))
    if len(parts) == 1:
        return parts[0]
    dataset = ConcatDataset(parts)
    dataset.transform = transform  # augment.worker_init reseeds it in each loader worker
    return dataset


def _training_labels(fit: SplitImages, pseudo: SplitImages | None) -> np.ndarray:
    labels = [fit.frame["percentage"].to_numpy(np.float64)]
    if pseudo is not None and len(pseudo.frame):
        labels.append(pseudo.frame["percentage"].to_numpy(np.float64))
    return np.concatenate(labels)


# ----------------------------------------------------------------------------------------------- a fold


class _FoldTraining:
    """The moving parts of one fold's training (model, optimizer, schedule, data), built once, resumable."""

    def __init__(self, cfg: TrainConfig, fold: int, fit: SplitImages, pseudo: SplitImages | None, fold_dir: Path):
        self.cfg, self.fold, self.fold_dir = cfg, fold, fold_dir
        self.name = f"[{cfg.model_name} fold {fold}]"
        torch.manual_seed(cfg.seed + fold)
        self.device = machine.resolve_device(cfg.device)
        machine.prepare_device(self.device)
        self.model = build_model_for(cfg, self.device)  # before anything is written: bad weights fail first
        self.optimizer = build_optimizer(self.model, cfg)
        self.transform = augment.training_transform(cfg)
        train_set = _training_dataset(fit, pseudo, self.transform)
        self.pairs = None if cfg.mixup == "none" else \
            mixup.MixedPairs(train_set, _training_labels(fit, pseudo), cfg.mixup, cfg.mixup_alpha, cfg.cmixup_sigma)
        train_set = self.pairs or train_set
        self.steps_per_epoch = len(train_set) // cfg.batch_size if len(train_set) > cfg.batch_size else 1
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        weight_table = None if cfg.lds == "none" else \
            losses.lds_weights(_training_labels(fit, pseudo), cfg.lds, cfg.lds_sigma)
        self.runner = StepRunner(self.model, self.optimizer, cfg, self.device, weight_table)
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.loader = make_loader(train_set, cfg, self.device, train=True, seed=cfg.seed * 100 + fold)
        self.state_path = fold_dir / "state.pt"

    def resume(self) -> tuple[int, list[dict]]:
        """(first epoch to train, history so far) from state.pt, or (0, []) for a fresh fold."""
        if not self.state_path.is_file():
            return 0, []
        way_out = (f"delete {self.state_path} to restart this fold from its first epoch, or rerun the whole run "
                   "with --force")
        state = files.load_torch(self.state_path, way_out, map_location=self.device)

        def weights(key: str) -> dict[str, torch.Tensor]:  # inline, or by the name of a kept checkpoint
            return state[key] if key in state else \
                files.load_torch(self.fold_dir / state[f"{key}_file"], way_out, map_location=self.device)

        self.model.load_state_dict(weights("model"))
        if self.ema is not None:
            self.ema.module.load_state_dict(weights("ema"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.runner.scaler is not None and "grad_scaler" in state:  # fp16: resume with the loss scale reached
            self.runner.scaler.load_state_dict(state["grad_scaler"])
        log.info("%s resuming after epoch %d (from %s)", self.name, state["epoch"] + 1, self.state_path)
        return state["epoch"] + 1, list(state["history"])

    def train_epoch(self, epoch: int, progress: bool) -> dict[str, float]:
        """One epoch of updates; returns the mean training loss parts and the images/s. Raises TrainingDiverged
        when the loss was not finite (checked once, at the epoch's end: no host sync per step)."""
        cfg, started = self.cfg, time.perf_counter()
        self.loader.sampler.set_epoch(epoch)
        if self.loader.num_workers == 0:  # in-process augmentation: its stream is a function of (seed, fold, epoch)
            self.transform.set_seed(cfg.seed * 100_003 + self.fold * 1009 + epoch)
            if self.pairs is not None:
                self.pairs.set_seed(cfg.seed * 100_003 + self.fold * 1009 + epoch)
        sums: dict[str, torch.Tensor] = {}
        not_finite = torch.zeros((), dtype=torch.int64, device=self.device)
        counted = torch.zeros((), dtype=torch.float64, device=self.device)  # the slices of finite-loss steps
        seen = steps = 0
        bar = tqdm(self.loader, total=self.steps_per_epoch, desc=f"{cfg.model_name} f{self.fold} e{epoch + 1}/"
                   f"{cfg.epochs}", disable=not progress, leave=False, mininterval=2.0)
        for step, (images, targets) in enumerate(bar):
            if step >= self.steps_per_epoch:
                break
            parts = self.runner(*self.runner.to_device(images, targets))
            if self.ema is not None:
                self.ema.update(self.model)
            finite = torch.isfinite(parts["loss"])
            not_finite += (~finite).long()
            counted += finite.double() * len(targets)
            for key, value in parts.items():
                sums[key] = sums.get(key, 0) + torch.where(finite, value, 0.0) * len(targets)
            seen, steps = seen + len(targets), steps + 1
            self.scheduler.step_update(epoch * self.steps_per_epoch + step + 1)
        bar.close()
        bad = int(not_finite)
        # fp16's loss scaler skips the odd overflowing step on purpose; without one, a single NaN loss means NaN
        # gradients, hence NaN weights from then on
        if bad and (self.runner.scaler is None or bad == steps):
            raise self.diverged(epoch, f"the training loss was NaN or infinite in {bad} of {steps} steps")
        finite_slices = max(float(counted), 1.0)
        return {"train_images_per_s": seen / (time.perf_counter() - started),
                **{f"train_{k}": float(v) / finite_slices for k, v in sums.items()}}

    @property
    def evaluated(self) -> nn.Module:
        """The weights validated, kept and predicted with: the EMA's when on, else the trained ones."""
        return self.model if self.ema is None else self.ema.module

    def diverged(self, epoch: int, what: str) -> TrainingDiverged:
        cfg = self.cfg
        return TrainingDiverged(
            f"{self.name} diverged at epoch {epoch + 1}/{cfg.epochs}: {what}. Nothing of this epoch was kept. The "
            f"usual fixes: a lower lr (now {cfg.lr:g}, e.g. -p lr {cfg.lr / 10:g}), gradient clipping (-p clip_grad "
            "1.0), or, on a GPU, another precision (-p amp_dtype bfloat16, or -p amp false); then rerun with --force "
            "(or another --name): the recipe changed")

    def save_epoch(self, epoch: int, history: list[dict]) -> None:
        """The epoch's checkpoint when kept, then the resume state (weights by reference to that checkpoint)."""
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "epoch": epoch,
                 "history": history}
        if self.runner.scaler is not None:
            state["grad_scaler"] = self.runner.scaler.state_dict()
        key = "model" if self.ema is None else "ema"  # under which the evaluated weights are resumed
        if self.ema is not None:
            state["model"] = self.model.state_dict()  # the trained weights, to go on training from
        if epoch in kept_epochs(self.cfg):
            path = files.save_torch(self.evaluated.state_dict(), checkpoint_path(self.fold_dir, epoch), record=True)
            state[f"{key}_file"] = path.name
        else:
            state[key] = self.evaluated.state_dict()
        files.save_torch(state, self.state_path, record=True)
        csvfiles.write_frame(self.fold_dir / "history.csv", pd.DataFrame(history))


def check_finite(values: np.ndarray, what: str, way_out: str) -> np.ndarray:
    """Predictions must be finite numbers: a NaN or infinity is never averaged, clipped or rounded into a result."""
    bad = ~np.isfinite(np.asarray(values, dtype=np.float64))
    if bad.any():
        raise TrainingDiverged(f"{what}: {int(bad.sum())} of {bad.size} predictions are NaN or infinite; {way_out}")
    return values


def _predict_with_kept_checkpoints(cfg: TrainConfig, fold_dir: Path, splits: dict[str, SplitImages],
                                   model: nn.Module | None = None) -> pd.DataFrame:
    """Every kept checkpoint's prediction of every image of `splits` (columns PREDICTION_COLUMNS)."""
    device = machine.resolve_device(cfg.device)
    model = model or build_model_for(cfg, device, for_checkpoint=True)
    frames = []
    for epoch in kept_epochs(cfg):
        model.load_state_dict(load_checkpoint(fold_dir, epoch, device))
        for split, split_images in splits.items():
            values = check_finite(predict(model, split_images.images, cfg, device),
                                  f"[{cfg.model_name} {fold_dir.name}] checkpoint of epoch {epoch + 1} on {split}",
                                  "the training diverged: lower lr, or set clip_grad, and rerun with --force")
            frames.append(pd.DataFrame({"split": split, "name": split_images.frame["name"].to_numpy(), "epoch": epoch,
                                        "prediction": values}))
    return pd.concat(frames, ignore_index=True)[PREDICTION_COLUMNS]


def _reuse_fold(cfg: TrainConfig, fold: int, fold_dir: Path, predict_splits: dict[str, SplitImages],
                inputs: dict[str, Any]) -> pd.DataFrame:
    """A finished fold's predictions, after verifying its files; Val/Test slices it has not predicted (new ones, or
    ones whose image changed under the same name) are predicted with its kept checkpoints and added, and those of
    slices no longer in their split are dropped."""
    predictions_csv = fold_dir / "predictions.csv"
    files.forget(fold_dir / "state.pt")  # left over when a kill fell inside the finishing forget
    files.verify_folder(fold_dir, fold_way_out(fold_dir))
    predictions = ensemble.read_predictions(predictions_csv)
    recorded = (_saved_inputs(fold_dir) or {}).get("predicted", {})
    current = _predicted_digests(predict_splits)
    new, changed, rows_before = {}, 0, len(predictions)
    # a whole split gone from the data (its folder removed) takes its predictions with it
    predictions = predictions[predictions["split"].isin([OOF, *predict_splits])]
    recorded = {split: done for split, done in recorded.items() if split in predict_splits}
    for split, split_images in predict_splits.items():
        done = recorded.get(split, {})
        stale = np.array([done.get(name) != digest for name, digest in current[split].items()], dtype=bool)
        names = set(split_images.frame["name"][stale])
        changed += sum(1 for name in names if name in done)
        in_split = predictions["split"] == split
        gone = in_split & ~predictions["name"].isin(set(split_images.frame["name"]))  # removed from the split
        predictions = predictions[~(gone | (in_split & predictions["name"].isin(names)))]
        if stale.any():
            new[split] = split_images.subset(stale)
    if not new and len(predictions) == rows_before:
        log.info("[%s fold %d] already done: reusing %s", cfg.model_name, fold, predictions_csv)
        return predictions
    if new:
        log.info("[%s fold %d] already trained: predicting %s slice(s) with its kept checkpoints (no training%s)",
                 cfg.model_name, fold, ", ".join(f"{len(s.frame)} {split}" for split, s in new.items()),
                 f"; {changed} of them changed since they were predicted" if changed else "")
        predictions = pd.concat([predictions, _predict_with_kept_checkpoints(cfg, fold_dir, new)], ignore_index=True)
    csvfiles.write_frame(predictions_csv, predictions, record=True)
    _write_inputs(fold_dir, inputs, {**recorded, **current})
    return predictions


def train_fold(cfg: TrainConfig, fold: int, train_split: SplitImages, fold_dir: Path,
               predict_splits: dict[str, SplitImages] | None = None, pseudo: SplitImages | None = None,
               progress: bool = True, allow_training: bool = True) -> pd.DataFrame:
    """Train one fold (train rows with fold != `fold`, plus pseudo-labelled rows), validate on fold `fold`.

    Returns the predictions of every kept checkpoint (columns PREDICTION_COLUMNS; split "oof" = held-out fold).
    A finished fold is reused when its recipe, held-out slices and data (by content) are those asked for; else
    FoldMismatch. `allow_training=False` (a report): an unfinished fold is FoldNotTrained. Progress: one log line
    per epoch (model, fold, epoch, loss, held-out MAE/PC, img/s); a non-finite loss or held-out score stops the
    training at once (TrainingDiverged).
    """
    fold_dir = Path(fold_dir)
    predict_splits = predict_splits or {}
    is_valid = train_split.frame["fold"].to_numpy() == fold
    if not is_valid.any():
        present = sorted(int(f) for f in train_split.frame["fold"].unique())
        raise ValueError(f"fold {fold} has no slices: the folds file has folds {present}")
    check_same_recipe(cfg, fold_dir / "config.yaml")
    check_same_held_out(train_split.frame["name"][is_valid], fold_dir / "held_out.txt")
    valid, fit = train_split.subset(is_valid), train_split.subset(~is_valid)
    inputs = inputs_digest({"train": fit, "pseudo": pseudo, "held_out": valid})
    check_same_inputs(inputs, fold_dir)
    if (fold_dir / "predictions.csv").is_file():
        return _reuse_fold(cfg, fold, fold_dir, predict_splits, inputs)
    if not allow_training:
        raise FoldNotTrained(f"{fold_dir} is not trained (no predictions.csv): the pipeline's training jobs train "
                             "it (./run_all.sh), or run 02_train with role='train' to train it in the notebook")
    training = _FoldTraining(cfg, fold, fit, pseudo, fold_dir)
    fold_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_yaml(fold_dir / "config.yaml", record=True)
    files.write_text(fold_dir / "held_out.txt", "\n".join(sorted(train_split.frame["name"][is_valid])) + "\n")
    _write_inputs(fold_dir, inputs, {})
    start_epoch, history = training.resume()
    valid_true = valid.frame["percentage"].to_numpy(np.float64)
    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        row = {"epoch": epoch, **training.train_epoch(epoch, progress)}
        row["lr"] = training.optimizer.param_groups[0]["lr"]
        held_out = predict(training.evaluated, valid.images, cfg, training.device)
        if not np.isfinite(held_out).all():
            raise training.diverged(epoch, f"{int((~np.isfinite(held_out)).sum())} of {len(held_out)} held-out "
                                           "predictions are NaN or infinite")
        valid_scores = score(held_out, valid_true)
        if valid_scores["MAE"] > DIVERGED_MAE:
            raise training.diverged(epoch, f"the held-out MAE is {valid_scores['MAE']:.3g} (percentages lie in "
                                           "0..100)")
        row.update({f"valid_{k}": v for k, v in valid_scores.items()}, seconds=time.perf_counter() - started)
        history.append(row)
        log.info("%s epoch %d/%d loss %.3f valid MAE %.3f PC %.3f (%.1f img/s)", training.name, epoch + 1, cfg.epochs,
                 row.get("train_loss", float("nan")), row["valid_MAE"], row["valid_PC"], row["train_images_per_s"])
        training.save_epoch(epoch, history)
    predictions = _predict_with_kept_checkpoints(cfg, fold_dir, {OOF: valid, **predict_splits},
                                                 model=training.model)
    csvfiles.write_frame(fold_dir / "predictions.csv", predictions, record=True)
    _write_inputs(fold_dir, inputs, _predicted_digests(predict_splits))
    files.forget(training.state_path)  # the kept checkpoints + predictions are the fold's result
    return predictions


def train_model(cfg: TrainConfig, run_dir: str | Path, train_split: SplitImages,
                predict_splits: dict[str, SplitImages] | None = None, pseudo: SplitImages | None = None,
                progress: bool = True, allow_training: bool = True) -> pd.DataFrame:
    """Train (or reuse, or with `allow_training=False` only report) every fold in cfg.folds; returns all kept
    checkpoints' predictions with a `fold` column."""
    paths = RunPaths(run_dir)
    if allow_training:
        cfg.save_yaml(paths.model(cfg.model_name) / "config.yaml")
    frames = []
    for fold in cfg.folds:
        predictions = train_fold(cfg, fold, train_split, paths.fold(cfg.model_name, fold), predict_splits,
                                 pseudo, progress=progress, allow_training=allow_training)
        frames.append(predictions.assign(fold=fold))
    return pd.concat(frames, ignore_index=True)


def run_models(configs: Iterable[TrainConfig], paths: PathSettings, allow_training: bool = True,
               progress: bool = True) -> pd.DataFrame:
    """02_train's work: each model's data (decoded once per size), then `train_model`; all predictions with
    `model` and `fold` columns."""
    frames = []
    for cfg in configs:
        run = paths.run
        train_split, predict_splits, pseudo = load_training_data(cfg, paths.data_dir, paths.cache_dir, run.folds_csv,
                                                                 run.pseudo_labels_csv, progress=progress)
        log.info("[%s] train %d | predict %s | pseudo-labelled %d", cfg.model_name, len(train_split.frame),
                 {k: len(v.frame) for k, v in predict_splits.items()}, 0 if pseudo is None else len(pseudo.frame))
        predictions = train_model(cfg, paths.run_dir, train_split, predict_splits, pseudo, progress=progress,
                                  allow_training=allow_training)
        frames.append(predictions.assign(model=cfg.model_name))
    return pd.concat(frames, ignore_index=True)


def load_history(run_dir: str | Path, model_names: Iterable[str] | None = None) -> pd.DataFrame:
    """All folds' training curves of a run (or of some models), for plotting."""
    frames = []
    for model_name, fold, path in RunPaths(run_dir).fold_files("history.csv"):
        if model_names is None or model_name in model_names:
            frames.append(csvfiles.read_frame(path, text_columns=()).assign(model=model_name, fold=fold))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ----------------------------------------------------------------------------------------------- the data of a run


def load_training_data(cfg: TrainConfig, data_dir: str | Path, cache_dir: str | Path, folds_csv: str | Path,
                       pseudo_labels_csv: str | Path | None = None, progress: bool = True, predict: bool = True
                       ) -> tuple[SplitImages, dict[str, SplitImages], SplitImages | None]:
    """Train rows with their folds, the unlabeled splits to predict (Val, Test when present and `predict`), and the
    pseudo-labelled rows when cfg.use_pseudo_labels — all backed by the decoded-image cache."""
    def decoded(frame: pd.DataFrame, split: str) -> SplitImages:
        return SplitImages(frame, data.cached_images(frame, cache_dir, cfg.img_size, cfg.in_chans, split=split,
                                                     progress=progress))

    train_frame = data.load_split(data_dir, "Train", require_labels=True)
    folds = csvfiles.read_frame(folds_csv)
    merged = train_frame.merge(folds[["name", "fold"]], on="name", how="left")
    if merged["fold"].isna().any() or len(folds) != len(train_frame):
        raise data.DataError(f"{folds_csv} does not match the Train split of {data_dir} "
                             f"({len(folds)} rows in folds, {len(train_frame)} labelled slices): "
                             "rerun notebooks/01_folds.ipynb")
    merged["fold"] = merged["fold"].astype(int)
    train_split = decoded(merged, "Train")
    predict_splits = {}
    for split in ("Val", "Test") if predict or cfg.use_pseudo_labels else ():
        frame = data.load_split(data_dir, split)
        if frame is not None:
            predict_splits[split] = decoded(frame, split)
    pseudo = _pseudo_labelled(pseudo_labels_csv, predict_splits) if cfg.use_pseudo_labels else None
    return train_split, predict_splits if predict else {}, pseudo


def _pseudo_labelled(pseudo_labels_csv: str | Path | None, predict_splits: dict[str, SplitImages]) -> SplitImages:
    """The Val/Test slices with their pseudo-labels (04_pseudo_label's file), backed by the same image rows."""
    if pseudo_labels_csv is None or not Path(pseudo_labels_csv).is_file():
        raise data.DataNotFoundError(f"use_pseudo_labels=True but {pseudo_labels_csv} is missing: "
                                     "run notebooks/04_pseudo_label.ipynb (it writes the pseudo-labels first)")
    labels = csvfiles.read_frame(pseudo_labels_csv, text_columns=("name", "split"))
    parts = []
    for split, group in labels.groupby("split"):
        if split not in predict_splits:
            raise data.DataError(f"{pseudo_labels_csv} labels {split} slices but the data has no {split} split "
                                 f"now: rerun notebooks/04_pseudo_label.ipynb (./run_all.sh resumes the run)")
        source = predict_splits[split]
        index = source.frame.reset_index(drop=True).reset_index().merge(group[["name", "percentage"]], on="name",
                                                                         suffixes=("_none", ""))
        rows = data.RowSubset(source.images, index["index"].to_numpy())
        parts.append(SplitImages(index[["name", "percentage"]], rows))
    if len(parts) == 1:
        return parts[0]
    return SplitImages(pd.concat([p.frame for p in parts], ignore_index=True),
                       data.RowConcat([p.images for p in parts]))
