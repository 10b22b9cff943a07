"""utils.data: label CSVs, split discovery, image decoding of every mode/format, the decoded-image cache."""
from __future__ import annotations

import csv
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from utils import data, files
from utils.data import DataError, DataNotFoundError

SAMPLE_NAMES = [f"Image_{i:04d}.png" for i in range(20)] + ["Image_0292.png"]


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def gray_pattern(height: int = 40, width: int = 48, seed: int = 0) -> np.ndarray:
    """A gray test image with structure (gradient + noise) so resizing and modes are checked on real content."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width)[None, :] * np.linspace(0.3, 1.0, height)[:, None]
    return np.clip(ramp + rng.normal(0, 20, (height, width)), 0, 255).astype(np.uint8)


def save_gray(path: Path, gray: np.ndarray, mode: str = "L") -> Path:
    """Save a gray image in one PIL mode (gray content kept exact for every lossless mode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(gray, mode="L")
    if mode == "RGB":
        image = Image.fromarray(np.stack([gray] * 3, axis=2), mode="RGB")
    elif mode == "RGBA":
        image = Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 255)]), mode="RGBA")
    elif mode == "LA":
        image = Image.fromarray(np.dstack([gray, np.full_like(gray, 255)]), mode="LA")
    elif mode == "I;16":
        image = Image.fromarray(gray.astype(np.uint16) * 257)  # 16-bit gray, same levels scaled to 0..65535
    elif mode == "P":
        image = image.convert("P")
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, quality=95)
    else:
        image.save(path)
    return path


def write_csv(path: Path, rows: list[str], newline: str = "\r\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(row + newline for row in rows).encode())
    return path


def make_split(root: Path, split: str, names: list[str], labels: dict[str, float] | None, *,
               images_sub: str | None = "Images", csv_name: str | None = None, subject: int = 0) -> Path:
    """A split folder with small gray PNGs (+ a label CSV when `labels`)."""
    folder = root / split / images_sub if images_sub else root / split
    for index, name in enumerate(names):
        save_gray(folder / name, gray_pattern(seed=index))
    if labels is not None:
        write_csv(root / split / (csv_name or f"{split}.csv"), [f"{n},{p:.1f},{subject}" for n, p in labels.items()])
    return folder


# ---------------------------------------------------------------------------------------------------------------
# read_labels
# ---------------------------------------------------------------------------------------------------------------
def test_read_labels_official_format(tmp_path):
    rows = ["Image_0001.png,12.0,3", "Image_0000.png,0.0,3", "Image_0002.png,100.0,4"]
    path = write_csv(tmp_path / "Train.csv", rows)
    frame = data.read_labels(path)
    assert frame.columns.tolist() == ["name", "percentage", "subject"]
    assert frame["name"].tolist() == ["Image_0001.png", "Image_0000.png", "Image_0002.png"]
    assert frame["percentage"].tolist() == [12.0, 0.0, 100.0]
    assert frame["percentage"].dtype == np.float64
    assert str(frame["subject"].dtype) == "Int64" and frame["subject"].tolist() == [3, 3, 4]


def test_read_labels_header_lf_and_two_columns(tmp_path):
    with_header = write_csv(tmp_path / "a.csv", ["name,percentage,subject", "x.png,5.5,1"], newline="\n")
    frame = data.read_labels(with_header)
    assert frame["name"].tolist() == ["x.png"] and frame["percentage"].tolist() == [5.5]
    two_columns = write_csv(tmp_path / "b.csv", ["Image,Label", "x.png,7", "y.png,0.0", ""], newline="\n")
    frame = data.read_labels(two_columns)
    assert frame["name"].tolist() == ["x.png", "y.png"] and frame["percentage"].tolist() == [7.0, 0.0]
    assert frame["subject"].isna().all() and str(frame["subject"].dtype) == "Int64"


def test_read_labels_real_train_csv(shared_dir):
    frame = data.read_labels(shared_dir / "Train.csv")
    with open(shared_dir / "Train.csv", newline="") as handle:
        rows = list(csv.reader(handle))  # independent parse
    assert len(frame) == len(rows) == 3054
    assert frame["name"].tolist() == [r[0] for r in rows]
    np.testing.assert_array_equal(frame["percentage"].to_numpy(), [float(r[1]) for r in rows])
    assert frame["subject"].tolist() == [int(r[2]) for r in rows]
    assert frame["subject"].nunique() == 132


@pytest.mark.parametrize(
    "rows, row_number, fragment",
    [
        (["a.png,1.0,0", "b.png,abc,0"], 2, "not a number"),
        (["a.png,1.0,0", "b.png,100.5,0"], 2, "not in [0, 100]"),
        (["a.png,-1,0"], 1, "not in [0, 100]"),
        (["a.png,1.0,0", "b.png,nan,0"], 2, "not in [0, 100]"),
        (["a.png,1.0,0", "b.png,2.0,0", "a.png,3.0,1"], 3, "duplicate name"),
        (["a.png,1.0,0", "b.png,2.0,0,9"], 2, "columns"),
        (["a.png,1.0,0", "b.png,2.0"], 2, "columns"),
        (["a.png"], 1, "columns"),
        (["a.png,1.0,0", "b.png,2.0,x"], 2, "subject"),
        (["a.png,1.0,0", ",2.0,0"], 2, "empty image name"),
    ],
)
def test_read_labels_errors_name_file_and_row(tmp_path, rows, row_number, fragment):
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError) as info:
        data.read_labels(path)
    message = str(info.value)
    assert str(path) in message and f"row {row_number}" in message and fragment in message


