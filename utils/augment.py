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

The seed team's RandAugment (`randaug_style: authors`, their utils/augmentations.py; docs/paper.md): N ops drawn
*with* replacement from the same ten, each applied with p 0.5 at a *fixed* strength of M/30 of its range with a random
sign for the geometric ones (their default M = 15: rotate 15 degrees, shear 0.15, translate 50 px, a 20 px cutout
filled with their grey; their colour factors are 0.1 + 1.8 M/30, exactly 1.0 at M = 15: no-ops), done with PIL's
operations as theirs (nearest-neighbour, shear about the top-left corner). Their translate and cutout are in pixels
of a 512 px slice: here they scale with the image's side (the same share of the slice at any size). Their
training also flips every image vertically and horizontally with p 0.5 each, after RandAugment (`train_flips`).

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
from typing import TYPE_CHECKING

import albumentations as A
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance

if TYPE_CHECKING:
    from utils.config import TrainConfig

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


# The seed team's RandAugment: op -> (min, max) of its strength; value = M/30 (max - min) + min (their augment_list).
AUTHORS_RANGES = {"rotate": (0.0, 30.0), "color": (0.1, 1.9), "contrast": (0.1, 1.9), "brightness": (0.1, 1.9),
                  "sharpness": (0.1, 1.9), "shear_x": (0.0, 0.3), "shear_y": (0.0, 0.3), "cutout": (0.0, 40.0),
                  "translate_x": (0.0, 100.0), "translate_y": (0.0, 100.0)}
AUTHORS_SIGNED = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")  # a random sign each time
AUTHORS_PIXELS = ("cutout", "translate_x", "translate_y")  # absolute pixels of their 512 px slices
AUTHORS_SIDE = 512
AUTHORS_CUTOUT_FILL = (125, 123, 114)  # their cutout colour (gray input: its luminance)


def authors_value(op: str, magnitude: int) -> float:
    """The strength the seed team's RandAugment gives `op` at `magnitude` (fixed: no random draw)."""
    low, high = AUTHORS_RANGES[op]
    return float(magnitude) / MAX_MAGNITUDE * float(high - low) + low


def authors_op(image: Image.Image, op: str, value: float, cutout_centre: tuple[float, float] = (0.0, 0.0)
               ) -> Image.Image:
    """One op of the seed team's RandAugment on a PIL image, `value` already signed and in this image's pixels."""
    if op == "rotate":
        return image.rotate(value)  # PIL's defaults, as theirs: nearest neighbour, black corners
    if op in ("color", "contrast", "brightness", "sharpness"):
        return getattr(ImageEnhance, op.capitalize())(image).enhance(value)
    affine = {"shear_x": (1, value, 0, 0, 1, 0), "shear_y": (1, 0, 0, value, 1, 0),
              "translate_x": (1, 0, value, 0, 1, 0), "translate_y": (1, 0, 0, 0, 1, value)}.get(op)
    if affine is not None:
        return image.transform(image.size, Image.AFFINE, affine)
    if op == "cutout":
        if value <= 0:
            return image
        x0, y0 = max(0, int(cutout_centre[0] - value / 2)), max(0, int(cutout_centre[1] - value / 2))
        box = (x0, y0, min(image.width, x0 + value), min(image.height, y0 + value))
        image = image.copy()
        fill = AUTHORS_CUTOUT_FILL if image.mode == "RGB" else \
            round(0.299 * AUTHORS_CUTOUT_FILL[0] + 0.587 * AUTHORS_CUTOUT_FILL[1] + 0.114 * AUTHORS_CUTOUT_FILL[2])
        ImageDraw.Draw(image).rectangle(box, fill)
        return image
    raise ValueError(f"unknown op {op!r}: one of {', '.join(AUTHORS_RANGES)}")


