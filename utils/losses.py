"""Losses of the paper (eq 1-3), one function each.

Notation: y in [0, 100] is the infection percentage of a slice; the exp/ldl heads give logits over the 101 integer
bins i = 0..100 and p = softmax(logits) (see ``utils.models``).

* eq 1 (expectation loss):  L_exp = SmoothL1(E, y)   with E = sum_i i * p_i            -> ``head_loss`` "l1_exp"
* eq 2 (regression loss):   L_reg = SmoothL1(f2(p), y) (reg head: SmoothL1(linear, y)) -> ``head_loss`` "l1_reg"
* eq 3 (label distribution): t_y(i) = 0.6 if i = y, 0.15 if |i - y| = 1, 0.05 if |i - y| = 2, else 0
  -> ``target_distribution``; the ldl head adds KL(t_y || p) -> ``kl_to_target``.

Totals per head: ``reg`` = eq 2; ``exp`` = eq 1 + eq 2; ``ldl`` = eq 1 + eq 2 + kl_weight * KL.
SmoothL1 uses beta = 1 and the batch mean. All losses are computed in float32.

For the imbalanced labels of real CT (a quarter of the slices at 0 %, few above 75 %), two settings of the training
loop (no maintained package implements them):

* **LDS** (label distribution smoothing, Yang et al., "Delving into Deep Imbalanced Regression", ICML 2021):
  per-sample loss weights from the training labels' histogram over the 101 integer bins convolved with a Gaussian
  kernel (sd ``lds_sigma`` percentage points): w(y) = 1 / density(y) (``inverse``) or its square root
  (``sqrt_inverse``), scaled to mean 1 over the training slices -> ``lds_weights``; every term of ``head_loss`` is
  then a weighted mean.
* **Balanced MSE** (Ren et al., "Balanced MSE for Imbalanced Visual Regression", CVPR 2022), its batch-based Monte
  Carlo form (BMC): eq 2's SmoothL1 on f2 becomes -log softmax_j(-(f2_i - y_j)^2 / (2 sigma^2)) at j = i over the
  batch's labels y_j, times 2 sigma^2 (so its gradient has MSE's scale) -> ``balanced_mse``. It undoes the training
  labels' prior in the prediction: what a shift of the severity mix between Train and Val/Test calls for.

And one on the representation:

* **RankSim** (Gong et al., "RankSim: Ranking Similarity Regularization for Deep Imbalanced Regression", ICML 2022):
  over the batch's slices with distinct labels (one drawn at random per label: ties carry no order, and a rare label
  counts as much as a frequent one), each slice ranks the others twice, by the cosine similarity of their pooled
  features and by the closeness of their labels; the regularizer is the squared difference of the two rankings
  (ranks scaled to (0, 1]), averaged over the others and summed over the slices, times ``ranksim_weight``. Ranks
  have no gradient; blackbox differentiation (Vlastelica et al., ICLR 2020) gives one: the ranks of the
  similarities moved by ``ranksim_lambda`` times the incoming gradient, minus the ranks, over ``ranksim_lambda``
  -> ``ranksim``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from utils.config import HEADS, LDS_MODES, NUM_BINS, REGRESSION_LOSSES, check_choice

# eq 3: weight of the bins at offsets -2, -1, 0, +1, +2 from the label.
LABEL_KERNEL = (0.05, 0.15, 0.6, 0.15, 0.05)


def check_targets(target: torch.Tensor, low: float = 0.0, high: float = 100.0) -> None:
    """Raise ValueError if any target is NaN or outside [low, high] (never clamp silently)."""
    target = torch.as_tensor(target)
    bad = torch.isnan(target) | (target < low) | (target > high)
    num_bad = int(bad.sum())
    if num_bad:
        index = int(bad.flatten().nonzero()[0])
        example = float(target.flatten()[index])
        raise ValueError(f"{num_bad} of {target.numel()} targets are NaN or outside [{low:g}, {high:g}] "
                         f"(e.g. index {index}: {example}); fix the labels (percentages must lie in 0..100)")


def target_distribution(percentage: torch.Tensor, num_bins: int = NUM_BINS) -> torch.Tensor:
    """Label distribution of eq 3, shape (B, num_bins); each row sums to 1.

    For an integer label y: t(y) puts 0.6 on bin y, 0.15 on y +- 1 and 0.05 on y +- 2.
    Mass that would fall outside [0, num_bins - 1] is folded back onto the nearest valid bin, so the distribution
    keeps its total mass and its peak at the label: y = 0 gives bins 0, 1, 2 = 0.8, 0.15, 0.05; y = 1 gives
    bins 0..3 = 0.2, 0.6, 0.15, 0.05 (symmetrically at 100 and 99).
    A non-integer label (pseudo-labels are floats) is split linearly between its neighbouring integers:
    t(y) = (1 - frac) * t(floor y) + frac * t(floor y + 1), with frac = y - floor y.
    """
    percentage = torch.as_tensor(percentage, dtype=torch.float64).flatten()
    check_targets(percentage, 0.0, num_bins - 1)
    # floor clamped to num_bins - 2 so that y = 100 becomes 99 + frac 1 (the upper neighbour exists).
    lower = percentage.floor().clamp(0, num_bins - 2)
    frac = percentage - lower
    dist = torch.zeros(percentage.numel(), num_bins, dtype=torch.float64, device=percentage.device)
    for base, base_weight in ((lower, 1.0 - frac), (lower + 1, frac)):
        for offset, kernel_weight in zip(range(-2, 3), LABEL_KERNEL):
            bins = (base + offset).clamp(0, num_bins - 1).long().unsqueeze(1)  # fold back onto the edge
            dist.scatter_add_(1, bins, (base_weight * kernel_weight).unsqueeze(1))
    dist = dist / dist.sum(dim=1, keepdim=True)  # exact to float rounding; guards the float32 cast below
    return dist.float()


def _mean(per_sample: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return per_sample.mean() if weights is None else (per_sample * weights).mean()


def smooth_l1(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """SmoothL1 with beta = 1, batch mean (eq 1 and eq 2): 0.5 d^2 if |d| < 1 else |d| - 0.5; `weights`: the mean
    of the weighted per-sample terms."""
    per_sample = F.smooth_l1_loss(pred.float(), target.float(), beta=1.0, reduction="none")
    return _mean(per_sample, weights)


def kl_to_target(logits: torch.Tensor, target_dist: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """KL(t || softmax(logits)) = sum_i t_i (log t_i - log p_i), averaged over the batch (ldl head)."""
    per_sample = F.kl_div(F.log_softmax(logits.float(), dim=1), target_dist.float(), reduction="none").sum(dim=1)
    return _mean(per_sample, weights)


def balanced_mse(pred: torch.Tensor, target: torch.Tensor, sigma: float,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Balanced MSE, batch-based Monte Carlo form (module docstring): for each sample i,
    2 sigma^2 * (-log softmax_j(-(pred_i - y_j)^2 / (2 sigma^2))[j = i]), averaged over the batch."""
    pred, target = pred.float().flatten(), target.float().flatten()
    logits = -0.5 * (pred[:, None] - target[None, :]) ** 2 / sigma ** 2
    per_sample = F.cross_entropy(logits, torch.arange(len(pred), device=pred.device), reduction="none")
    return _mean(per_sample, weights) * (2 * sigma ** 2)


