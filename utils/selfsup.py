"""Self-supervised pretraining on every slice a user has, labels unused: prior knowledge without downloaded weights.

Many users cannot download ImageNet weights (hospital networks, air-gapped clusters), and the challenge allowed no
external data beyond ImageNet; what every user does have is the challenge's own slices: Train (its images, not its
labels), Val and Test. This module pretrains a timm backbone on them and writes its weights, which 02_train loads
through `pretrained_file` (timm's loader: the classifier is dropped, the first conv adapted to in_chans).

    python -m utils.selfsup --data DIR --arch resnet10t --img-size 96 --epochs 30 --out runs/ssl/resnet10t.pth

Methods (torch alone: each is a projection head and a loss of a few lines, simpler than a framework dependency):
* `simclr` (Chen et al. 2020): two augmented views of each slice, a 2-layer projection head, the NT-Xent loss
  (cross-entropy of each view against its partner among the 2B-1 others, temperature `temperature`).
* `simsiam` (Chen & He 2021): the same views, a projector and a predictor, negative cosine similarity with a stop
  gradient; no negatives, so it works at the small batches of a CPU.
* `byol` (Grill et al. 2020): SimSiam's predictor aimed at a momentum target (timm's ModelEmaV3 of the backbone and
  projector, its decay rising from `momentum` to 1 on a cosine over the steps). lightly has the same three pieces,
  but installing it brings pytorch_lightning and hydra.
Near-duplicates: adjacent slices of a CT scan are nearly the same image, so contrastive pretraining takes a near-copy
of a slice for one of its negatives; `dedup_correlation` > 0 drops, in the data's order (the challenge numbers a scan's
slices consecutively), every slice whose thumbnail correlates at least that much with the last slice kept.
Views: random resized crop (scale 0.35-1), h-flip, rotation up to 20 degrees, brightness/contrast 0.4, blur
(albumentations, on the gray uint8 slice), then utils.augment.Normalizer as in training. The choice of method and
length is measured by paired 5-fold CV of the fine-tuned model (docs/results.md, "Self-supervised pretraining").
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn

from utils import augment, csvfiles, data, files, machine, models, train
from utils.config import SELFSUP_METHODS, ConfigError, SelfSupSettings, check_arch, check_choice, default_cache_dir

log = logging.getLogger("utils.selfsup")  # not __name__: "__main__" under python -m

THUMBNAIL = 24  # px: the near-duplicate test compares slices at this size (shape, not noise)


@dataclass
class SelfSupConfig:
    """One pretraining run (its defaults: what docs/results.md's measurement used)."""

    arch: str = "resnet10t"
    in_chans: int = 3
    img_size: int = 96
    method: str = "simclr"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    temperature: float = 0.2  # simclr
    momentum: float = 0.99  # byol: the target's decay at the first step (1 at the last)
    projection_dim: int = 128
    dedup_correlation: float = 0.0  # 0: every slice; else drop those this close to the last kept (Pearson r)
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("method", self.method, SELFSUP_METHODS)
        check_arch(self.arch)
        if self.epochs < 1 or self.batch_size < 4 or self.lr <= 0 or self.img_size < 16:
            raise ConfigError(f"epochs={self.epochs}, batch_size={self.batch_size}, lr={self.lr}, "
                              f"img_size={self.img_size}: need >= 1, >= 4, > 0, >= 16")
        if not (0 <= self.dedup_correlation <= 1 and 0 <= self.momentum < 1):
            raise ConfigError(f"dedup_correlation={self.dedup_correlation}, momentum={self.momentum}: need 0 (off) "
                              "to 1, and 0 to below 1")


def view_transform(img_size: int) -> A.Compose:
    """The random view of a gray uint8 slice (H, W, 1) -> (img_size, img_size, 1)."""
    return A.Compose([
        A.RandomResizedCrop(size=(img_size, img_size), scale=(0.35, 1.0), ratio=(0.8, 1.25)),
        A.HorizontalFlip(p=0.5),
        A.Rotate(limit=(-20, 20), border_mode=0, fill=0, p=0.7),
        A.RandomBrightnessContrast(brightness_limit=0.4, contrast_limit=0.4, p=0.8),
        A.GaussianBlur(blur_limit=(3, 5), p=0.3),
    ])


class TwoViews(torch.utils.data.Dataset):
    """Two random views of each slice, as uint8 (1, H, W) tensors."""

    def __init__(self, images: np.ndarray, img_size: int, seed: int):
        self.images, self.transform = images, view_transform(img_size)
        self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __len__(self) -> int:
        return len(self.images)

    def _view(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.transform(image=np.ascontiguousarray(image[:, :, :1]))["image"]).permute(2, 0, 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = np.asarray(self.images[index])
        return self._view(image), self._view(image)


class SelfSupModel(nn.Module):
    """A timm backbone (global average pooled) with the method's heads."""

    def __init__(self, cfg: SelfSupConfig):
        super().__init__()
        self.method = cfg.method
        self.backbone = models.build_model(cfg.arch, head="reg", pooling="avg", in_chans=cfg.in_chans).backbone
        width = models.map_channels(self.backbone)
        self.projector = nn.Sequential(nn.Linear(width, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                                       nn.Linear(512, cfg.projection_dim))
        self.predictor = nn.Sequential(nn.Linear(cfg.projection_dim, 64), nn.BatchNorm1d(64), nn.ReLU(inplace=True),
                                       nn.Linear(64, cfg.projection_dim)) if cfg.method != "simclr" else None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x).mean(dim=(2, 3)))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each of the 2B views must pick its partner among the 2B - 1 others."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = len(z1)
    partners = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, partners)


