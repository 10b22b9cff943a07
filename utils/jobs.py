"""Every (model, fold) training is an independent job scheduled by Dask (`dask.distributed`): the same code on a
laptop, a multi-GPU box and a cluster.

    run_training(configs, run_dir, data_dir, cache_dir)                  # the pipeline's train stages, utils.sweep

A job (`TrainJob`) loads its data from the shared decoded-image cache and calls `utils.train.train_fold`, the same
function 02_train calls; the fold's files (kept checkpoints, predictions, resume state) are the result, on disk in
the run folder, so a finished job is never lost and a rerun reuses it (train_fold checks its recipe and files).

Where jobs run (`Runner`):
* **Local** (default): a Dask cluster of this machine, started for the stage (the pipeline keeps it for its next
  training stage, `Runner.keep_cluster`) and closed after it: one worker
  *process* per job slot, each with one thread (one job at a time), made with Dask's `SpecCluster` + `Nanny`, no
  dashboard (nothing needs the network). On a GPU box there are `jobs_per_gpu` slots per visible GPU and slot i's
  process sees only its GPU (`CUDA_VISIBLE_DEVICES`), so K jobs share each card and each job's CUDA work stays on it.
  On a CPU-only box jobs run one at a time by default (`jobs`), each with cores // jobs torch threads.
* **External**: `--scheduler ADDRESS` (or `PERCOVID_SCHEDULER`) sends the jobs to a running `dask scheduler`; its
  workers (`dask worker ADDRESS --nthreads 1`, one per job slot; pin a GPU with `CUDA_VISIBLE_DEVICES`, or use
  dask-jobqueue on Slurm) must have this project installed (`pip install -e .`) and see the run folder and data at
  the same paths.

Before the jobs, one job per distinct (img_size, in_chans) builds the decode cache, so parallel jobs never decode
the same images twice. Progress: the jobs' log lines (one per job per epoch: model, fold, epoch, MAE, img/s) reach
the client as Dask events wherever the worker runs, plus a count of finished jobs. The first failing job stops the
stage with its model, fold and error (`JobFailed`); the other jobs are cancelled, and the folds they finished stay
on disk for the rerun, which also resumes a cancelled or killed fold after its last finished epoch.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils import files
from utils.config import RunPaths, TrainConfig
from utils.machine import usable_cores

log = logging.getLogger(__name__)

SCHEDULER_ENV = "PERCOVID_SCHEDULER"
LOG_TOPIC = "percovid-log"
_WATCHED: set[tuple[str, int]] = set()  # owners this worker process already watches


class JobFailed(RuntimeError):
    """A training job failed; the message names its model and fold and carries its error."""


@dataclass
class TrainJob:
    """One (model, fold) to train, with everything a worker process needs to do it."""

    config: dict[str, Any]  # a TrainConfig as a dict (plain data: any worker can unpickle it)
    fold: int
    run_dir: str
    data_dir: str | None  # an official-layout folder ...
    cache_dir: str
    packed: str | None = None  # ... or a packed Train split (utils.data.pack_images; nothing to predict then)
    predict: bool = True  # predict Val/Test with the kept checkpoints (utils.sweep: only the held-out fold)
    threads: int | None = None  # torch CPU threads in the worker (None: leave torch's default)
    loader_workers: int | None = None  # when the config says -1 (automatic): this job's share of the cores
    deadline: float | None = None  # time.time() after which the job does not start (utils.sweep --time-limit)
    owner: tuple[str, int] | None = None  # (host, pid) of the run that submitted it: a local job dies with it

    @property
    def label(self) -> str:
        return f"{self.config['model_name']} fold {self.fold}"


@dataclass
class Runner:
    """Where and how wide jobs run (see the module docstring)."""

    scheduler: str | None = None  # an external scheduler's address; None: a local cluster
    jobs: int | None = None  # parallel jobs on a CPU-only machine (default 1)
    jobs_per_gpu: int = 2  # jobs sharing each GPU (utils.bench --concurrent K measures the choice)
    gpus: int | None = None  # visible GPUs (None: torch.cuda.device_count())
    threads: int | None = None  # torch threads per job (default: cores // local slots)
    cores: int = field(default_factory=usable_cores)
    # True: the local cluster outlives a stage, for the next one (the pipeline's two training stages: its start and
    # the workers' imports cost ~8 s per stage on 2 cores); close() ends it. False: each stage starts and closes one.
    keep_cluster: bool = False
    _cluster: Any = field(default=None, init=False, repr=False, compare=False)
    _cluster_key: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.scheduler = self.scheduler or os.environ.get(SCHEDULER_ENV) or None
        if self.jobs is not None and self.jobs < 1 or self.jobs_per_gpu < 1:
            raise ValueError(f"jobs={self.jobs}, jobs_per_gpu={self.jobs_per_gpu}: need at least 1")

    def slots(self, use_gpu: bool) -> list[dict[str, str]]:
        """The environment of each local worker process: one per job slot."""
        gpus = (self.gpus if self.gpus is not None else _visible_gpus()) if use_gpu else 0
        if gpus:  # GPU-minor order: the first jobs spread over the cards
            return [{"CUDA_VISIBLE_DEVICES": str(gpu)} for _ in range(self.jobs_per_gpu) for gpu in range(gpus)]
        return [{} for _ in range(self.jobs or 1)]

    def local_cluster(self, slots: list[dict[str, str]], threads: int) -> Any:
        """The local cluster for these slots: the kept one when it has the same slots, else a new one."""
        key = (tuple(tuple(sorted(slot.items())) for slot in slots), threads)
        if self._cluster is not None and self._cluster_key != key:
            self.close()
        if self._cluster is None:
            self._cluster, self._cluster_key = _local_cluster(slots, threads), key
        return self._cluster

    def close(self) -> None:
        if self._cluster is not None:
            cluster, self._cluster = self._cluster, None
            cluster.close()


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


# ----------------------------------------------------------------------------------------------- in the worker


class _EventHandler(logging.Handler):
    """Sends log records of a job running on a Dask worker to the client (see `_subscribe`)."""

    def __init__(self, worker: Any):
        super().__init__()
        self.worker = worker
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.worker.log_event(LOG_TOPIC, {"level": record.levelno, "message": self.format(record)})


def _route_logs_to_client() -> tuple[logging.Logger, list[logging.Handler]]:
    """In a worker: the engine's log lines go to the client instead of the worker's stdout."""
    from distributed import get_worker

    engine = logging.getLogger("utils")
    saved = engine.handlers[:]
    engine.handlers = [_EventHandler(get_worker())]
    engine.setLevel(logging.INFO)
    engine.propagate = False
    return engine, saved


def prepare_cache(job: TrainJob) -> str:
    """Decode (once) every split the job's model reads, at its size; returns what was prepared."""
    from utils import data

    if job.packed:
        return "packed"
    engine, saved = _route_logs_to_client()
    try:
        cfg = TrainConfig(**job.config)
        reads = ("Train", "Val", "Test") if job.predict or cfg.use_pseudo_labels else ("Train",)
        for split in reads:
            frame = data.load_split(job.data_dir, split, require_labels=split == "Train")
            if frame is not None:
                data.cached_images(frame, job.cache_dir, cfg.img_size, cfg.in_chans, split=split)
        return f"{cfg.img_size} px x {cfg.in_chans} ch"
    finally:
        engine.handlers = saved