def descending_ranks(rows: torch.Tensor) -> torch.Tensor:
    """Each row's ranks, largest value first, scaled to (0, 1]: (position + 1) / row length."""
    positions = rows.argsort(dim=1, descending=True).argsort(dim=1)
    return (positions + 1).float() / rows.shape[1]


class _BlackboxRanks(torch.autograd.Function):
    """`descending_ranks` with the blackbox-differentiation gradient (module docstring, RankSim)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, interpolation: float) -> torch.Tensor:
        ranks = descending_ranks(rows)
        ctx.interpolation = interpolation
        ctx.save_for_backward(rows, ranks)
        return ranks

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        rows, ranks = ctx.saved_tensors
        moved = descending_ranks(rows + ctx.interpolation * grad)
        return (moved - ranks) / ctx.interpolation, None


def ranksim(features: torch.Tensor, target: torch.Tensor, interpolation: float = 2.0) -> torch.Tensor:
    """RankSim's regularizer (module docstring) of a batch's pooled features (B, C) and labels (B,); 0 when the
    batch holds fewer than two distinct labels."""
    target = target.float().flatten()
    labels, label_of = torch.unique(target, return_inverse=True)
    if len(labels) < 2:
        return features.sum() * 0.0  # keeps the graph: SAM's passes call backward on every loss
    order = torch.randperm(len(target), device=target.device)
    first = torch.full((len(labels),), len(target), device=target.device, dtype=torch.long)
    first = first.scatter_reduce(0, label_of[order], torch.arange(len(target), device=target.device), "amin")
    picked = order[first]  # one slice per distinct label, drawn at random
    unit = F.normalize(features[picked].float(), dim=1)
    feature_ranks = _BlackboxRanks.apply(unit @ unit.T, interpolation)
    label_ranks = descending_ranks(-(target[picked, None] - target[None, picked]).abs())
    return ((feature_ranks - label_ranks) ** 2).mean(dim=1).sum()


def lds_weights(labels: np.ndarray, mode: str, sigma: float, num_bins: int = NUM_BINS) -> torch.Tensor:
    """LDS loss weights per integer bin (module docstring): shape (num_bins,), mean 1 over `labels`.

    The histogram of the labels (rounded to the nearest bin) is convolved with a Gaussian kernel of sd `sigma` bins
    (truncated at 4 sd, the kernel normalised to sum 1, zero padding at the edges: mass that would fall outside
    0..100 is lost, as for an unbounded histogram); an empty smoothed bin gets the weight of the smallest non-zero
    density. mode "none": all ones."""
    check_choice("lds", mode, LDS_MODES)
    if mode == "none":
        return torch.ones(num_bins)
    labels = np.asarray(labels, dtype=np.float64)
    bins = np.clip(np.rint(labels), 0, num_bins - 1).astype(int)
    histogram = np.bincount(bins, minlength=num_bins).astype(np.float64)
    radius = max(1, int(np.ceil(4 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    density = np.convolve(histogram, kernel, mode="same")
    density = np.where(density > 0, density, density[density > 0].min())
    weights = 1.0 / density if mode == "inverse" else 1.0 / np.sqrt(density)
    weights /= weights[bins].mean()  # mean 1 over the training slices
    return torch.tensor(weights, dtype=torch.float32)


def sample_weights(table: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each target's weight from a per-bin table (float labels: the nearest bin)."""
    index = target.detach().round().clamp(0, len(table) - 1).long()
    return table.to(target.device)[index]