def predictor_loss(model: SelfSupModel, z1: torch.Tensor, z2: torch.Tensor,
                   t1: torch.Tensor | None = None, t2: torch.Tensor | None = None) -> torch.Tensor:
    """SimSiam's and BYOL's symmetric negative cosine similarity of each view's prediction and the other view's
    target: the other view's own embedding, detached (SimSiam), or the momentum target's embedding (BYOL)."""
    t1, t2 = (z1.detach(), z2.detach()) if t1 is None else (t1, t2)
    p1, p2 = model.predictor(z1), model.predictor(z2)
    return -(F.cosine_similarity(p1, t2).mean() + F.cosine_similarity(p2, t1).mean()) / 2


def target_decay(step: int, steps: int, momentum: float) -> float:
    """BYOL's target decay at a step: `momentum` at the first, rising on a cosine to 1 at the last."""
    return 1 - (1 - momentum) * (math.cos(math.pi * step / max(1, steps - 1)) + 1) / 2


def distinct_slices(images: np.ndarray, max_correlation: float) -> np.ndarray:
    """The indices of the slices kept when every slice whose THUMBNAIL px gray thumbnail correlates (Pearson r) at
    least `max_correlation` with the last slice kept is dropped, walking the slices in their order."""
    import cv2  # albumentations' dependency

    thumbs = np.stack([cv2.resize(np.ascontiguousarray(image[:, :, 0]), (THUMBNAIL, THUMBNAIL),
                                  interpolation=cv2.INTER_AREA) for image in images]).reshape(len(images), -1)
    thumbs = thumbs.astype(np.float64) - thumbs.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(thumbs, axis=1)
    kept = [0]
    for index in range(1, len(images)):
        last = kept[-1]
        denominator = norms[index] * norms[last]
        # a flat thumbnail (all one gray) correlates with nothing; two flat ones are the same image
        r = float(thumbs[index] @ thumbs[last] / denominator) if denominator > 0 else float(norms[index] == norms[last])
        if r < max_correlation:
            kept.append(index)
    return np.asarray(kept)