def test_read_labels_empty_and_missing(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"\r\n")
    with pytest.raises(DataError, match="empty"):
        data.read_labels(empty)
    header_only = write_csv(tmp_path / "h.csv", ["name,percentage,subject"])
    with pytest.raises(DataError, match="no data rows"):
        data.read_labels(header_only)
    with pytest.raises(FileNotFoundError):
        data.read_labels(tmp_path / "nope.csv")


# ---------------------------------------------------------------------------------------------------------------
# load_image
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "I;16"])
def test_load_image_lossless_modes_give_the_gray_levels(tmp_path, mode):
    gray = gray_pattern(32, 32)
    path = save_gray(tmp_path / "x.png", gray, mode)
    one = data.load_image(path, 32, 1)
    assert one.dtype == np.uint8 and one.shape == (32, 32, 1)
    np.testing.assert_array_equal(one[:, :, 0], gray)
    three = data.load_image(path, 32, 3)
    assert three.shape == (32, 32, 3)
    for channel in range(3):
        np.testing.assert_array_equal(three[:, :, channel], gray)


def test_load_image_palette_and_jpeg(tmp_path):
    gray = gray_pattern(32, 32)
    palette = save_gray(tmp_path / "p.png", gray, "P")
    expected = np.asarray(Image.open(palette).convert("RGBA").convert("L"))
    np.testing.assert_array_equal(data.load_image(palette, 32, 1)[:, :, 0], expected)
    for suffix in (".jpg", ".JPEG"):
        jpeg = save_gray(tmp_path / f"j{suffix}", gray, "RGB")
        decoded = data.load_image(jpeg, 32, 1)[:, :, 0].astype(int)
        assert np.abs(decoded - gray.astype(int)).mean() < 6  # lossy, but the same picture


def test_load_image_resizes_with_pil_bilinear(tmp_path):
    gray = gray_pattern(40, 48)
    path = save_gray(tmp_path / "x.png", gray, "RGB")
    expected = np.asarray(Image.fromarray(gray).resize((24, 24), Image.BILINEAR))
    np.testing.assert_array_equal(data.load_image(path, 24, 1)[:, :, 0], expected)
    up = np.asarray(Image.fromarray(gray).resize((64, 64), Image.BILINEAR))
    np.testing.assert_array_equal(data.load_image(path, 64, 3)[:, :, 1], up)


def test_load_image_real_rgba_slice(shared_dir):
    path = shared_dir / "sample_slices" / "Image_0292.png"
    with Image.open(path) as image:
        assert image.mode == "RGBA" and image.size == (512, 512)
        rgb = np.asarray(image, dtype=np.float64)[:, :, :3]
    luminance = np.floor(rgb @ np.array([299, 587, 114]) / 1000 + 0.5)  # ITU-R 601, as PIL rounds
    loaded = data.load_image(path, 512, 3)
    assert loaded.shape == (512, 512, 3)
    assert np.abs(loaded[:, :, 0].astype(int) - luminance.astype(int)).max() <= 1
    np.testing.assert_array_equal(loaded[:, :, 0], loaded[:, :, 2])
    small = data.load_image(path, 128, 1)
    assert small.shape == (128, 128, 1)
    block_mean = loaded[:, :, 0].reshape(128, 4, 128, 4).mean(axis=(1, 3))
    assert np.abs(small[:, :, 0] - block_mean).mean() < 3  # a downscale of the same picture


