"""Backbones, pooling and regression heads (paper, section "Method": backbone + hybrid pooling + heads).

A model is a timm CNN backbone that returns its last feature map (B, C, H, W), a global pooling, an optional
dropout and one of three heads:

* ``reg``: one linear output, trained with SmoothL1 (eq 2 of the paper, see ``utils.losses``).
* ``exp``: ``num_bins`` (= 101, one per integer percentage 0..100) logits; p = softmax(logits);
  the expectation E = sum_i i * p_i (trained with eq 1) and a second linear layer f2(p) -> 1 (eq 2). ``f2`` is
  the regression output used at inference.
* ``ldl``: the same module as ``exp``; only the loss differs (eq 1 + eq 2 + KL to the label distribution, eq 3).

``forward`` always returns a dict of named outputs: ``"reg"`` (B,) is what inference uses, ``"features"``
(B, num_features) the pooled features before dropout (RankSim's, ``utils.losses``); ``exp``/``ldl`` heads add
``"expectation"`` (B,) and ``"logits"`` (B, num_bins). The head runs in float32 even under autocast.

Pooling choices (``POOLINGS``):

* ``avg``: global average pooling.
* ``hybrid``: the seed team's "hybrid pooling" after Gao et al., DLDL-v2 (IJCAI 2018): a 2x2 max-pool with stride
  2, then global average pooling. ``ceil_mode=True`` so that odd-sized maps lose no border row/column and a 1x1
  map (tiny test inputs) passes through unchanged instead of crashing.
* ``avgmax`` / ``catavgmax``: timm's ``SelectAdaptivePool2d`` (mean of avg and max / their concatenation, which
  doubles the feature count).

Pretrained weights come from timm (Hugging Face hub cache) or from a local file; see ``build_model``.
"""
from __future__ import annotations

import os
import pickle
import re
from collections.abc import Collection, Iterable
from pathlib import Path

import timm
import torch
from timm.layers import SelectAdaptivePool2d
from torch import nn

from utils.config import (  # noqa: F401 (HEADS etc. re-exported)
    F2_INPUTS,
    HEADS,
    NUM_BINS,
    POOLINGS,
    ConfigError,
    TrainConfig,
    check_arch,
    check_choice,
)

HUB_TIMEOUT_S = 5.0  # the one quick question to the hub before a run (no retries)


class PretrainedWeightsUnavailable(ConfigError, RuntimeError):
    """`pretrained: true`, and timm's weights are neither in the local cache nor to be had from the hub."""


class PretrainedFileError(ConfigError, RuntimeError):
    """`pretrained_file` is no plain weights file (tensors only) of the model's architecture."""


class PretrainedFileMissing(PretrainedFileError, FileNotFoundError):
    """`pretrained_file` does not exist."""


# ----------------------------------------------------------------------------------------------- weights, checked
# The pipeline checks every model's weights before its first notebook (check_weights) and build_model checks them
# again where a model is built: the same functions, so the same one-line messages, worded here only.


