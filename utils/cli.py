"""What every command-line entry point shares: an error is one line naming the fix, and Ctrl-C and SIGTERM are clean
exits.

    if __name__ == "__main__":
        sys.exit(cli.run(main, errors=(PredictError, ...)))

* An expected error (the entry point's own, a bad setting, bad data, a damaged file, a full disk) prints
  `error: <message>` on stderr and exits with `code` (no traceback: the message says what to do).
* Ctrl-C (SIGINT) prints one line and exits with 130, SIGTERM (a job scheduler's `kill`, `timeout`) with 143, the
  shell's conventions; SIGTERM is raised as `Terminated` in the main thread, so that every `with`/`finally` runs on
  the way out: temporary files are removed, the run lock is released, the local Dask cluster is closed. What was
  finished is kept (atomic writes), and the same command resumes.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from utils.config import ConfigError
from utils.files import DiskFullError, IntegrityError, RunLocked

INTERRUPTED = 130  # 128 + SIGINT
TERMINATED = 143  # 128 + SIGTERM
# Errors of the project's own making, one line each in every entry point.
COMMON_ERRORS: tuple[type[BaseException], ...] = (ConfigError, IntegrityError, RunLocked, DiskFullError)


class Terminated(BaseException):
    """SIGTERM, as an exception of the main thread (BaseException: no `except Exception` swallows it)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def worker_init(*_: Any) -> None:
    """The initializer of every worker process the project starts (multiprocessing pools, DataLoader workers, spawned
    processes): a forked worker inherits `run`'s SIGTERM handler, so the pool's own exit (which stops its workers
    with SIGTERM) printed a `Terminated` traceback per worker. Here SIGTERM ends a worker quietly (the default) and
    Ctrl-C, sent by a terminal to the whole process group, is left to the parent, which stops its workers.
    Takes and ignores any arguments (a DataLoader passes the worker's id)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def quiet_interrupt() -> None:
    """After Ctrl-C: the libraries' own shutdown chatter (Dask's closing comms) is nothing a user can act on."""
    logging.getLogger("distributed").setLevel(logging.CRITICAL)
    logging.getLogger("tornado").setLevel(logging.CRITICAL)


def _end_progress_line() -> None:
    """A progress bar on a terminal leaves its line open: the message starts on the next one."""
    if sys.stderr.isatty():
        print(file=sys.stderr)


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
        errors: tuple[type[BaseException], ...] = (), code: int = 2) -> int:
    """Call `main(argv)` with the conventions of the module docstring; returns the exit code."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return int(main(argv) or 0)
    except KeyboardInterrupt:
        quiet_interrupt()
        _end_progress_line()
        print("interrupted (Ctrl-C): what was finished is kept; run the same command again to resume",
              file=sys.stderr)
        return INTERRUPTED
    except Terminated:
        quiet_interrupt()
        _end_progress_line()
        print("terminated (SIGTERM): what was finished is kept; run the same command again to resume",
              file=sys.stderr)
        return TERMINATED
    except COMMON_ERRORS + tuple(errors) as error:
        print(f"error: {error}", file=sys.stderr)
        return code
    finally:
        if in_main_thread and previous is not None:  # None: a handler set outside Python, not restorable
            signal.signal(signal.SIGTERM, previous)