def _die_with_owner(owner: tuple[str, int] | None) -> None:
    """A job of a local cluster must not outlive its run: if the run's process is killed (SIGKILL, OOM), the worker
    processes it spawned would go on writing the run folder while a rerun starts. A daemon thread ends this process
    within a second of the owner's death (jobs on other hosts are left to their cluster)."""
    if owner is None or owner[0] != files.HOST or owner in _WATCHED:
        return
    _WATCHED.add(owner)

    def watch() -> None:
        while files.pid_alive(owner[1]):
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, name="percovid-owner-watchdog", daemon=True).start()


def _job_data(job: TrainJob, cfg: TrainConfig):
    from utils import data, folds, train

    paths = RunPaths(job.run_dir)
    if job.packed:
        frame, images = data.load_packed(job.packed, cfg.img_size, cfg.in_chans)
        frame = frame.merge(folds.read_folds(paths.folds_csv)[["name", "fold"]], on="name", how="left",
                            validate="one_to_one")
        return train.SplitImages(frame, images), {}, None
    return train.load_training_data(cfg, job.data_dir, job.cache_dir, paths.folds_csv, paths.pseudo_labels_csv,
                                    progress=False, predict=job.predict)


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures whose message says what to do: the job reports them in one line, without a traceback."""
    from utils import config, data, train

    return (files.DiskFullError, files.IntegrityError, data.DataError, config.ConfigError, train.TrainingDiverged,
            train.FoldMismatch, train.FoldNotTrained)


def check_scheduler(address: str, timeout: float = 5.0) -> None:
    """An external scheduler must answer before the run starts (not after 00 and 01, with a long traceback)."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        port = parsed.port
    except ValueError:
        port = -1
    if not parsed.hostname or port == -1:
        raise JobFailed(f"--scheduler {address!r}: expected tcp://HOST:PORT (what `dask scheduler` prints)")
    if parsed.scheme not in ("tcp", "tls"):
        return  # ucx://, ws://...: Dask's other transports, not tried here
    try:
        with socket.create_connection((parsed.hostname, port or 8786), timeout=timeout):
            pass
    except OSError as error:
        raise JobFailed(f"--scheduler {address}: no Dask scheduler answers there within {timeout:g} s ({error}); "
                        "start one (`dask scheduler`), check the address, or leave --scheduler out to train on "
                        "this machine") from None