def test_load_image_rejects_truncated_and_garbage(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(gray_pattern(64, 64)).save(buffer, format="PNG")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(DataError, match="cut.png"):
        data.load_image(truncated, 32, 1)
    garbage = tmp_path / "junk.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="junk.png"):
        data.load_image(garbage, 32, 1)
    with pytest.raises(FileNotFoundError):
        data.load_image(tmp_path / "missing.png", 32, 1)
    with pytest.raises(ValueError, match="channels"):
        data.load_image(truncated, 32, 2)


# ---------------------------------------------------------------------------------------------------------------
# load_split
# ---------------------------------------------------------------------------------------------------------------
def test_load_split_real_sample_slices(shared_dir, tmp_path):
    """The real RGBA slices and their real Train.csv rows, in a tmp layout made of symlinks (never copied)."""
    images = tmp_path / "Train" / "Images"
    images.mkdir(parents=True)
    for name in SAMPLE_NAMES:
        (images / name).symlink_to(shared_dir / "sample_slices" / name)
    lines = (shared_dir / "Train.csv").read_bytes().split(b"\r\n")
    wanted = [line for line in lines if line.split(b",")[0].decode() in SAMPLE_NAMES]
    (tmp_path / "Train" / "Train.csv").write_bytes(b"\r\n".join(wanted) + b"\r\n")
    frame = data.load_split(tmp_path, "Train")
    assert frame["name"].tolist() == sorted(SAMPLE_NAMES)
    assert frame["percentage"].tolist() == [0.0] * 20 + [100.0]  # subject 0 is healthy, Image_0292 is 100%
    assert frame["subject"].tolist() == [0] * 20 + [5]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in frame["path"])
    assert data.load_split(tmp_path, "Val") is None and data.load_split(tmp_path, "Test") is None


@pytest.mark.parametrize("images_sub", [None, "Images", "slices"])
@pytest.mark.parametrize("csv_in_sub", [False, True])
def test_load_split_finds_images_and_csv(tmp_path, images_sub, csv_in_sub):
    names = ["Image_0002.png", "Image_0000.png", "Image_0001.png"]
    labels = {"Image_0002.png": 30.0, "Image_0000.png": 0.0, "Image_0001.png": 10.0}
    csv_name = "meta/labels.csv" if csv_in_sub else "Train.csv"
    make_split(tmp_path, "train", names, labels, images_sub=images_sub, csv_name=csv_name)
    frame = data.load_split(tmp_path, "Train")
    assert frame.columns.tolist() == ["name", "path", "percentage", "subject"]
    assert frame["name"].tolist() == sorted(names)
    assert frame["percentage"].tolist() == [0.0, 10.0, 30.0]
    folder = tmp_path / "train" / images_sub if images_sub else tmp_path / "train"
    assert frame["path"].tolist() == [str((folder / n).absolute()) for n in sorted(names)]


def test_load_split_unlabelled_val_and_case_insensitive_names(tmp_path):
    make_split(tmp_path, "TRAIN", ["a.png"], {"a.png": 1.0})
    make_split(tmp_path, "Validation", ["v2.PNG", "v1.jpg"], None, images_sub=None)
    (tmp_path / "Validation" / "notes.txt").write_text("stray non-image file")
    (tmp_path / "Validation" / ".DS_Store").write_bytes(b"\0")
    frame = data.load_split(tmp_path, "val")
    assert frame["name"].tolist() == ["v1.jpg", "v2.PNG"]
    assert frame["percentage"].isna().all() and frame["subject"].isna().all()
    assert data.load_split(tmp_path, "Test") is None


def test_load_split_explicit_paths_and_several_csvs(tmp_path):
    make_split(tmp_path, "Train", ["a.png", "b.png"], {"a.png": 1.0, "b.png": 2.0})
    write_csv(tmp_path / "Train" / "other.csv", ["a.png,50.0,0", "b.png,60.0,0"])
    assert data.load_split(tmp_path, "Train")["percentage"].tolist() == [1.0, 2.0]  # Train.csv wins by name
    frame = data.load_split(tmp_path, "Train", labels_csv=tmp_path / "Train" / "other.csv")
    assert frame["percentage"].tolist() == [50.0, 60.0]
    frame = data.load_split(tmp_path / "elsewhere", "Test", images_dir=tmp_path / "Train" / "Images")
    assert frame["name"].tolist() == ["a.png", "b.png"] and frame["percentage"].isna().all()
    (tmp_path / "Train" / "Train.csv").unlink()
    write_csv(tmp_path / "Train" / "Images" / "third.csv", ["a.png,1.0,0", "b.png,2.0,0"])
    with pytest.raises(DataError, match="several label CSVs"):
        data.load_split(tmp_path, "Train")


