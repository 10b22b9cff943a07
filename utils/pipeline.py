"""Run the whole recipe: the numbered notebooks with papermill, every training as Dask jobs (`./run_all.sh`).

    python -m utils.pipeline [--profile NAME|PATH] [--data DIR] [--name RUN] [--workdir DIR] [--force]
                             [-p KEY VALUE]... [--jobs N] [--jobs-per-gpu K] [--scheduler ADDRESS] [--stages LIST]

Like MONAI's tutorial runner: one papermill execution per notebook, executed copies saved under
`runs/<name>/notebooks/`, the first failing step stops the run (non-zero exit, its error printed). The plan
(`plan`) is the whole run, every training included:

    00_eda, 01_folds,
    [self-supervised pretraining of the backbones, when the profile sets selfsup_epochs (utils.selfsup)],
    train jobs: every (model, fold) of the profile (utils.jobs, on Dask), then 02_train per model with
        role='report' (its folds are the jobs'; it shows the curves and the fold table),
    03_ensemble,
    04_pseudo_label (role='report': writes the pseudo-labels), and for the profile's pseudo_label_models:
        train jobs of the retrains, 02_train per retrain, 04_pseudo_label again (Table 3, the final ensemble),
    05_submit, 06_explain (intervals with their coverage, saliency maps, per-scan tables).

Every notebook gets the same recipe parameters a user sets in Jupyter, `profile` (the file) and `overrides` (the
`-p` values), and the run's paths; it resolves them with utils.runs as the pipeline does. Before anything runs or
is written, every setting of the profile and of `-p` is checked (utils.config: unknown or duplicate keys, types,
ranges), and so is what the machine must offer: the device asked for, the scheduler's address, `--jobs` against
the cores and the trainings there are. The run holds `runs/<name>/.lock` (one run per folder) and first removes the
temporary files of killed runs. A rerun reuses finished work (trained folds, kept checkpoints, predictions) unless
`--force`, which starts the run afresh. Outputs go under `--workdir` (default: the checkout, or $PERCOVID_WORKDIR):
runs/, submissions/, data/phantoms, data/cache.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from utils import cli, files, jobs, machine, runs
from utils.config import (
    REPO_ROOT,
    WORKDIR_ENV,
    ConfigError,
    RunPaths,
    TrainConfig,
    default_data_dir,
    load_profile,
    parse_yaml_value,
    workdir,
)

log = logging.getLogger("utils.pipeline")  # not __name__: "__main__" under python -m

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
STAGES = ("00_eda", "01_folds", "02_train", "03_ensemble", "04_pseudo_label", "05_submit", "06_explain")
KERNEL_NAME = "percovid"
# The kernels' own start-up chatter a user cannot act on (e.g. ipykernel's "running over TCP without encryption"
# warning: its TCP ports are bound to 127.0.0.1 and used by this process alone).
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]


class PipelineError(RuntimeError):
    """A stage failed or the run was misconfigured; the message says which and where to look."""


@dataclass
class Step:
    """One step of the plan: a notebook execution, or the training jobs of some models."""

    stage: str  # the --stages name it belongs to
    notebook: str | None = None  # notebook stem to execute
    output: str | None = None  # executed copy's stem
    parameters: dict[str, Any] = field(default_factory=dict)
    train: list[TrainConfig] = field(default_factory=list)  # models whose folds are trained as jobs
    pretrain: dict[Path, Any] = field(default_factory=dict)  # self-supervised pretrainings (utils.selfsup)

    @property
    def title(self) -> str:
        if self.pretrain:
            return f"self-supervised pretraining: {', '.join(p.name for p in self.pretrain)}"
        return self.output or f"train {len(self.train)} model(s): {', '.join(c.model_name for c in self.train)}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run_all.sh", description="Run the whole recipe: notebooks with papermill, trainings as Dask jobs.",
        epilog="./run_all.sh --test [PYTEST ARGS] runs the lint and the test suite instead; ./run_all.sh --no-venv "
               "... runs in the current Python environment (Kaggle, Colab).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--profile", default="demo", help="profile name in notebooks/profiles/ or a YAML path (default: demo)")
    add("--data", default=None, help="data folder in the official layout (default: the phantom set, made in "
        "<workdir>/data/phantoms on first use)")
    add("--name", default=None, help="run name: runs/<name>/, submissions/<name>.csv (default: the profile's name)")
    add("--workdir", default=None, help=f"where every output goes: runs/, submissions/, data/ (default: "
        f"${WORKDIR_ENV}, else the checkout); a read-only checkout needs one")
    add("--force", action="store_true", help="discard runs/<name>/ and start afresh instead of resuming")
    add("-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
        help="override one setting for every notebook (VALUE parsed as YAML: 3, 0.1, [0,1], true)")
    add("--jobs", type=int, default=None, help="trainings side by side on a CPU-only machine (default 1)")
    add("--jobs-per-gpu", type=int, default=2, help="trainings sharing each GPU (default 2)")
    add("--scheduler", default=None, help="address of a running Dask scheduler to send the trainings to "
        f"(default: ${jobs.SCHEDULER_ENV}, else a local cluster)")
    add("--kernel", default=None, help=f"Jupyter kernel (default: {KERNEL_NAME} if registered, else python3)")
    add("--stages", default=",".join(STAGES), help="comma-separated subset of stages to run (debugging)")
    add("--dry-run", action="store_true", help="check every setting and what the machine must offer, print the plan, "
        "and stop: nothing is trained or written")
    args = parser.parse_args(argv)
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {','.join(STAGES)}")
    if args.name is not None and (not args.name or "/" in args.name or args.name.startswith(".")):
        parser.error(f"--name {args.name!r}: use a plain folder name (no '/', not starting with '.')")
    if (args.jobs is not None and args.jobs < 1) or args.jobs_per_gpu < 1:
        parser.error("--jobs and --jobs-per-gpu need at least 1")
    if args.data is not None:
        args.data = from_caller(args.data)
    if Path(args.profile).suffix:  # a YAML path, not a profile name
        args.profile = from_caller(args.profile)
    args.param = [[key, from_caller(value) if key in FILE_SETTINGS and value not in ("", "null", "~") else value]
                  for key, value in args.param]
    return args


# run_all.sh runs in the checkout; the folder it was called from, where relative paths on its command line start
CALLER_DIR_ENV = "PERCOVID_CALLER_DIR"
FILE_SETTINGS = ("pretrained_file", "scans_csv")  # -p values that name a file


def from_caller(path: str) -> str:
    """A relative path of the command line, made absolute from the caller's folder (else the current one)."""
    expanded = Path(path).expanduser()
    return str(expanded if expanded.is_absolute() else Path(os.environ.get(CALLER_DIR_ENV) or os.getcwd()) / expanded)


