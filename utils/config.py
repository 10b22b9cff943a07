"""One config namespace for the whole suite: every setting defined once, typed, and checked before anything runs.

Each setting is a field of exactly one dataclass, with its default and its checks:

    PathSettings      data_dir, run_dir, cache_dir          every notebook (run_all.sh sets them)
    TrainConfig       one model's training recipe           02_train (img_size / in_chans also 00_eda)
    FoldSettings      n_folds, fold_seed                    01_folds
    EnsembleSettings  models, greedy_selection, rounding    03_ensemble, 04_pseudo_label
    SubmitSettings    split, submission_csv, export         05_submit
    SelfSupSettings   selfsup_epochs, _method, _dedup       the pipeline's pretraining step (utils.selfsup)
    ExplainSettings   interval_level, worst_slices, ...     06_explain
    NotebookSettings  profile, overrides, role, ...         every notebook (how it gets its recipe)

A notebook's `parameters` cell declares some of these fields with the same defaults (tests/test_config.py compares
every notebook's parameters with these classes, so the two cannot drift) and turns them into one validated object
with `<Class>.from_namespace(globals())`. `TrainConfig.save_yaml` dumps the recipe next to the checkpoints (as
timm's train.py dumps its args), so every result on disk says how it was made.

Profiles (`notebooks/profiles/*.yaml`): `params` go to every notebook that declares them; each entry of `models` is
one model trained by `02_train` (its keys, TrainConfig fields only, override `params`); `pseudo_label_models` are
retrained with pseudo-labels. `check_run_settings` checks a profile and the `-p` overrides before a run starts: an
unknown or misspelled key, a value of the wrong type or out of range, a fold that the folds cannot have; each
error names the file (or `-p`), the key and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PROFILES_DIR = REPO_ROOT / "notebooks" / "profiles"
# Where outputs go (runs/, submissions/, data/phantoms, data/cache): the checkout, unless PERCOVID_WORKDIR names
# another folder (run_all.sh --workdir sets it; a read-only checkout on Kaggle or Colab needs it).
WORKDIR_ENV = "PERCOVID_WORKDIR"


def workdir() -> Path:
    """The folder every output goes under (read when called: run_all.sh --workdir and a notebook's kernel set it)."""
    return Path(os.environ.get(WORKDIR_ENV) or REPO_ROOT).expanduser().resolve()


def default_data_dir() -> Path:
    return workdir() / "data" / "phantoms"


def default_cache_dir() -> Path:
    return workdir() / "data" / "cache"


def default_run_dir() -> Path:
    return workdir() / "runs" / "interactive"


# Choices of the method (the paper's heads and poolings, utils.models; optimizers, utils.train / utils.sam).
HEADS = ("reg", "exp", "ldl")
POOLINGS = ("avg", "hybrid", "avgmax", "catavgmax")
NUM_BINS = 101  # the exp/ldl heads' bins: integer percentages 0..100
OPTIMIZERS = ("sgd", "adamw")
SAM_MODES = ("sam", "asam", "none")
# Autocast dtypes: auto picks bf16 where the GPU computes it natively, else fp16 with loss scaling (utils.train).
AMP_DTYPES = ("auto", "bfloat16", "float16")
# torch.compile's modes for the training step (`compile: true` is "default"; "reduce-overhead" adds CUDA graphs).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SUBMIT_SPLITS = ("Val", "Test")
# How the ensemble rounds (utils.ensemble): none; once (the mean of everything, rounded half up); authors (each
# checkpoint rounded half up; one model: the mean of its checkpoint integers truncated; several: the mean of all
# their checkpoint integers rounded half up: the seed team's inference and combine scripts). true / false in a profile
# mean once / none.
ROUNDINGS = ("none", "once", "authors")
# Imbalanced-regression settings (utils.losses): LDS loss weights, and eq 2's loss on f2.
LDS_MODES = ("none", "inverse", "sqrt_inverse")
REGRESSION_LOSSES = ("smooth_l1", "balanced_mse")
SELFSUP_METHODS = ("simclr", "simsiam", "byol")  # utils.selfsup
# The paper's choices that its text leaves open and the seed team's code settles (docs/paper.md): what f2 (eq 2)
# reads (utils.models), whose RandAugment (utils.augment), and SAM's BatchNorm updates (utils.sam).
F2_INPUTS = ("probs", "logits")
RANDAUG_STYLES = ("suite", "authors")
SAM_BN_UPDATES = ("first", "both")
# Training pairs mixed (utils.mixup): none, plain mixup (uniform partners), C-Mixup (partners by label distance).
MIXUP_MODES = ("none", "mixup", "cmixup")
NOTEBOOK_ROLES = ("train", "report")
PROFILE_KEYS = ("description", "params", "models", "pseudo_label_models")


class ConfigError(ValueError):
    """A setting or profile is wrong; the message names it and the fix. `key` is the setting at fault, if one."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """The one check of a categorical setting (head, pooling, optimizer, ...)."""
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: choose one of {', '.join(map(str, choices))}", key=name)


def rounding_rule(rounding: bool | str) -> str:
    """A rounding setting as one of ROUNDINGS (true: once, false: none); a ConfigError for anything else."""
    rule = {True: "once", False: "none"}.get(rounding, rounding)
    check_choice("rounding", rule, ROUNDINGS)
    return rule


def check_plain_name(name: str, value: str) -> None:
    """Names that become folder and file names (model_name, run names)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", value or ""):
        raise ConfigError(f"{name}={value!r}: use letters, digits and - _ . + only (it names a folder)", key=name)


# ----------------------------------------------------------------------------------------------- typed fields


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (Union, types.UnionType):
        parts = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(_describe(a) for a in parts) + (" or null" if len(parts) < len(typing.get_args(hint))
                                                            else "")
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    return {int: "a whole number", float: "a number", bool: "true or false", str: "a string",
            dict: "a mapping"}.get(hint, str(hint))


def _typed(name: str, value: Any, hint: Any) -> Any:
    """`value` checked against the field's type hint (ints are accepted as floats, tuples as lists)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _typed(name, value, option)
            except ConfigError:
                continue
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_typed(f"{name}[{i}]", item, args[0]) for i, item in enumerate(value)]
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ConfigError(f"{name}={value!r}: expected {_describe(hint)}", key=name.split("[")[0])


class Settings:
    """Base of the settings dataclasses: each field is type-checked on construction, then `validate` checks ranges."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _typed(f.name, getattr(self, f.name), hints[f.name]))
        self.validate()

    def validate(self) -> None:
        """Ranges and choices; raise ConfigError(message, key)."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}

    @classmethod
    def from_namespace(cls, namespace: Mapping[str, Any]):
        """This class's fields picked out of a notebook's variables (the `parameters` cell); others are ignored."""
        return cls(**{name: namespace[name] for name in cls.field_names() if name in namespace})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_all(checks: list[tuple[bool, str, str]]) -> None:
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"{key}={message}", key=key)


# ----------------------------------------------------------------------------------------------- the settings


@dataclass
class TrainConfig(Settings):
    """Everything that defines one model's training; defaults are the paper's recipe (GPU, real data)."""

    model_name: str = "resnest50d_exp_hybrid"
    arch: str = "resnest50d"  # any timm CNN
    head: str = "exp"  # reg | exp | ldl
    pooling: str = "hybrid"  # avg | hybrid | avgmax | catavgmax
    f2_input: str = "probs"  # exp/ldl heads: f2 (eq 2) reads the softmax probabilities | the logits (seed code)
    in_chans: int = 3  # 1 (gray) or 3 (ImageNet weights)
    img_size: int = 512
    drop_rate: float = 0.0
    pretrained: bool = False  # timm's ImageNet weights (hub download, or its local cache)
    pretrained_file: str | None = None  # or a local .pth/.safetensors of the same arch (e.g. utils.selfsup's)
    optimizer: str = "sgd"  # sgd | adamw: the base optimizer
    sam: str = "sam"  # sam | asam | none: the SAM wrapper around it
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-3
    sam_rho: float = 0.05
    sam_bn_update: str = "first"  # BatchNorm running statistics move on SAM's first pass | both (seed code)
    epochs: int = 50
    warmup_epochs: float = 2.0
    warmup_lr: float = 1e-5
    min_lr: float = 1e-6
    batch_size: int = 8
    clip_grad: float | None = None
    kl_weight: float = 1.0  # weight of the ldl head's KL term
    regression_loss: str = "smooth_l1"  # smooth_l1 (eq 2) | balanced_mse (its batch form, on f2; utils.losses)
    bmse_sigma: float = 8.0  # balanced_mse: the label noise sd, in percentage points
    lds: str = "none"  # none | inverse | sqrt_inverse: loss weights from the smoothed label density (utils.losses)
    lds_sigma: float = 2.0  # lds: the smoothing kernel's sd, in percentage points
    ranksim_weight: float = 0.0  # RankSim: weight of the ranking-similarity regularizer (0: off; utils.losses)
    ranksim_lambda: float = 2.0  # RankSim: the blackbox ranking gradient's interpolation strength
    randaug_n: int = 2  # RandAugment: ops per image
    randaug_m: int = 9  # RandAugment: magnitude 0..30
    randaug_style: str = "suite"  # suite (utils.augment) | authors (the seed team's: fixed strength, p 0.5 each)
    train_flips: bool = False  # random horizontal and vertical flips (p 0.5 each) in training (seed code)
    mixup: str = "none"  # none | mixup | cmixup: each training slice mixed with a partner (utils.mixup)
    mixup_alpha: float = 2.0  # the mixing weight lam ~ Beta(alpha, alpha) (C-Mixup's experiments: 2)
    cmixup_sigma: float = 5.0  # cmixup: the label kernel's sd, in percentage points
    tta_hflip: bool = False  # average predictions with the h-flipped image
    folds: list[int] = field(default_factory=lambda: [0, 1])  # folds to train (of FoldSettings.n_folds)
    save_last_k: int = 5  # checkpoints of the last k epochs are kept and averaged
    # > 0: the weights validated, kept and predicted with are an exponential moving average of the trained ones
    # (timm's ModelEmaV3, updated after every step with this decay; 0.995 averages over ~200 steps)
    ema_decay: float = 0.0
    seed: int = 42
    use_pseudo_labels: bool = False  # add 04_pseudo_label's labelled Val/Test slices to every fold's training part
    device: str = "auto"  # auto: cuda when present (autocast: amp_dtype), else cpu (fp32, or bf16: cpu_bf16)
    amp: bool = True
    # auto: bf16 on GPUs that compute it natively (compute capability >= 8: A100, H100, RTX 30xx on), else fp16 with
    # a GradScaler (T4, P100, V100: Kaggle's GPUs, where bf16 is emulated and slow); fp32 on the CPU.
    # bfloat16 | float16: that dtype on any device.
    amp_dtype: str = "auto"
    # On a CPU that computes bf16 natively (AVX-512 BF16 or AMX: oneDNN's bf16 convolutions), amp_dtype auto trains
    # and predicts in bf16 autocast (2x the fp32 speed of resnet10t on an AMD EPYC: docs/speed.md); fp32 elsewhere.
    cpu_bf16: bool = False
    channels_last: bool = True
    compile: bool | str = False  # torch.compile the step: false, true (= "default") or one of COMPILE_MODES
    num_workers: int = -1  # loader workers; -1: min(8, cores - 1) on GPU, 0 on CPU
    max_steps_per_epoch: int | None = None  # smoke tests only

    def validate(self) -> None:
        check_plain_name("model_name", self.model_name)
        check_choice("head", self.head, HEADS)
        check_choice("pooling", self.pooling, POOLINGS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("sam", self.sam, SAM_MODES)
        check_choice("amp_dtype", self.amp_dtype, AMP_DTYPES)
        check_choice("regression_loss", self.regression_loss, REGRESSION_LOSSES)
        check_choice("lds", self.lds, LDS_MODES)
        check_choice("f2_input", self.f2_input, F2_INPUTS)
        check_choice("sam_bn_update", self.sam_bn_update, SAM_BN_UPDATES)
        check_choice("randaug_style", self.randaug_style, RANDAUG_STYLES)
        check_choice("mixup", self.mixup, MIXUP_MODES)
        if isinstance(self.compile, str):
            check_choice("compile", self.compile, COMPILE_MODES)
        _check_all([
            (self.in_chans in (1, 3), "in_chans", f"{self.in_chans}: use 1 (grayscale) or 3 (ImageNet weights)"),
            (self.img_size >= 16, "img_size", f"{self.img_size}: use at least 16 px"),
            (0 <= self.drop_rate < 1, "drop_rate", f"{self.drop_rate}: must be in [0, 1)"),
            (self.epochs >= 1, "epochs", f"{self.epochs}: need at least 1"),
            (self.batch_size >= 1, "batch_size", f"{self.batch_size}: need at least 1"),
            (1 <= self.save_last_k <= self.epochs, "save_last_k", f"{self.save_last_k}: must be in 1..epochs "
                                                                  f"({self.epochs})"),
            (0 <= self.warmup_epochs < self.epochs, "warmup_epochs", f"{self.warmup_epochs}: must be in [0, epochs)"),
            (self.lr > 0, "lr", f"{self.lr}: must be > 0"),
            (self.warmup_lr >= 0 and self.min_lr >= 0, "warmup_lr", f"{self.warmup_lr} / min_lr={self.min_lr}: "
                                                                    "must be >= 0 (0: the seed code's schedule)"),
            (0 <= self.momentum < 1, "momentum", f"{self.momentum}: must be in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay", f"{self.weight_decay}: must be >= 0"),
            (self.sam_rho >= 0, "sam_rho", f"{self.sam_rho}: must be >= 0"),
            (self.clip_grad is None or self.clip_grad > 0, "clip_grad", f"{self.clip_grad}: must be > 0 or null"),
            (0 <= self.ema_decay < 1, "ema_decay", f"{self.ema_decay}: must be in [0, 1) (0: off)"),
            (self.kl_weight >= 0, "kl_weight", f"{self.kl_weight}: must be >= 0"),
            (self.bmse_sigma > 0, "bmse_sigma", f"{self.bmse_sigma}: must be > 0"),
            (self.lds_sigma > 0, "lds_sigma", f"{self.lds_sigma}: must be > 0"),
            (self.ranksim_weight >= 0, "ranksim_weight", f"{self.ranksim_weight}: must be >= 0 (0: off)"),
            (self.ranksim_lambda > 0, "ranksim_lambda", f"{self.ranksim_lambda}: must be > 0"),
            (0 <= self.randaug_n <= 10, "randaug_n", f"{self.randaug_n}: RandAugment's N must be in 0..10"),
            (0 <= self.randaug_m <= 30, "randaug_m", f"{self.randaug_m}: RandAugment's M must be in 0..30"),
            (self.mixup_alpha > 0, "mixup_alpha", f"{self.mixup_alpha}: must be > 0 (Beta(alpha, alpha))"),
            (self.cmixup_sigma > 0, "cmixup_sigma", f"{self.cmixup_sigma}: must be > 0 (percentage points)"),
            (len(self.folds) >= 1, "folds", "[]: list at least one fold to train"),
            (all(f >= 0 for f in self.folds) and len(set(self.folds)) == len(self.folds), "folds",
             f"{self.folds}: folds are distinct numbers 0..n_folds-1"),
            (self.num_workers >= -1, "num_workers", f"{self.num_workers}: use -1 (automatic) or 0 and up"),
            (self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1, "max_steps_per_epoch",
             f"{self.max_steps_per_epoch}: must be >= 1 or null"),
            (bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device)), "device",
             f"{self.device!r}: use auto, cpu, cuda or cuda:N"),
        ])
        # the architecture is checked where it matters without importing timm in every process that reads a recipe:
        # check_run_settings (before a run starts) and utils.models.build_model (before a model is built)

    @property
    def compile_mode(self) -> str | None:
        """torch.compile's mode for the training step, or None when the step runs eagerly."""
        if self.compile is True:
            return "default"
        return self.compile or None

    def save_yaml(self, path: str | Path, record: bool = False) -> None:
        """The recipe as YAML; `record`: with its integrity record (a fold's config.yaml: what predict rebuilds the
        model from, so an edit is refused, never used)."""
        from utils import files

        files.write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False), record=record)

    @classmethod
    def load_yaml(cls, path: str | Path) -> TrainConfig:
        """A saved recipe; fields added since it was saved take their defaults (their old behaviour)."""
        saved = load_yaml(path)
        if not isinstance(saved, dict):
            raise ConfigError(f"{path} holds no recipe (a mapping of settings): the file is damaged; retrain or "
                              "export again what wrote it")
        unknown = sorted(set(saved) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"{path}: {_unknown_key('a saved recipe', unknown[0], cls.field_names())} (written by "
                              f"another version of this suite: use that version, or retrain)", key=unknown[0])
        return cls(**saved)