def _short(error: BaseException) -> str:
    """An error of a library in a few words, on one line."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:160]}" + ("..." if len(text) > 160 else "")


def weights_unavailable(arch: str, why: str) -> PretrainedWeightsUnavailable:
    """The refusal of `pretrained: true` when the weights cannot be had, naming both ways out."""
    from huggingface_hub import constants

    return PretrainedWeightsUnavailable(
        f"pretrained=true: {why}; ways out: download them once on a machine whose network reaches the hub "
        f"(python -c \"import timm; timm.create_model('{arch}', pretrained=True)\") and copy its cache (HF_HOME, "
        f"here {constants.HF_HOME}) to this machine, or pass a weights file of {arch} (-p pretrained_file "
        f"/path/to/{arch}.safetensors), or train from scratch (-p pretrained false)", key="pretrained")


def weights_file_error(path: str | os.PathLike, why: str) -> PretrainedFileError:
    """The refusal of a `pretrained_file` (never advising to load a file of unknown origin with its code)."""
    cls = PretrainedFileMissing if why.startswith("no such file") else PretrainedFileError
    return cls(f"pretrained_file {path}: {why}", key="pretrained_file")


def check_weights_file(path: str | os.PathLike) -> dict:
    """The state_dict of a `pretrained_file`, read as data only (torch.load(weights_only=True), or safetensors): a
    pickle that would run code (or hold other Python objects) is refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise weights_file_error(path, "no such file: pass an existing .pth/.safetensors state_dict of the model's "
                                       "arch, or leave pretrained_file out (null)")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        except Exception as error:
            raise weights_file_error(path, f"not a readable .safetensors file ({_short(error)}): write it again "
                                           "where it was made") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        if found:  # torch's own text would advise weights_only=False: never for a file of unknown origin
            raise weights_file_error(path, f"it holds Python objects besides tensors ({found.group(1)}), which could "
                                           "run code when loaded, so it is not loaded; re-save it where it was made "
                                           "as a plain state_dict (torch.save(model.state_dict(), path)) or as "
                                           ".safetensors") from None
        raise weights_file_error(path, "not a weights file (neither a torch state_dict nor .safetensors): pass the "
                                       "state_dict of the model's arch") from None
    except Exception as error:
        raise weights_file_error(path, f"not a weights file ({_short(error)}): pass the .pth/.safetensors "
                                       "state_dict of the model's arch") from None
    if not isinstance(loaded, dict):
        raise weights_file_error(path, f"it holds a {type(loaded).__name__}, not a state_dict (names -> tensors): "
                                       "re-save it as torch.save(model.state_dict(), path)")
    return loaded


def _hub_source(arch: str) -> tuple[str | None, list[str], str | None]:
    """(hub repo id with @revision, weight file names timm tries, legacy url) of timm's weights for `arch`."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is None:
        return None, [], None
    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    return cfg.hf_hub_id or None, names, cfg.url or None


def _cached(hub_id: str | None, names: list[str], url: str | None) -> bool:
    from urllib.parse import urlparse

    from huggingface_hub import try_to_load_from_cache

    if hub_id:
        repo, _, revision = hub_id.partition("@")
        if any(isinstance(try_to_load_from_cache(repo, name, revision=revision or None), str) for name in names):
            return True
    if url:  # timm's older source: torch.hub's checkpoint folder
        return (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name).is_file()
    return False


def _hub_answers(hub_id: str | None, names: list[str], url: str | None) -> str | None:
    """None when the hub answers one quick question about the weights (no retries), else why not."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError

    if hub_id:
        if constants.HF_HUB_OFFLINE:
            return "the hub is not asked: HF_HUB_OFFLINE is set"
        repo, _, revision = hub_id.partition("@")
        try:
            get_hf_file_metadata(hf_hub_url(repo, names[0], revision=revision or None), timeout=HUB_TIMEOUT_S,
                                 retry_on_errors=False)
        except EntryNotFoundError:
            pass  # the hub answered; timm takes the other file name
        except Exception as error:
            return f"the hub does not answer within {HUB_TIMEOUT_S:g} s ({_short(error)})"
        return None
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=HUB_TIMEOUT_S):
            return None
    except Exception as error:
        return f"{url} does not answer within {HUB_TIMEOUT_S:g} s ({_short(error)})"


def check_hub_weights(arch: str) -> None:
    """`pretrained: true`: timm's weights of `arch` are in the local cache, or the hub answers now."""
    hub_id, names, url = _hub_source(arch)
    if not hub_id and not url:
        raise PretrainedWeightsUnavailable(
            f"pretrained=true: timm has no pretrained weights for {arch!r}: pass a weights file of it (-p "
            f"pretrained_file /path/to/{arch}.safetensors), choose an arch with weights (timm.list_pretrained()), "
            "or train from scratch (-p pretrained false)", key="pretrained")
    if _cached(hub_id, names, url):
        return
    why = _hub_answers(hub_id, names, url)
    if why is not None:
        from huggingface_hub import constants

        raise weights_unavailable(arch, f"the weights of {arch!r} ({hub_id or url}) are not in the local cache "
                                        f"{constants.HF_HUB_CACHE}, and {why}")


