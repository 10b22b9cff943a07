"""utils.phantoms: exact labels from the generator's own masks, official layout, atomic writes, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from utils import data, phantoms
from utils.phantoms import draw_anatomy, generate_phantoms, plan_phantoms, render_slice

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(subjects=8, size=64, seed=3, slices_per_subject=(2, 4))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("phantoms") / "set"
    return out, generate_phantoms(out, num_workers=1, **SMALL)


def test_render_slice_masks_and_label():
    anatomy = draw_anatomy(np.random.default_rng(0), severity=0.4)
    for infection in (0.0, 0.03, 0.25, 0.6, 1.0):
        image, lung, infected = render_slice(np.random.default_rng(1), 128, anatomy, z=0.55, infection=infection)
        assert image.dtype == np.uint8 and image.shape == (128, 128)
        assert lung.dtype == bool and infected.dtype == bool and lung.shape == infected.shape == (128, 128)
        assert not (infected & ~lung).any()  # lesions only inside the lungs
        share = infected.sum() / lung.sum()
        assert abs(share - infection) < 0.01  # the quantile threshold hits the target share
        label = phantoms.infection_percentage(lung, infected)
        assert label == round(100 * np.count_nonzero(infected) / np.count_nonzero(lung))
    assert 0.08 < lung.mean() < 0.35  # two lungs of plausible size


def test_render_slice_looks_like_ct():
    anatomy = draw_anatomy(np.random.default_rng(5), severity=0.5)
    image, lung, infected = render_slice(np.random.default_rng(6), 256, anatomy, z=0.6, infection=0.3)
    yy, xx = np.mgrid[:256, :256]
    outside = (xx + 0.5 - 128) ** 2 + (yy + 0.5 - 128) ** 2 > 128**2
    assert (image[outside] == 0).all()  # black outside the field of view
    healthy_lung = lung & ~infected
    assert np.median(image[healthy_lung]) < 90  # lungs are dark
    assert np.median(image[infected]) > np.median(image[healthy_lung]) + 25  # lesions are brighter
    body = image[100:160, 118:138]  # mediastinum: soft tissue
    assert np.median(body) > 170


def test_render_slice_deterministic():
    anatomy = draw_anatomy(np.random.default_rng(2))
    first = render_slice(np.random.default_rng(9), 96, anatomy, 0.4, 0.2)
    second = render_slice(np.random.default_rng(9), 96, anatomy, 0.4, 0.2)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        render_slice(np.random.default_rng(9), 96, anatomy, 0.4, 1.5)


def test_layout_and_csv_format(small_set):
    out, summary = small_set
    assert (out / "README.md").is_file() and (out / phantoms.MANIFEST).is_file()
    raw = (out / "Train" / "Train.csv").read_bytes()
    assert raw.endswith(b"\r\n") and b"\r\n" in raw and not raw.startswith(b"name")
    for line in raw.decode().split("\r\n")[:-1]:
        name, percentage, subject = line.split(",")
        assert name.startswith("Image_") and name.endswith(".png")
        assert percentage.endswith(".0") and float(percentage) == int(float(percentage))
        assert subject.isdigit()
    splits = {s: data.load_split(out, s) for s in data.SPLITS}
    assert splits["Train"]["percentage"].notna().all()
    assert splits["Val"]["percentage"].isna().all() and splits["Test"]["percentage"].isna().all()
    names = [n for s in splits.values() for n in s["name"]]
    assert len(names) == len(set(names)) == sum(summary["counts"].values())
    for split in ("Val", "Test"):
        answer = data.read_labels(out / "labels" / f"{split}.csv")
        assert answer["name"].tolist() == splits[split]["name"].tolist()
    subjects = {s: set(data.read_labels(out / p)["subject"]) for s, p in
                [("Train", "Train/Train.csv"), ("Val", "labels/Val.csv"), ("Test", "labels/Test.csv")]}
    assert not (subjects["Train"] & subjects["Val"]) and not (subjects["Train"] & subjects["Test"])
    assert not (subjects["Val"] & subjects["Test"])
    with Image.open(splits["Train"]["path"][0]) as image:
        assert image.mode == "L" and image.size == (64, 64)
    assert not list(out.parent.glob("*.tmp-*"))


def test_labels_recomputed_from_the_generators_own_masks(small_set):
    """Re-render every slice from the manifest's seeds: same pixels as the PNG, same label as the CSV."""
    out, summary = small_set
    labels = pd.concat(
        [data.read_labels(out / p) for p in ("Train/Train.csv", "labels/Val.csv", "labels/Test.csv")]
    ).set_index("name")
    subjects = {s["subject"]: s for s in summary["subjects"]}
    for entry in summary["slices"]:
        subject = subjects[entry["subject"]]
        anatomy = draw_anatomy(np.random.default_rng(subject["seed"]), severity=subject["severity"])
        image, lung, infected = render_slice(
            np.random.default_rng(entry["seed"]), 64, anatomy, z=entry["z"], infection=entry["infection"]
        )
        expected = float(np.rint(100.0 * infected.sum() / lung.sum()))
        assert labels.loc[entry["name"], "percentage"] == expected
        assert labels.loc[entry["name"], "subject"] == entry["subject"]
        png = np.asarray(Image.open(out / entry["split"] / "Images" / entry["name"]))
        np.testing.assert_array_equal(png, image)