def check_arch(arch: str) -> None:
    """An unknown timm architecture is an error listing the closest names (imports timm: call it late)."""
    import timm

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=6, cutoff=0.6)
        raise ConfigError(f"arch={arch!r}: not a timm architecture" + (f"; closest: {', '.join(close)}" if close
                                                                        else " (see timm.list_models())"), key="arch")


@dataclass
class PathSettings(Settings):
    """Where a notebook reads and writes. run_all.sh passes absolute paths; None is the interactive default."""

    data_dir: str | None = None  # official layout (Train/, Val/[, Test/]); None: the phantom set, made on first use
    run_dir: str | None = None  # everything the run writes; None: runs/interactive_<profile> (utils.runs)
    cache_dir: str | None = None  # decoded-image cache shared by runs; None: data/cache

    def resolved(self) -> PathSettings:
        """Absolute paths, with the defaults (under `workdir()`) filled in; nothing is created (utils.runs makes
        the phantom set when it is the data)."""
        data_dir = Path(self.data_dir).expanduser() if self.data_dir else default_data_dir()
        return PathSettings(str(data_dir.resolve()), str(Path(self.run_dir or default_run_dir()).resolve()),
                            str(Path(self.cache_dir or default_cache_dir()).resolve()))

    @property
    def run(self) -> RunPaths:
        return RunPaths(self.run_dir or default_run_dir())


