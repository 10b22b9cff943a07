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
from pathlib import Path

import timm
import torch
from timm.layers import SelectAdaptivePool2d
from torch import nn

from utils.config import HEADS, NUM_BINS, POOLINGS, check_arch, check_choice  # noqa: F401 (HEADS etc. re-exported)


class PretrainedWeightsUnavailable(RuntimeError):
    """timm could not get the pretrained weights (typically: no network and nothing in the local cache)."""


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


class PercentageRegressor(nn.Module):
    """timm backbone -> pooling -> dropout -> head; ``forward`` returns a dict of named outputs (see module doc)."""

    def __init__(self, backbone: nn.Module, arch: str, head: str, pooling: str, drop_rate: float,
                 num_bins: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.arch = arch
        self.head_type = head
        self.pooling_type = pooling
        self.pool, feat_mult = _make_pool(pooling)
        self.num_features = backbone.num_features * feat_mult
        self.dropout = nn.Dropout(drop_rate)
        if head == "reg":
            self.head_reg = nn.Linear(self.num_features, 1)
        else:
            self.head_logits = nn.Linear(self.num_features, num_bins)
            self.head_reg = nn.Linear(num_bins, 1)  # f2 of eq 2: regression on the bin probabilities
            self.register_buffer("bins", torch.arange(num_bins, dtype=torch.float32), persistent=False)
            # f2 starts as the expectation (w_i = i, b = 0). With PyTorch's default init (|w| < 0.1) f2 would have
            # to grow weights of ~100 from gradients of size p_i ~ 1/101: it stays a constant for thousands of
            # steps and, from scratch, the backbone never learns (measured: OOF MAE stuck at the constant's).
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
            return {"reg": self.head_reg(probs).squeeze(1), "expectation": expectation, "logits": logits,
                    "features": pooled}


def _create_backbone(arch: str, pretrained: bool, pretrained_file: str | os.PathLike | None,
                     in_chans: int) -> nn.Module:
    kwargs = dict(num_classes=0, global_pool="", in_chans=in_chans)
    if pretrained_file is not None:
        path = Path(pretrained_file)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained_file not found: {path} (pass an existing .pth/.safetensors file, "
                                    "or pretrained_file=None)")
        try:
            return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
        except Exception as error:
            raise RuntimeError(f"could not load weights for {arch!r} from {path}: {error} "
                               f"(is it a state_dict of timm's {arch!r}?)") from error
    if not pretrained:
        return timm.create_model(arch, pretrained=False, **kwargs)
    try:
        return timm.create_model(arch, pretrained=True, **kwargs)
    except Exception as error:  # offline, missing cache, hub down, no weights for this arch ...
        raise PretrainedWeightsUnavailable(
            f"could not get pretrained weights for {arch!r} ({type(error).__name__}: {error}). Ways out: "
            f"(1) run once with network access so timm caches them in the Hugging Face hub cache "
            f"(HF_HOME, default ~/.cache/huggingface; copy that folder to offline machines); or "
            f"(2) download the weight file elsewhere and pass pretrained_file='/path/to/{arch}.safetensors'; "
            f"or set pretrained=False to train from scratch.") from error


def build_model(arch: str, head: str = "exp", pooling: str = "avg", in_chans: int = 3, drop_rate: float = 0.0,
                pretrained: bool = False, pretrained_file: str | os.PathLike | None = None,
                num_bins: int = NUM_BINS) -> PercentageRegressor:
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

    Raises:
        utils.config.ConfigError (a ValueError): unknown arch (lists close timm names), head or pooling.
        FileNotFoundError: ``pretrained_file`` does not exist.
        PretrainedWeightsUnavailable: ``pretrained=True`` but the weights cannot be had (e.g. offline).
    """
    check_choice("head", head, HEADS)
    check_choice("pooling", pooling, POOLINGS)
    check_arch(arch)
    backbone = _create_backbone(arch, pretrained, pretrained_file, in_chans)
    return PercentageRegressor(backbone, arch=arch, head=head, pooling=pooling, drop_rate=drop_rate,
                               num_bins=num_bins)
