"""Files a run keeps: written atomically, recorded with their size and hash, verified before reuse; one run per
folder; no debris.

* **Atomic writes.** Every file the project writes goes through `atomic_path`: the content goes to a temporary
  `.<name>.tmp-<host>-<pid>` next to the target, which is renamed over it only when complete, so a reader (or a
  rerun after a kill) never sees half a file. `write_text`, `write_bytes`, `save_torch`, `save_npz` and `write_zip`
  are the usual cases; `atomic_path` itself serves writers that need a path (a memmap, a folder).
* **Integrity.** Files whose loss would silently corrupt results (kept checkpoints, resume states, predictions) are
  written with `record=True`: their size and SHA-256 go to `integrity.json` in the same folder. `verify` compares a
  file with its record before it is reused, ensembled, exported or loaded for prediction; a mismatch is an
  `IntegrityError` naming the file and the way out. The record is journaled so that no kill can leave a file and
  its record disagreeing: the new content's digest is added to the record as *pending* before the rename, and made
  the only one after it; `verify` accepts the committed digest or a pending one (a kill fell between the steps).
  `forget` drops the record before the file, so a kill between leaves an unrecorded leftover, never a record of a
  missing file.
* **One run per folder.** `RunLock` holds an exclusive `flock` on `<folder>/.lock` for the life of a run and writes
  its pid and host there. A second run on the same folder stops at once; a lock file left by a dead process (the
  kernel releases a dead process's flock) is taken over with a message.
* **Disk full.** A write that fails for want of space (the OS's ENOSPC / EDQUOT, or torch's checkpoint writer failing
  mid-file) is a `DiskFullError` naming the file and the free space; the temporary file is removed, the target is
  left as it was, and the rerun resumes from what was kept. `reserve_space` claims a file's size up front, so a
  memory-mapped writer fails with that error instead of dying of SIGBUS.
* **No debris.** `remove_debris` deletes the temporary files of dead processes of this host (a SIGKILL between
  writing and renaming leaves one); each run calls it on its folders at start.

Test hook: `PERCOVID_KILL_AT="<substring>:<n>"` SIGKILLs the process group (and the group `PERCOVID_KILL_GROUP`, the
whole run's, when set: Jupyter kernels run in sessions of their own) just before the n-th atomic rename of a path
containing the substring in one process: the worst moment for a kill, reproduced exactly (tests/test_faults.py).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import time
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HOST = socket.gethostname()
INTEGRITY_FILE = "integrity.json"
LOCK_FILE = ".lock"
_TEMP_PATTERN = re.compile(r"^\..+\.tmp-(?P<host>.+)-(?P<pid>\d+)$")
_KILL_AT = os.environ.get("PERCOVID_KILL_AT", "")
_writes_seen: dict[str, int] = {}


class IntegrityError(RuntimeError):
    """A kept file differs from what was recorded when it was written (truncated, edited, replaced, missing)."""


class RunLocked(RuntimeError):
    """Another live run holds the folder."""


class DiskFullError(OSError):
    """No space left where a file was being written; nothing partial was kept."""

    def __init__(self, path: Path, detail: str, message: str | None = None):
        if message is None:
            try:
                free = f"{shutil.disk_usage(Path(path).parent).free / 2**20:.0f} MiB were free there when it failed"
            except OSError:
                free = "free space unknown"
            message = (f"no space left on device writing {path} ({detail}; {free}): free some space (or put the "
                       "outputs elsewhere with --workdir) and rerun the same command; nothing partial was kept and "
                       "finished work is reused")
        super().__init__(errno.ENOSPC, message)
        self.path, self.detail = path, detail

    def __reduce__(self):  # pickled as its message: a Dask worker's error reaches the client as this type
        return type(self), (self.path, self.detail, self.strerror)

    def __str__(self) -> str:
        return self.strerror


def _disk_full_detail(error: BaseException) -> str | None:
    """Why `error` is a full disk, or None when it is another failure."""
    if isinstance(error, DiskFullError):
        return None
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return os.strerror(error.errno)
    # torch's zip writer reports a failed write of a checkpoint as a position mismatch (measured: a full tmpfs)
    if isinstance(error, RuntimeError) and ("unexpected pos" in str(error) or "file write failed" in str(error)):
        return f"torch: {str(error).splitlines()[0]}"
    return None


def reserve_space(path: str | os.PathLike, target: str | os.PathLike | None = None) -> None:
    """Allocate a (sparse) file's whole size now: ENOSPC here, not SIGBUS later in a memory-mapped write. The
    error names `target`, the file being written (`path` may be its temporary name)."""
    path = Path(path)
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, path.stat().st_size)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(Path(target or path), os.strerror(error.errno)) from None
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate: go on
                raise


# ----------------------------------------------------------------------------------------------- atomic writes


def temp_path(path: Path) -> Path:
    """The temporary name `path` is written under: hidden, next to it, naming this host and process."""
    return path.with_name(f".{path.name}.tmp-{HOST}-{os.getpid()}")


def _fault_point(path: Path) -> None:
    """The test hook of the module docstring: SIGKILL the process group before the n-th matching rename."""
    if not _KILL_AT:
        return
    needle, _, count = _KILL_AT.rpartition(":")
    if needle and needle in str(path):
        _writes_seen[needle] = _writes_seen.get(needle, 0) + 1
        if _writes_seen[needle] == int(count):
            run_group = os.environ.get("PERCOVID_KILL_GROUP")
            if run_group and int(run_group) != os.getpgrp():
                os.killpg(int(run_group), signal.SIGKILL)
            os.killpg(os.getpgrp(), signal.SIGKILL)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, record: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write (a file or a folder); on success it replaces `path`, on any error it is
    removed and `path` is left as it was. `record=True` (a file): its integrity record, journaled around the
    rename (module docstring)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = temp_path(target)
    _remove(temporary)  # a leftover of an earlier process that had this pid
    try:
        yield temporary
        entry = _announce(target, temporary) if record else None
        _fault_point(target)
        os.replace(temporary, target)
    except BaseException as error:
        _remove(temporary)
        detail = _disk_full_detail(error)
        if detail is not None:
            raise DiskFullError(target, detail) from None
        raise
    if entry is not None:
        _commit(target, entry)


def write_bytes(path: str | os.PathLike, payload: bytes, record: bool = False) -> Path:
    with atomic_path(path, record=record) as temporary:
        temporary.write_bytes(payload)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, record: bool = False) -> Path:
    """Write `text` as UTF-8, line ends untouched (no newline translation)."""
    return write_bytes(path, text.encode("utf-8"), record=record)


def save_torch(obj: Any, path: str | os.PathLike, record: bool = False) -> Path:
    import torch

    with atomic_path(path, record=record) as temporary:
        torch.save(obj, temporary)
    return Path(path)


def save_npz(path: str | os.PathLike, arrays: Mapping[str, Any], compressed: bool = True) -> Path:
    import numpy as np

    with atomic_path(path) as temporary, open(temporary, "wb") as handle:  # a handle: np.savez adds no suffix
        (np.savez_compressed if compressed else np.savez)(handle, **arrays)
    return Path(path)


def write_zip(path: str | os.PathLike, members: Mapping[str, str | bytes]) -> Path:
    """A zip of `members`, byte for byte the same for the same content (fixed member dates)."""
    with atomic_path(path) as temporary, zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), content,
                             compress_type=zipfile.ZIP_DEFLATED)
    return Path(path)


# ----------------------------------------------------------------------------------------------- integrity


def stream_digest(handle: Any) -> str:
    """SHA-256 of what is left to read from a binary file handle."""
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return stream_digest(handle)


def _records(folder: Path) -> dict[str, dict[str, Any]]:
    manifest = folder / INTEGRITY_FILE
    if not manifest.is_file():
        return {}
    try:
        return json.loads(manifest.read_text())
    except (OSError, ValueError) as error:
        raise IntegrityError(f"{manifest} is unreadable ({error}): the records of the files beside it are lost; "
                             f"rerun what wrote them (for a fold: delete {folder}, or rerun with --force)") from None


def _write_records(folder: Path, records: Mapping[str, Any]) -> None:
    write_text(folder / INTEGRITY_FILE, json.dumps(records, indent=1, sort_keys=True) + "\n")


def _entry_of(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": file_digest(path)}


def _announce(target: Path, temporary: Path) -> dict[str, Any]:
    """Before `temporary` replaces `target`: add its digest to target's record as pending (one writer per folder:
    its fold's job). Pending digests accumulate only while kills fall between announce and commit."""
    entry = _entry_of(temporary)
    records = _records(target.parent)
    current = records.get(target.name, {})
    records[target.name] = {**current, "pending": [*current.get("pending", []), entry]}
    _write_records(target.parent, records)
    return entry


