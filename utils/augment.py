"""RandAugment for CT slices (albumentations 2.0.8) and the normalisation every model input goes through.

The paper ("Revitalizing regression tasks through modern training procedures", its data-augmentation part) trains
with RandAugment (Cubuk et al. 2020): each image gets N operations drawn at random from a fixed list, all at
one global magnitude M. The paper's list: rotate (0-30 degrees), colour, contrast, brightness, sharpness, shear x,
shear y, cutout, translate x, translate y.

Magnitude mapping (M in 0..30, f = M / 30; each op draws its strength uniformly in [-max, +max] at f):
    rotate          +-30 f degrees                                  (the paper's 0-30 degree range at M = 30)
    shear x / y     +-16.7 f degrees  (= atan(0.3): RandAugment's max shear 0.3)
    translate x / y +-0.45 f of the image side                      (RandAugment's max translate 0.45)
    brightness      x * b,  b in 1 +- 0.9 f        (PIL/torchvision brightness: scale toward black)
    contrast        blend with the image mean, c in 1 +- 0.9 f     (PIL/torchvision contrast)
    colour          blend with gray, s in 1 +- 0.9 f               (PIL saturation; only for colour input)
    sharpness       img + a * Laplacian, a in [0, 0.9 f / 13]      (PIL's sharpness at factor 1 + 0.9 f; its
                                                                    smoothing kernel sums to 13; sharpening only)
    cutout          one hole, side in [0.5, 1] x 0.4 f of the image, filled with 0 (RandAugment's cutout)
Geometric ops fill with 0 (border_mode constant): CT air outside the body is dark.

Colour on grayscale CT: the slices are gray (R = G = B, `utils.data.load_image` replicates luminance), and a
saturation change of a gray image is the identity. Rather than spend one of the N draws on a no-op, colour is left out
of the list for grayscale input; every image still gets N real ops (drawn from 9 instead of 10). Pass
`grayscale=False` for true colour images to put it back. With grayscale input the ops run on one channel and the
result is replicated to all (identical output, ~1.7x faster at 512 px x 3 channels). The N ops are applied in list
order (albumentations' SomeOf sorts the drawn indices).

Eval transforms do no augmentation. Every transform returns uint8 tensors; `Normalizer` turns a batch on the device
into float32 (x / 255 - mean) / std with ImageNet mean/std (3 channels) or their averages (1 channel), so pretrained
ImageNet weights see the input statistics they expect. Test-time augmentation: `hflip_tta` (average of the
prediction on a batch and on its horizontal flip).

Every DataLoader worker starts with a copy of the transform's random state; `worker_init` reseeds it per worker
(pass it as `worker_init_fn`), otherwise all workers would draw the same augmentations.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence

import albumentations as A
import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_MAGNITUDE = 30
# Strengths at M = MAX_MAGNITUDE (see the module docstring).
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR_DEGREES = math.degrees(math.atan(0.3))
MAX_TRANSLATE_FRACTION = 0.45
MAX_ENHANCE = 0.9  # brightness / contrast / colour / sharpness factors span 1 +- 0.9
PIL_SMOOTH_KERNEL_SUM = 13.0
MAX_CUTOUT_FRACTION = 0.4
CONSTANT_BORDER = 0  # cv2.BORDER_CONSTANT


def randaugment_ops(magnitude: int, grayscale: bool = True) -> list[A.BasicTransform]:
    """The paper's RandAugment operations at magnitude `magnitude` (0..30), each applied with p=1 when drawn."""
    if not 0 <= magnitude <= MAX_MAGNITUDE:
        raise ValueError(f"magnitude must be in 0..{MAX_MAGNITUDE} (RandAugment's M), got {magnitude}")
    f = magnitude / MAX_MAGNITUDE
    rotate = MAX_ROTATE_DEGREES * f
    shear = MAX_SHEAR_DEGREES * f
    translate = MAX_TRANSLATE_FRACTION * f
    enhance = (1.0 - MAX_ENHANCE * f, 1.0 + MAX_ENHANCE * f)
    identity = (1.0, 1.0)
    hole = MAX_CUTOUT_FRACTION * f
    ops: list[A.BasicTransform] = [
        A.Rotate(limit=(-rotate, rotate), border_mode=CONSTANT_BORDER, fill=0, p=1.0),
        A.ColorJitter(brightness=identity, contrast=enhance, saturation=identity, hue=(0.0, 0.0), p=1.0),
        A.ColorJitter(brightness=enhance, contrast=identity, saturation=identity, hue=(0.0, 0.0), p=1.0),
        A.Sharpen(alpha=(0.0, MAX_ENHANCE * f / PIL_SMOOTH_KERNEL_SUM), lightness=(1.0, 1.0), p=1.0),
        A.Affine(shear={"x": (-shear, shear), "y": (0.0, 0.0)}, border_mode=CONSTANT_BORDER, fill=0, p=1.0),
        A.Affine(shear={"x": (0.0, 0.0), "y": (-shear, shear)}, border_mode=CONSTANT_BORDER, fill=0, p=1.0),
        A.CoarseDropout(
            num_holes_range=(1, 1), hole_height_range=(hole / 2, hole), hole_width_range=(hole / 2, hole), fill=0, p=1.0
        ),
        A.Affine(
            translate_percent={"x": (-translate, translate), "y": (0.0, 0.0)},
            border_mode=CONSTANT_BORDER,
            fill=0,
            p=1.0,
        ),
        A.Affine(
            translate_percent={"x": (0.0, 0.0), "y": (-translate, translate)},
            border_mode=CONSTANT_BORDER,
            fill=0,
            p=1.0,
        ),
    ]
    if not grayscale:
        ops.insert(1, A.ColorJitter(brightness=identity, contrast=identity, saturation=enhance, hue=(0.0, 0.0), p=1.0))
    return ops