@dataclass
class NotebookSettings(Settings):
    """How a notebook gets its recipe: a profile (the one place recipes are written) plus overrides, checked as
    run_all.sh's -p; and, for 02/04, whether it trains itself or reports on the pipeline's jobs."""

    profile: str = "demo"  # a profile of notebooks/profiles/ (demo: minutes on a CPU; paper: the seed team's, GPU)
    overrides: dict = field(default_factory=dict)  # settings on top of the profile, e.g. {'epochs': 3} (as -p)
    role: str = "train"  # train: train (or resume) what it shows here; report: the pipeline's jobs trained it
    train_models: list[str] | None = None  # 02/04: which of the profile's models (None: all)

    def validate(self) -> None:
        check_choice("role", self.role, NOTEBOOK_ROLES)


@dataclass
class FoldSettings(Settings):
    n_folds: int = 5  # subject-grouped, severity-stratified folds (utils.folds)
    fold_seed: int = 0

    def validate(self) -> None:
        _check_all([(self.n_folds >= 2, "n_folds", f"{self.n_folds}: cross-validation needs at least 2 folds")])


@dataclass
class EnsembleSettings(Settings):
    models: list[str] | None = None  # models to combine (None: every trained model; 04: the 03 ensemble)
    greedy_selection: bool = False  # choose models by forward selection on OOF MAE
    rounding: bool | str = True  # none | once (= true: one mean, rounded half up) | authors (ROUNDINGS)

    def validate(self) -> None:
        self.rounding = rounding_rule(self.rounding)  # one spelling from here on


