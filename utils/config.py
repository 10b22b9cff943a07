"""One config namespace for the whole suite: the training recipe, profiles and the run folder layout.

`TrainConfig` holds every knob of one model's training (defaults = the paper's recipe: SAM + SGD, rho 0.05,
momentum 0.9, weight decay 5e-3, lr 1e-3, batch 8, cosine with 2 warm-up epochs, 50 epochs, 512 px, last 5
checkpoints kept). A notebook's `parameters` cell sets plain variables; `TrainConfig.from_namespace(globals())`
turns them into one validated object, and `save_yaml` dumps it next to the checkpoints (as timm's train.py
dumps its args), so every result on disk says how it was made.

Profiles (`notebooks/profiles/*.yaml`) are papermill parameters: `params` go to every notebook that declares
them; each entry of `models` is one run of `02_train` (its keys override `params`).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PROFILES_DIR = REPO_ROOT / "notebooks" / "profiles"
OPTIMIZERS = ("sgd", "adamw")
SAM_MODES = ("sam", "asam", "none")


class ConfigError(ValueError):
    """A parameter or profile is wrong; the message names it and the fix."""


@dataclass
class TrainConfig:
    """Everything that defines one model's training; defaults are the paper's recipe (GPU, real data)."""
    # Fields are papermill parameters of notebooks/02_train.ipynb: keep the two in step.

    model_name: str = "resnest50d_exp_hybrid"
    arch: str = "resnest50d"
    head: str = "exp"  # reg | exp | ldl  (utils.models.HEADS)
    pooling: str = "hybrid"  # avg | hybrid | avgmax | catavgmax  (utils.models.POOLINGS)
    in_chans: int = 3
    img_size: int = 512
    drop_rate: float = 0.0
    pretrained: bool = False
    pretrained_file: str | None = None
    # optimisation
    optimizer: str = "sgd"  # sgd | adamw: the base optimizer
    sam: str = "sam"  # sam | asam | none: the SAM wrapper around the base optimizer (utils.sam)
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-3
    sam_rho: float = 0.05
    epochs: int = 50
    warmup_epochs: float = 2.0
    warmup_lr: float = 1e-5
    min_lr: float = 1e-6
    batch_size: int = 8
    clip_grad: float | None = None
    kl_weight: float = 1.0
    # augmentation (RandAugment: n_ops ops of magnitude 0..30 per image)
    randaug_n: int = 2
    randaug_m: int = 9
    tta_hflip: bool = False
    # folds and checkpoints
    folds: list[int] = field(default_factory=lambda: [0, 1])
    save_last_k: int = 5
    seed: int = 42
    use_pseudo_labels: bool = False
    # hardware: "auto" = cuda when present (bf16 autocast, channels_last), else cpu fp32
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    num_workers: int = -1  # -1: min(8, cores - 1) on GPU, 0 on CPU (workers would steal the model's cores)
    max_steps_per_epoch: int | None = None  # for smoke tests only

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        from utils.models import HEADS, POOLINGS  # late import: config must not pull in torch for pipeline CLI

        checks = [
            (self.head in HEADS, f"head={self.head!r}: choose one of {HEADS}"),
            (self.pooling in POOLINGS, f"pooling={self.pooling!r}: choose one of {POOLINGS}"),
            (self.optimizer in OPTIMIZERS, f"optimizer={self.optimizer!r}: choose one of {OPTIMIZERS}"),
            (self.sam in SAM_MODES, f"sam={self.sam!r}: choose one of {SAM_MODES}"),
            (self.in_chans in (1, 3), f"in_chans={self.in_chans}: use 1 (grayscale) or 3 (ImageNet weights)"),
            (self.img_size >= 16, f"img_size={self.img_size}: use at least 16 px"),
            (self.epochs >= 1, f"epochs={self.epochs}: need at least 1"),
            (self.batch_size >= 1, f"batch_size={self.batch_size}: need at least 1"),
            (1 <= self.save_last_k <= self.epochs, f"save_last_k={self.save_last_k}: must be in 1..epochs ({self.epochs})"),
            (0 <= self.warmup_epochs < self.epochs, f"warmup_epochs={self.warmup_epochs}: must be in [0, epochs)"),
            (len(self.folds) >= 1, "folds=[]: list at least one fold to train"),
            (self.lr > 0, f"lr={self.lr}: must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_namespace(cls, namespace: Mapping[str, Any]) -> "TrainConfig":
        """Pick this config's fields out of a notebook's variables (the `parameters` cell); missing ones keep defaults."""
        values = {name: namespace[name] for name in cls.field_names() if name in namespace}
        if "folds" in values:
            values["folds"] = [int(f) for f in values["folds"]]
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_yaml(self, path: str | Path) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load_yaml(cls, path: str | Path) -> "TrainConfig":
        return cls(**yaml.safe_load(Path(path).read_text()))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file in the same folder + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_profile(name_or_path: str | Path) -> dict[str, Any]:
    """Read a profile YAML (a name in notebooks/profiles/ or a path) and check its shape."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ConfigError(f"profile {name_or_path!r} not found (looked for {path}); known profiles: {known}")
    profile = yaml.safe_load(path.read_text()) or {}
    unknown = set(profile) - {"description", "params", "models", "pseudo_label_models"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}; "
                          "allowed: description, params, models, pseudo_label_models")
    profile.setdefault("params", {})
    profile.setdefault("models", [])
    for i, model in enumerate(profile["models"]):
        if "model_name" not in model:
            raise ConfigError(f"{path}: models[{i}] has no model_name (every trained model needs a unique name)")
    names = [m["model_name"] for m in profile["models"]]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: duplicate model_name in models: {names}")
    profile["path"] = str(path)
    return profile


class RunPaths:
    """Where each stage of a run reads and writes: everything lives under runs/<name>/."""

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)

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