def _channel_stats(values: Sequence[float] | float | None, default: Sequence[float], channels: int,
                   what: str) -> np.ndarray:
    if values is None:
        values = default if channels == 3 else [float(np.mean(default))] * channels
    stats = np.asarray(values, dtype=np.float64).reshape(-1)
    if stats.size == 1:
        stats = np.repeat(stats, channels)
    if stats.size != channels:
        raise ValueError(f"{what} has {stats.size} values for {channels} channels")
    return stats


class SliceTransform:
    """uint8 (H, W, C) numpy image -> uint8 (C', H, W) tensor, RandAugment applied when training.

    Gray input (R = G = B, `gray_input`) is augmented on one channel and returned with one channel (C' = 1): the
    same result as augmenting each equal channel (2-3x faster at 512 px), and a 3x smaller batch to copy; the
    `Normalizer` replicates it on the device. Normalisation happens there too, on whole batches: uint8 is 4x less to
    pin and copy than float32."""

    def __init__(self, augment: A.Compose | None, gray_input: bool = False) -> None:
        self.augment = augment
        self.gray_input = gray_input

    def set_seed(self, seed: int) -> None:
        """Make the augmentation stream reproducible (and distinct per DataLoader worker)."""
        if self.augment is not None:
            # One shared stream for the op choice and every op's draws (Compose(seed=...) would give each op its
            # own generator with the same seed, correlating e.g. the rotate angle with the shear).
            self.augment.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if image.ndim == 2:
            image = image[:, :, None]
        if image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(f"expected a uint8 (H, W, C) image, got {image.dtype} {tuple(image.shape)}")
        if self.gray_input:
            image = image[:, :, :1]
        if self.augment is not None:
            image = self.augment(image=np.ascontiguousarray(image))["image"]
        # np.array: a writeable copy (cached images are read-only memmaps, which torch.from_numpy warns about).
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class Normalizer:
    """uint8 batch (N, 1 or C, H, W) on any device -> float32 (N, C, H, W): (x / 255 - mean) / std per channel, a
    1-channel batch replicated to C. Mean/std default to ImageNet's (their averages for 1 channel), so pretrained
    ImageNet weights see the input statistics they expect. The memory format (channels_last) is kept."""

    def __init__(self, channels: int, mean: Sequence[float] | float | None = None,
                 std: Sequence[float] | float | None = None) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        mean_array = _channel_stats(mean, IMAGENET_MEAN, channels, "mean")
        std_array = _channel_stats(std, IMAGENET_STD, channels, "std")
        if np.any(std_array <= 0):
            raise ValueError(f"std must be positive, got {std_array.tolist()}")
        self.channels = channels
        # (x / 255 - mean) / std == x * scale - shift: one multiply-subtract per element.
        self.scale = torch.tensor(1.0 / (255.0 * std_array), dtype=torch.float32).view(1, -1, 1, 1)
        self.shift = torch.tensor(mean_array / std_array, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, batch: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        if batch.ndim != 4 or batch.shape[1] not in (1, self.channels):
            raise ValueError(f"expected a (N, 1 or {self.channels}, H, W) batch, got shape {tuple(batch.shape)}")
        if self.scale.device != batch.device:
            self.scale, self.shift = self.scale.to(batch.device), self.shift.to(batch.device)
        n, _, height, width = batch.shape
        # One float32 output in the wanted layout; x * scale broadcasts a gray channel to all channels on the way.
        out = torch.empty((n, self.channels, height, width), dtype=torch.float32, device=batch.device,
                          memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return torch.mul(batch, self.scale, out=out).sub_(self.shift)


def build_transform(
    train: bool,
    channels: int,
    n_ops: int = 2,
    magnitude: int = 9,
    grayscale: bool = True,
    seed: int | None = None,
) -> SliceTransform:
    """The per-image transform: RandAugment (N=`n_ops`, M=`magnitude`) when `train`, else the identity; uint8 out.

    `grayscale` (input has R = G = B, as `utils.data.load_image` makes it) leaves the colour op out (a no-op on gray)
    and works on one channel (see SliceTransform); `seed` fixes the augmentation stream. `channels` is checked only:
    the Normalizer makes the model's channels.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    augment = None
    if train:
        ops = randaugment_ops(magnitude, grayscale=grayscale)
        if not 0 <= n_ops <= len(ops):
            raise ValueError(f"n_ops must be in 0..{len(ops)} (RandAugment's N), got {n_ops}")
        if n_ops > 0:
            augment = A.Compose([A.SomeOf(ops, n=n_ops, replace=False, p=1.0)])
    transform = SliceTransform(augment, gray_input=grayscale)
    if seed is not None:
        transform.set_seed(seed)
    return transform


def worker_init(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: reseed the dataset's augmentation from torch's per-worker seed."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        return
    transform = getattr(info.dataset, "transform", None)
    if isinstance(transform, SliceTransform):
        transform.set_seed(int(info.seed % 2**32))


def hflip_tta(batch: torch.Tensor) -> torch.Tensor:
    """The batch (N, C, H, W) mirrored left-right (width axis); inference averages predictions on both."""
    if batch.ndim != 4:
        raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(batch.shape)}")
    return torch.flip(batch, dims=(3,))