def test_reuse_refuse_and_force(small_set, tmp_path):
    out, summary = small_set
    stamp = (out / phantoms.MANIFEST).stat().st_mtime_ns
    assert generate_phantoms(out, num_workers=1, **SMALL) == summary  # same parameters: reused, untouched
    assert (out / phantoms.MANIFEST).stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="force"):
        generate_phantoms(out, num_workers=1, **{**SMALL, "seed": 4})
    empty = tmp_path / "empty"
    empty.mkdir()
    generate_phantoms(empty, subjects=2, size=48, slices_per_subject=(1, 1), val_fraction=0, test_fraction=0)
    assert (empty / "Train" / "Train.csv").is_file() and not (empty / "Val").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone else's folder")
    for force in (False, True):  # a folder that is not a phantom set is never replaced, not even with force
        with pytest.raises(FileExistsError, match="is not a phantom set .*not this project's to replace"):
            generate_phantoms(foreign, subjects=3, size=48, force=force)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    replaced = generate_phantoms(empty, subjects=3, size=48, slices_per_subject=(1, 2), force=True, num_workers=2)
    assert (empty / "Train" / "Train.csv").is_file() and replaced["parameters"]["subjects"] == 3  # a phantom set
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "foreign"]  # no tmp or retired folders left


def test_killed_run_leaves_no_output(tmp_path, monkeypatch):
    def crash(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(phantoms, "_render_job", crash)
    with pytest.raises(KeyboardInterrupt):
        generate_phantoms(tmp_path / "set", subjects=3, size=48, num_workers=1)
    assert list(tmp_path.iterdir()) == []


def test_planned_label_distribution_is_shaped_like_train_csv():
    """Targets of a large plan (label = round(100 x target) up to the quantile's pixel granularity)."""
    _, slices = plan_phantoms(subjects=600, seed=0)
    labels = np.rint(100 * np.array([s["infection"] for s in slices]))
    zero_share, median, mean = np.mean(labels == 0), np.median(labels), labels.mean()
    # Real Train.csv: 24% zeros, median 6, mean 18.0, max 100.
    assert 0.17 < zero_share < 0.32 and 3 <= median <= 10 and 13 < mean < 24 and labels.max() >= 95
    per_subject = pd.Series([s["subject"] for s in slices]).value_counts()
    assert per_subject.min() >= 6 and per_subject.max() <= 14
    subjects, _ = plan_phantoms(subjects=600, seed=0)
    assert 0.05 < np.mean([s["severity"] == 0 for s in subjects]) < 0.12  # healthy subjects


def test_cli_small_run(tmp_path):
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "utils.phantoms", str(out), "--subjects", "3", "--size", "48",
               "--min-slices", "1", "--max-slices", "2", "--image-mode", "RGBA", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Train" in done.stdout
    manifest = json.loads((out / phantoms.MANIFEST).read_text())
    assert manifest["parameters"]["size"] == 48 and manifest["parameters"]["image_mode"] == "RGBA"
    first = sorted((out / "Train" / "Images").iterdir())[0]
    with Image.open(first) as image:
        assert image.mode == "RGBA" and image.size == (48, 48)
    refused = subprocess.run(command[:4] + ["--subjects", "4"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and "force" in refused.stderr


def test_force_keeps_the_old_set_when_the_final_rename_fails(tmp_path, monkeypatch):
    out = tmp_path / "set"
    old_summary = generate_phantoms(out, subjects=2, size=48, slices_per_subject=(1, 1), num_workers=1)
    real_replace = os.replace

    def failing_replace(source, target):
        if Path(target) == out and Path(source).name.startswith(".set.tmp-"):
            raise OSError("disk full")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        generate_phantoms(out, subjects=3, size=48, slices_per_subject=(1, 1), num_workers=1, force=True)
    assert json.loads((out / phantoms.MANIFEST).read_text()) == old_summary  # the old set is back in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no tmp or retired folders left