@dataclass
class SubmitSettings(Settings):
    split: str = "Val"  # the split to submit: Val (validation phase) or Test
    submission_csv: str | None = None  # None: submissions/<run name>.csv
    export: bool = True  # also write runs/<name>/export/ (what utils.predict needs, nothing else)

    def validate(self) -> None:
        check_choice("split", self.split, SUBMIT_SPLITS)

    def csv_path(self, run_dir: str | Path) -> Path:
        """Where the submission goes: `submission_csv`, else <workdir>/submissions/<run name>.csv."""
        if self.submission_csv:
            return Path(self.submission_csv)
        return workdir() / "submissions" / f"{Path(run_dir).name}.csv"


@dataclass
class SelfSupSettings(Settings):
    """Self-supervised pretraining of each model's backbone on every slice of the data, labels unused
    (utils.selfsup); its weights become the model's pretrained_file. A pipeline stage, no notebook."""

    selfsup_epochs: int = 0  # 0: off
    selfsup_method: str = "simclr"  # simclr | simsiam | byol
    selfsup_dedup: float = 0.0  # 0: every slice; else drop those that correlate >= this with the last kept

    def validate(self) -> None:
        check_choice("selfsup_method", self.selfsup_method, SELFSUP_METHODS)
        _check_all([(self.selfsup_epochs >= 0, "selfsup_epochs", f"{self.selfsup_epochs}: 0 (off) or more"),
                    (0 <= self.selfsup_dedup <= 1, "selfsup_dedup",
                     f"{self.selfsup_dedup}: 0 (off), or a correlation up to 1 (0.95 keeps 58 % of the crops)")])


