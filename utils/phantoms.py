"""Phantom CT slices: the embedded default data set, in the official Per-COVID-19 layout.

Without the real challenge data (Bougourzi et al., J. Imaging 2021, 7(9):189) the suite runs end to end on these
synthetic, seeded slices. Each is drawn from the generator's own masks, so its label is exact: the challenge label is
the infection percentage of a slice (challenge paper: "the percentage of the infected lung area with respect to the
whole lung area"), here 100 x infection_mask.sum() / lung_mask.sum() at the output resolution, rounded to a whole
number and written `12.0` like the real file.

Anatomy (lung window, 0 = black, 1 = white; the image is the patient seen from the feet, back at the bottom): a black
outside of the scanner's circular field of view, dark air, a soft-tissue body ellipse with a darker fat rim, ribs
(bright arcs), sternum and spine (vertebral body, canal, spinous process), a table line, a heart that notches the
lower lungs, and two dark lungs whose size and shape vary per subject and along z (small at apex and base). Vessels
are small bright blobs and short lines inside the lungs. COVID-like lesions: a smooth random field inside the lungs
(3D Gaussian seeds per subject, peripheral and posterior like COVID-19 pneumonia, plus fine texture) is thresholded at
the quantile that leaves the slice's target infected fraction; the infected region is ground-glass (mildly brighter,
hazy, soft-edged, vessels still visible) with dense consolidation (bright) at the cores for some subjects. Gaussian
noise, per-subject brightness/contrast.

Label distribution (per subject a severity S ~ lognormal, stratified per split, 10% healthy subjects; per slice S
times a bell over z times lognormal jitter) is tuned to the real Train.csv: about 24% zeros, median ~6, mean ~18,
tail to 100 (a 600-subject plan: 23% zeros, median 6, mean 18.2; the default 36 Train subjects: mean 16-19).

Layout written (like the challenge; Val/Test labels kept apart so a run can be scored locally):
    OUT/Train/Images/Image_0000.png ...   OUT/Train/Train.csv (headerless CRLF `name,percentage,subject`)
    OUT/Val/Images/*.png                  OUT/Test/Images/*.png
    OUT/labels/Val.csv  OUT/labels/Test.csv
    OUT/README.md                         OUT/phantoms.json (parameters, per-subject and per-slice seeds)
Images are 8-bit grayscale (L) PNGs by default (`image_mode="RGBA"` mimics the real RGBA files; the reader turns
both into the same gray image). The set is built in a temporary `.OUT.tmp-<host>-<pid>` next to OUT
(`files.atomic_path`) and renamed to OUT when complete (with `force=True` an existing OUT is moved aside just before
and deleted after); an existing complete OUT made with the same parameters is reused (its summary returned), different
parameters need `force=True`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import NamedTuple

import numpy as np
from PIL import Image

from utils import cli, csvfiles, files
from utils.machine import usable_cores

FORMAT_VERSION = 1
MANIFEST = "phantoms.json"
HEALTHY_SHARE = 0.1
SEVERITY_LOG_MEDIAN = math.log(0.14)
SEVERITY_LOG_SIGMA = 1.6
SLICE_JITTER_SIGMA = 0.45
Z_RANGE = (0.08, 0.92)


@dataclass(frozen=True)
class Anatomy:
    """One subject's body, lungs, lesion seeds and scanner look; coordinates are in [-1, 1] image units."""

    body_rx: float
    body_ry: float
    body_cy: float
    lung_cx: float  # lateral distance of each lung centre from the midline
    lung_cy: float
    lung_rx: float
    lung_ry: float
    lung_exponent: float  # superellipse exponent: 2 = ellipse, larger = boxier
    lung_harmonics: tuple[tuple[float, ...], ...]  # per lung: (amplitude_k, phase_k) for k = 2, 3, 4
    heart_rx: float
    heart_ry: float
    n_ribs: int
    lesion_seeds: tuple[tuple[float, ...], ...]  # (side +-1, x, y, z, sigma_xy, sigma_z, weight), lung-local units
    ggo_amplitude: float
    consolidation_share: float  # fraction of the infected area that is dense consolidation
    consolidation_amplitude: float
    gain: float
    offset: float
    noise_sigma: float