def test_load_split_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="no Train folder"):
        data.load_split(tmp_path, "Train")
    make_split(tmp_path, "Train", ["a.png", "b.png"], {"a.png": 1.0, "b.png": 2.0})
    (tmp_path / "Val").mkdir()
    with pytest.raises(DataError, match="no .png/.jpg images"):
        data.load_split(tmp_path, "Val")
    (tmp_path / "Test" / "Images").mkdir(parents=True)
    with pytest.raises(DataError, match="no .png/.jpg images"):
        data.load_split(tmp_path, "Test")
    with pytest.raises(DataNotFoundError, match="no label CSV"):
        data.load_split(tmp_path, "Val", images_dir=tmp_path / "Train" / "Images", require_labels=True)
    with pytest.raises(ValueError, match="unknown split"):
        data.load_split(tmp_path, "holdout")


def test_load_split_label_image_mismatch(tmp_path):
    names = [f"Image_{i:04d}.png" for i in range(8)]
    make_split(tmp_path, "Train", names[:2], dict.fromkeys(names, 0.0))
    with pytest.raises(DataError) as info:
        data.load_split(tmp_path, "Train")
    assert "6 labelled slice(s) have no image" in str(info.value)
    assert "Image_0002.png, Image_0003.png, Image_0004.png, Image_0005.png, Image_0006.png, ..." in str(info.value)
    other = tmp_path / "other"
    make_split(other, "Train", names, dict.fromkeys(names[:5], 0.0))
    with pytest.raises(DataError, match=r"3 image\(s\) have no row .*Image_0005.png"):
        data.load_split(other, "Train")


def test_load_split_ambiguous_image_folders(tmp_path):
    make_split(tmp_path, "Train", ["a.png"], {"a.png": 1.0})
    save_gray(tmp_path / "Train" / "More" / "b.png", gray_pattern())
    with pytest.raises(DataError, match="images_dir"):
        data.load_split(tmp_path, "Train")


# ---------------------------------------------------------------------------------------------------------------
# cached_images
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def small_split(tmp_path) -> pd.DataFrame:
    names = [f"Image_{i:04d}.png" for i in range(6)]
    folder = tmp_path / "data" / "Train" / "Images"
    modes = ["L", "RGB", "RGBA", "LA", "I;16", "P"]
    for index, (name, mode) in enumerate(zip(names, modes)):
        save_gray(folder / name, gray_pattern(40 + index, 48, seed=index), mode)
    write_csv(tmp_path / "data" / "Train" / "Train.csv", [f"{n},{i}.0,{i // 2}" for i, n in enumerate(names)])
    return data.load_split(tmp_path / "data", "Train")


def test_cached_images_match_load_image_and_are_read_only(small_split, tmp_path):
    cache = tmp_path / "cache"
    images = data.cached_images(small_split, cache, 16, 3, "Train")
    assert isinstance(images, np.memmap) and not images.flags.writeable
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8
    expected = np.stack([data.load_image(p, 16, 3) for p in small_split["path"]])
    np.testing.assert_array_equal(images, expected)
    files = sorted(p.name for p in cache.iterdir())  # the cache and its per-image digests
    assert len(files) == 2 and re.fullmatch(r"train_[0-9a-f]{8}_16px_3ch_[0-9a-f]{12}\.npy", files[0])
    assert files[1] == files[0] + data.DIGEST_SUFFIX
    parallel = data.cached_images(small_split, tmp_path / "cache2", 16, 3, "Train", num_workers=2)
    np.testing.assert_array_equal(parallel, expected)