@dataclass
class ExplainSettings(Settings):
    """06_explain: prediction intervals, saliency maps, per-scan summaries (utils.intervals, utils.explain)."""

    interval_level: float = 0.9  # coverage of the prediction intervals
    worst_slices: int = 8  # the out-of-fold slices with the largest errors shown with their heatmaps
    scans_csv: str | None = None  # name,subject rows mapping Val/Test images to scans, for their per-scan table

    def validate(self) -> None:
        _check_all([(0 < self.interval_level < 1, "interval_level", f"{self.interval_level}: must lie in (0, 1)"),
                    (self.worst_slices >= 0, "worst_slices", f"{self.worst_slices}: 0 or more")])


SETTINGS_CLASSES: tuple[type[Settings], ...] = (PathSettings, NotebookSettings, TrainConfig, FoldSettings,
                                                EnsembleSettings, SubmitSettings, SelfSupSettings, ExplainSettings)
# Never set by a profile or -p: the paths come from run_all.sh's --data / --name / --workdir, the notebook settings
# from the pipeline (or the user of a notebook).
RESERVED_SETTINGS = {
    **dict.fromkeys([*PathSettings.field_names(), "submission_csv"],
                    "is set by run_all.sh (--data, --name, --workdir)"),
    **dict.fromkeys(NotebookSettings.field_names(), "is a notebook parameter (the pipeline sets it)")}


