"""Run the numbered notebooks in order with papermill: the engine behind `./run_all.sh`.

    python -m utils.pipeline [--profile NAME|PATH] [--data DIR] [--name RUN] [--force] [-p KEY VALUE]...

Like MONAI's tutorial runner: one papermill execution per notebook, executed copies saved under
`runs/<name>/notebooks/`, the first failing notebook stops the run (non-zero exit, its error printed).
Each notebook gets only the parameters its `parameters` cell declares: the profile's `params`, then `-p`
overrides, then the run's paths. `02_train` runs once per entry of the profile's `models`. A rerun reuses
finished work (trained folds, kept checkpoints, predictions) unless `--force`, which starts the run afresh.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from utils.config import REPO_ROOT, ConfigError, atomic_write_text, load_profile

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
STAGES = ("00_eda", "01_folds", "02_train", "03_ensemble", "04_pseudo_label", "05_submit")
PHANTOM_SUBDIR = Path("data") / "phantoms"
CACHE_SUBDIR = Path("data") / "cache"
KERNEL_NAME = "percovid"


class PipelineError(RuntimeError):
    """A stage failed or the run was misconfigured; the message says which and where to look."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run_all.sh", description="Run the numbered notebooks in order with papermill.",
                                     epilog="./run_all.sh --test [PYTEST ARGS] runs the test suite instead.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="demo", help="profile name in notebooks/profiles/ or a YAML path (default: demo)")
    parser.add_argument("--data", default=None, help=f"data folder in the official layout (default: the phantom set, made in {PHANTOM_SUBDIR} on first use)")
    parser.add_argument("--name", default=None, help="run name: outputs in runs/<name>/, submissions/<name>.csv (default: profile name)")
    parser.add_argument("--force", action="store_true", help="discard runs/<name>/ and start afresh instead of resuming")
    parser.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="override one parameter for every notebook (VALUE parsed as YAML: 3, 0.1, [0,1], true)")
    parser.add_argument("--kernel", default=None, help=f"Jupyter kernel (default: {KERNEL_NAME} if registered, else python3)")
    parser.add_argument("--workdir", default=str(REPO_ROOT), help=argparse.SUPPRESS)  # tests: runs/, submissions/, data/ elsewhere
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of stages to run (debugging)")
    args = parser.parse_args(argv)
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {','.join(STAGES)}")
    if args.name is not None and (not args.name or "/" in args.name or args.name.startswith(".")):
        parser.error(f"--name {args.name!r}: use a plain folder name (letters, digits, - and _)")
    return args


def parse_overrides(pairs: Sequence[Sequence[str]]) -> dict[str, Any]:
    return {key: yaml.safe_load(value) for key, value in pairs}


def declared_parameters(notebook: Path) -> set[str]:
    import papermill

    return set(papermill.inspect_notebook(str(notebook)))


def choose_kernel(requested: str | None) -> str:
    if requested:
        return requested
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL_NAME if KERNEL_NAME in KernelSpecManager().find_kernel_specs() else "python3"


def ensure_data(data: str | None, workdir: Path) -> Path:
    """The given folder, or the embedded phantom set (generated on first use)."""
    if data is not None:
        path = Path(data).expanduser().resolve()
        if not path.is_dir():
            raise PipelineError(f"--data {data}: no such folder (expected the official layout: Train/, Val/[, Test/])")
        return path
    phantom_dir = workdir / PHANTOM_SUBDIR
    if not (phantom_dir / "Train").is_dir():
        from utils import phantoms

        print(f"making the phantom CT data set in {phantom_dir} (first run only)", flush=True)
        phantoms.generate_phantoms(phantom_dir)
    return phantom_dir