def _commit(target: Path, entry: dict[str, Any]) -> None:
    """After the rename: the new digest is the record, the older ones are dropped."""
    records = _records(target.parent)
    records[target.name] = entry
    _write_records(target.parent, records)


def forget(path: str | os.PathLike) -> None:
    """Delete a recorded file and its record (a resume state that is no longer needed); the record goes first."""
    path = Path(path)
    records = _records(path.parent)
    if records.pop(path.name, None) is not None:
        _write_records(path.parent, records)
    path.unlink(missing_ok=True)


def _accepted(entry: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The digests a file may have: the committed one, then any pending (a kill fell between announce and commit)."""
    return ([entry] if "sha256" in entry else []) + list(entry.get("pending", []))


def verify(path: str | os.PathLike, way_out: str, older_ok: bool = False) -> Path:
    """Check `path` against its record; IntegrityError names the file and `way_out` on any difference.

    A folder without integrity.json (written before records existed, or by hand) is not checked; `older_ok`: nor is
    a file that an older version wrote without a record next to recorded ones (a warning says so)."""
    path = Path(path)
    records = _records(path.parent)
    if not records:
        return path
    entry = records.get(path.name)
    if entry is None and older_ok:
        log.warning("%s has no integrity record (written by an older version of this suite): it cannot be checked "
                    "for edits; %s to have it recorded", path, way_out)
        return path
    if entry is None:
        raise IntegrityError(f"{path} has no integrity record in {path.parent / INTEGRITY_FILE}: it was not written "
                             f"by this run; {way_out}")
    return check_entry(path, entry, way_out)


def check_entry(path: str | os.PathLike, entry: Mapping[str, Any], way_out: str) -> Path:
    """`path` against a record {size, sha256} (integrity.json's, or an export manifest's), or a pending one."""
    path = Path(path)
    accepted = _accepted(entry)
    recorded = accepted[0]
    if not path.is_file():
        raise IntegrityError(f"{path} is missing (recorded: {recorded['size']} bytes); {way_out}")
    size = path.stat().st_size
    candidates = [e for e in accepted if e["size"] == size]
    if not candidates or file_digest(path) not in {e["sha256"] for e in candidates}:
        raise IntegrityError(f"{path} is corrupt: {size} bytes, recorded {recorded['size']} bytes with sha256 "
                             f"{recorded['sha256'][:12]}... when written (truncated or changed since); {way_out}")
    return path


def verify_folder(folder: str | os.PathLike, way_out: str) -> list[Path]:
    """Verify every file recorded in `folder`; returns them."""
    folder = Path(folder)
    records = _records(folder)
    # a file only ever announced (killed before its first rename) does not exist yet: nothing to verify
    return [verify(folder / name, way_out) for name, entry in sorted(records.items())
            if "sha256" in entry or (folder / name).exists()]


def load_torch(path: str | os.PathLike, way_out: str, map_location: Any = "cpu") -> Any:
    """`torch.load(weights_only=True)` of a verified file; an unreadable file is an IntegrityError with `way_out`."""
    import torch

    verify(path, way_out)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError/EOFError/UnpicklingError/... for a damaged file
        raise IntegrityError(f"{path} cannot be read ({type(error).__name__}: {str(error).splitlines()[0]}); "
                             f"{way_out}") from None


# ----------------------------------------------------------------------------------------------- one run per folder


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`with RunLock(folder):` the only run writing `folder` (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunLocked(f"{self.folder} is already in use by a run ({holder}): wait for it to finish, or give "
                            "this run another --name") from None
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        if previous:
            log.warning("taking over %s: the run that held it (%s) ended without releasing it", self.path, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {HOST}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty lock file = released cleanly (no takeover message next time)
            os.close(self._fd)  # closing releases the flock
            self._fd = None


# ----------------------------------------------------------------------------------------------- debris


def remove_debris(*folders: str | os.PathLike) -> list[Path]:
    """Delete temporary files/folders (`.<name>.tmp-<host>-<pid>`) left in `folders` by dead processes of this host."""
    removed = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob(".*.tmp-*")):
            match = _TEMP_PATTERN.match(path.name)
            if match and path.exists() and match["host"] == HOST and not pid_alive(int(match["pid"])):
                _remove(path)
                removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) left by killed runs (%s)", len(removed),
                 ", ".join(p.name for p in removed[:3]) + (", ..." if len(removed) > 3 else ""))
    return removed
