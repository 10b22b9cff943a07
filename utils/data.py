"""Reading the Per-COVID-19 challenge data: label CSVs, split folders, slice images and a decoded-image cache.

The challenge (Bougourzi et al., J. Imaging 2021, 7(9):189, the dataset description) ships CT slices as
512x512 8-bit RGBA PNGs in `Train/`, `Val/` and `Test/` folders, with a headerless CRLF label file
`Image_0000.png,0.0,0` = slice name, infection percentage (0-100), subject (CT scan) id. The paper ("Revitalizing
regression tasks through modern training procedures", its method) feeds the slices, resized to the backbone's input
size, to ImageNet-pretrained CNNs; this module turns a download into `name, path, percentage, subject` frames and
uint8 image arrays for that.

Decoding 512x512 PNGs is the slow step of a CPU data pipeline, so `cached_images` decodes every slice of a split once
per (size, channels) into one `.npy` file that all folds, models and notebooks of a run share through a read-only
memmap. The cache is trusted by content, not by its size or date: the digests of every decoded image and of every
source file are written with it (`<cache>.digests.json`) and checked when a process first opens it; a cache that
differs, or whose source files changed (even under the same names, sizes and dates), is rebuilt. The same
per-image digests (`image_digests`) make the identity of what a fold was trained on (utils.train).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from utils import cli, csvfiles, files
from utils.csvfiles import IMAGE_EXTENSIONS  # noqa: F401 (part of this module's API)

log = logging.getLogger(__name__)

SPLITS = ("Train", "Val", "Test")

# Folder names accepted for each split (compared case-insensitively).
SPLIT_FOLDER_NAMES = {
    "Train": ("train", "training"),
    "Val": ("val", "valid", "validation"),
    "Test": ("test", "testing"),
}
# Bump when load_image's output for the same file changes, so old caches are not reused.
_CACHE_FORMAT_VERSION = "1"


class DataError(ValueError):
    """Bad or inconsistent input data; the message names the file/row and how to fix it."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A required folder or file is missing."""


# --------------------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------------------
def read_labels(csv_path: str | os.PathLike) -> pd.DataFrame:
    """Read a Per-COVID-19 label CSV into columns `name` (str), `percentage` (float), `subject` (Int64).

    The official file has no header, CRLF line ends and rows `Image_0000.png,0.0,0`; a header row, LF line ends and
    two-column files (`name,percentage`, subject <NA>) are accepted too (utils.csvfiles, the one CSV reader). Raises
    DataError naming the file and row for a non-numeric, NaN or out-of-range [0, 100] percentage, a non-integer
    subject, a duplicate name, a wrong column count or an empty file.
    """
    try:
        rows = csvfiles.read_name_value_rows(csv_path, value_name="percentage", example="Image_0000.png,0.0,0",
                                             range_hint="the label is 100 x infected lung area / lung area, "
                                                        "fix the value")
    except FileNotFoundError:
        raise DataNotFoundError(f"label file {csv_path} not found: pass the path of the split's label CSV") from None
    except csvfiles.CsvError as error:
        raise DataError(f"label file {error}") from None
    subjects: list[object] = [pd.NA] * len(rows.names)
    for index, text in enumerate(rows.subjects or []):
        value = float(text) if csvfiles.is_number(text) else math.nan
        if not math.isfinite(value) or value != int(value):
            raise DataError(f"label file {rows.where(index)}: subject {text!r} is not an integer id; write the CT "
                            "scan number, e.g. 7")
        subjects[index] = int(value)
    return pd.DataFrame({"name": pd.Series(rows.names, dtype=object),
                         "percentage": pd.Series(rows.values, dtype="float64"),
                         "subject": pd.array(subjects, dtype="Int64")})


# --------------------------------------------------------------------------------------------------------------
# Finding and reading a split
# --------------------------------------------------------------------------------------------------------------
def _canonical_split(split: str) -> str:
    for canonical, aliases in SPLIT_FOLDER_NAMES.items():
        if split.lower() == canonical.lower() or split.lower() in aliases:
            return canonical
    raise ValueError(f"unknown split {split!r}: use one of {SPLITS}")