def check_weights(arch: str, pretrained: bool, pretrained_file: str | os.PathLike | None, in_chans: int = 3) -> None:
    """Before a run: the weights a model starts from can be had (file: read as data only, and it fits `arch`;
    `pretrained`: cached, or the hub answers). Raises PretrainedFileError / PretrainedWeightsUnavailable."""
    if pretrained_file is not None:
        _create_backbone(arch, pretrained, pretrained_file, in_chans)
    elif pretrained:
        check_hub_weights(arch)


def check_model_weights(configs: Iterable[TrainConfig], made: Collection[Path] = ()) -> None:
    """`check_weights` of each distinct weight source of these models (the pipeline's and the sweep's check before
    any work); files in `made` are written by the run itself (its self-supervised pretraining) and not there yet."""
    checked = set()
    for cfg in configs:
        key = (cfg.arch, cfg.pretrained, cfg.pretrained_file, cfg.in_chans)
        if key not in checked and not (cfg.pretrained_file and Path(cfg.pretrained_file) in made):
            checked.add(key)
            check_weights(*key)


class HybridPool(nn.Module):
    """DLDL-v2 hybrid pooling: 2x2/stride-2 max-pool (ceil mode), then global average -> (B, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.max_pool = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.max_pool(feature_map).mean(dim=(2, 3))


def _make_pool(pooling: str) -> tuple[nn.Module, int]:
    """The pooling module and its feature multiplier (2 for catavgmax, else 1)."""
    if pooling == "avg":
        return nn.AdaptiveAvgPool2d(1), 1  # flattened in forward
    if pooling == "hybrid":
        return HybridPool(), 1
    pool = SelectAdaptivePool2d(pool_type=pooling, flatten=True)  # avgmax | catavgmax (build_model checked it)
    return pool, pool.feat_mult()


def map_channels(backbone: nn.Module) -> int:
    """Channels of the feature map a timm backbone built with ``global_pool=""`` returns: its ``head_hidden_size``
    where the model's head convolves after the pooling (MobileNetV3/V4, GhostNet, LCNet: that 1x1 conv then runs on
    the map, 960 -> 1280 channels), else ``num_features``."""
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


class PercentageRegressor(nn.Module):
    """timm backbone -> pooling -> dropout -> head; ``forward`` returns a dict of named outputs (see module doc)."""

    def __init__(self, backbone: nn.Module, arch: str, head: str, pooling: str, drop_rate: float,
                 num_bins: int, f2_input: str = "probs") -> None:
        super().__init__()
        check_choice("f2_input", f2_input, F2_INPUTS)
        self.f2_input = f2_input
        self.backbone = backbone
        self.arch = arch
        self.head_type = head
        self.pooling_type = pooling
        self.pool, feat_mult = _make_pool(pooling)
        self.num_features = map_channels(backbone) * feat_mult
        self.dropout = nn.Dropout(drop_rate)
        if head == "reg":
            self.head_reg = nn.Linear(self.num_features, 1)
        else:
            self.head_logits = nn.Linear(self.num_features, num_bins)
            self.head_reg = nn.Linear(num_bins, 1)  # f2 of eq 2: regression on the probabilities (or logits)
            self.register_buffer("bins", torch.arange(num_bins, dtype=torch.float32), persistent=False)
            # On the probabilities f2 starts as the expectation (w_i = i, b = 0). With PyTorch's default init
            # (|w| < 0.1) f2 would have to grow weights of ~100 from gradients of size p_i ~ 1/101: it stays a
            # constant for thousands of steps and, from scratch, the backbone never learns (measured: OOF MAE stuck
            # at the constant's). On the logits (the seed team's DLDModel) it keeps PyTorch's default, as theirs.
            if f2_input == "probs":
                with torch.no_grad():
                    self.head_reg.weight.copy_(self.bins.unsqueeze(0))
                    self.head_reg.bias.zero_()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, num_features), float32."""
        feature_map = self.backbone(x)
        if feature_map.ndim != 4:
            raise RuntimeError(f"{self.arch} returned features of shape {tuple(feature_map.shape)}; "
                               "PercentageRegressor needs a CNN backbone returning (B, C, H, W)")
        pooled = self.pool(feature_map.float())
        return pooled.flatten(1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.features(x)
        features = self.dropout(pooled)
        # The head is tiny; run it in float32 so the softmax/expectation are exact under bf16/fp16 autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.head_type == "reg":
                return {"reg": self.head_reg(features).squeeze(1), "features": pooled}
            logits = self.head_logits(features)
            probs = logits.softmax(dim=1)
            expectation = probs @ self.bins  # E = sum_i i * p_i (eq 1's prediction)
            f2 = self.head_reg(probs if self.f2_input == "probs" else logits)
            return {"reg": f2.squeeze(1), "expectation": expectation, "logits": logits, "features": pooled}


def _create_backbone(arch: str, pretrained: bool, pretrained_file: str | os.PathLike | None,
                     in_chans: int) -> nn.Module:
    kwargs = dict(num_classes=0, global_pool="", in_chans=in_chans)
    if pretrained_file is not None:
        path = Path(pretrained_file)
        check_weights_file(path)  # before timm reads it: data only, and the messages of the check before a run
        try:
            return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
        except Exception as error:
            raise weights_file_error(path, f"could not load weights for {arch!r} from it ({_short(error)}): is it "
                                           f"a state_dict of timm's {arch!r}?") from error
    if not pretrained:
        return timm.create_model(arch, pretrained=False, **kwargs)
    check_hub_weights(arch)  # in the local cache, or the hub answers: else one line now, not after hub retries
    try:
        return timm.create_model(arch, pretrained=True, **kwargs)
    except Exception as error:  # the hub answered a moment ago, then failed; a damaged cache ...
        raise weights_unavailable(arch, f"timm could not get the weights of {arch!r} ({_short(error)})") from error


def build_model(arch: str, head: str = "exp", pooling: str = "avg", in_chans: int = 3, drop_rate: float = 0.0,
                pretrained: bool = False, pretrained_file: str | os.PathLike | None = None,
                num_bins: int = NUM_BINS, f2_input: str = "probs") -> PercentageRegressor:
    """Build a percentage regressor on any timm CNN.

    Args:
        arch: timm model name (e.g. ``resnest50d``, ``seresnet50``, ``efficientnet_b4``; a pretrained tag such as
            ``resnet18.a1_in1k`` is allowed).
        head: one of ``HEADS`` (``reg``, ``exp``, ``ldl``).
        pooling: one of ``POOLINGS`` (``avg``, ``hybrid``, ``avgmax``, ``catavgmax``).
        in_chans: input channels (timm adapts pretrained first-conv weights).
        drop_rate: dropout probability before the head's first linear layer.
        pretrained: load timm's pretrained weights (Hugging Face hub download or its local cache).
        pretrained_file: a local ``.pth``/``.safetensors`` state_dict of the timm ``arch``; when given, it is the
            weight source (``pretrained`` is then ignored). Loaded through timm's
            ``pretrained_cfg_overlay=dict(file=...)``, so classifier weights are dropped and in_chans adapted.
        num_bins: bins of the exp/ldl heads (integers 0..num_bins-1; 101 for percentages).
        f2_input: what the exp/ldl heads' f2 reads, one of ``F2_INPUTS``: ``probs`` (the softmax, f2 initialised
            as the expectation) or ``logits`` (the seed team's code, PyTorch's default initialisation).

    Raises:
        utils.config.ConfigError (a ValueError): unknown arch (lists close timm names), head or pooling; and its
        subclasses PretrainedFileMissing (also a FileNotFoundError), PretrainedFileError (a file that is no plain
        state_dict of ``arch``) and PretrainedWeightsUnavailable (``pretrained=True``, the weights neither cached
        nor to be had from the hub, e.g. offline): the messages of the pipeline's check before its first notebook.
    """
    check_choice("head", head, HEADS)
    check_choice("pooling", pooling, POOLINGS)
    check_arch(arch)
    backbone = _create_backbone(arch, pretrained, pretrained_file, in_chans)
    return PercentageRegressor(backbone, arch=arch, head=head, pooling=pooling, drop_rate=drop_rate,
                               num_bins=num_bins, f2_input=f2_input)
