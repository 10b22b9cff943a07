"""Run the whole recipe: the numbered notebooks with papermill, every training as Dask jobs (`./run_all.sh`).

    python -m utils.pipeline [--profile NAME|PATH] [--data DIR] [--name RUN] [--force] [-p KEY VALUE]...
                             [--jobs N] [--jobs-per-gpu K] [--scheduler ADDRESS] [--stages LIST]

Like MONAI's tutorial runner: one papermill execution per notebook, executed copies saved under
`runs/<name>/notebooks/`, the first failing step stops the run (non-zero exit, its error printed). The plan
(`plan`) is the whole run, every training included:

    00_eda, 01_folds,
    [self-supervised pretraining of the backbones, when the profile sets selfsup_epochs (utils.selfsup)],
    train jobs: every (model, fold) of the profile (utils.jobs, on Dask), then 02_train per model (the report:
        its folds are reused, it shows the curves and the fold table),
    03_ensemble,
    04_pseudo_label (writes the pseudo-labels), and for the profile's pseudo_label_models:
        train jobs of the retrains, 02_train per retrain, 04_pseudo_label again (Table 3, the final ensemble),
    05_submit.

Before anything runs or is written, every setting of the profile and of `-p` is checked (utils.config:
unknown keys, types, ranges). The run holds `runs/<name>/.lock` (one run per folder) and first removes the temporary
files of killed runs. A rerun reuses finished work (trained folds, kept checkpoints, predictions) unless `--force`,
which starts the run afresh. Each notebook gets only the parameters its `parameters` cell declares: the profile's
`params`, then `-p` overrides, then the run's paths.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from utils import files, jobs
from utils.config import (
    DEFAULT_DATA_DIR,
    REPO_ROOT,
    ConfigError,
    PathSettings,
    TrainConfig,
    check_run_settings,
    load_profile,
)

log = logging.getLogger("utils.pipeline")  # not __name__: "__main__" under python -m

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
STAGES = ("00_eda", "01_folds", "02_train", "03_ensemble", "04_pseudo_label", "05_submit")
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
        epilog="./run_all.sh --test [PYTEST ARGS] runs the lint and the test suite instead.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--profile", default="demo", help="profile name in notebooks/profiles/ or a YAML path (default: demo)")
    add("--data", default=None, help="data folder in the official layout (default: the phantom set, made in "
        f"{DEFAULT_DATA_DIR.relative_to(REPO_ROOT)} on first use)")
    add("--name", default=None, help="run name: runs/<name>/, submissions/<name>.csv (default: the profile's name)")
    add("--force", action="store_true", help="discard runs/<name>/ and start afresh instead of resuming")
    add("-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
        help="override one setting for every notebook (VALUE parsed as YAML: 3, 0.1, [0,1], true)")
    add("--jobs", type=int, default=None, help="trainings side by side on a CPU-only machine (default 1)")
    add("--jobs-per-gpu", type=int, default=2, help="trainings sharing each GPU (default 2)")
    add("--scheduler", default=None, help="address of a running Dask scheduler to send the trainings to "
        f"(default: ${jobs.SCHEDULER_ENV}, else a local cluster)")
    add("--kernel", default=None, help=f"Jupyter kernel (default: {KERNEL_NAME} if registered, else python3)")
    add("--workdir", default=str(REPO_ROOT), help=argparse.SUPPRESS)  # tests: runs/, submissions/, data/ elsewhere
    add("--stages", default=",".join(STAGES), help="comma-separated subset of stages to run (debugging)")
    args = parser.parse_args(argv)
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {','.join(STAGES)}")
    if args.name is not None and (not args.name or "/" in args.name or args.name.startswith(".")):
        parser.error(f"--name {args.name!r}: use a plain folder name (letters, digits, - and _)")
    if (args.jobs is not None and args.jobs < 1) or args.jobs_per_gpu < 1:
        parser.error("--jobs and --jobs-per-gpu need at least 1")
    return args


def parse_overrides(pairs: Sequence[Sequence[str]]) -> dict[str, Any]:
    values = {}
    for key, text in pairs:
        try:
            values[key] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"-p {key} {text!r}: not a YAML value (quote strings, write lists as [0,1])") from None
    return values


def declared_parameters(notebook: Path) -> set[str]:
    import papermill

    return set(papermill.inspect_notebook(str(notebook)))


def choose_kernel(requested: str | None) -> str:
    if requested:
        return requested
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL_NAME if KERNEL_NAME in KernelSpecManager().find_kernel_specs() else "python3"


def plan(profile: dict[str, Any], settings: dict[str, Any], overrides: dict[str, Any], paths: dict[str, str],
         stages: Sequence[str]) -> list[Step]:
    """Every step of the run, in order (see the module docstring)."""
    base = {**profile["params"], **overrides, **paths}
    models, retrains, pretrainings = settings["train"], settings["pseudo"], {}
    if not models:
        raise ConfigError(f"{profile['path']}: the profile lists no models to train")
    if settings["selfsup"].selfsup_epochs:
        from utils import selfsup

        out_dir = Path(paths["run_dir"]) / "selfsup"
        models, pretrainings = selfsup.with_pretraining(models, settings["selfsup"].selfsup_epochs,
                                                        settings["selfsup"].selfsup_method, out_dir)
        retrains, _ = selfsup.with_pretraining(retrains, settings["selfsup"].selfsup_epochs,
                                               settings["selfsup"].selfsup_method, out_dir)

    def trained(stage: str, configs: list[TrainConfig]) -> list[Step]:
        """The jobs, then 02_train per model as its report."""
        return [Step(stage, train=configs)] + [Step(stage, "02_train", f"02_train__{c.model_name}",
                                                    {**base, **c.to_dict(), **paths}) for c in configs]

    steps: list[Step] = []
    for stage in stages:
        if stage == "02_train":
            steps += ([Step(stage, pretrain=pretrainings)] if pretrainings else []) + trained(stage, models)
        elif stage == "03_ensemble":
            steps.append(Step(stage, stage, stage, {**base, "models": [c.model_name for c in models]}))
        elif stage == "04_pseudo_label":
            labelled = {**base, "models": [c.model_name for c in models]}
            steps.append(Step(stage, stage, stage, labelled))
            if retrains:
                steps += trained(stage, retrains)
                steps.append(Step(stage, stage, f"{stage}__after_retraining", labelled))
        else:
            steps.append(Step(stage, stage, stage, base))
    return steps


def _start_run_folder(run_dir: Path, force: bool, submission_csv: Path) -> None:
    """With the lock held: --force empties the run folder (all but the lock); debris of killed runs goes."""
    if force:
        log.info("--force: removing the contents of %s", run_dir)
        for child in run_dir.iterdir():
            if child.name != files.LOCK_FILE:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        for stale in (submission_csv, submission_csv.with_suffix(".zip")):
            stale.unlink(missing_ok=True)


def _run_notebook(step: Step, run_dir: Path, declared: set[str], kernel: str) -> None:
    import papermill

    output = run_dir / "notebooks" / f"{step.output}.ipynb"
    chosen = {k: v for k, v in step.parameters.items() if k in declared}
    try:
        papermill.execute_notebook(str(NOTEBOOKS_DIR / f"{step.notebook}.ipynb"), str(output), parameters=chosen,
                                   kernel_name=kernel, cwd=str(NOTEBOOKS_DIR), progress_bar=sys.stderr.isatty(),
                                   log_output=True, extra_arguments=KERNEL_ARGUMENTS)
    except papermill.PapermillExecutionError as error:
        raise PipelineError(f"notebook {step.notebook} failed: {error.ename}: {error.evalue}\n"
                            f"executed copy with the traceback: {output}") from None


def run(argv: Sequence[str] | None = None) -> Path | None:
    """Run the stages; returns the submission path when the submit stage ran."""
    args = parse_args(argv)
    profile = load_profile(args.profile)
    overrides = parse_overrides(args.param)
    settings = check_run_settings(profile, overrides)  # before anything is decoded or written
    name = args.name or Path(profile["path"]).stem
    workdir = Path(args.workdir).resolve()
    run_dir = workdir / "runs" / name
    submission_csv = workdir / "submissions" / f"{name}.csv"
    cache_dir = workdir / "data" / "cache"
    if args.data is not None and not Path(args.data).expanduser().is_dir():
        raise PipelineError(f"--data {args.data}: no such folder (expected the official layout: Train/, Val/[, Test/])")
    kernel = choose_kernel(args.kernel)
    runner = jobs.Runner(scheduler=args.scheduler, jobs=args.jobs, jobs_per_gpu=args.jobs_per_gpu, keep_cluster=True)
    with files.RunLock(run_dir), contextlib.closing(runner):  # closing: the local Dask cluster, kept across stages
        _start_run_folder(run_dir, args.force, submission_csv)
        files.remove_debris(run_dir, cache_dir, submission_csv.parent, workdir / "data")
        data_dir = Path(args.data).expanduser() if args.data else workdir / "data" / "phantoms"
        if args.data is None and not (data_dir / "Train").is_dir():
            from utils import phantoms

            log.info("making the phantom CT data set in %s (first run only)", data_dir)
            phantoms.generate_phantoms(data_dir)
        where = PathSettings(str(data_dir), str(run_dir), str(cache_dir)).resolved()
        paths = {**where.to_dict(), "submission_csv": str(submission_csv)}
        steps = plan(profile, settings, overrides, paths, args.stages.split(","))
        declared = {s.notebook: declared_parameters(NOTEBOOKS_DIR / f"{s.notebook}.ipynb") for s in steps if s.notebook}
        (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
        files.write_text(run_dir / "run_config.yaml", yaml.safe_dump(
            {"profile": profile["path"], "name": name, "overrides": overrides, **paths, "kernel": kernel,
             "command": " ".join(sys.argv), "settings": {k: [c.to_dict() for c in v] if isinstance(v, list)
                                                         else v.to_dict() for k, v in settings.items()}},
            sort_keys=False))
        for step in steps:
            log.info("== %s", step.title + (f"  ->  {_shown(run_dir / 'notebooks' / (step.output + '.ipynb'))}"
                                             if step.notebook else ""))
            started = time.perf_counter()
            if step.notebook:
                _run_notebook(step, run_dir, declared[step.notebook], kernel)
            elif step.pretrain:
                from utils import selfsup

                selfsup.run_pretraining(step.pretrain, where.data_dir, where.cache_dir)
            else:
                try:
                    jobs.run_training(step.train, run_dir, where.data_dir, where.cache_dir, runner)
                except jobs.JobFailed as error:
                    raise PipelineError(f"training job failed: {error}") from None
            log.info("   done in %.1f s", time.perf_counter() - started)
    return submission_csv if "05_submit" in args.stages.split(",") else None


def _shown(path: Path) -> str:
    """Paths relative to the current folder when below it (what a user typed `./run_all.sh` from)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        submission = run(argv)
    except (PipelineError, ConfigError, files.RunLocked, files.IntegrityError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if submission is None:
        return 0
    if not submission.is_file():
        print(f"error: the pipeline finished but {submission} was not written", file=sys.stderr)
        return 1
    print(f"submission: {_shown(submission)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
