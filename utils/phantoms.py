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
both into the same gray image). The set is built in `OUT.tmp-<pid>` and renamed to OUT when complete; an existing
complete OUT made with the same parameters is reused (its summary returned), different parameters need `force=True`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
from PIL import Image

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
    """
    if not 0.0 <= infection <= 1.0:
        raise ValueError(f"infection must be a fraction in [0, 1], got {infection}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    if anatomy is None:
        anatomy = draw_anatomy(rng)
    a = anatomy
    coords = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
    u = coords[None, :]  # left-right
    v = coords[:, None]  # front (top) to back (bottom)

    # Body: ellipse with a fat rim, scanner table below, field-of-view circle.
    body_rho = np.sqrt((u / a.body_rx) ** 2 + ((v - a.body_cy) / a.body_ry) ** 2)
    value = np.where(body_rho <= 1.0, np.float32(0.86), np.float32(0.2))  # soft tissue / air
    value[(body_rho > 0.9) & (body_rho <= 1.0)] = 0.78  # subcutaneous fat
    table_y = a.body_cy + a.body_ry + 0.06
    rows, cols = _window(coords, table_y - 0.012, table_y + 0.012), _window(coords, -0.8, 0.8)
    value[rows, cols] = 0.62

    # Ribs: bright arcs just inside the body wall, laterally and at the back (angles only on the thin band).
    band_y, band_x = np.nonzero((body_rho > 0.8) & (body_rho < 0.86))
    theta = np.arctan2((coords[band_y] - a.body_cy) / a.body_ry, coords[band_x] / a.body_rx)
    bone = np.zeros(len(band_y), dtype=bool)
    for index in range(a.n_ribs):
        centre = -0.2 + (math.pi + 0.4) * (index + 0.5) / a.n_ribs + rng.normal(0, 0.05)
        half_width = rng.uniform(0.08, 0.16)
        for mirrored in (centre, math.pi - centre):
            bone |= np.abs((theta - mirrored + math.pi) % (2 * math.pi) - math.pi) < half_width
    value[band_y[bone], band_x[bone]] = 1.0
    # Sternum at the front, spine at the back.
    spine_y = a.body_cy + 0.62 * a.body_ry
    _fill_ellipse(value, coords, 0.0, a.body_cy - 0.9 * a.body_ry, 0.07, 0.035, 1.0)
    _fill_ellipse(value, coords, 0.0, spine_y, 0.11, 0.09, 1.0)
    _fill_ellipse(value, coords, 0.0, spine_y + 0.12, 0.045, 0.04, 0.8)  # spinal canal
    _fill_ellipse(value, coords, 0.0, spine_y + 0.23, 0.03, 0.07, 1.0)  # spinous process

    # Lungs: superellipses with harmonic wobble, small at apex and base, notched by the heart lower down.
    # Computed only inside each lung's bounding box.
    profile = 0.55 + 0.45 * math.sin(math.pi * min(max(z, 0.0), 1.0)) ** 0.6
    lung_rx, lung_ry = a.lung_rx * profile, a.lung_ry * (0.75 + 0.25 * profile)
    heart_scale = 0.4 + 0.6 * (max(0.0, math.sin(math.pi * (z - 0.25) / 0.85)) if z > 0.25 else 0.0)
    heart_rx, heart_ry, heart_y = a.heart_rx * heart_scale, a.heart_ry * heart_scale, a.lung_cy - 0.12
    mediastinum = 0.06 + 0.05 * profile
    lung_mask = np.zeros((size, size), dtype=bool)
    local_x = np.zeros((size, size), dtype=np.float32)  # lung-local coordinates (for lesions)
    local_y = np.zeros((size, size), dtype=np.float32)
    side_of = np.zeros((size, size), dtype=np.float32)
    reach = 1.0 + 3 * 0.05 + 0.01  # the wobble adds at most 3 x 0.05 to the unit radius
    for lung_index, side in enumerate((-1.0, 1.0)):
        rows = _window(coords, a.lung_cy - reach * lung_ry, a.lung_cy + reach * lung_ry)
        cols = _window(coords, side * a.lung_cx - reach * lung_rx, side * a.lung_cx + reach * lung_rx)
        bu, bv = u[:, cols], v[rows, :]
        lx = (bu - side * a.lung_cx) / lung_rx
        ly = (bv - a.lung_cy) / lung_ry
        angle = np.arctan2(ly, lx * side)
        wobble = np.float32(1.0)
        harmonics = a.lung_harmonics[lung_index]
        for k in range(3):
            wobble = wobble + np.float32(harmonics[2 * k]) * np.cos((k + 2) * angle + np.float32(harmonics[2 * k + 1]))
        p = a.lung_exponent
        inside = (np.abs(lx) ** p + np.abs(ly) ** p) <= wobble**p
        inside &= body_rho[rows, cols] < 0.78
        inside &= ((bu - 0.06) / heart_rx) ** 2 + ((bv - heart_y) / heart_ry) ** 2 > 1.0
        inside &= np.abs(bu) >= mediastinum
        inside &= (bu / 0.16) ** 2 + ((bv - spine_y) / 0.14) ** 2 > 1.0  # the spine keeps the lungs apart behind
        lung_mask[rows, cols] |= inside
        local_x[rows, cols] = np.where(inside, lx, local_x[rows, cols])
        local_y[rows, cols] = np.where(inside, ly, local_y[rows, cols])
        side_of[rows, cols] = np.where(inside, np.float32(side), side_of[rows, cols])
    if lung_mask.sum() < 50:
        raise ValueError(f"slice too small for lungs at size {size}; use size >= 32")
    # Dependent density: lung a little brighter toward the back.
    value[lung_mask] = (0.2 + 0.03 * (local_y[lung_mask] + 1.0)).astype(np.float32)

    # Lesions: quantile-thresholded smooth field inside the lungs.
    infection_mask = np.zeros((size, size), dtype=bool)
    lesion = np.zeros((size, size), dtype=np.float32)
    if infection > 0:
        lx, ly, sides = local_x[lung_mask], local_y[lung_mask], side_of[lung_mask]
        field = 0.5 * np.sqrt(lx**2 + ly**2) + 0.25 * ly  # peripheral, posterior bias
        for side, sx, sy, sz, sigma_xy, sigma_z, weight in a.lesion_seeds:
            reach = math.exp(-0.5 * ((z - sz) / sigma_z) ** 2) * weight
            on_side = sides == side
            field += on_side * (2.0 * reach) * np.exp(-0.5 * ((lx - sx) ** 2 + (ly - sy) ** 2) / sigma_xy**2)
        texture = _smooth_noise(rng, size, max(4, size // 24))[lung_mask]
        field = field + 0.35 * texture
        field = (field - field.mean()) / (field.std() + 1e-6)
        threshold = np.quantile(field, 1.0 - infection) if infection < 1.0 else -np.inf
        infected = field > threshold
        infection_mask[lung_mask] = infected
        edge = 0.12  # soft edge width, in field standard deviations
        haze = _sigmoid((field - threshold) / edge) * (1.0 + 0.3 * _smooth_noise(rng, size, size // 6)[lung_mask])
        lesion_value = a.ggo_amplitude * np.clip(haze, 0.0, 1.3)
        if a.consolidation_share > 0 and infected.any():
            core = np.quantile(field[infected], 1.0 - a.consolidation_share)
            lesion_value += a.consolidation_amplitude * _sigmoid((field - core) / edge)
        lesion[lung_mask] = lesion_value

    # Vessels: small bright blobs and short lines, denser toward the hilum; visible through ground glass.
    vessels = np.zeros((size, size), dtype=np.float32)
    ys, xs = np.nonzero(lung_mask)
    n_vessels = int(20 + 35 * profile)
    if len(xs):
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
    value = np.where(lung_mask, np.maximum(value + lesion, value + vessels), value)

    # Scanner look: per-subject window, noise, black outside the field of view.
    image = a.offset + a.gain * value + rng.normal(0.0, a.noise_sigma, (size, size)).astype(np.float32)
    image[(u**2 + v**2) > 1.0] = 0.0
    image_u8 = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return image_u8, lung_mask, infection_mask


def infection_percentage(lung_mask: np.ndarray, infection_mask: np.ndarray) -> float:
    """The challenge label: 100 x infected lung area / lung area, rounded to a whole number like the real labels."""
    return float(np.rint(100.0 * np.count_nonzero(infection_mask & lung_mask) / np.count_nonzero(lung_mask)))


# --------------------------------------------------------------------------------------------------------------
# The data set
# --------------------------------------------------------------------------------------------------------------
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
    # Severities are stratified within each split (healthy share, then lognormal quantiles of a shuffled even grid),
    # so even a small set has the intended label distribution instead of a lucky or unlucky draw of the heavy tail.
    split_of = ["Train"] * n_train + ["Val"] * n_val + ["Test"] * n_test
    severities = np.zeros(subjects)
    normal = NormalDist()
    start = 0
    for split, count in (("Train", n_train), ("Val", n_val), ("Test", n_test)):
        if count == 0:
            continue
        n_healthy = int(round(HEALTHY_SHARE * count)) if split != "Train" else max(1, int(round(HEALTHY_SHARE * count)))
        n_covid = count - n_healthy
        grid = (rng.permutation(n_covid) + rng.random(n_covid)) / max(n_covid, 1)
        covid = [min(0.97, math.exp(SEVERITY_LOG_MEDIAN + SEVERITY_LOG_SIGMA * normal.inv_cdf(q))) for q in grid]
        severities[start : start + count] = rng.permutation(np.array([0.0] * n_healthy + covid))
        start += count
    low, high = slices_per_subject
    plan_subjects, plan_slices = [], []
    for subject in range(subjects):
        split = split_of[subject]
        severity = float(severities[subject])
        n_slices = int(rng.integers(low, high + 1))
        z = np.sort(rng.uniform(*Z_RANGE, n_slices))
        centre, width = rng.uniform(0.45, 0.85), rng.uniform(0.35, 0.7)
        bell = np.clip(1.0 - ((z - centre) / width) ** 2, 0.0, None)
        targets = np.clip(severity * bell * np.exp(rng.normal(0.0, SLICE_JITTER_SIGMA, n_slices)), 0.0, 1.0)
        plan_subjects.append({"subject": subject, "split": split, "severity": severity, "seed": [seed, 1, subject]})
        for index in range(n_slices):
            plan_slices.append(
                {
                    "split": split,
                    "subject": subject,
                    "z": float(z[index]),
                    "infection": float(targets[index]),
                    "seed": [seed, 2, subject, index],
                }
            )
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
    with open(path, "w", newline="") as handle:
        handle.write("".join(f"{name},{percentage:.1f},{subject}\r\n" for name, percentage, subject in rows))


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
    low, high = slices_per_subject
    if subjects < 1 or not 1 <= low <= high:
        raise ValueError(
            f"need subjects >= 1 and 1 <= slices_per_subject[0] <= [1], got {subjects}, {slices_per_subject}"
        )
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1):
        raise ValueError(f"val_fraction and test_fraction must be in [0, 1), got {val_fraction}, {test_fraction}")
    if image_mode not in ("L", "RGBA"):
        raise ValueError(f"image_mode must be 'L' or 'RGBA', got {image_mode!r}")
    out = Path(out_dir)
    parameters = {
        "format": FORMAT_VERSION,
        "subjects": subjects,
        "size": size,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "slices_per_subject": [low, high],
        "image_mode": image_mode,
    }
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder holds nothing to lose: fill it
    if out.exists():
        manifest = out / MANIFEST
        existing = json.loads(manifest.read_text()) if manifest.is_file() else None
        if existing is not None and existing["parameters"] == parameters and not force:
            return existing
        if not force:
            what = "a phantom set with other parameters" if existing else "not a complete phantom set"
            raise FileExistsError(f"{out} exists and is {what}; pass force=True (--force) to replace it")

    started = time.perf_counter()
    plan_subjects, plan_slices = plan_phantoms(subjects, seed, val_fraction, test_fraction, (low, high))
    splits = [s for s in ("Train", "Val", "Test") if any(e["split"] == s for e in plan_slices)]
    temporary = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        for split in splits:
            (temporary / split / "Images").mkdir(parents=True)
        (temporary / "labels").mkdir()
        subject_of = {s["subject"]: s for s in plan_subjects}
        jobs = [(entry, subject_of[entry["subject"]], size, image_mode, str(temporary)) for entry in plan_slices]
        workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
        if workers > 1 and len(jobs) > 8:
            import multiprocessing

            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with multiprocessing.get_context(method).Pool(workers) as pool:
                labels = dict(pool.imap_unordered(_render_job, jobs, chunksize=4))
        else:
            labels = dict(map(_render_job, jobs))
        for entry in plan_slices:
            entry["percentage"] = labels[entry["name"]]
        for split in splits:
            rows = [(e["name"], e["percentage"], e["subject"]) for e in plan_slices if e["split"] == split]
            target = temporary / ("Train/Train.csv" if split == "Train" else f"labels/{split}.csv")
            _write_labels(target, rows)
        percentages = np.array([e["percentage"] for e in plan_slices if e["split"] == "Train"])
        counts = {split: sum(e["split"] == split for e in plan_slices) for split in splits}
        summary = {
            "parameters": parameters,
            "counts": counts,
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
        (temporary / "README.md").write_text(_readme(parameters, counts))
        (temporary / MANIFEST).write_text(json.dumps(summary))  # written last: marks the set complete
        if out.exists():  # force: swap the old set out, then delete it
            retired = out.with_name(f"{out.name}.old-{os.getpid()}")
            os.replace(out, retired)
            os.replace(temporary, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
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