def is_image_file(path: Path) -> bool:
    # Hidden files (macOS "._Image_0000.png" forks, ".DS_Store") are never slices.
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


# Files that sit beside slices without being slices: never worth a word.
_COMPANION_SUFFIXES = (".csv", ".txt", ".md", ".json", ".yaml", ".yml", ".zip", ".ipynb", ".py")


def check_image_names(paths: Sequence[Path]) -> None:
    """Every slice's name must fit the project's UTF-8 CSV files (a Linux name of arbitrary bytes may not)."""
    for path in paths:
        try:
            csvfiles.check_text(path.name)
        except csvfiles.CsvError as error:
            raise DataError(f"{path.parent}: {error}") from None


def warn_skipped(folder: Path, skipped: Sequence[Path]) -> None:
    """Name the files among the slices that the reader does not take (a .bmp, .tif, .dcm next to the PNGs)."""
    if skipped:
        shown = ", ".join(p.name for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        log.warning("%s: skipped %d file(s) that are not PNG/JPEG slices (%s); convert them to PNG to use them",
                    folder, len(skipped), shown)


def _image_files(folder: Path, warn: bool = False) -> list[Path]:
    entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in entries if is_image_file(p)]
    if warn:
        warn_skipped(folder, [p for p in entries if not is_image_file(p)
                              and p.suffix.lower() not in _COMPANION_SUFFIXES])
    check_image_names(images)
    return images


def images_below(folder: Path) -> tuple[list[Path], list[Path]]:
    """(images, other files) in `folder` and every folder below it, sorted: hidden files and folders (Jupyter's
    `.ipynb_checkpoints`, macOS forks) are never slices and are not entered; symlinked folders are followed, each
    real folder once (a link loop ends there)."""
    images: list[Path] = []
    others: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for top, subfolders, names in os.walk(folder, followlinks=True):
        status = os.stat(top)
        if (status.st_dev, status.st_ino) in seen:  # reached again through a link: walked already
            subfolders[:] = []
            continue
        seen.add((status.st_dev, status.st_ino))
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in names:
            path = Path(top) / name
            if not name.startswith(".") and path.is_file():
                (images if is_image_file(path) else others).append(path)
    return sorted(images), sorted(others)


def _visible_subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_split_dir(data_dir: str | os.PathLike, split: str) -> Path | None:
    """The folder of `split` inside `data_dir` (names matched case-insensitively), or None when there is none."""
    canonical = _canonical_split(split)
    root = Path(data_dir)
    if not root.is_dir():
        raise DataNotFoundError(f"data folder {root} not found: set data_dir (notebook parameter) or --data "
                                "(run_all.sh) to the folder that holds Train/ and Val/")
    matches = [p for p in _visible_subfolders(root) if p.name.lower() in SPLIT_FOLDER_NAMES[canonical]]
    if len(matches) > 1:
        raise DataError(
            f"{root} has several {canonical} folders ({', '.join(p.name for p in matches)}): keep one, or pass "
            f"images_dir/labels_csv explicitly"
        )
    return matches[0] if matches else None


def find_images_dir(split_dir: Path) -> Path | None:
    """The folder with the slices: `split_dir` itself or its only subfolder holding images; None when none has any."""
    candidates = [split_dir] if _image_files(split_dir) else []
    candidates += [p for p in _visible_subfolders(split_dir) if _image_files(p)]
    if len(candidates) > 1:
        raise DataError(
            f"{split_dir}: images found in several folders ({', '.join(str(p) for p in candidates)}); "
            f"pass images_dir= to say which holds the slices"
        )
    return candidates[0] if candidates else None