OUT_OF_MEMORY_HINT = ("\nThe GPU ran out of memory: rerun with fewer trainings per card (--jobs-per-gpu, down to 1) "
                      "or a smaller batch_size; the finished folds are reused and the others resume.")


def run_train_job(job: TrainJob) -> str | None:
    """A worker's job: train (or reuse) one fold. Returns its label (None: not started, past the deadline);
    raises JobFailed with the traceback text."""
    import torch

    from utils import train

    if job.deadline is not None and time.time() > job.deadline:
        return None
    _die_with_owner(job.owner)
    engine, saved = _route_logs_to_client()
    try:
        if job.threads:
            torch.set_num_threads(job.threads)
        values = dict(job.config, folds=[job.fold])
        if values.get("num_workers", -1) == -1 and job.loader_workers is not None:
            values["num_workers"] = job.loader_workers
        cfg = TrainConfig(**values)
        train_split, predict_splits, pseudo = _job_data(job, cfg)
        train.train_fold(cfg, job.fold, train_split, RunPaths(job.run_dir).fold(cfg.model_name, job.fold),
                         predict_splits, pseudo, progress=False)
        return job.label
    except Exception as error:
        if isinstance(error, expected_errors()):  # its message names the file or setting and the fix
            message = str(error)
            raise JobFailed(message if message.startswith(f"[{job.label}]") else f"{job.label}: {message}") from None
        hint = OUT_OF_MEMORY_HINT if isinstance(error, torch.OutOfMemoryError) else ""
        raise JobFailed(f"{job.label}: {type(error).__name__}: {error}{hint}\n{traceback.format_exc()}") from None
    finally:
        engine.handlers = saved


# ----------------------------------------------------------------------------------------------- in the client


# Dask's defaults for a worker suit many small tasks; a training job is one long Python loop. Off: the pre-spawn
# environment (docstring below), the statistical profiler (samples every thread's stack each 10 ms) and the GIL
# contention monitor. Measured on the demo's resnet18 job (2 cores, 4 epochs, twice each): 3.4-4.1 s per epoch with
# them, 2.7-3.6 s without (the same job outside Dask: 2.7-3.9 s).
# Also off: daemonic worker processes, which may not start children, so a GPU job's DataLoader workers could not
# start ("daemonic processes are not allowed to have children"; the nanny still ends its worker with the run).
WORKER_CONFIG = {"distributed.nanny.pre-spawn-environ": {}, "distributed.worker.profile.enabled": False,
                 "distributed.admin.system-monitor.gil.enabled": False, "distributed.worker.daemon": False}


def _local_cluster(slots: list[dict[str, str]], threads: int):
    """A Dask cluster of this machine: one single-threaded worker process per slot, everything on 127.0.0.1, no
    dashboard (Dask's status pages stay on a random local port), Dask's own log lines silenced below errors.

    Dask's Nanny puts `distributed.nanny.pre-spawn-environ` into the environment of this process and of its workers:
    MALLOC_TRIM_THRESHOLD_=65536 and OMP/MKL/OPENBLAS_NUM_THREADS=1, tuned for many small pandas tasks. For a torch
    training they halve the speed (measured on the demo's resnet18: 67 vs 126 img/s, 2 cores): glibc returns every
    freed tensor to the kernel and maps it again. So no pre-spawn environment here; each slot's own thread count."""
    import dask
    from distributed import Nanny, Scheduler, SpecCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    local = {"dashboard": False, "dashboard_address": "127.0.0.1:0", "host": "127.0.0.1"}
    counts = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    # the workers' own log lines stay silent (a failing job's "Compute Failed" with its traceback): the client
    # reports every failure, in one line where its message says what to do
    workers = {f"slot-{i}": {"cls": Nanny, "options": {"nthreads": 1, "env": {**counts, **env}, "memory_limit": 0,
                                                        "silence_logs": logging.CRITICAL, **local}}
               for i, env in enumerate(slots)}
    # The worker processes ignore Ctrl-C: a terminal sends it to the whole process group, and each worker would
    # print its own KeyboardInterrupt traceback; the run's process gets it and closes the cluster (an ignored signal
    # stays ignored in a spawned child: Python installs its SIGINT handler only over the default disposition).
    _quiet_resource_tracker()
    interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN) if threading.current_thread() is \
        threading.main_thread() else None
    try:
        with dask.config.set(WORKER_CONFIG):  # read when the nannies are made, here
            return SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": local},
                               silence_logs=logging.ERROR, asynchronous=False)
    finally:
        if interrupt is not None:
            signal.signal(signal.SIGINT, interrupt)


