"""The one training loop: a fold of one model, from a TrainConfig, resumable, with the last-k checkpoints kept.

Per fold (`train_fold`): build the model (utils.models), SGD (or AdamW) wrapped in SAM (utils.sam) or plain, timm's
CosineLRScheduler stepped per update (warm-up then cosine, as in the paper), RandAugment (utils.augment) on the
decoded-image cache (utils.data); each epoch validates on the held-out fold (the out-of-fold, OOF, slices) and
saves a resume state; the last `save_last_k` epochs' weights are kept as plain state dicts. At the end each kept
checkpoint predicts the OOF slices and every extra split (Val, Test): `predictions.csv` (split, name, epoch,
prediction). The ensemble stage (utils.ensemble) averages those over checkpoints, folds and models.

On a GPU: bf16 autocast (no GradScaler: bf16 has fp32's range, which also keeps SAM's two passes simple),
channels_last, pinned memory, non-blocking copies, persistent workers, cudnn.benchmark. On a CPU: fp32, no
loader workers by default (they would compete with the model for the cores).

Resume: a killed run, rerun, continues from the last finished epoch (`state.pt`: weights, optimizer incl. SAM's
base optimizer momentum, scheduler, history); a fold whose `predictions.csv` exists is skipped. Data order is a
function of (seed, fold, epoch), so a resumed epoch sees the same order it would have seen.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from tqdm.auto import tqdm

from utils import augment, data, losses, models, sam
from utils.config import RunPaths, TrainConfig, atomic_write_text
from utils.metrics import score

PREDICTION_COLUMNS = ["split", "name", "epoch", "prediction"]


@dataclass
class SplitImages:
    """One split's rows (name, percentage, subject[, fold]) and its decoded uint8 images (N, H, W, C), same order."""

    frame: pd.DataFrame
    images: np.ndarray

    def __post_init__(self) -> None:
        if len(self.frame) != len(self.images):
            raise ValueError(f"{len(self.frame)} rows but {len(self.images)} images: frame and cache are out of step")

    def subset(self, mask: np.ndarray) -> "SplitImages":
        index = np.flatnonzero(mask)
        return SplitImages(self.frame.iloc[index].reset_index(drop=True), _LazyRows(self.images, index))


class _LazyRows:
    """Rows of a (memmapped) image array picked by index without copying the array into memory."""

    def __init__(self, images: np.ndarray, index: np.ndarray):
        self.images, self.index = images, index
        self.shape = (len(index),) + tuple(images.shape[1:])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.images[self.index[i]]