def find_labels_csv(split_dir: Path, split: str) -> Path | None:
    """The label CSV in `split_dir` or one level below, or None. Several CSVs: the one named like the split wins."""
    canonical = _canonical_split(split)
    found = sorted(p for p in split_dir.glob("*.csv") if not p.name.startswith("."))
    for sub in _visible_subfolders(split_dir):
        found += sorted(p for p in sub.glob("*.csv") if not p.name.startswith("."))
    if len(found) > 1:
        named = [p for p in found if p.stem.lower() in SPLIT_FOLDER_NAMES[canonical]]
        if len(named) == 1:
            return named[0]
        raise DataError(
            f"{split_dir}: several label CSVs ({', '.join(str(p) for p in found)}); pass labels_csv= to choose one"
        )
    return found[0] if found else None


def _named_by_file(labels: pd.DataFrame, labels_path: Path, image_dir: Path) -> pd.DataFrame:
    """Labels name slices by file name; a row that names a path (some tools write absolute ones) is taken by its
    file name when the path lies in the images folder (relative paths: from the CSV's folder), else refused."""
    paths = [name for name in labels["name"] if "/" in name]
    if not paths:
        return labels
    images = image_dir.resolve()
    renamed = {}
    for name in paths:
        path = Path(name)
        path = path if path.is_absolute() else labels_path.parent / path
        if path.parent.resolve() != images:
            raise DataError(f"{labels_path}: {name!r} is a path outside the images folder {image_dir}: name each "
                            f"slice by its file name (e.g. {path.name}), as the challenge's label files do")
        renamed[name] = path.name
    labels = labels.assign(name=labels["name"].map(lambda n: renamed.get(n, n)))
    twice = labels["name"][labels["name"].duplicated()].tolist()
    if twice:
        raise DataError(f"{labels_path}: {twice[0]!r} is labelled twice (once by its path, once by its name): keep "
                        "one row")
    return labels


def _first(names: Sequence[str], count: int = 5) -> str:
    shown = ", ".join(list(names)[:count])
    return shown + (", ..." if len(names) > count else "")


def load_split(
    data_dir: str | os.PathLike,
    split: str,
    images_dir: str | os.PathLike | None = None,
    labels_csv: str | os.PathLike | None = None,
    require_labels: bool | None = None,
) -> pd.DataFrame | None:
    """The slices of one split as a frame `name, path (absolute str), percentage (NaN without labels), subject`.

    Sorted by name. Folders are found inside `data_dir` (see `find_split_dir`, `find_images_dir`,
    `find_labels_csv`) unless `images_dir`/`labels_csv` are given (each independently). Returns None when an
    optional split (Val, Test) has no folder; a missing Train folder is an error. `require_labels` defaults to True
    for Train only. With labels, every CSV row needs its image and every image needs its row.
    """
    canonical = _canonical_split(split)
    if require_labels is None:
        require_labels = canonical == "Train"
    # With an explicit images_dir the data folder is optional (it may still hold the split's label CSV).
    split_dir = find_split_dir(data_dir, canonical) if images_dir is None or Path(data_dir).is_dir() else None
    if images_dir is None:
        if split_dir is None:
            if canonical == "Train":
                raise DataNotFoundError(
                    f"no Train folder in {data_dir}: expected {Path(data_dir) / 'Train'} with the slices and the "
                    f"label CSV (or pass images_dir= and labels_csv=)"
                )
            return None
        found_dir = find_images_dir(split_dir)
        if found_dir is None:
            raise DataError(f"{split_dir}: no .png/.jpg images in it or in its subfolders; add the {canonical} slices")
        image_dir = found_dir
    else:
        image_dir = Path(images_dir)
        if not image_dir.is_dir():
            raise DataNotFoundError(f"images folder {image_dir} not found")
    if labels_csv is None and split_dir is not None:
        labels_path = find_labels_csv(split_dir, canonical)
    else:
        labels_path = Path(labels_csv) if labels_csv is not None else None
    if labels_path is None and require_labels:
        raise DataNotFoundError(
            f"no label CSV for {canonical} in {split_dir or image_dir}: put {canonical}.csv (rows "
            f"'Image_0000.png,0.0,0') there or pass labels_csv="
        )

    files = {p.name: p for p in _image_files(image_dir, warn=True)}
    if not files:
        raise DataError(f"{image_dir}: no .png/.jpg images; add the {canonical} slices")
    if labels_path is not None:
        labels = _named_by_file(read_labels(labels_path), labels_path, image_dir)
        missing = [name for name in labels["name"] if name not in files]
        if missing:
            raise DataError(
                f"{labels_path}: {len(missing)} labelled slice(s) have no image in {image_dir} "
                f"({_first(missing)}); copy the images or remove those rows"
            )
        unlabelled = sorted(set(files) - set(labels["name"]))
        if unlabelled:
            raise DataError(
                f"{image_dir}: {len(unlabelled)} image(s) have no row in {labels_path} ({_first(unlabelled)}); "
                f"add their labels or move them out of the folder"
            )
        frame = labels.copy()
    else:
        frame = pd.DataFrame(
            {
                "name": pd.Series(sorted(files), dtype=object),
                "percentage": np.full(len(files), np.nan),
                "subject": pd.array([pd.NA] * len(files), dtype="Int64"),
            }
        )
    frame["path"] = [str(files[name].absolute()) for name in frame["name"]]
    frame = frame.sort_values("name", kind="stable").reset_index(drop=True)
    return frame[["name", "path", "percentage", "subject"]]


