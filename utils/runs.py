"""A run's recipe and folders, resolved once and the same way for `./run_all.sh` and for a notebook in Jupyter.

    run = runs.resolve("demo", {"epochs": 3}, data_dir=None, run_dir="runs/x", cache_dir=None)
    run, notebook = runs.from_notebook(globals())      # a notebook: its parameters cell's profile, overrides, paths

A profile (`notebooks/profiles/*.yaml`) is the one place a recipe is written; overrides are checked like run_all.sh's
`-p` (utils.config.check_run_settings: unknown keys, types, ranges, each error naming where the value came from).
The data folder defaults to the phantom CT set, generated here, and only here, on first use (`Run.ensure_data`).
With `selfsup_epochs` every model without weights of its own gets the backbone that utils.selfsup pretrains into
`<run>/selfsup/` as its `pretrained_file`, planned here so that the pipeline's jobs and the notebooks agree.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from utils.config import (
    ConfigError,
    NotebookSettings,
    PathSettings,
    RunPaths,
    TrainConfig,
    check_run_settings,
    default_data_dir,
    load_profile,
    workdir,
)

if TYPE_CHECKING:
    from utils.selfsup import SelfSupConfig

log = logging.getLogger(__name__)


@dataclass
class Run:
    """A checked recipe (settings of every stage) and the folders it reads and writes."""

    profile: dict[str, Any]
    overrides: dict[str, Any]
    paths: PathSettings  # absolute
    settings: dict[str, Any]  # utils.config.check_run_settings's, the selfsup weights filled in
    pretrainings: dict[Path, SelfSupConfig]  # weights file -> its pretraining (selfsup_epochs > 0)

    @property
    def name(self) -> str:
        return Path(self.paths.run_dir).name

    @property
    def run(self) -> RunPaths:
        return RunPaths(self.paths.run_dir)

    @property
    def train(self) -> list[TrainConfig]:
        return self.settings["train"]

    @property
    def pseudo(self) -> list[TrainConfig]:
        return self.settings["pseudo"]

    def models(self, names: Sequence[str] | None = None, retrains: bool = False) -> list[TrainConfig]:
        """The profile's models (`retrains`: its pseudo-label retrains), or those named (of either list)."""
        if names is None:
            return list(self.pseudo if retrains else self.train)
        known = {cfg.model_name: cfg for cfg in self.train + self.pseudo}
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ConfigError(f"train_models: {unknown} are not models of {self.profile['path']} "
                              f"(its models: {sorted(known)})", key="train_models")
        return [known[name] for name in names]

    def pretrainings_for(self, configs: Sequence[TrainConfig]) -> dict[Path, SelfSupConfig]:
        """The self-supervised pretrainings these models' weights come from."""
        wanted = {Path(cfg.pretrained_file) for cfg in configs if cfg.pretrained_file}
        return {out: cfg for out, cfg in self.pretrainings.items() if out in wanted}

    def ensure_data(self) -> Path:
        """The data folder; the phantom set is generated when it is the data and missing (first use)."""
        folder = Path(self.paths.data_dir)
        if folder == default_data_dir() and not (folder / "Train").is_dir():
            from utils import phantoms  # imported when needed: every notebook resolves its run through here

            log.info("making the phantom CT data set in %s (first use only)", folder)
            phantoms.generate_phantoms(folder)
        return folder


def resolve(profile: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
            data_dir: str | Path | None = None, run_dir: str | Path | None = None,
            cache_dir: str | Path | None = None, check_archs: bool = True) -> Run:
    """Check the profile and overrides (nothing is read or written; `check_archs`: the architectures too, which
    imports timm), and resolve the paths (defaults under `utils.config.workdir()`; run_dir:
    runs/interactive_<profile>)."""
    loaded = dict(profile) if isinstance(profile, Mapping) else load_profile(profile)
    overrides = dict(overrides or {})
    settings = check_run_settings(loaded, overrides, check_archs)
    if run_dir is None:
        run_dir = workdir() / "runs" / f"interactive_{Path(loaded['path']).stem}"
    paths = PathSettings(None if data_dir is None else str(data_dir), str(run_dir),
                         None if cache_dir is None else str(cache_dir)).resolved()
    pretrainings: dict[Path, SelfSupConfig] = {}
    ssl = settings["selfsup"]
    if ssl.selfsup_epochs:
        from utils import selfsup  # imported when needed: it brings albumentations and the training loop

        out_dir = Path(paths.run_dir) / "selfsup"
        settings["train"], pretrainings = selfsup.with_pretraining(settings["train"], ssl, out_dir)
        settings["pseudo"], _ = selfsup.with_pretraining(settings["pseudo"], ssl, out_dir)
    return Run(loaded, overrides, paths, settings, pretrainings)


def from_notebook(namespace: Mapping[str, Any]) -> tuple[Run, NotebookSettings]:
    """A notebook's run: its parameters cell's `profile`, `overrides` and paths (utils.config's NotebookSettings
    and PathSettings); the data folder exists afterwards (the phantom set is made on first use)."""
    notebook = NotebookSettings.from_namespace(namespace)
    where = PathSettings.from_namespace(namespace)
    # the architectures are not checked here (timm costs each notebook a second): the pipeline checked them before
    # its first notebook, and in Jupyter utils.models refuses an unknown one, with the closest names, when the
    # notebook builds a model
    run = resolve(notebook.profile, notebook.overrides, where.data_dir, where.run_dir, where.cache_dir,
                  check_archs=False)
    run.ensure_data()
    return run, notebook