class AuthorsRandAugment(A.ImageOnlyTransform):
    """The seed team's RandAugment (module docstring) on a uint8 (H, W, 1 or 3) image; its draws come from the
    transform's random state (`SliceTransform.set_seed`), so a stream is reproducible."""

    def __init__(self, n_ops: int = 2, magnitude: int = 15, ops: Sequence[str] = tuple(AUTHORS_RANGES),
                 p: float = 1.0) -> None:
        super().__init__(p=p)
        if not 0 <= magnitude <= MAX_MAGNITUDE:
            raise ValueError(f"magnitude must be in 0..{MAX_MAGNITUDE} (RandAugment's M), got {magnitude}")
        self.n_ops, self.magnitude, self.ops = n_ops, magnitude, tuple(ops)

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        image = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        scale = image.width / AUTHORS_SIDE
        for op in self.py_random.choices(self.ops, k=self.n_ops):  # with replacement, as random.choices
            if self.py_random.uniform(0, 1) <= 0.5:  # theirs: applied when a uniform draw is > 0.5
                continue
            value = authors_value(op, self.magnitude) * (scale if op in AUTHORS_PIXELS else 1.0)
            if op in AUTHORS_SIGNED and self.py_random.random() < 0.5:
                value = -value
            centre = (self.py_random.uniform(1, image.width), self.py_random.uniform(1, image.height))
            image = authors_op(image, op, value, centre)
        out = np.asarray(image, dtype=np.uint8)
        return out[:, :, None] if out.ndim == 2 else out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("n_ops", "magnitude", "ops")


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
    style: str = "suite",
    flips: bool = False,
) -> SliceTransform:
    """The per-image transform: RandAugment (N=`n_ops`, M=`magnitude`, this suite's or the seed team's `style`),
    then, with `flips`, vertical and horizontal flips (p 0.5 each), when `train`; else the identity; uint8 out.

    `grayscale` (input has R = G = B, as `utils.data.load_image` makes it) leaves the colour op out of this suite's
    list (a no-op on gray) and works on one channel (see SliceTransform); `seed` fixes the augmentation stream.
    `channels` is checked only: the Normalizer makes the model's channels.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if style not in ("suite", "authors"):
        raise ValueError(f"style must be 'suite' or 'authors', got {style!r}")
    augment = None
    if train:
        steps: list[A.BasicTransform] = []
        if style == "authors":
            if n_ops > 0:
                steps.append(AuthorsRandAugment(n_ops, magnitude))
        else:
            ops = randaugment_ops(magnitude, grayscale=grayscale)
            if not 0 <= n_ops <= len(ops):
                raise ValueError(f"n_ops must be in 0..{len(ops)} (RandAugment's N), got {n_ops}")
            if n_ops > 0:
                steps.append(A.SomeOf(ops, n=n_ops, replace=False, p=1.0))
        if flips:  # after RandAugment, vertical first: the seed team's order
            steps += [A.VerticalFlip(p=0.5), A.HorizontalFlip(p=0.5)]
        if steps:
            augment = A.Compose(steps)
    transform = SliceTransform(augment, gray_input=grayscale)
    if seed is not None:
        transform.set_seed(seed)
    return transform


def training_transform(cfg: TrainConfig, seed: int | None = None) -> SliceTransform:
    """A recipe's training transform: its RandAugment (randaug_n, randaug_m, randaug_style) and flips."""
    return build_transform(train=True, channels=cfg.in_chans, n_ops=cfg.randaug_n, magnitude=cfg.randaug_m, seed=seed,
                           style=cfg.randaug_style, flips=cfg.train_flips)


def worker_init(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: reseed the dataset's augmentation from torch's per-worker seed; and stop quietly
    (utils.cli.worker_init: a forked loader worker would raise the run's `Terminated` on the SIGTERM that ends it)."""
    from utils import cli  # the one place worker processes get their signal handling

    cli.worker_init()
    info = torch.utils.data.get_worker_info()
    if info is None:
        return
    seed = int(info.seed % 2**32)
    transform = getattr(info.dataset, "transform", None)
    if isinstance(transform, SliceTransform):
        transform.set_seed(seed)
    pairs_seed = getattr(info.dataset, "set_seed", None)  # utils.mixup.MixedPairs: its partner stream
    if callable(pairs_seed):
        pairs_seed(seed)


def hflip_tta(batch: torch.Tensor) -> torch.Tensor:
    """The batch (N, C, H, W) mirrored left-right (width axis); inference averages predictions on both."""
    if batch.ndim != 4:
        raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(batch.shape)}")
    return torch.flip(batch, dims=(3,))