# --------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _to_luminance(image: Image.Image) -> Image.Image:
    """Grayscale (mode L) version of any PIL image; 16-bit/int/float modes are assumed to span 0..65535."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's convert("L") clips 16-bit values at 255 (a white image); scale the 16-bit range instead.
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "L":
        return image
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    # RGB/RGBA/LA/CMYK/1 -> L uses ITU-R 601 luminance and ignores alpha (alpha is all 255 in the challenge PNGs).
    return image.convert("L")


@contextlib.contextmanager
def open_image(path: str | os.PathLike) -> Iterator[Image.Image]:
    """Every image the project reads is opened here: a missing, empty, truncated or non-image file is a DataError
    naming the path (PIL's own errors never reach the user)."""
    try:
        with Image.open(path) as image:
            yield image
    except FileNotFoundError:
        raise DataNotFoundError(f"image {path} not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot decode image {path} ({error}); replace the file with a valid PNG/JPEG") from None


def image_header(path: str | os.PathLike) -> tuple[str, str, str | None]:
    """(size "WxH", mode, format) from the file header, without decoding the pixels."""
    with open_image(path) as image:
        return f"{image.size[0]}x{image.size[1]}", image.mode, image.format


def load_gray(path: str | os.PathLike) -> np.ndarray:
    """A slice as the gray uint8 (H, W) image the project sees, at its own size (for figures and saliency maps)."""
    with open_image(path) as image:
        image.load()
        return np.asarray(_to_luminance(image), dtype=np.uint8)


def load_image(path: str | os.PathLike, size: int, channels: int) -> np.ndarray:
    """Decode one slice to uint8 (size, size, channels): grayscale luminance, bilinear resize, gray replicated to 3.

    CT slices are grayscale whatever their file mode (the challenge PNGs are RGBA with R=G=B), so every image goes
    to L first and is replicated when `channels` is 3. Unreadable or truncated files raise DataError naming the path.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    with open_image(path) as image:
        image.load()  # decode now: a truncated file raises here instead of yielding a half image
        gray = _to_luminance(image)
    if gray.size != (size, size):
        gray = gray.resize((size, size), Image.BILINEAR)  # PIL's bilinear widens its kernel when downscaling
    array = np.asarray(gray, dtype=np.uint8)
    if channels == 3:
        return np.repeat(array[:, :, None], 3, axis=2)
    return array[:, :, None].copy()


# --------------------------------------------------------------------------------------------------------------
# Decoded-image cache
# --------------------------------------------------------------------------------------------------------------
def _cache_key(frame: pd.DataFrame) -> str:
    digest = hashlib.sha1(f"format={_CACHE_FORMAT_VERSION}\n".encode())
    for name, path in zip(frame["name"], frame["path"]):
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise DataNotFoundError(f"image {path} not found (listed for slice {name})") from None
        digest.update(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def _split_tag(split: str) -> str:
    tag = re.sub(r"[^A-Za-z0-9]+", "-", split).strip("-").lower()
    if not tag:
        raise ValueError(f"split name {split!r} has no letters or digits; use e.g. 'train'")
    return tag


def _source_tag(frame: pd.DataFrame) -> str:
    """Short hash of the folders the images live in: caches of different data sets never evict each other."""
    folders = sorted({str(Path(path).resolve().parent) for path in frame["path"]})
    return hashlib.sha1("\n".join(folders).encode()).hexdigest()[:8]


def cache_path(frame: pd.DataFrame, cache_dir: str | os.PathLike, size: int, channels: int, split: str) -> Path:
    """Where `cached_images` keeps the frame's decoded images:
    `<split>_<source folders hash>_<size>px_<channels>ch_<content hash>.npy`."""
    return Path(cache_dir) / (f"{_split_tag(split)}_{_source_tag(frame)}_{size}px_{channels}ch_"
                              f"{_cache_key(frame)}.npy")


def _decode_job(job: tuple[str, int, int]) -> np.ndarray:
    path, size, channels = job
    return load_image(path, size, channels)


def _iterate_decoded(paths: list[str], size: int, channels: int, num_workers: int) -> Iterable[np.ndarray]:
    jobs = [(path, size, channels) for path in paths]
    if num_workers <= 0 or len(jobs) < 2:
        for job in jobs:
            yield _decode_job(job)
        return
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    # cli.worker_init: the pool's exit stops its workers with SIGTERM, quietly (no `Terminated` traceback)
    with multiprocessing.get_context(method).Pool(num_workers, initializer=cli.worker_init) as pool:
        chunk = max(1, min(32, len(jobs) // (4 * num_workers)))
        yield from pool.imap(_decode_job, jobs, chunksize=chunk)  # imap keeps frame order


DIGEST_SUFFIX = ".digests.json"
_verified: dict[tuple, list[str]] = {}  # (cache path, size, mtime, inode) -> its checked per-image digests


def digest_rows(images: np.ndarray | Sequence[np.ndarray]) -> list[str]:
    """One short SHA-256 per image (its uint8 pixels and shape): ~1.6 GB/s here, ~1 % of decoding the images."""
    digests = []
    for image in images:
        image = np.ascontiguousarray(image)
        digest = hashlib.sha256(f"{image.shape}".encode())
        digest.update(image.data)
        digests.append(digest.hexdigest()[:32])
    return digests


def _digest_file(cache: Path) -> Path:
    return cache.with_name(cache.name + DIGEST_SUFFIX)


def source_digests(paths: Sequence[str]) -> list[str]:
    """One short SHA-256 per source file's bytes (0.11 s for the 2805 real crops here, files in the page cache; decoding
    them takes 3.1-3.6 s)."""
    digests = []
    for path in paths:
        with open(path, "rb") as handle:
            digests.append(files.stream_digest(handle)[:32])
    return digests


def _checked_cache(target: Path, names: Sequence[str], paths: Sequence[str], shape: tuple) -> np.ndarray | None:
    """The cache at `target` if it holds what its digests say, the decoded pixels and the source files both (checked
    once per process and file version), else None (missing, unreadable, or changed since it was written, or its
    sources changed under the same names, sizes and dates: rebuilt by the caller)."""
    if not target.is_file():
        return None
    try:
        cached = np.load(target, mmap_mode="r")
        recorded = json.loads(_digest_file(target).read_text())
    except (OSError, ValueError):
        return None  # unreadable, or written before digests were kept: rebuilt
    if cached.shape != shape or cached.dtype != np.uint8 or recorded.get("names") != list(names):
        return None
    stat = target.stat()
    key = (str(target), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _verified:
        actual = digest_rows(cached)
        changed = [i for i, (a, b) in enumerate(zip(actual, recorded["digests"])) if a != b]
        if changed or len(actual) != len(recorded["digests"]):
            log.warning("decoded-image cache %s differs from its digests (%d image(s) changed since it was written, "
                        "e.g. %s): rebuilding it", target, len(changed), ", ".join(names[i] for i in changed[:3]))
            return None
        sources = source_digests(paths)
        moved = [i for i, (a, b) in enumerate(zip(sources, recorded.get("sources", []))) if a != b]
        if moved or len(sources) != len(recorded.get("sources", [])):
            log.info("%d source image(s) changed under the same name, size and date since %s was decoded (e.g. %s): "
                     "decoding again", len(moved) or len(sources), target.name,
                     ", ".join(names[i] for i in (moved or range(len(names)))[:3]))
            return None
        _verified[key] = actual
    _register(cached, _verified[key])
    return cached


_digests_of: dict[str, list[str]] = {}  # memmap file -> its checked digests (image_digests)


def _register(images: np.ndarray, digests: list[str]) -> None:
    if isinstance(images, np.memmap) and images.filename:
        _digests_of[str(Path(images.filename).resolve())] = digests


def image_digests(images: np.ndarray | RowSubset | RowConcat) -> list[str]:
    """Per-image digests: those checked with a cache (no second pass), else computed from the pixels."""
    if isinstance(images, (RowSubset, RowConcat)):
        return images.row_digests()
    if isinstance(images, np.memmap) and images.filename:
        known = _digests_of.get(str(Path(images.filename).resolve()))
        if known is not None and len(known) == len(images):
            return known
    return digest_rows(images)


def cached_images(
    frame: pd.DataFrame,
    cache_dir: str | os.PathLike,
    size: int,
    channels: int,
    split: str,
    num_workers: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """All images of `frame` (column `path`), decoded by `load_image`, as a read-only uint8 memmap (N, size, size, C).

    Rows follow the frame's order. The cache file is keyed by split, size, channels and a hash of the slices' names,
    byte sizes and modification times, so it is rebuilt only when a source file changes and is shared by every
    fold/model/notebook that asks for the same images; its content is checked against the per-image digests
    written with it (module docstring). It is written to a temporary file and renamed when complete
    (utils.files.atomic_path: a killed run leaves no half cache; the digests are written first, so a cache never
    lacks them); older caches of the same folders/split/size/channels are then deleted (those of other data sets
    are kept). `num_workers` > 0 decodes in that many processes.
    """
    if len(frame) == 0:
        raise DataError(f"no slices to cache for split {split!r}: the frame is empty")
    if "path" not in frame.columns:
        raise ValueError("frame needs a 'path' column (use load_split to build it)")
    directory = Path(cache_dir)
    target = cache_path(frame, directory, size, channels, split)
    shape = (len(frame), size, size, channels)
    names = [str(name) for name in frame["name"]]
    cached = _checked_cache(target, names, list(frame["path"]), shape)
    if cached is not None:
        return cached
    files.remove_debris(directory)  # half caches of killed runs
    with files.atomic_path(target) as temporary:
        output = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=shape)
        files.reserve_space(temporary, target)  # a full disk fails here, naming the file, not with SIGBUS later
        decoded = _iterate_decoded(list(frame["path"]), size, channels, num_workers)
        if progress:
            from tqdm.auto import tqdm

            decoded = tqdm(decoded, total=len(frame), desc=f"decoding {split} {size}px", unit="img")
        for index, image in enumerate(decoded):
            output[index] = image
        output.flush()
        digests = digest_rows(output)
        del output
        record = {"names": names, "digests": digests, "sources": source_digests(list(frame["path"]))}
        files.write_text(_digest_file(target), json.dumps(record) + "\n")
    prefix = target.name.rsplit("_", 1)[0] + "_"  # the same folders/split/size/channels, older content
    for old in directory.glob(prefix + "*.npy"):
        if old != target:
            old.unlink(missing_ok=True)
            _digest_file(old).unlink(missing_ok=True)
    cached = np.load(target, mmap_mode="r")
    stat = target.stat()
    _verified[(str(target), stat.st_size, stat.st_mtime_ns, stat.st_ino)] = digests
    _register(cached, digests)
    return cached


# --------------------------------------------------------------------------------------------------------------
# Rows of image arrays
# --------------------------------------------------------------------------------------------------------------
class RowSubset:
    """Rows of a (memmapped) image array picked by index, without copying the array into memory."""

    def __init__(self, images: np.ndarray | RowSubset | RowConcat, index: np.ndarray):
        self.images, self.index = images, np.asarray(index)
        self.shape = (len(self.index),) + tuple(images.shape[1:])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.images[self.index[i]]

    def row_digests(self) -> list[str]:
        digests = image_digests(self.images)
        return [digests[i] for i in self.index]


class RowConcat:
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

    def row_digests(self) -> list[str]:
        return [digest for source in self.sources for digest in image_digests(source)]


# --------------------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------------------
class SliceDataset(torch.utils.data.Dataset):
    """(image tensor uint8 CHW, target float32 scalar) pairs from a uint8 (N, H, W, C) array and its targets.

    The transform (utils.augment.build_transform) does the augmentation and the tensor conversion; batches are
    normalised on the device (utils.augment.Normalizer). The target is NaN when `targets` is None (unlabelled
    Val/Test slices).
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: np.ndarray | None,
        transform: Callable[[np.ndarray], torch.Tensor],
    ) -> None:
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = None if targets is None else np.asarray(targets, dtype=np.float32)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.transform(np.asarray(self.images[index]))
        target = math.nan if self.targets is None else float(self.targets[index])
        return image, torch.tensor(target, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------------
# Packed Train split (for machines without the raw slices)
# --------------------------------------------------------------------------------------------------------------
def pack_images(data_dir: str | os.PathLike, sizes: Sequence[int], out: str | os.PathLike) -> Path:
    """Decode the labelled Train split at each size (1 channel: the slices are gray) into one compressed .npz,
    written atomically: `utils.sweep run --images` trains from it on a machine that lacks the raw slices."""
    frame = load_split(data_dir, "Train", require_labels=True)
    arrays = {"name": frame["name"].to_numpy(dtype=str),  # unicode, not object: no pickle
              "percentage": frame["percentage"].to_numpy(np.float64),
              "subject": frame["subject"].to_numpy(np.int64)}
    for size in sizes:
        arrays[f"images_{size}"] = np.stack([load_image(p, size, 1)[:, :, 0] for p in frame["path"]])
    return files.save_npz(out, arrays)


def packed_labels(packed_npz: str | os.PathLike) -> pd.DataFrame:
    """name, percentage, subject of a packed Train split."""
    with np.load(packed_npz) as packed:
        return pd.DataFrame({"name": packed["name"], "percentage": packed["percentage"], "subject": packed["subject"]})


def load_packed(packed_npz: str | os.PathLike, size: int, channels: int) -> tuple[pd.DataFrame, np.ndarray]:
    """A packed Train split's labels and its uint8 (N, size, size, channels) images."""
    with np.load(packed_npz) as packed:
        stored = f"images_{size}"
        if stored not in packed.files:
            sizes = sorted(int(k.split("_")[1]) for k in packed.files if k.startswith("images_"))
            raise DataError(f"{packed_npz} has no {size} px images (it holds {sizes}): pack it again with "
                            f"--sizes {size}")
        frame = pd.DataFrame({"name": packed["name"], "percentage": packed["percentage"], "subject": packed["subject"]})
        return frame, np.repeat(packed[stored][:, :, :, None], channels, axis=3)