def known_settings() -> dict[str, type[Settings]]:
    """Every setting name -> the one class that defines it."""
    return {name: cls for cls in SETTINGS_CLASSES for name in cls.field_names()}


# ----------------------------------------------------------------------------------------------- checking a run


def _unknown_key(where: str, key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"closest valid names: {', '.join(close)}" if close else f"valid names: {', '.join(sorted(valid))}"
    return ConfigError(f"{where}: unknown setting {key!r}; {hint}", key=key)


def _attributed(error: ConfigError, sources: list[tuple[str, Mapping[str, Any]]]) -> ConfigError:
    """The error, prefixed with the last source that set its key (-p beats a model entry beats params)."""
    where = next((w for w, values in reversed(sources) if error.key in values), "default")
    return ConfigError(f"{where}: {error}", key=error.key)


def check_run_settings(profile: dict[str, Any], overrides: Mapping[str, Any], check_archs: bool = True
                       ) -> dict[str, Any]:
    """Check a loaded profile and the -p overrides before anything runs (`check_archs`: also that every arch is a
    timm architecture, which imports timm); returns the validated settings:
    {"train": [TrainConfig per model], "pseudo": [TrainConfig per pseudo-label retrain], "folds": FoldSettings,
    "ensemble": EnsembleSettings, "submit": SubmitSettings, "selfsup": SelfSupSettings, "explain": ExplainSettings}."""
    known = known_settings()
    valid = sorted(set(known) - set(RESERVED_SETTINGS))
    path = profile["path"]
    sources = [(f"{path}: params", profile["params"]), ("-p", overrides)]
    for where, values in sources:
        for key in values:
            if key in RESERVED_SETTINGS:
                raise ConfigError(f"{where}: {key!r} {RESERVED_SETTINGS[key]}; remove it", key=key)
            if key not in known:
                raise _unknown_key(where, key, valid)
    shared = {**profile["params"], **overrides}

    def build(cls: type[Settings], values: Mapping[str, Any], layers: list[tuple[str, Mapping[str, Any]]]):
        try:
            return cls(**{k: v for k, v in values.items() if k in cls.field_names()})
        except ConfigError as error:
            raise _attributed(error, layers) from None

    fold_settings = build(FoldSettings, shared, sources)
    trains = []
    for index, model in enumerate(profile["models"]):
        where = f"{path}: models[{index}] ({model.get('model_name', '?')})"
        for key in model:
            if key not in TrainConfig.field_names():
                raise _unknown_key(where + " (a model entry takes TrainConfig settings only)", key,
                                   TrainConfig.field_names())
        layers = [sources[0], (where, model), sources[1]]
        cfg = build(TrainConfig, {**profile["params"], **model, **overrides}, layers)
        if check_archs:
            try:
                check_arch(cfg.arch)
            except ConfigError as error:
                raise _attributed(error, layers) from None
        bad = [f for f in cfg.folds if f >= fold_settings.n_folds]
        if bad:
            raise _attributed(ConfigError(f"folds={cfg.folds}: fold {bad[0]} does not exist with "
                                          f"n_folds={fold_settings.n_folds} (folds are 0..{fold_settings.n_folds - 1})",
                                          key="folds"), layers)
        trains.append(cfg)
    pseudo_names = profile.get("pseudo_label_models") or []
    _check_model_names(profile, overrides, trains, pseudo_names)
    pseudo = [TrainConfig(**{**cfg.to_dict(), "model_name": pseudo_label_name(cfg.model_name),
                             "use_pseudo_labels": True}) for cfg in trains if cfg.model_name in pseudo_names]
    ensemble = build(EnsembleSettings, shared, sources)
    _check_ensemble_models(ensemble, trains, sources)
    return {"train": trains, "pseudo": pseudo, "folds": fold_settings,
            "ensemble": ensemble, "submit": build(SubmitSettings, shared, sources),
            "selfsup": build(SelfSupSettings, shared, sources), "explain": build(ExplainSettings, shared, sources)}


def _check_ensemble_models(ensemble: EnsembleSettings, configs: list[TrainConfig],
                           sources: list[tuple[str, Mapping[str, Any]]]) -> None:
    """`models` (what 03/04 combine) names models the run trains before 03: an unknown one (or a pseudo-label
    retrain, trained after 03 and put in its original's place by 04 itself) failed in 03, after every training."""
    names = [cfg.model_name for cfg in configs]
    unknown = [name for name in ensemble.models or [] if name not in names]
    if unknown:
        retrain = " (a pseudo-label retrain: 04 puts it in its original's place by itself)" \
            if unknown[0].endswith(PSEUDO_SUFFIX) else ""
        raise _attributed(ConfigError(f"models={ensemble.models}: {unknown[0]!r} is not a model this run trains "
                                      f"before 03{retrain} (its models: {', '.join(names)}); list some of those, or "
                                      "null for all", key="models"), sources)


def _check_model_names(profile: Mapping[str, Any], overrides: Mapping[str, Any], trains: list[TrainConfig],
                       pseudo_names: list[str]) -> None:
    """A model_name in -p (or params) applies to every model: refused when it gives several models one name (they
    would share one folder: the run failed after a whole training) or renames a model of pseudo_label_models (its
    retrain silently disappeared); and no retrain may take the name of another model."""
    path, names = profile["path"], [cfg.model_name for cfg in trains]
    entries = [model.get("model_name") for model in profile["models"]]
    where = "-p model_name" if "model_name" in overrides else f"{path}: params: model_name"
    fix = (f"name each model in its `models` entry (and in pseudo_label_models) of a copy of {path}, and run that "
           "copy with --profile")
    if len(set(names)) < len(names):
        raise ConfigError(f"{where} {names[0]!r} gives all {len(names)} models of the profile one name "
                          f"({', '.join(map(str, entries))}): each needs its own folder; {fix}", key="model_name")
    orphans = [name for name in pseudo_names if name not in names]
    if orphans:
        raise ConfigError(f"{where} {names[0]!r} renames {orphans[0]!r}, which the profile's pseudo_label_models "
                          f"retrains: the retrain would silently not run; {fix}", key="model_name")
    taken = [name for name in pseudo_names if pseudo_label_name(name) in names]
    if taken:
        raise ConfigError(f"{path}: the pseudo-label retrain of {taken[0]!r} is named {pseudo_label_name(taken[0])!r}, "
                          f"like another model of the profile: rename that model", key="model_name")


PSEUDO_SUFFIX = "_pl"


def pseudo_label_name(model_name: str) -> str:
    """The model retrained with pseudo-labels (the paper's Table 3 pairs it with its original)."""
    return model_name + PSEUDO_SUFFIX


# ----------------------------------------------------------------------------------------------- profiles


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key twice in one mapping (YAML keeps the last silently)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: YAML's own way to share settings
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise ConfigError(f"{key_node.start_mark.name}, line {line}: the key {key!r} is not a setting name: "
                              "write plain names as keys")
        if key in seen:
            raise ConfigError(f"{key_node.start_mark.name}, line {line}: duplicate key {key!r} (first on line "
                              f"{seen[key]}); YAML would keep only the last: keep one", key=str(key))
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)
# Numbers as a user writes them: PyYAML follows YAML 1.1, whose floats need a dot, so 1e-3, 5E-3, 1e+2 and -.5 were
# strings (then refused as "expected a number"). YAML 1.2's forms (Python's float() reads them) are added here; the
# safe dumper learns them too, so that a string such as "1e3" is written quoted and reads back as a string.
_FLOAT_1_2 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$|^[-+]?\.[0-9][0-9_]*$")
for _resolving in (_StrictLoader, yaml.SafeDumper):
    _resolving.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789."))