# multiprocessing's resource tracker (started with the cluster's first process) frees the semaphores of nannies
# stopped by a Ctrl-C and warns that it did, after the run's one-line message: it does its job, the warning is noise
RESOURCE_TRACKER_FILTER = "ignore:resource_tracker:UserWarning:multiprocessing.resource_tracker"


def _quiet_resource_tracker() -> None:
    """The filter in PYTHONWARNINGS, which the tracker's interpreter reads (it is a process of its own)."""
    current = os.environ.get("PYTHONWARNINGS", "")
    if RESOURCE_TRACKER_FILTER not in current:
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [current, RESOURCE_TRACKER_FILTER]))


def _print_event(event: tuple[float, dict[str, Any]]) -> None:
    _, message = event
    log.log(message.get("level", logging.INFO), "%s", message.get("message", message))


def run_training(configs: Sequence[TrainConfig], run_dir: str | Path, data_dir: str | Path | None,
                 cache_dir: str | Path, runner: Runner | None = None, packed: str | None = None,
                 predict: bool = True, time_limit: float | None = None, keep_going: bool = False) -> list[str]:
    """Train every fold of every config as Dask jobs; returns the labels (model fold k) of the jobs that ran.

    The first failing job raises JobFailed and cancels the others (finished folds stay on disk); with `keep_going`
    the others run on and JobFailed lists every failure at the end. No job starts after `time_limit` seconds."""
    from distributed import Client

    runner = runner or Runner()
    if not configs:
        return []
    use_gpu = any(c.device != "cpu" for c in configs) and \
        (runner.gpus if runner.gpus is not None else _visible_gpus()) > 0
    slots = runner.slots(use_gpu) if runner.scheduler is None else []
    share = runner.threads or (max(1, runner.cores // len(slots)) if slots else None)
    deadline = None if time_limit is None else time.time() + time_limit
    owner = (files.HOST, os.getpid()) if runner.scheduler is None else None
    jobs = [TrainJob(cfg.to_dict(), fold, str(run_dir), None if data_dir is None else str(data_dir), str(cache_dir),
                     packed=packed, predict=predict, threads=share, deadline=deadline, owner=owner,
                     loader_workers=(max(1, min(8, share - 1)) if use_gpu and share else None))
            for cfg in configs for fold in cfg.folds]
    where = (f"the scheduler at {runner.scheduler}" if runner.scheduler else
             f"{len(slots)} local worker process(es)" + (f" ({runner.jobs_per_gpu} per GPU)" if use_gpu else
                                                         f", {share} thread(s) each"))
    log.info("[train] %d job(s) of %s on %s", len(jobs), ", ".join(dict.fromkeys(c.model_name for c in configs)),
             where)
    cluster = runner.local_cluster(slots, share or 1) if runner.scheduler is None else None
    try:
        with Client(runner.scheduler or cluster, set_as_default=False) as client:
            client.subscribe_topic(LOG_TOPIC, _print_event)
            first_of_size = {(c.img_size, c.in_chans): job for c, job in zip(
                [c for c in configs for _ in c.folds], jobs)}
            try:
                client.gather(client.map(prepare_cache, list(first_of_size.values()), pure=False))
            except Exception as error:  # an unreadable image, a missing split: the reader's message says which
                raise JobFailed(f"decoding the images: {type(error).__name__}: {error}") from None
            return _gather_jobs(client, jobs, keep_going)
    finally:
        if cluster is not None and not runner.keep_cluster:
            runner.close()


def _gather_jobs(client: Any, jobs: list[TrainJob], keep_going: bool) -> list[str]:
    from distributed import as_completed

    futures = {client.submit(run_train_job, job, pure=False): job for job in jobs}
    finished, failures = [], []
    for future in as_completed(futures, loop=client.loop):
        job = futures[future]
        if future.status != "finished":
            error = future.exception()
            failure = str(error) if isinstance(error, JobFailed) else f"{job.label}: {type(error).__name__}: {error}"
            if not keep_going:
                client.cancel(list(futures))
                raise JobFailed(failure)
            failures.append(failure)
            log.info("[train] FAILED %s", failure.splitlines()[0])
            continue
        if future.result() is not None:
            finished.append(future.result())
            log.info("[train] %d/%d jobs finished (%s)", len(finished), len(jobs), job.label)
    if failures:
        raise JobFailed(f"{len(failures)} job(s) failed (the others finished):\n" + "\n".join(failures))
    return finished