def draw_anatomy(rng: np.random.Generator, severity: float = 0.2) -> Anatomy:
    """A random subject. `severity` (0..1, the subject's typical infected fraction) sets the number of lesion seeds."""
    body_rx = rng.uniform(0.84, 0.95)
    body_ry = rng.uniform(0.6, 0.72)
    lung_rx = body_rx * rng.uniform(0.33, 0.39)
    harmonics = tuple(
        tuple(value for _ in range(3) for value in (rng.uniform(0.0, 0.05), rng.uniform(0.0, 2 * math.pi)))
        for _ in range(2)
    )
    n_seeds = int(np.clip(round(3 + 14 * severity + rng.normal(0, 1.5)), 2, 20))
    seeds = []
    for _ in range(n_seeds):
        side = float(rng.choice((-1.0, 1.0)))
        # COVID-19 lesions are mostly peripheral and posterior: radius biased outwards, angle toward the back (+y).
        radius = math.sqrt(rng.uniform(0.25, 1.0)) * 0.9
        angle = rng.normal(math.pi / 2, 1.2)
        x = radius * math.cos(angle)
        y = radius * math.sin(angle)
        seeds.append(
            (side, x, y, rng.uniform(0.0, 1.0), rng.uniform(0.12, 0.4), rng.uniform(0.12, 0.35), rng.uniform(0.5, 1.5))
        )
    return Anatomy(
        body_rx=body_rx,
        body_ry=body_ry,
        body_cy=rng.uniform(-0.02, 0.1),
        lung_cx=body_rx * rng.uniform(0.43, 0.48),
        lung_cy=rng.uniform(-0.06, 0.02),
        lung_rx=lung_rx,
        lung_ry=body_ry * rng.uniform(0.62, 0.74),
        lung_exponent=rng.uniform(2.0, 2.8),
        lung_harmonics=harmonics,
        heart_rx=body_rx * rng.uniform(0.2, 0.27),
        heart_ry=body_ry * rng.uniform(0.3, 0.42),
        n_ribs=int(rng.integers(6, 11)),
        lesion_seeds=tuple(seeds),
        ggo_amplitude=rng.uniform(0.16, 0.28),
        consolidation_share=float(rng.choice((0.0, rng.uniform(0.1, 0.6)), p=(0.4, 0.6))),
        consolidation_amplitude=rng.uniform(0.4, 0.55),
        gain=rng.uniform(0.9, 1.08),
        offset=rng.uniform(-0.05, 0.05),
        noise_sigma=rng.uniform(0.012, 0.035),
    )


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-std noise smooth on the scale size/cells (bilinear upsampling of a coarse grid)."""
    coarse = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR), dtype=np.float32)
    return (field - field.mean()) / (field.std() + 1e-6)


def _add_blobs(canvas: np.ndarray, blobs: np.ndarray, size: int) -> None:
    """Add oriented Gaussian blobs (cx, cy in [-1, 1], sigma_major, sigma_minor in pixels, angle, amplitude)."""
    for cx, cy, s_major, s_minor, angle, amplitude in blobs:
        px, py = (cx + 1) * size / 2, (cy + 1) * size / 2
        reach = int(math.ceil(3.5 * s_major))
        x0, x1 = max(int(px) - reach, 0), min(int(px) + reach + 1, size)
        y0, y1 = max(int(py) - reach, 0), min(int(py) + reach + 1, size)
        if x0 >= x1 or y0 >= y1:
            continue
        xs = np.arange(x0, x1, dtype=np.float32) + 0.5 - px
        ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - py
        cos, sin = math.cos(angle), math.sin(angle)
        along = xs * cos + ys * sin
        across = -xs * sin + ys * cos
        canvas[y0:y1, x0:x1] += amplitude * np.exp(-0.5 * ((along / s_major) ** 2 + (across / s_minor) ** 2))


def _window(coords: np.ndarray, low: float, high: float) -> slice:
    """Index range of `coords` (sorted pixel centres) within [low, high]."""
    return slice(int(np.searchsorted(coords, low)), int(np.searchsorted(coords, high, side="right")))


def _fill_ellipse(value: np.ndarray, coords: np.ndarray, cx: float, cy: float, rx: float, ry: float, level: float):
    """Set the pixels of an axis-aligned ellipse to `level`, touching only its bounding box."""
    rows, cols = _window(coords, cy - ry, cy + ry), _window(coords, cx - rx, cx + rx)
    inside = ((coords[None, cols] - cx) / rx) ** 2 + ((coords[rows, None] - cy) / ry) ** 2 <= 1.0
    value[rows, cols][inside] = level


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def render_slice(
    rng: np.random.Generator,
    size: int,
    anatomy: Anatomy | None = None,
    z: float = 0.5,
    infection: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom slice: (image uint8 (size, size), lung_mask bool, infection_mask bool).

    `z` in [0, 1] runs apex to base; `infection` is the target infected share of the lung (0..1). The slice's
    label is 100 * infection_mask.sum() / lung_mask.sum() (infection_mask lies inside lung_mask).
    The parts are drawn in a fixed order, each drawing its random numbers from `rng` in turn (ribs, lesions,
    vessels, scanner noise): the same seed gives the same slice.
    """
    if not 0.0 <= infection <= 1.0:
        raise ValueError(f"infection must be a fraction in [0, 1], got {infection}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    if anatomy is None:
        anatomy = draw_anatomy(rng)
    coords = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0  # pixel centres in [-1, 1]
    profile = 0.55 + 0.45 * math.sin(math.pi * min(max(z, 0.0), 1.0)) ** 0.6  # lung size along z (apex, base small)
    value, body_rho = _draw_body(anatomy, coords)
    _draw_ribs(rng, anatomy, coords, body_rho, value)
    spine_y = _draw_sternum_and_spine(anatomy, coords, value)
    lungs = _draw_lungs(anatomy, coords, body_rho, spine_y, z, profile, value)
    infection_mask, lesion = _draw_lesions(rng, anatomy, lungs, z, infection)
    vessels = _draw_vessels(rng, anatomy, coords, lungs.mask, profile)
    value = np.where(lungs.mask, np.maximum(value + lesion, value + vessels), value)
    return _scanner_look(rng, anatomy, coords, value), lungs.mask, infection_mask


def _draw_body(a: Anatomy, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Body: soft-tissue ellipse with a fat rim in air, scanner table below. Returns (value, body_rho), body_rho the
    elliptic radius of each pixel (1 on the skin); the field-of-view circle is the scanner look's."""
    u, v = coords[None, :], coords[:, None]  # left-right; front (top) to back (bottom)
    body_rho = np.sqrt((u / a.body_rx) ** 2 + ((v - a.body_cy) / a.body_ry) ** 2)
    value = np.where(body_rho <= 1.0, np.float32(0.86), np.float32(0.2))  # soft tissue / air
    value[(body_rho > 0.9) & (body_rho <= 1.0)] = 0.78  # subcutaneous fat
    table_y = a.body_cy + a.body_ry + 0.06
    rows, cols = _window(coords, table_y - 0.012, table_y + 0.012), _window(coords, -0.8, 0.8)
    value[rows, cols] = 0.62
    return value, body_rho


def _draw_ribs(rng: np.random.Generator, a: Anatomy, coords: np.ndarray, body_rho: np.ndarray, value: np.ndarray):
    """Ribs: bright arcs just inside the body wall, laterally and at the back (angles only on the thin band)."""
    band_y, band_x = np.nonzero((body_rho > 0.8) & (body_rho < 0.86))
    theta = np.arctan2((coords[band_y] - a.body_cy) / a.body_ry, coords[band_x] / a.body_rx)
    bone = np.zeros(len(band_y), dtype=bool)
    for index in range(a.n_ribs):
        centre = -0.2 + (math.pi + 0.4) * (index + 0.5) / a.n_ribs + rng.normal(0, 0.05)
        half_width = rng.uniform(0.08, 0.16)
        for mirrored in (centre, math.pi - centre):
            bone |= np.abs((theta - mirrored + math.pi) % (2 * math.pi) - math.pi) < half_width
    value[band_y[bone], band_x[bone]] = 1.0


def _draw_sternum_and_spine(a: Anatomy, coords: np.ndarray, value: np.ndarray) -> float:
    """Sternum at the front, spine at the back; returns the spine's centre y (it keeps the lungs apart)."""
    spine_y = a.body_cy + 0.62 * a.body_ry
    _fill_ellipse(value, coords, 0.0, a.body_cy - 0.9 * a.body_ry, 0.07, 0.035, 1.0)
    _fill_ellipse(value, coords, 0.0, spine_y, 0.11, 0.09, 1.0)
    _fill_ellipse(value, coords, 0.0, spine_y + 0.12, 0.045, 0.04, 0.8)  # spinal canal
    _fill_ellipse(value, coords, 0.0, spine_y + 0.23, 0.03, 0.07, 1.0)  # spinous process
    return spine_y


class _Lungs(NamedTuple):
    """The lungs of a slice: mask, and per lung pixel its lung-local coordinates and side (-1, +1; 0 outside)."""

    mask: np.ndarray
    x: np.ndarray
    y: np.ndarray
    side: np.ndarray


def _superellipse(lx: np.ndarray, ly: np.ndarray, side: float, harmonics: tuple[float, ...], p: float) -> np.ndarray:
    """Inside a superellipse of exponent `p` whose radius wobbles with harmonics k = 2, 3, 4 (lung-local units)."""
    angle = np.arctan2(ly, lx * side)
    wobble = np.float32(1.0)
    for k in range(3):
        wobble = wobble + np.float32(harmonics[2 * k]) * np.cos((k + 2) * angle + np.float32(harmonics[2 * k + 1]))
    return (np.abs(lx) ** p + np.abs(ly) ** p) <= wobble**p


def _draw_lungs(
    a: Anatomy, coords: np.ndarray, body_rho: np.ndarray, spine_y: float, z: float, profile: float, value: np.ndarray
) -> _Lungs:
    """Lungs: superellipses with harmonic wobble, small at apex and base, notched by the heart lower down, each
    computed only inside its bounding box; dark, a little brighter toward the back (dependent density)."""
    size = len(coords)
    u, v = coords[None, :], coords[:, None]
    lung_rx, lung_ry = a.lung_rx * profile, a.lung_ry * (0.75 + 0.25 * profile)
    heart_scale = 0.4 + 0.6 * (max(0.0, math.sin(math.pi * (z - 0.25) / 0.85)) if z > 0.25 else 0.0)
    heart_rx, heart_ry, heart_y = a.heart_rx * heart_scale, a.heart_ry * heart_scale, a.lung_cy - 0.12
    mediastinum = 0.06 + 0.05 * profile
    lungs = _Lungs(*(np.zeros((size, size), dtype=dtype) for dtype in (bool, np.float32, np.float32, np.float32)))
    reach = 1.0 + 3 * 0.05 + 0.01  # the wobble adds at most 3 x 0.05 to the unit radius
    for lung_index, side in enumerate((-1.0, 1.0)):
        rows = _window(coords, a.lung_cy - reach * lung_ry, a.lung_cy + reach * lung_ry)
        cols = _window(coords, side * a.lung_cx - reach * lung_rx, side * a.lung_cx + reach * lung_rx)
        bu, bv = u[:, cols], v[rows, :]
        lx = (bu - side * a.lung_cx) / lung_rx
        ly = (bv - a.lung_cy) / lung_ry
        inside = _superellipse(lx, ly, side, a.lung_harmonics[lung_index], a.lung_exponent)
        inside &= body_rho[rows, cols] < 0.78
        inside &= ((bu - 0.06) / heart_rx) ** 2 + ((bv - heart_y) / heart_ry) ** 2 > 1.0
        inside &= np.abs(bu) >= mediastinum
        inside &= (bu / 0.16) ** 2 + ((bv - spine_y) / 0.14) ** 2 > 1.0  # the spine keeps the lungs apart behind
        lungs.mask[rows, cols] |= inside
        lungs.x[rows, cols] = np.where(inside, lx, lungs.x[rows, cols])
        lungs.y[rows, cols] = np.where(inside, ly, lungs.y[rows, cols])
        lungs.side[rows, cols] = np.where(inside, np.float32(side), lungs.side[rows, cols])
    if lungs.mask.sum() < 50:
        raise ValueError(f"slice too small for lungs at size {size}; use size >= 32")
    value[lungs.mask] = (0.2 + 0.03 * (lungs.y[lungs.mask] + 1.0)).astype(np.float32)
    return lungs


def _lesion_field(rng: np.random.Generator, a: Anatomy, lungs: _Lungs, z: float) -> np.ndarray:
    """Standardised lesion field over the lung pixels: peripheral and posterior bias, the subject's 3D Gaussian
    seeds at this z, fine texture."""
    lx, ly, sides = lungs.x[lungs.mask], lungs.y[lungs.mask], lungs.side[lungs.mask]
    field = 0.5 * np.sqrt(lx**2 + ly**2) + 0.25 * ly  # peripheral, posterior bias
    for side, sx, sy, sz, sigma_xy, sigma_z, weight in a.lesion_seeds:
        reach = math.exp(-0.5 * ((z - sz) / sigma_z) ** 2) * weight
        on_side = sides == side
        field += on_side * (2.0 * reach) * np.exp(-0.5 * ((lx - sx) ** 2 + (ly - sy) ** 2) / sigma_xy**2)
    size = len(lungs.mask)
    texture = _smooth_noise(rng, size, max(4, size // 24))[lungs.mask]
    field = field + 0.35 * texture
    return (field - field.mean()) / (field.std() + 1e-6)


def _draw_lesions(
    rng: np.random.Generator, a: Anatomy, lungs: _Lungs, z: float, infection: float
) -> tuple[np.ndarray, np.ndarray]:
    """Lesions: the lesion field thresholded at the quantile that leaves the target infected share; ground glass
    (hazy, soft-edged) with consolidation at the cores. Returns (infection_mask, lesion brightness)."""
    size = len(lungs.mask)
    infection_mask = np.zeros((size, size), dtype=bool)
    lesion = np.zeros((size, size), dtype=np.float32)
    if infection > 0:
        field = _lesion_field(rng, a, lungs, z)
        threshold = np.quantile(field, 1.0 - infection) if infection < 1.0 else -np.inf
        infected = field > threshold
        infection_mask[lungs.mask] = infected
        edge = 0.12  # soft edge width, in field standard deviations
        haze = _sigmoid((field - threshold) / edge) * (1.0 + 0.3 * _smooth_noise(rng, size, size // 6)[lungs.mask])
        lesion_value = a.ggo_amplitude * np.clip(haze, 0.0, 1.3)
        if a.consolidation_share > 0 and infected.any():
            core = np.quantile(field[infected], 1.0 - a.consolidation_share)
            lesion_value += a.consolidation_amplitude * _sigmoid((field - core) / edge)
        lesion[lungs.mask] = lesion_value
    return infection_mask, lesion


def _draw_vessels(
    rng: np.random.Generator, a: Anatomy, coords: np.ndarray, lung_mask: np.ndarray, profile: float
) -> np.ndarray:
    """Vessels: small bright blobs and short lines, denser toward the hilum; visible through ground glass."""
    size = len(coords)
    vessels = np.zeros((size, size), dtype=np.float32)
    ys, xs = np.nonzero(lung_mask)
    n_vessels = int(20 + 35 * profile)
    if not len(xs):
        return vessels
    picks = rng.integers(0, len(xs), n_vessels * 2)
    hilar = np.abs(coords[xs[picks]]) < a.lung_cx  # keep medial picks, drop some lateral ones
    picks = picks[hilar | (rng.random(len(picks)) < 0.35)][:n_vessels]
    scale = size / 512.0
    major = rng.uniform(0.8, 3.5, len(picks)) * scale
    blobs = np.stack(
        [
            coords[xs[picks]],
            coords[ys[picks]],
            np.maximum(major, 0.6),
            np.maximum(rng.uniform(0.6, 1.4, len(picks)) * scale, 0.5),
            rng.uniform(0, math.pi, len(picks)),
            rng.uniform(0.25, 0.6, len(picks)),
        ],
        axis=1,
    )
    _add_blobs(vessels, blobs, size)
    vessels *= lung_mask
    return vessels


def _scanner_look(rng: np.random.Generator, a: Anatomy, coords: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Scanner look: per-subject window, noise, black outside the field of view; the 8-bit image."""
    size = len(coords)
    u, v = coords[None, :], coords[:, None]
    image = a.offset + a.gain * value + rng.normal(0.0, a.noise_sigma, (size, size)).astype(np.float32)
    image[(u**2 + v**2) > 1.0] = 0.0
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def infection_percentage(lung_mask: np.ndarray, infection_mask: np.ndarray) -> float:
    """The challenge label: 100 x infected lung area / lung area, rounded to a whole number like the real labels."""
    return float(np.rint(100.0 * np.count_nonzero(infection_mask & lung_mask) / np.count_nonzero(lung_mask)))


# --------------------------------------------------------------------------------------------------------------
# The data set
# --------------------------------------------------------------------------------------------------------------
def _stratified_severities(rng: np.random.Generator, counts: list[tuple[str, int]]) -> np.ndarray:
    """Per-subject severities, split by split in `counts` order ((split, n_subjects), ...).

    Stratified within each split (healthy share, then lognormal quantiles of a shuffled even grid), so even a small
    set has the intended label distribution instead of a lucky or unlucky draw of the heavy tail."""
    severities = np.zeros(sum(count for _, count in counts))
    normal = NormalDist()
    start = 0
    for split, count in counts:
        if count == 0:
            continue
        n_healthy = int(round(HEALTHY_SHARE * count)) if split != "Train" else max(1, int(round(HEALTHY_SHARE * count)))
        n_covid = count - n_healthy
        grid = (rng.permutation(n_covid) + rng.random(n_covid)) / max(n_covid, 1)
        covid = [min(0.97, math.exp(SEVERITY_LOG_MEDIAN + SEVERITY_LOG_SIGMA * normal.inv_cdf(q))) for q in grid]
        severities[start : start + count] = rng.permutation(np.array([0.0] * n_healthy + covid))
        start += count
    return severities


def _plan_slices(
    rng: np.random.Generator, seed: int, subject: int, split: str, severity: float, low: int, high: int
) -> list[dict]:
    """One subject's slices (unnamed): low..high sorted z positions, each with its target infected fraction
    (severity x a bell over z x lognormal jitter) and render seed."""
    n_slices = int(rng.integers(low, high + 1))
    z = np.sort(rng.uniform(*Z_RANGE, n_slices))
    centre, width = rng.uniform(0.45, 0.85), rng.uniform(0.35, 0.7)
    bell = np.clip(1.0 - ((z - centre) / width) ** 2, 0.0, None)
    targets = np.clip(severity * bell * np.exp(rng.normal(0.0, SLICE_JITTER_SIGMA, n_slices)), 0.0, 1.0)
    return [
        {
            "split": split,
            "subject": subject,
            "z": float(z[index]),
            "infection": float(targets[index]),
            "seed": [seed, 2, subject, index],
        }
        for index in range(n_slices)
    ]


def plan_phantoms(
    subjects: int = 60,
    seed: int = 0,
    val_fraction: float = 0.25,
    test_fraction: float = 0.15,
    slices_per_subject: tuple[int, int] = (6, 14),
) -> tuple[list[dict], list[dict]]:
    """The subjects (split, id, severity, anatomy seed) and slices (name, split, subject, z, target infected
    fraction `infection`, render seed) of a phantom set, without rendering; `generate_phantoms` renders this plan."""
    rng = np.random.default_rng([seed, 0])
    n_val = int(round(val_fraction * subjects))
    n_test = int(round(test_fraction * subjects))
    n_train = subjects - n_val - n_test
    if n_train < 1:
        raise ValueError(f"val_fraction + test_fraction leave no Train subject out of {subjects}")
    split_of = ["Train"] * n_train + ["Val"] * n_val + ["Test"] * n_test
    severities = _stratified_severities(rng, [("Train", n_train), ("Val", n_val), ("Test", n_test)])
    low, high = slices_per_subject
    plan_subjects, plan_slices = [], []
    for subject in range(subjects):
        split, severity = split_of[subject], float(severities[subject])
        plan_subjects.append({"subject": subject, "split": split, "severity": severity, "seed": [seed, 1, subject]})
        plan_slices += _plan_slices(rng, seed, subject, split, severity, low, high)
    digits = max(4, len(str(len(plan_slices) - 1)))
    for number, entry in enumerate(plan_slices):  # Train, then Val, then Test: names unique across splits
        entry["name"] = f"Image_{number:0{digits}d}.png"
    return plan_subjects, plan_slices


def _render_job(job: tuple) -> tuple[str, float]:
    """Render one planned slice, write its PNG, return (name, label)."""
    entry, subject, size, image_mode, folder = job
    anatomy = draw_anatomy(np.random.default_rng(subject["seed"]), severity=subject["severity"])
    rng = np.random.default_rng(entry["seed"])
    image, lung, infected = render_slice(rng, size, anatomy, entry["z"], entry["infection"])
    picture = Image.fromarray(image, mode="L")
    if image_mode == "RGBA":
        picture = picture.convert("RGBA")
    picture.save(Path(folder) / entry["split"] / "Images" / entry["name"], compress_level=1)
    return entry["name"], infection_percentage(lung, infected)


def _write_labels(path: Path, rows: list[tuple[str, float, int]]) -> None:
    # the official Train.csv's format: no header, CRLF, percentages written as 12.0
    csvfiles.write_rows(path, [(name, f"{percentage:.1f}", subject) for name, percentage, subject in rows],
                        line_end="\r\n")


def _readme(parameters: dict, counts: dict) -> str:
    lines = [
        "# Phantom Per-COVID-19 data (synthetic)",
        "",
        "Synthetic CT-like slices made by `python -m utils.phantoms` for running the suite without the real",
        "challenge data. They are NOT patient data and results on them say nothing about real CT.",
        "Labels are exact: 100 x infected lung pixels / lung pixels of the generator's own masks, rounded.",
        "",
        "Layout as in the challenge: `Train/Images/*.png` + `Train/Train.csv` (no header, CRLF,",
        "`name,percentage,subject`), `Val/Images`, `Test/Images`; the Val/Test labels are in `labels/` so a run",
        "can be scored locally. `phantoms.json` holds the parameters and per-slice seeds.",
        "",
        f"Parameters: {json.dumps(parameters)}",
        f"Slices: {json.dumps(counts)}",
        "",
    ]
    return "\n".join(lines)


def _parameters(
    subjects: int,
    size: int,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    slices_per_subject: tuple[int, int],
    image_mode: str,
) -> dict:
    """Check the arguments of `generate_phantoms`; return the parameters its manifest records."""
    low, high = slices_per_subject
    if subjects < 1 or not 1 <= low <= high:
        raise ValueError(
            f"need subjects >= 1 and 1 <= slices_per_subject[0] <= [1], got {subjects}, {slices_per_subject}"
        )
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1):
        raise ValueError(f"val_fraction and test_fraction must be in [0, 1), got {val_fraction}, {test_fraction}")
    if image_mode not in ("L", "RGBA"):
        raise ValueError(f"image_mode must be 'L' or 'RGBA', got {image_mode!r}")
    return {
        "format": FORMAT_VERSION,
        "subjects": subjects,
        "size": size,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "slices_per_subject": [low, high],
        "image_mode": image_mode,
    }


def _reusable_set(out: Path, parameters: dict, force: bool) -> dict | None:
    """The summary of the complete set at `out` if it was made with `parameters` (and not `force`): reuse it. None
    when `out` is to be written (absent, empty (removed here), or a phantom set and `force`); otherwise
    FileExistsError. A folder that is not a phantom set is never replaced, `force` or not: it is someone's."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder holds nothing to lose: fill it
    if not out.exists():
        return None
    manifest = out / MANIFEST
    try:
        existing = json.loads(manifest.read_text()) if manifest.is_file() else None
    except (OSError, ValueError):
        existing = None
    if not isinstance(existing, dict) or "parameters" not in existing:
        existing = None  # not a readable manifest of a set: not this project's folder
    if existing is not None and existing["parameters"] == parameters and not force:
        return existing
    if existing is None:
        raise FileExistsError(f"{out} exists and is not a phantom set (no {MANIFEST}): it is not this project's to "
                              f"replace; give a new folder, or move it away yourself")
    if not force:
        raise FileExistsError(f"{out} exists and is a phantom set with other parameters; pass force=True (--force) "
                              "to replace it")
    return None


def _render_slices(
    folder: Path, plan_subjects: list[dict], plan_slices: list[dict], size: int, image_mode: str, workers: int
) -> None:
    """Render every planned slice's PNG into `folder`/<split>/Images (a pool of `workers` processes, serially for
    one worker or a few slices) and set each entry's "percentage" (its label)."""
    subject_of = {s["subject"]: s for s in plan_subjects}
    jobs = [(entry, subject_of[entry["subject"]], size, image_mode, str(folder)) for entry in plan_slices]
    if workers > 1 and len(jobs) > 8:
        import multiprocessing

        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        # cli.worker_init: the pool's exit stops its workers with SIGTERM, quietly (no `Terminated` traceback)
        with multiprocessing.get_context(method).Pool(workers, initializer=cli.worker_init) as pool:
            labels = dict(pool.imap_unordered(_render_job, jobs, chunksize=4))
    else:
        labels = dict(map(_render_job, jobs))
    for entry in plan_slices:
        entry["percentage"] = labels[entry["name"]]


def _summary(
    parameters: dict, plan_subjects: list[dict], plan_slices: list[dict], splits: list[str], started: float
) -> dict:
    """The manifest: parameters, counts, Train label statistics, seconds taken, the plan with its labels."""
    percentages = np.array([e["percentage"] for e in plan_slices if e["split"] == "Train"])
    return {
        "parameters": parameters,
        "counts": {split: sum(e["split"] == split for e in plan_slices) for split in splits},
        "subjects_per_split": {split: sum(s["split"] == split for s in plan_subjects) for split in splits},
        "train_label_stats": {
            "mean": float(percentages.mean()),
            "median": float(np.median(percentages)),
            "zero_share": float(np.mean(percentages == 0)),
            "max": float(percentages.max()),
        },
        "seconds": round(time.perf_counter() - started, 2),
        "subjects": plan_subjects,
        "slices": plan_slices,
    }


def _write_set_files(
    folder: Path,
    parameters: dict,
    plan_subjects: list[dict],
    plan_slices: list[dict],
    splits: list[str],
    started: float,
) -> dict:
    """Write the label files (Train/Train.csv, labels/<split>.csv), README.md and, last, the manifest (it marks the
    set complete) into `folder`; return the manifest."""
    for split in splits:
        rows = [(e["name"], e["percentage"], e["subject"]) for e in plan_slices if e["split"] == split]
        _write_labels(folder / ("Train/Train.csv" if split == "Train" else f"labels/{split}.csv"), rows)
    summary = _summary(parameters, plan_subjects, plan_slices, splits, started)
    files.write_text(folder / "README.md", _readme(parameters, summary["counts"]))
    files.write_text(folder / MANIFEST, json.dumps(summary))
    return summary


@contextlib.contextmanager
def _new_folder(out: Path) -> Iterator[Path]:
    """`files.atomic_path` for the set: yields the temporary folder to fill, which replaces `out` when complete.

    An existing `out` (force) is moved aside to `OUT.old-<pid>` just before the rename (os.replace cannot replace a
    non-empty folder) and deleted after it; should the rename fail, it is put back."""
    retired = out.with_name(f"{out.name}.old-{os.getpid()}")
    try:
        with files.atomic_path(out) as temporary:
            yield temporary
            if out.exists():
                os.replace(out, retired)
    except BaseException:
        if retired.exists() and not out.exists():
            os.replace(retired, out)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def generate_phantoms(
    out_dir: str | os.PathLike,
    subjects: int = 60,
    size: int = 512,
    seed: int = 0,
    val_fraction: float = 0.25,
    test_fraction: float = 0.15,
    slices_per_subject: tuple[int, int] = (6, 14),
    image_mode: str = "L",
    num_workers: int | None = None,
    force: bool = False,
) -> dict:
    """Write a phantom data set to `out_dir` (layout in the module docstring) and return its summary.

    Deterministic for the parameters. An existing complete set with the same parameters is reused (its summary
    returned); one with other parameters, or a non-empty folder that is not a phantom set, raises FileExistsError
    unless `force`. `num_workers` processes render slices (default: all cores, at most 8).
    """
    parameters = _parameters(subjects, size, seed, val_fraction, test_fraction, slices_per_subject, image_mode)
    out = Path(out_dir)
    existing = _reusable_set(out, parameters, force)
    if existing is not None:
        return existing
    started = time.perf_counter()
    plan_subjects, plan_slices = plan_phantoms(subjects, seed, val_fraction, test_fraction, slices_per_subject)
    splits = [s for s in ("Train", "Val", "Test") if any(e["split"] == s for e in plan_slices)]
    workers = min(8, usable_cores()) if num_workers is None else num_workers
    with _new_folder(out) as temporary:
        for split in splits:
            (temporary / split / "Images").mkdir(parents=True)
        (temporary / "labels").mkdir()
        _render_slices(temporary, plan_subjects, plan_slices, size, image_mode, workers)
        summary = _write_set_files(temporary, parameters, plan_subjects, plan_slices, splits, started)
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI: python -m utils.phantoms OUT [--subjects N --size S --seed K --force]."""
    parser = argparse.ArgumentParser(description="Write synthetic Per-COVID-19-like CT slices (exact labels).")
    parser.add_argument("out", help="output folder (created; must not exist unless --force or same parameters)")
    parser.add_argument("--subjects", type=int, default=60)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--min-slices", type=int, default=6)
    parser.add_argument("--max-slices", type=int, default=14)
    parser.add_argument("--image-mode", choices=("L", "RGBA"), default="L")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--force", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)
    try:
        summary = generate_phantoms(
            args.out,
            subjects=args.subjects,
            size=args.size,
            seed=args.seed,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            slices_per_subject=(args.min_slices, args.max_slices),
            image_mode=args.image_mode,
            num_workers=args.workers,
            force=args.force,
        )
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stats = summary["train_label_stats"]
    print(
        f"{args.out}: {summary['counts']} slices, Train labels mean {stats['mean']:.1f} median {stats['median']:.0f} "
        f"zeros {stats['zero_share']:.0%}, {summary['seconds']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