def parse_yaml_value(text: str) -> Any:
    """One value as a settings file reads it (a -p VALUE): the same strict loader, numbers as a user writes them."""
    return yaml.load(text, Loader=_StrictLoader)


def load_yaml(path: str | Path) -> Any:
    """A settings YAML (a profile, a saved recipe): a key twice in one mapping is a ConfigError naming the file,
    the line and the key."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:  # a stream: the errors name the file
            return yaml.load(handle, Loader=_StrictLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text: save it as UTF-8") from None


def load_profile(name_or_path: str | Path) -> dict[str, Any]:
    """Read a profile YAML (a name in notebooks/profiles/ or a path) and check its shape; `check_run_settings`
    checks its keys and values."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ConfigError(f"profile {name_or_path!r} not found (looked for {path}); known profiles: {known}")
    profile = load_yaml(path)
    if profile is None:
        raise ConfigError(f"{path} is empty: a profile needs at least `models:` (a list of models to train), "
                          "e.g. copy notebooks/profiles/demo.yaml")
    if not isinstance(profile, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(PROFILE_KEYS)}")
    unknown = set(profile) - set(PROFILE_KEYS)
    if unknown:
        raise _unknown_key(str(path), sorted(unknown)[0], list(PROFILE_KEYS))
    profile.setdefault("params", {})
    profile.setdefault("models", [])
    profile["pseudo_label_models"] = profile.get("pseudo_label_models") or []
    if not isinstance(profile["pseudo_label_models"], list):  # a bare name would be read as its letters
        raise ConfigError(f"{path}: pseudo_label_models must be a list of model names, e.g. "
                          f"[{profile['pseudo_label_models']}]", key="pseudo_label_models")
    if not isinstance(profile["params"], dict) or not isinstance(profile["models"], list) or \
            not all(isinstance(m, dict) for m in profile["models"]):
        raise ConfigError(f"{path}: params must be a mapping and models a list of mappings")
    if not profile["models"]:
        raise ConfigError(f"{path}: the profile lists no models to train; add a `models:` list (see "
                          "notebooks/profiles/demo.yaml)")
    for i, model in enumerate(profile["models"]):
        if "model_name" not in model:
            raise ConfigError(f"{path}: models[{i}] has no model_name (every trained model needs a unique name)")
    names = [m["model_name"] for m in profile["models"]]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: duplicate model_name in models: {names}")
    unknown_pseudo = sorted(set(profile["pseudo_label_models"]) - set(names))
    if unknown_pseudo:
        raise ConfigError(f"{path}: pseudo_label_models {unknown_pseudo} are not among the profile's models {names}")
    profile["path"] = str(path)
    return profile