def head_loss(outputs: dict[str, torch.Tensor], target: torch.Tensor, head: str,
              kl_weight: float = 1.0, check: bool = True, weights: torch.Tensor | None = None,
              regression_loss: str = "smooth_l1", bmse_sigma: float = 8.0, ranksim_weight: float = 0.0,
              ranksim_lambda: float = 2.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training loss of one head: (total loss tensor, parts as detached 0-dim tensors).

    reg: eq 2.  exp: eq 1 + eq 2.  ldl: eq 1 + eq 2 + kl_weight * KL(t || p), t from eq 3.
    ``outputs`` is the model's dict (``"reg"``, and for exp/ldl ``"expectation"``, ``"logits"``).
    Parts keys: ``loss`` and those used of ``l1_reg``, ``l1_exp``, ``kl`` (kl unweighted). Parts stay on the
    device (``float(part)`` to log) so the training step never waits for the GPU; ``check=False`` skips the
    NaN/range check of the targets, for callers that checked them on the host already (it syncs on a GPU).
    `weights`: per-sample weights (LDS, ``sample_weights``) of every term; ``regression_loss="balanced_mse"``: eq 2's
    term is ``balanced_mse`` (part ``bmse_reg`` instead of ``l1_reg``). ``ranksim_weight > 0`` adds that times
    ``ranksim`` of ``outputs["features"]`` (part ``ranksim``, unweighted).
    """
    check_choice("head", head, HEADS)
    check_choice("regression_loss", regression_loss, REGRESSION_LOSSES)
    target = target.float().flatten()
    if check:
        check_targets(target)
    if regression_loss == "balanced_mse":
        parts = {"bmse_reg": balanced_mse(outputs["reg"], target, bmse_sigma, weights)}
    else:
        parts = {"l1_reg": smooth_l1(outputs["reg"].flatten(), target, weights)}  # eq 2
    total = next(iter(parts.values()))
    if head in ("exp", "ldl"):
        parts["l1_exp"] = smooth_l1(outputs["expectation"].flatten(), target, weights)  # eq 1
        total = total + parts["l1_exp"]
    if head == "ldl":
        logits = outputs["logits"]
        parts["kl"] = kl_to_target(logits, target_distribution(target, num_bins=logits.shape[1]), weights)  # eq 3
        total = total + kl_weight * parts["kl"]
    if ranksim_weight > 0:
        parts["ranksim"] = ranksim(outputs["features"], target, ranksim_lambda)
        total = total + ranksim_weight * parts["ranksim"]
    parts["loss"] = total
    return total, {name: value.detach() for name, value in parts.items()}