def pretrain(images: np.ndarray, cfg: SelfSupConfig, out: str | Path, device: str = "auto") -> pd.DataFrame:
    """Pretrain on uint8 slices (N, H, W, C); write the backbone's state dict to `out` (and `<out>.history.csv`)."""
    every = len(images)
    if cfg.dedup_correlation > 0 and every:
        images = images[distinct_slices(images, cfg.dedup_correlation)]
        log.info("[selfsup] %d of %d slices kept: the others correlate >= %.3f with their neighbour", len(images),
                 every, cfg.dedup_correlation)
    if len(images) < 2:
        raise ValueError(f"self-supervised pretraining needs at least 2 unlabelled slices, got {len(images)} of "
                         f"{every}: add images to the data folder, set selfsup_epochs 0"
                         + (" or a higher selfsup_dedup" if len(images) < every else ""))
    torch.manual_seed(cfg.seed)
    train_cfg = train.TrainConfig(arch=cfg.arch, in_chans=cfg.in_chans, img_size=cfg.img_size, device=device,
                                  batch_size=cfg.batch_size, num_workers=0)
    torch_device = machine.resolve_device(train_cfg.device)
    machine.prepare_device(torch_device)
    model = SelfSupModel(cfg).to(torch_device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # a small folder still gets whole batches (drop_last keeps NT-Xent's batch statistics even)
    batch_size = min(cfg.batch_size, len(images))
    loader = torch.utils.data.DataLoader(TwoViews(images, cfg.img_size, cfg.seed), batch_size=batch_size,
                                         shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    steps, warmup = cfg.epochs * len(loader), int(cfg.warmup_epochs * len(loader))
    target = None
    if cfg.method == "byol":
        target = ModelEmaV3(model, decay=cfg.momentum)
        target.module.train()  # BYOL's target normalizes with its batch's statistics, as the online network does
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup else
                                                 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    normalizer, history = augment.Normalizer(cfg.in_chans), []
    for epoch in range(cfg.epochs):
        started, total, seen = time.perf_counter(), 0.0, 0
        model.train()
        for view1, view2 in loader:
            x1 = normalizer(view1.to(torch_device), channels_last=True)
            x2 = normalizer(view2.to(torch_device), channels_last=True)
            z1, z2 = model.embed(x1), model.embed(x2)
            if cfg.method == "simclr":
                loss = nt_xent(z1, z2, cfg.temperature)
            elif target is None:
                loss = predictor_loss(model, z1, z2)
            else:
                with torch.no_grad():
                    t1, t2 = target.module.embed(x1), target.module.embed(x2)
                loss = predictor_loss(model, z1, z2, t1, t2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if target is not None:
                target.apply_update_(model, target_decay(schedule.last_epoch, steps, cfg.momentum))
            schedule.step()
            total, seen = total + loss.item() * len(view1), seen + len(view1)
        speed = 2 * seen / (time.perf_counter() - started)
        history.append({"epoch": epoch, "loss": total / seen, "images_per_s": speed, "slices": len(images)})
        log.info("[selfsup %s %s] epoch %d/%d loss %.4f (%.1f img/s)", cfg.method, cfg.arch, epoch + 1, cfg.epochs,
                 history[-1]["loss"], history[-1]["images_per_s"])
    files.save_torch({k: v.cpu() for k, v in model.backbone.state_dict().items()}, out, record=True)
    frame = pd.DataFrame(history)
    csvfiles.write_frame(Path(f"{out}.history.csv"), frame)
    files.write_text(Path(f"{out}.config.json"), json.dumps(asdict(cfg), indent=1) + "\n")
    return frame


def with_pretraining(configs: Sequence[train.TrainConfig], settings: SelfSupSettings,
                     out_dir: str | Path) -> tuple[list[train.TrainConfig], dict[Path, SelfSupConfig]]:
    """The pipeline's plan: one pretraining per (arch, in_chans, img_size) of the models without weights of their
    own. Returns the configs with `pretrained_file` set, and the pretrainings to run (weights file -> recipe)."""
    configured, runs = [], {}
    for model_cfg in configs:
        if model_cfg.pretrained or model_cfg.pretrained_file:
            configured.append(model_cfg)
            continue
        cfg = SelfSupConfig(arch=model_cfg.arch, in_chans=model_cfg.in_chans, img_size=model_cfg.img_size,
                            method=settings.selfsup_method, epochs=settings.selfsup_epochs,
                            dedup_correlation=settings.selfsup_dedup)
        dedup = f"_dedup{cfg.dedup_correlation:g}" if cfg.dedup_correlation else ""
        out = Path(out_dir) / f"{cfg.arch}_{cfg.in_chans}ch_{cfg.img_size}px_{cfg.method}_e{cfg.epochs}{dedup}.pth"
        runs[out] = cfg
        configured.append(train.TrainConfig(**{**model_cfg.to_dict(), "pretrained_file": str(out)}))
    return configured, runs


def run_pretraining(runs: dict[Path, SelfSupConfig], data_dir: str | Path, cache_dir: str | Path) -> None:
    """Pretrain each planned backbone; a weights file already there (and intact) is reused."""
    for out, cfg in runs.items():
        if out.is_file():
            files.verify(out, f"delete {out} to pretrain again")
            log.info("[selfsup] reusing %s", out)
        else:
            pretrain(unlabelled_images(data_dir, cfg, cache_dir), cfg, out)


def unlabelled_images(data_dir: str | Path, cfg: SelfSupConfig, cache_dir: str | Path | None = None,
                      splits: Sequence[str] = data.SPLITS) -> np.ndarray:
    """Every slice of the data set's splits (Train's labels unused), decoded at cfg's size."""
    arrays, cache_dir = [], cache_dir or default_cache_dir()
    for split in splits:
        frame = data.load_split(data_dir, split, require_labels=False)
        if frame is not None:
            arrays.append(np.asarray(data.cached_images(frame, cache_dir, cfg.img_size, cfg.in_chans, split=split)))
    return np.concatenate(arrays)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.selfsup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="official-layout folder: every split's images are used")
    parser.add_argument("--out", required=True, help="the backbone weights to write (.pth), for pretrained_file")
    parser.add_argument("--device", default="auto")
    for name, value in asdict(SelfSupConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    data_dir, out, device = args.pop("data"), args.pop("out"), args.pop("device")
    cfg = SelfSupConfig(**args)
    images = unlabelled_images(data_dir, cfg)
    log.info("[selfsup] %d slices of %s", len(images), data_dir)
    pretrain(images, cfg, out, device)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from utils import cli

    raise SystemExit(cli.run(main, errors=(data.DataError,)))