# ----------------------------------------------------------------------------------------------- the run folder


class RunPaths:
    """Where each stage of a run reads and writes: everything lives under runs/<name>/."""

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)

    # Every entry a run writes at its top level (the pipeline, the notebooks, utils.sweep, utils.selfsup's weights);
    # ".lock": files.LOCK_FILE.
    ENTRIES = frozenset({".lock", "run_config.yaml", "folds.csv", "cv_summary.csv", "figures", "models", "ensemble",
                         "pseudo", "notebooks", "export", "selfsup"})
    LITTER = frozenset({".DS_Store", ".ipynb_checkpoints"})  # what file browsers and Jupyter leave: nobody's work

    def foreign_entries(self) -> list[Path]:
        """What the folder holds that no run writes (temporary files of killed writers aside): a user's files,
        which nothing of this project may delete."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.name not in self.ENTRIES | self.LITTER
                      and not (p.name.startswith(".") and ".tmp-" in p.name))

    @property
    def is_run(self) -> bool:
        """Whether the folder is a run of this project: the pipeline's (run_config.yaml) or a notebook's (models/
        with ensemble/, folds.csv or the run lock). What no export or --force may write over unasked."""
        return (self.root / "run_config.yaml").is_file() or (self.models.is_dir() and any(
            (self.root / name).exists() for name in ("ensemble", "folds.csv", ".lock")))

    @property
    def folds_csv(self) -> Path:
        return self.root / "folds.csv"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def model(self, model_name: str) -> Path:
        return self.models / model_name

    def fold(self, model_name: str, fold: int) -> Path:
        return self.model(model_name) / f"fold{fold}"

    def fold_files(self, filename: str) -> Iterator[tuple[str, int, Path]]:
        """(model name, fold, path) of every models/<model>/fold<k>/<filename> of the run, sorted."""
        for path in sorted(self.models.glob(f"*/fold*/{filename}")):
            yield path.parent.parent.name, int(path.parent.name.removeprefix("fold")), path

    @property
    def ensemble(self) -> Path:
        return self.root / "ensemble"

    @property
    def pseudo(self) -> Path:
        return self.root / "pseudo"

    @property
    def pseudo_labels_csv(self) -> Path:
        return self.pseudo / "pseudo_labels.csv"

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    @property
    def export(self) -> Path:
        return self.root / "export"