def plan(profile: dict[str, Any], overrides: dict[str, Any], paths: dict[str, str], stages: Sequence[str],
         kernel: str) -> list[tuple[str, str, dict[str, Any]]]:
    """The list of (notebook stem, executed-copy stem, parameters) to run, in order."""
    base = {**profile["params"], **overrides, **paths}
    model_params = [{**profile["params"], **model, **overrides, **paths} for model in profile["models"]]
    model_names = [m["model_name"] for m in profile["models"]]
    pseudo_names = profile.get("pseudo_label_models") or []
    unknown = sorted(set(pseudo_names) - set(model_names))
    if unknown:
        raise ConfigError(f"pseudo_label_models {unknown} are not among the profile's models {model_names}")
    retrain = [{**p, "model_name": f"{p['model_name']}_pl", "use_pseudo_labels": True}
               for p in model_params if p["model_name"] in pseudo_names]
    steps: list[tuple[str, str, dict[str, Any]]] = []
    for stage in stages:
        if stage == "02_train":
            if not model_params:
                raise ConfigError("the profile lists no models to train")
            steps += [(stage, f"{stage}__{p['model_name']}", p) for p in model_params]
        elif stage == "03_ensemble":
            steps.append((stage, stage, {**base, "models": model_names}))
        elif stage == "04_pseudo_label":
            steps.append((stage, stage, {**base, "models": model_names, "retrain_params": retrain,
                                         "kernel_name": kernel}))
        else:
            steps.append((stage, stage, base))
    return steps


def run(argv: Sequence[str] | None = None) -> Path | None:
    """Run the stages; returns the submission path when the submit stage ran."""
    args = parse_args(argv)
    profile = load_profile(args.profile)
    name = args.name or Path(profile["path"]).stem
    overrides = parse_overrides(args.param)
    workdir = Path(args.workdir).resolve()
    run_dir = workdir / "runs" / name
    submission_csv = workdir / "submissions" / f"{name}.csv"
    if args.force and run_dir.exists():
        print(f"--force: removing {run_dir}", flush=True)
        shutil.rmtree(run_dir)
        for stale in (submission_csv, submission_csv.with_suffix(".zip")):
            stale.unlink(missing_ok=True)
    data_dir = ensure_data(args.data, workdir)
    kernel = choose_kernel(args.kernel)
    paths = {"run_dir": str(run_dir), "data_dir": str(data_dir), "cache_dir": str(workdir / CACHE_SUBDIR),
             "submission_csv": str(submission_csv)}
    steps = plan(profile, overrides, paths, args.stages.split(","), kernel)

    declared = {stem: declared_parameters(NOTEBOOKS_DIR / f"{stem}.ipynb") for stem in {s for s, _, _ in steps}}
    all_declared = set().union(*declared.values())
    unknown = sorted(set(overrides) - all_declared)
    if unknown:
        raise ConfigError(f"-p {unknown}: no notebook has such a parameter; known: {sorted(all_declared)}")

    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "run_config.yaml", yaml.safe_dump(
        {"profile": profile["path"], "name": name, "overrides": overrides, **paths, "kernel": kernel,
         "command": " ".join(sys.argv)}, sort_keys=False))
    import papermill

    for stem, out_stem, params in steps:
        notebook = NOTEBOOKS_DIR / f"{stem}.ipynb"
        output = run_dir / "notebooks" / f"{out_stem}.ipynb"
        chosen = {k: v for k, v in params.items() if k in declared[stem]}
        print(f"== {out_stem}  ->  {_shown(output)}", flush=True)
        started = time.perf_counter()
        try:
            papermill.execute_notebook(str(notebook), str(output), parameters=chosen, kernel_name=kernel,
                                       cwd=str(NOTEBOOKS_DIR), progress_bar=sys.stderr.isatty(), log_output=True)
        except papermill.PapermillExecutionError as error:
            raise PipelineError(f"notebook {stem} failed: {error.ename}: {error.evalue}\n"
                                f"executed copy with the traceback: {output}") from None
        print(f"   done in {time.perf_counter() - started:.1f} s", flush=True)
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
    except (PipelineError, ConfigError) as error:
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