def parse_overrides(pairs: Sequence[Sequence[str]]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, text in pairs:
        if key in values:
            raise ConfigError(f"-p {key} is given twice ({values[key]!r} and {text!r}): keep one", key=key)
        try:
            values[key] = parse_yaml_value(text)  # as a profile reads it: 1e-3 is a number there and here
        except yaml.YAMLError:
            raise ConfigError(f"-p {key} {text!r}: not a YAML value (quote strings, write lists as [0,1])") from None
    return values


def declared_parameters(notebook: Path) -> set[str]:
    import papermill

    return set(papermill.inspect_notebook(str(notebook)))


def choose_kernel(requested: str | None) -> str:
    """--kernel, checked before anything runs (papermill's NoSuchKernel came at 00, after the phantom set was made);
    by default percovid where registered, else python3."""
    from jupyter_client.kernelspec import KernelSpecManager

    known = KernelSpecManager().find_kernel_specs()
    if requested and requested not in known:
        raise PipelineError(f"--kernel {requested}: no such Jupyter kernel here (known: {', '.join(sorted(known))}); "
                            f"choose one of those, or register it (python -m ipykernel install --user --name "
                            f"{requested})")
    return requested or (KERNEL_NAME if KERNEL_NAME in known else "python3")


def plan(run: runs.Run, submission_csv: Path, stages: Sequence[str]) -> list[Step]:
    """Every step of the run, in order (see the module docstring)."""
    base = {"profile": run.profile["path"], "overrides": run.overrides, **run.paths.to_dict(),
            "submission_csv": str(submission_csv)}

    def trained(stage: str, configs: list[TrainConfig]) -> list[Step]:
        """The jobs, then 02_train per model as its report."""
        return [Step(stage, train=configs)] + [Step(stage, "02_train", f"02_train__{c.model_name}",
                                                    {**base, "train_models": [c.model_name], "role": "report"})
                                               for c in configs]

    steps: list[Step] = []
    for stage in stages:
        if stage == "02_train":
            pretrain = run.pretrainings_for(run.train)
            steps += ([Step(stage, pretrain=pretrain)] if pretrain else []) + trained(stage, run.train)
        elif stage == "04_pseudo_label":
            steps.append(Step(stage, stage, stage, {**base, "role": "report"}))
            if run.pseudo and not _has_slices_to_label(run.paths.data_dir):
                log.info("no Val/Test split in %s to pseudo-label: the retrains (%s) are skipped",
                         run.paths.data_dir, ", ".join(c.model_name for c in run.pseudo))
            elif run.pseudo:
                steps += trained(stage, run.pseudo)
                steps.append(Step(stage, stage, f"{stage}__after_retraining", {**base, "role": "report"}))
        else:
            steps.append(Step(stage, stage, stage, base))
    return steps


def _has_slices_to_label(data_dir: str | None) -> bool:
    """Whether the data has a Val or Test split (a folder not there yet: the phantom set, which has both)."""
    from utils import data  # torch and PIL: only for a run that plans pseudo-label retrains

    if data_dir is None or not Path(data_dir).is_dir():
        return True
    return any(data.find_split_dir(data_dir, split) is not None for split in ("Val", "Test"))


def check_machine(run: runs.Run, runner: jobs.Runner) -> None:
    """What the machine must offer, checked before 00 runs: the device asked for (on a local cluster; an external
    scheduler's workers have their own), the scheduler's address, and --jobs against the cores and the trainings."""
    configs = run.train + run.pseudo
    if runner.scheduler is None:
        for cfg in configs:
            machine.check_device(cfg.device, one_gpu_per_job=True)
        warn_emulated_bf16(configs)
    else:
        jobs.check_scheduler(runner.scheduler)
    if runner.jobs is not None:
        if runner.jobs > runner.cores:
            raise ConfigError(f"--jobs {runner.jobs}: this machine lets the run use {runner.cores} core(s); use at "
                              f"most --jobs {runner.cores} (each training needs a core of its own)")
        most = max(sum(len(c.folds) for c in run.train), sum(len(c.folds) for c in run.pseudo))
        if runner.jobs > most:
            log.info("--jobs %d: this run has at most %d training(s) at once; starting %d worker(s)", runner.jobs,
                     most, most)
            runner.jobs = most


def warn_emulated_bf16(configs: Sequence[Any]) -> None:
    """A recipe whose epochs were sized for bf16 on the CPU (`cpu_bf16`) trains in fp32 on a CPU without bf16 in
    hardware: it still runs, the same recipe, but in about twice the time its profile states; said before 00."""
    names = sorted({cfg.model_name for cfg in configs if cfg.cpu_bf16 and cfg.amp and cfg.amp_dtype == "auto"
                    and machine.resolve_device(cfg.device).type == "cpu"})
    if names and not machine.cpu_computes_bf16():
        log.warning("cpu_bf16 (%s): this CPU has no bf16 arithmetic (AVX-512 BF16 or AMX), so these trainings run "
                    "in fp32, in about 2x the time the profile states (-p epochs N, half its epochs, keeps that time)",
                    ", ".join(names))


def check_weights(run: runs.Run, runner: jobs.Runner, stages: Sequence[str] = STAGES, force: bool = False) -> None:
    """Before 00: the weights each model still to train starts from can be had (utils.models.check_weights: a
    pretrained_file read as data only and fitting its arch; `pretrained: true`: in the local cache, or the hub
    answers at once), not after 00 and 01 and a minute of hub retries. A model whose folds are all trained (a rerun:
    none is rebuilt from its weights) or whose stage is not run is not checked; weights the run's own pretraining
    writes are not there yet; an external scheduler's workers have their own cache (their jobs check the same
    way, in one line)."""
    if runner.scheduler is not None:
        return
    paths = RunPaths(run.paths.run_dir)
    staged = (run.train if "02_train" in stages else []) + (run.pseudo if "04_pseudo_label" in stages else [])
    to_train = [cfg for cfg in staged
                if force or not all((paths.fold(cfg.model_name, f) / "predictions.csv").is_file() for f in cfg.folds)]
    if to_train:
        from utils import models

        models.check_model_weights(to_train, made=set(run.pretrainings))


def check_subjects(run: runs.Run) -> None:
    """Before 00: the Train labels (utils.data's reader) have subjects for the folds (01 groups them by subject).
    The phantom set, made at the run's start, has enough."""
    from utils import data

    folder = Path(run.paths.data_dir)
    if folder == default_data_dir() and not (folder / "Train").is_dir():
        return
    try:
        frame = data.load_split(folder, "Train", require_labels=True)
        labels = data.find_labels_csv(data.find_split_dir(folder, "Train"), "Train")
    except data.DataError as error:
        raise PipelineError(str(error)) from None
    problem = subjects_problem(str(labels), frame, run.settings["folds"].n_folds, "-p n_folds")
    if problem:
        raise PipelineError(problem)


def subjects_problem(labels: str, frame: Any, n_folds: int, option: str) -> str | None:
    """Why the Train rows (`frame`: name, subject) cannot make `n_folds` subject-grouped folds, or None; `option`
    is the command line's way to set n_folds (the pipeline's `-p n_folds`, the sweep's `--n-folds`)."""
    subjects = frame["subject"].dropna().nunique()
    unknown = frame.loc[frame["subject"].isna(), "name"].tolist()
    if unknown:
        return (f"{labels}: {len(unknown)} slice(s) have no subject id ({', '.join(unknown[:3])}): folds are "
                "grouped by subject; write each row as name,percentage,subject")
    if subjects < 2:
        return (f"{labels}: {subjects} subject(s); cross-validation needs at least 2 subjects (2 <= n_folds <= "
                "subjects, each fold holds out whole subjects): add the slices of more subjects (CT scans)")
    if n_folds > subjects:
        return (f"n_folds={n_folds}: {labels} has {subjects} subjects, fewer than the folds (each fold holds out "
                f"whole subjects): use {option} {subjects} or fewer (n_folds <= subjects), and folds within it")
    return None


def check_writable(folders: Sequence[Path]) -> None:
    """Before 00: every folder the run writes can be written (a read-only one failed at its first write: the kernel
    install, or 05 after the whole training). Root ignores permission bits, so a file is really created and removed,
    in each folder or, where it does not exist yet, in its nearest existing parent."""
    probed: set[Path] = set()
    for folder in folders:
        parent = folder
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if parent in probed:
            continue
        probed.add(parent)
        probe = files.temp_path(parent / "write-check")  # the debris pattern: removed by a later run if left
        try:
            os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            os.unlink(probe)
        except OSError as error:
            what = f"{folder} is not writable" if parent == folder else \
                f"{folder} cannot be made ({parent} is not writable)"
            raise PipelineError(f"{what}: {error.strerror}; the run writes its outputs there: make it writable, or "
                                "pass --workdir DIR (a writable folder: every output goes under it)") from None


def output_folders(run: runs.Run, root: Path, submission_csv: Path, stages: Sequence[str]) -> list[Path]:
    """The folders a run writes: the workdir, runs/<name>, data/cache, submissions/ (when 05 runs), and the phantom
    set when it is to be made."""
    folders = [root, Path(run.paths.run_dir), Path(run.paths.cache_dir)]
    if "05_submit" in stages:
        folders.append(submission_csv.parent)
    data_dir = Path(run.paths.data_dir)
    if data_dir == default_data_dir() and not (data_dir / "Train").is_dir():
        folders.append(data_dir)
    return folders


def check_force(run_dir: Path, force: bool) -> None:
    """Before the lock: --force deletes a run's own outputs only; a folder that holds anything a run does not write
    is refused (it is someone's, not this project's to delete)."""
    foreign = RunPaths(run_dir).foreign_entries() if force else []
    if foreign:
        raise PipelineError(f"--force would delete {foreign[0]}, which no run writes: nothing but a run's own "
                            f"outputs is deleted; move it out of {run_dir}, or choose another --name")


def _start_run_folder(run_dir: Path, force: bool, submission_csv: Path) -> None:
    """With the lock held: --force empties the run folder (all but the lock) and removes the run's submission
    (check_force said before the lock that it holds nothing but a run's own outputs)."""
    if force:
        log.info("--force: removing the contents of %s", run_dir)
        for child in run_dir.iterdir():
            if child.name != files.LOCK_FILE:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        for stale in (submission_csv, submission_csv.with_suffix(".zip")):
            stale.unlink(missing_ok=True)


# What jupyter_client's KernelClient.wait_for_ready raises (a RuntimeError, through nbclient and papermill) when the
# kernel dies or stays silent before its first reply: no cell has run. The usual cause is a port taken between its
# choice and the kernel's bind by another process starting kernels (two pipelines on one machine: the kernel dies of
# `ZMQError: Address already in use`); a new kernel picks new ports.
KERNEL_START_FAILURES = ("Kernel died before replying to kernel_info", "Kernel didn't respond")


def _kernel_died_at_start(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and str(error).startswith(KERNEL_START_FAILURES)


def _run_notebook(step: Step, run_dir: Path, declared: set[str], kernel: str) -> None:
    import papermill

    output = run_dir / "notebooks" / f"{step.output}.ipynb"
    chosen = {k: v for k, v in step.parameters.items() if k in declared}
    with _signals_kept() as received:
        for attempt in (1, 2):
            try:
                papermill.execute_notebook(str(NOTEBOOKS_DIR / f"{step.notebook}.ipynb"), str(output),
                                           parameters=chosen, kernel_name=kernel, cwd=str(NOTEBOOKS_DIR),
                                           progress_bar=sys.stderr.isatty(), log_output=True,
                                           extra_arguments=KERNEL_ARGUMENTS)
                return
            except Exception as error:
                if received:  # the kernel shut down under a Ctrl-C or SIGTERM: that is the news, not the cell's error
                    return
                if isinstance(error, papermill.PapermillExecutionError):
                    raise PipelineError(f"notebook {step.notebook} failed: {error.ename}: {error.evalue}\n"
                                        f"executed copy with the traceback: {output}") from None
                if not _kernel_died_at_start(error):
                    raise
                if attempt == 1:  # no cell ran: starting a kernel again costs seconds and loses nothing
                    log.warning("the %s kernel of notebook %s died at start (%s); starting it once more", kernel,
                                step.notebook, error)
                    continue
                raise PipelineError(
                    f"notebook {step.notebook}: its kernel ({kernel}) died at start twice ({error}); likely cause: "
                    "another process took its port (another pipeline starting kernels on this machine) or the "
                    "kernel itself is broken; the fix: run the same command again (finished work is reused), and "
                    f"if it dies again, see why with `jupyter kernelspec list` and `python -m ipykernel` of that "
                    f"kernel") from None


@contextlib.contextmanager
def _signals_kept() -> Iterator[list[int]]:
    """papermill's notebook client (nbclient) takes SIGINT and SIGTERM over while a notebook runs, to shut its kernel
    down, and then carries on: a Ctrl-C that came while a kernel started or stopped was lost (the run went on), and
    SIGTERM's handler was left at the default. Here the signal nbclient handles is recorded (yielded list) and
    raised once the notebook call returns (KeyboardInterrupt, cli.Terminated: one line, 130 or 143), and both
    handlers are put back."""
    from jupyter_core.utils import ensure_event_loop

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    loop = ensure_event_loop()  # the loop nbclient runs on in this thread
    received: list[int] = []
    plain = loop.add_signal_handler

    def recording(sig: int, callback: Callable[..., Any], *args: Any) -> None:
        def record_then_handle(*call_args: Any) -> None:
            received.append(sig)
            callback(*call_args)

        plain(sig, record_then_handle, *args)

    loop.add_signal_handler = recording  # this loop instance only
    try:
        yield received
    finally:
        del loop.add_signal_handler
        for sig, handler in handlers.items():
            if handler is not None and threading.current_thread() is threading.main_thread():
                signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt if received[0] == signal.SIGINT else cli.Terminated()


def run(argv: Sequence[str] | None = None) -> Path | None:
    """Run the stages; returns the submission path when the submit stage ran."""
    args = parse_args(argv)
    previous = os.environ.get(WORKDIR_ENV)
    if args.workdir:
        os.environ[WORKDIR_ENV] = str(Path(args.workdir).expanduser().resolve())  # the kernels and jobs inherit it
    try:
        return _run(args)
    finally:  # an in-process caller (a test, a notebook) keeps its own
        if previous is None:
            os.environ.pop(WORKDIR_ENV, None)
        else:
            os.environ[WORKDIR_ENV] = previous


def _run(args: argparse.Namespace) -> Path | None:
    root = workdir()
    profile = load_profile(args.profile)
    name = args.name or Path(profile["path"]).stem
    run_dir, submission_csv = root / "runs" / name, root / "submissions" / f"{name}.csv"
    if args.data is not None and not Path(args.data).expanduser().is_dir():
        raise PipelineError(f"--data {args.data}: no such folder (expected the official layout: Train/, Val/[, Test/])")
    # before anything is decoded or written: every setting, then what the machine must offer
    recipe = runs.resolve(profile, parse_overrides(args.param), args.data, run_dir, root / "data" / "cache")
    runner = jobs.Runner(scheduler=args.scheduler, jobs=args.jobs, jobs_per_gpu=args.jobs_per_gpu, keep_cluster=True)
    check_machine(recipe, runner)
    check_writable(output_folders(recipe, root, submission_csv, args.stages.split(",")))
    check_subjects(recipe)
    check_force(run_dir, args.force)
    check_weights(recipe, runner, args.stages.split(","), args.force)
    kernel = choose_kernel(args.kernel)
    if args.dry_run:
        for step in plan(recipe, submission_csv, args.stages.split(",")):
            print(step.title)
        print(f"dry run of {profile['path']}: every setting checked, nothing run or written")
        return None
    with files.RunLock(run_dir):
        try:
            _start_run_folder(run_dir, args.force, submission_csv)
            files.remove_debris(run_dir, recipe.paths.cache_dir, submission_csv.parent, root / "data")
            recipe.ensure_data()
            _run_steps(recipe, runner, submission_csv, args, kernel)
        finally:
            runner.close()  # the local Dask cluster, kept across the stages
    return submission_csv if "05_submit" in args.stages.split(",") else None


def _run_steps(recipe: runs.Run, runner: jobs.Runner, submission_csv: Path, args: argparse.Namespace,
               kernel: str) -> None:
    run_dir, where = Path(recipe.paths.run_dir), recipe.paths
    steps = plan(recipe, submission_csv, args.stages.split(","))
    declared = {s.notebook: declared_parameters(NOTEBOOKS_DIR / f"{s.notebook}.ipynb") for s in steps if s.notebook}
    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    files.write_text(run_dir / "run_config.yaml", yaml.safe_dump(
        {"profile": recipe.profile["path"], "name": recipe.name, "overrides": recipe.overrides, **where.to_dict(),
         "submission_csv": str(submission_csv), "kernel": kernel, "command": " ".join(sys.argv),
         "settings": {k: [c.to_dict() for c in v] if isinstance(v, list) else v.to_dict()
                      for k, v in recipe.settings.items()}}, sort_keys=False))
    for step in steps:
        log.info("== %s", step.title + (f"  ->  {_shown(run_dir / 'notebooks' / (step.output + '.ipynb'))}"
                                         if step.notebook else ""))
        started = time.perf_counter()
        if step.notebook:
            _run_notebook(step, run_dir, declared[step.notebook], kernel)
        elif step.pretrain:
            from utils import selfsup  # only runs that pretrain need albumentations' views here

            selfsup.run_pretraining(step.pretrain, where.data_dir, where.cache_dir)
        else:
            try:
                jobs.run_training(step.train, run_dir, where.data_dir, where.cache_dir, runner)
            except jobs.JobFailed as error:
                raise PipelineError(f"training job failed: {error}") from None
        log.info("   done in %.1f s", time.perf_counter() - started)


def _shown(path: Path) -> str:
    """Paths relative to the current folder when below it (what a user typed `./run_all.sh` from)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _main(argv: Sequence[str] | None) -> int:
    submission = run(argv)
    if submission is None:
        return 0
    if not submission.is_file():
        print(f"error: the pipeline finished but {submission} was not written", file=sys.stderr)
        return 1
    print(f"submission: {_shown(submission)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv, errors=(PipelineError, jobs.JobFailed), code=1)


if __name__ == "__main__":
    sys.exit(main())
