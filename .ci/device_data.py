"""Carry an official-layout data folder to a lent GPU machine, whose call takes at most 64 MiB of files.

    python .ci/device_data.py pack ../shared/per-covid19/crops 144 .devdata/crops144.tar     # here
    python .ci/device_data.py unpack .devdata/crops144.tar data/crops144                     # there
    python .ci/device_data.py pack ../shared/per-covid19/crops 224 .devdata/crops224.tar 55  # parts of <= 55 MiB
    python .ci/device_data.py unpack .devdata/crops224.part1.tar /tmp/crops224               # one call each,
    python .ci/device_data.py unpack .devdata/crops224.part2.tar /tmp/crops224               # into one folder

`pack` decodes every slice of Train (with its label CSV), Val and Test through the project's one reader at `size`
px, 1 channel (what the pipeline decodes them to: gray luminance, bilinear resize) and stores each as lossless WebP
(~2x smaller than PNG here: 3986 crops at 144 px are ~43 MB). `unpack` writes them back as gray PNGs in the
official layout; the pipeline then decodes exactly the arrays it would have decoded from the originals at that
size (`pack` checks the round trip of every image). At 224 px the crops are ~109 MiB, over one call's 64 MiB: with
a size limit `pack` writes parts (`<out>.part1.tar`, ...), each under it, carried by successive calls into one
folder (the machine keeps it while it stays warm). Not for users: only the device checks (.ci/gpu_checks.sh).
"""
from __future__ import annotations

import io
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("Train", "Val", "Test")


def _webp(job: tuple[str, int]) -> bytes:
    from utils.data import load_image

    path, size = job
    gray = load_image(path, size, 1)[:, :, 0]
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="WEBP", lossless=True, quality=100, method=4)
    with Image.open(io.BytesIO(buffer.getvalue())) as back:
        if not np.array_equal(np.asarray(back.convert("L")), gray):
            raise RuntimeError(f"{path}: the WebP round trip changed pixels")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def pack(data_dir: str, size: int, out: str, max_mib: float | None = None) -> list[str]:
    """Write the tar (or, over `max_mib`, its parts); returns the files written."""
    from utils import data, files

    frames = {split: data.load_split(data_dir, split, require_labels=split == "Train") for split in SPLITS}
    members = []
    with ProcessPoolExecutor() as pool:
        for split, frame in frames.items():
            if frame is None:
                continue
            if split == "Train":  # the label CSV byte for byte
                labels = data.find_labels_csv(data.find_split_dir(data_dir, split), split)
                members.append(("Train/Train.csv", labels.read_bytes()))
            jobs = [(path, size) for path in frame["path"]]
            for name, payload in zip(frame["name"], pool.map(_webp, jobs, chunksize=32)):
                members.append((f"{split}/Images/{Path(name).stem}.webp", payload))
            print(f"{split}: {len(frame)} slices", flush=True)
    limit = None if max_mib is None else 0.98 * max_mib * 2**20  # tar headers and padding: ~1 KiB a file
    parts, current, size_now = [], [], 0
    for name, payload in members:
        if limit is not None and current and size_now + len(payload) + 1024 > limit:
            parts.append(current)
            current, size_now = [], 0
        current.append((name, payload))
        size_now += len(payload) + 1024
    parts.append(current)
    written = []
    for index, part in enumerate(parts, start=1):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name, payload in part:
                _add(tar, name, payload)
        target = out if len(parts) == 1 else str(Path(out).with_suffix(f".part{index}.tar"))
        files.write_bytes(target, buffer.getvalue())
        print(f"wrote {target} ({len(buffer.getvalue()) / 2**20:.1f} MiB, {len(part)} files)")
        written.append(target)
    return written


def _png(job: tuple[bytes, str]) -> None:
    payload, target = job
    with Image.open(io.BytesIO(payload)) as image:
        image.convert("L").save(target, format="PNG", compress_level=1)


def unpack(tar_path: str, out_dir: str) -> None:
    out = Path(out_dir)
    jobs = []
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            payload = tar.extractfile(member).read()
            target = out / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if member.name.endswith(".webp"):
                jobs.append((payload, str(target.with_suffix(".png"))))
            else:
                target.write_bytes(payload)
    with ProcessPoolExecutor() as pool:
        list(pool.map(_png, jobs, chunksize=32))
    print(f"unpacked {len(jobs)} slices into {out}")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "pack":
        pack(args[0], int(args[1]), args[2], float(args[3]) if len(args) > 3 else None)
    elif command == "unpack":
        unpack(args[0], args[1])
    else:
        sys.exit(__doc__)