def test_cached_images_reuse_and_invalidation(small_split, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = np.array(data.cached_images(small_split, cache, 16, 1, "Train"))
    other_size = data.cached_images(small_split, cache, 8, 1, "Train")  # another key, kept side by side
    assert other_size.shape == (6, 8, 8, 1)

    def refuse(*args, **kwargs):
        raise AssertionError("decoded again although the cache is valid")

    real_load_image = data.load_image
    monkeypatch.setattr(data, "load_image", refuse)
    np.testing.assert_array_equal(data.cached_images(small_split, cache, 16, 1, "Train"), first)

    # A changed source file (new content and modification time) makes a new cache and deletes the old one.
    calls = []

    def counting(path, size, channels):
        calls.append(path)
        return real_load_image(path, size, channels)

    monkeypatch.setattr(data, "load_image", counting)
    changed = Path(small_split["path"][2])
    save_gray(changed, np.full((40, 48), 7, dtype=np.uint8))
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    rebuilt = data.cached_images(small_split, cache, 16, 1, "Train")
    assert len(calls) == 6
    assert (rebuilt[2] == 7).all()
    np.testing.assert_array_equal(np.delete(np.asarray(rebuilt), 2, axis=0), np.delete(first, 2, axis=0))
    names = sorted(p.name for p in cache.glob("*.npy"))
    assert len(names) == 2 and sum("_16px_1ch_" in n for n in names) == 1
    assert len(list(cache.glob("*" + data.DIGEST_SUFFIX))) == 2  # the old cache's digests went with it

    # Only the modification time changed: rebuilt too (the key cannot see content without decoding).
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 9_000_000_000))
    data.cached_images(small_split, cache, 16, 1, "Train")
    assert len(calls) == 12


def test_caches_of_another_data_set_are_kept(small_split, tmp_path):
    cache = tmp_path / "cache"
    data.cached_images(small_split, cache, 16, 1, "Train")
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    moved = small_split.copy()
    moved["path"] = [str(shutil.copy(p, elsewhere)) for p in small_split["path"]]
    data.cached_images(moved, cache, 16, 1, "Train")  # same split/size/channels, another folder
    assert len(list(cache.glob("*.npy"))) == 2


def test_cached_images_follow_frame_order(small_split, tmp_path):
    reversed_frame = small_split.iloc[::-1].reset_index(drop=True)
    images = data.cached_images(reversed_frame, tmp_path / "cache", 16, 1, "Train")
    np.testing.assert_array_equal(images[0], data.load_image(reversed_frame["path"][0], 16, 1))


def test_cached_images_bad_input_leaves_no_file(small_split, tmp_path):
    cache = tmp_path / "cache"
    broken = Path(small_split["path"][4])
    broken.write_bytes(broken.read_bytes()[:60])  # truncated PNG
    with pytest.raises(DataError, match=broken.name):
        data.cached_images(small_split, cache, 16, 3, "Train")
    assert not cache.exists() or list(cache.iterdir()) == []
    broken.unlink()
    with pytest.raises(DataNotFoundError, match=broken.name):
        data.cached_images(small_split, cache, 16, 3, "Train")
    assert not cache.exists() or list(cache.iterdir()) == []
    with pytest.raises(DataError, match="empty"):
        data.cached_images(small_split.iloc[:0], cache, 16, 3, "Train")


def test_cached_images_ignore_stale_tmp(small_split, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    target = data.cache_path(small_split, cache, 16, 1, "Train")
    stale = target.with_name(f".{target.name}.tmp-{files.HOST}-999999999")  # a killed run's leftover (no such pid)
    stale.write_bytes(b"half written")
    mine = files.temp_path(target)
    mine.write_bytes(b"left over by this pid")
    images = data.cached_images(small_split, cache, 16, 1, "Train")
    assert images.shape == (6, 16, 16, 1)
    assert sorted(p.name for p in cache.iterdir()) == [target.name, target.name + data.DIGEST_SUFFIX]


# ---------------------------------------------------------------------------------------------------------------
# SliceDataset
# ---------------------------------------------------------------------------------------------------------------
def test_slice_dataset_items():
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)

    def to_tensor(image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32))

    labelled = data.SliceDataset(images, np.array([12.0, 50.0]), to_tensor)
    assert len(labelled) == 2
    image, target = labelled[1]
    assert image.dtype == torch.float32 and image.shape == (3, 4, 4)
    torch.testing.assert_close(image, torch.from_numpy(images[1].transpose(2, 0, 1).astype(np.float32)))
    assert target.dtype == torch.float32 and target.ndim == 0 and target.item() == 50.0
    _, unknown = data.SliceDataset(images, None, to_tensor)[0]
    assert unknown.ndim == 0 and torch.isnan(unknown)
    with pytest.raises(ValueError):
        data.SliceDataset(images, np.zeros(3), to_tensor)