# ----------------------------------------------------------------------------------------------- hardware


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def autocast_context(cfg: TrainConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on CUDA when cfg.amp; fp32 elsewhere (CPU bf16 is slower than fp32 on most CPUs)."""
    if cfg.amp and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def loader_workers(cfg: TrainConfig, device: torch.device) -> int:
    if cfg.num_workers >= 0:
        return cfg.num_workers
    return min(8, max(1, (os.cpu_count() or 2) - 1)) if device.type == "cuda" else 0


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


def build_model_for(cfg: TrainConfig, device: torch.device) -> nn.Module:
    model = models.build_model(cfg.arch, head=cfg.head, pooling=cfg.pooling, in_chans=cfg.in_chans,
                               drop_rate=cfg.drop_rate, pretrained=cfg.pretrained, pretrained_file=cfg.pretrained_file)
    model = model.to(device)
    if device.type == "cuda" and cfg.channels_last:
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


def make_loader(dataset: Dataset, cfg: TrainConfig, device: torch.device, train: bool, seed: int = 0) -> DataLoader:
    """Training: shuffled by EpochShuffleSampler, full batches only, persistent workers on GPU boxes.
    Inference: in order, larger batches."""
    workers = loader_workers(cfg, device)
    return DataLoader(dataset, batch_size=cfg.batch_size if train else max(cfg.batch_size, 32),
                      sampler=EpochShuffleSampler(len(dataset), seed) if train else None,
                      drop_last=train and len(dataset) > cfg.batch_size, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=train and workers > 0,
                      prefetch_factor=4 if workers else None, worker_init_fn=augment.worker_init if workers else None)


class StepRunner:
    """One optimisation step on a batch already on the device: the hot path shared by training and benchmarks."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, device: torch.device):
        self.model, self.optimizer, self.cfg, self.device = model, optimizer, cfg, device
        self.autocast = autocast_context(cfg, device)
        self.forward = torch.compile(model) if cfg.compile else model

    def to_device(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        losses.check_targets(targets)  # on the host: a NaN/out-of-range label fails here, with no GPU sync
        memory_format = torch.channels_last if (self.device.type == "cuda" and self.cfg.channels_last) else None
        images = images.to(self.device, non_blocking=True)
        if memory_format is not None:
            images = images.contiguous(memory_format=memory_format)
        return images, targets.to(self.device, non_blocking=True).float()

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Returns the first pass's loss parts as detached device tensors (no host sync on the hot path)."""
        parts: dict[str, torch.Tensor] = {}

        def compute_loss() -> torch.Tensor:
            with self.autocast():
                outputs = self.forward(images)
            loss, loss_parts = losses.head_loss(outputs, targets, self.cfg.head, kl_weight=self.cfg.kl_weight,
                                                check=False)
            if not parts:
                parts.update(loss_parts)
            return loss

        if not self.model.training:  # predict() leaves it in eval mode; walking the modules every step is waste
            self.model.train()
        if isinstance(self.optimizer, sam.SAM):
            sam.sam_train_step(self.model, self.optimizer, compute_loss, clip_grad_norm=self.cfg.clip_grad)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            compute_loss().backward()
            if self.cfg.clip_grad:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
            self.optimizer.step()
        return parts


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, cfg: TrainConfig, device: torch.device) -> np.ndarray:
    """The regression output f2 (utils.models: out["reg"]) for each image, optionally averaged with its h-flip."""
    transform = augment.build_transform(train=False, channels=cfg.in_chans)
    loader = make_loader(data.SliceDataset(images, None, transform), cfg, device, train=False)
    autocast = autocast_context(cfg, device)
    model.eval()
    outputs = []
    for batch, _ in loader:
        batch = batch.to(device, non_blocking=True)
        if device.type == "cuda" and cfg.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast():
            pred = model(batch)["reg"].float()
            if cfg.tta_hflip:
                pred = 0.5 * (pred + model(augment.hflip_tta(batch))["reg"].float())
        outputs.append(pred.cpu())
    return torch.cat(outputs).numpy().astype(np.float64) if outputs else np.zeros(0)


# ----------------------------------------------------------------------------------------------- a fold


def _checkpoint_path(fold_dir: Path, epoch: int) -> Path:
    return fold_dir / f"checkpoint_epoch{epoch:03d}.pt"


def _atomic_torch_save(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _training_dataset(train: SplitImages, pseudo: SplitImages | None, transform: augment.SliceTransform) -> Dataset:
    parts = [data.SliceDataset(train.images, train.frame["percentage"].to_numpy(np.float32), transform)]
    if pseudo is not None and len(pseudo.frame):
        parts.append(data.SliceDataset(pseudo.images, pseudo.frame["percentage"].to_numpy(np.float32), transform))
    if len(parts) == 1:
        return parts[0]
    dataset = ConcatDataset(parts)
    dataset.transform = transform  # augment.worker_init reseeds it in each loader worker
    return dataset


# Fields that change how a run executes but not what it learns: a fold may be resumed with other values.
EXECUTION_ONLY_FIELDS = {"folds", "num_workers", "compile", "device"}


def check_same_recipe(cfg: TrainConfig, saved_config: Path) -> None:
    """Refuse to reuse or resume a fold that was trained with another recipe (a silently stale result)."""
    if not saved_config.is_file():
        return
    saved = TrainConfig.load_yaml(saved_config).to_dict()
    changed = {k: (saved[k], v) for k, v in cfg.to_dict().items()
               if k not in EXECUTION_ONLY_FIELDS and saved.get(k) != v}
    if changed:
        listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ValueError(f"{saved_config.parent} was trained with another recipe ({listed}); use another model_name "
                         "or run name, or rerun with --force to discard the run")


def check_same_held_out(names: Iterable[str], saved_list: Path) -> None:
    """Refuse to reuse or resume a fold whose held-out slices changed (folds remade with another seed or K)."""
    if saved_list.is_file() and saved_list.read_text().split() != sorted(names):
        raise ValueError(f"{saved_list.parent} was trained with other held-out slices than fold {saved_list.parent.name} "
                         "of the current folds.csv (01_folds rerun with another n_folds/fold_seed or data?); "
                         "use another run name, or --force to discard the run")


def train_fold(cfg: TrainConfig, fold: int, train_split: SplitImages, fold_dir: Path,
               predict_splits: dict[str, SplitImages] | None = None, pseudo: SplitImages | None = None,
               progress: bool = True, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Train one fold (train rows with fold != `fold`, plus pseudo-labelled rows), validate on fold `fold`.

    Returns the predictions of every kept checkpoint (columns PREDICTION_COLUMNS; split "oof" = held-out fold).
    """
    fold_dir = Path(fold_dir)
    predictions_csv = fold_dir / "predictions.csv"
    is_valid = train_split.frame["fold"].to_numpy() == fold
    if not is_valid.any():
        raise ValueError(f"fold {fold} has no slices: the folds file has folds {sorted(train_split.frame['fold'].unique())}")
    check_same_recipe(cfg, fold_dir / "config.yaml")
    check_same_held_out(train_split.frame["name"][is_valid], fold_dir / "held_out.txt")
    if predictions_csv.is_file():
        log(f"[{cfg.model_name} fold {fold}] already done: reusing {predictions_csv}")
        return pd.read_csv(predictions_csv)
    fold_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_yaml(fold_dir / "config.yaml")
    atomic_write_text(fold_dir / "held_out.txt", "\n".join(sorted(train_split.frame["name"][is_valid])) + "\n")
    fit, valid = train_split.subset(~is_valid), train_split.subset(is_valid)

    torch.manual_seed(cfg.seed + fold)
    device = resolve_device(cfg)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        # Denormal floats (weights/activations decaying towards 0) run ~10x slower on x86 CPUs: measured 9 vs
        # 152 img/s for the same resnet18 epoch. Flushing them to zero changes no result that matters.
        torch.set_flush_denormal(True)
    model = build_model_for(cfg, device)
    optimizer = build_optimizer(model, cfg)
    train_transform = augment.build_transform(train=True, channels=cfg.in_chans, n_ops=cfg.randaug_n,
                                              magnitude=cfg.randaug_m)
    train_set = _training_dataset(fit, pseudo, train_transform)
    steps_per_epoch = len(train_set) // cfg.batch_size if len(train_set) > cfg.batch_size else 1
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    runner = StepRunner(model, optimizer, cfg, device)
    loader = make_loader(train_set, cfg, device, train=True, seed=cfg.seed * 100 + fold)

    state_path = fold_dir / "state.pt"
    start_epoch, history = 0, []
    if state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, list(state["history"])
        log(f"[{cfg.model_name} fold {fold}] resuming after epoch {start_epoch} (from {state_path})")

    valid_true = valid.frame["percentage"].to_numpy(np.float64)
    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        loader.sampler.set_epoch(epoch)
        if loader.num_workers == 0:  # in-process augmentation: its stream is a function of (seed, fold, epoch) too
            train_transform.set_seed(cfg.seed * 100_003 + fold * 1009 + epoch)
        sums: dict[str, torch.Tensor] = {}
        seen = 0
        bar = tqdm(loader, total=steps_per_epoch, desc=f"{cfg.model_name} f{fold} e{epoch + 1}/{cfg.epochs}",
                   disable=not progress, leave=False, mininterval=2.0)
        for step, (images, targets) in enumerate(bar):
            if step >= steps_per_epoch:
                break
            images, targets = runner.to_device(images, targets)
            parts = runner(images, targets)
            for key, value in parts.items():
                sums[key] = sums.get(key, 0) + value * len(targets)
            seen += len(targets)
            scheduler.step_update(epoch * steps_per_epoch + step + 1)
        bar.close()
        train_seconds = time.perf_counter() - started
        valid_pred = predict(model, valid.images, cfg, device)
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_images_per_s": seen / train_seconds,
               **{f"train_{k}": float(v) / max(seen, 1) for k, v in sums.items()},
               **{f"valid_{k}": v for k, v in score(valid_pred, valid_true).items()},
               "seconds": time.perf_counter() - started}
        history.append(row)
        log(f"[{cfg.model_name} fold {fold}] epoch {epoch + 1}/{cfg.epochs} loss {row.get('train_loss', float('nan')):.3f} "
            f"valid MAE {row['valid_MAE']:.3f} PC {row['valid_PC']:.3f} ({row['train_images_per_s']:.1f} img/s)")
        if epoch >= cfg.epochs - cfg.save_last_k:
            _atomic_torch_save(model.state_dict(), _checkpoint_path(fold_dir, epoch))
        _atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history}, state_path)
        atomic_write_text(fold_dir / "history.csv", pd.DataFrame(history).to_csv(index=False))

    frames = []
    targets_by_split = {"oof": valid, **(predict_splits or {})}
    for epoch in range(cfg.epochs - cfg.save_last_k, cfg.epochs):
        model.load_state_dict(torch.load(_checkpoint_path(fold_dir, epoch), map_location=device, weights_only=True))
        for split, split_images in targets_by_split.items():
            frames.append(pd.DataFrame({"split": split, "name": split_images.frame["name"].to_numpy(), "epoch": epoch,
                                        "prediction": predict(model, split_images.images, cfg, device)}))
    predictions = pd.concat(frames, ignore_index=True)[PREDICTION_COLUMNS]
    atomic_write_text(predictions_csv, predictions.to_csv(index=False))
    state_path.unlink(missing_ok=True)  # the kept checkpoints + predictions are the fold's result
    return predictions


def train_model(cfg: TrainConfig, run_dir: str | Path, train_split: SplitImages,
                predict_splits: dict[str, SplitImages] | None = None, pseudo: SplitImages | None = None,
                progress: bool = True, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Train every fold in cfg.folds; returns all kept checkpoints' predictions with a `fold` column."""
    paths = RunPaths(run_dir)
    paths.model(cfg.model_name).mkdir(parents=True, exist_ok=True)
    cfg.save_yaml(paths.model(cfg.model_name) / "config.yaml")
    frames = []
    for fold in cfg.folds:
        predictions = train_fold(cfg, fold, train_split, paths.fold(cfg.model_name, fold), predict_splits,
                                 pseudo, progress=progress, log=log)
        frames.append(predictions.assign(fold=fold))
    return pd.concat(frames, ignore_index=True)


def load_history(run_dir: str | Path, model_names: Iterable[str] | None = None) -> pd.DataFrame:
    """All folds' training curves of a run (or of some models), for plotting."""
    frames = []
    for model_name, fold, path in RunPaths(run_dir).fold_files("history.csv"):
        if model_names is None or model_name in model_names:
            frames.append(pd.read_csv(path).assign(model=model_name, fold=fold))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_training_data(cfg: TrainConfig, data_dir: str | Path, cache_dir: str | Path, folds_csv: str | Path,
                       pseudo_labels_csv: str | Path | None = None, progress: bool = True
                       ) -> tuple[SplitImages, dict[str, SplitImages], SplitImages | None]:
    """Train rows with their folds, the unlabeled splits to predict (Val, Test when present), and the
    pseudo-labelled rows when cfg.use_pseudo_labels — all backed by the decoded-image cache."""
    def decoded(frame: pd.DataFrame, split: str) -> SplitImages:
        return SplitImages(frame, data.cached_images(frame, cache_dir, cfg.img_size, cfg.in_chans, split=split,
                                                     progress=progress))

    train_frame = data.load_split(data_dir, "Train", require_labels=True)
    folds = pd.read_csv(folds_csv, dtype={"name": str})
    merged = train_frame.merge(folds[["name", "fold"]], on="name", how="left")
    if merged["fold"].isna().any() or len(folds) != len(train_frame):
        raise ValueError(f"{folds_csv} does not match the Train split of {data_dir} "
                         f"({len(folds)} rows in folds, {len(train_frame)} labelled slices): rerun notebooks/01_folds.ipynb")
    merged["fold"] = merged["fold"].astype(int)
    train_split = decoded(merged, "Train")
    predict_splits = {}
    for split in ("Val", "Test"):
        frame = data.load_split(data_dir, split)
        if frame is not None:
            predict_splits[split] = decoded(frame, split)
    pseudo = None
    if cfg.use_pseudo_labels:
        if pseudo_labels_csv is None or not Path(pseudo_labels_csv).is_file():
            raise FileNotFoundError(f"use_pseudo_labels=True but {pseudo_labels_csv} is missing: "
                                    "run notebooks/04_pseudo_label.ipynb (it writes the pseudo-labels first)")
        labels = pd.read_csv(pseudo_labels_csv, dtype={"name": str})
        parts = []
        for split, group in labels.groupby("split"):
            source = predict_splits[split]
            index = source.frame.reset_index(drop=True).reset_index().merge(group[["name", "percentage"]], on="name",
                                                                             suffixes=("_none", ""))
            parts.append(SplitImages(index[["name", "percentage"]], _LazyRows(source.images, index["index"].to_numpy())))
        pseudo = parts[0] if len(parts) == 1 else SplitImages(
            pd.concat([p.frame for p in parts], ignore_index=True), _ConcatRows([p.images for p in parts]))
    return train_split, predict_splits, pseudo


class _ConcatRows:
    """Several row sources seen as one (pseudo-labels from Val and Test)."""

    def __init__(self, sources: list):
        self.sources = sources
        self.offsets = np.cumsum([0] + [len(s) for s in sources])
        self.shape = (int(self.offsets[-1]),) + tuple(sources[0].shape[1:])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.sources[k][i - self.offsets[k]]
