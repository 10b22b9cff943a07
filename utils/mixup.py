"""Mixup for regression: C-Mixup (Yao et al., "C-Mixup: Improving Generalization in Regression", NeurIPS 2022).

Mixup trains on convex combinations of two examples, x = lam x_i + (1 - lam) x_j and y = lam y_i + (1 - lam) y_j.
For a regression target, mixing two slices of very different infection (0 % and 80 %) makes an image whose label
(40 %) no real slice of that look would have; C-Mixup therefore draws the partner j of example i by label distance,
with probability proportional to a Gaussian kernel, P(j | i) ~ exp(-(y_i - y_j)^2 / (2 sigma^2)) over the whole
training set (i itself included), as its authors' code does (`get_mixup_sample_rate`, kernel density of the
labels); `mixup` draws j uniformly (plain mixup). lam ~ Beta(alpha, alpha), alpha 2 in their experiments.

Here the mixing happens in the training dataset, per example: each item is its own augmented slice mixed with an
augmented partner, one lam per item (their code draws one lam per batch), the image rounded back to uint8 (batches
travel as uint8 and are normalised on the device: normalising is affine, so mixing before it is mixing after it, to
within the rounding of half a grey level). Settings: `mixup` (none | mixup | cmixup), `mixup_alpha`, `cmixup_sigma`
(percentage points) of utils.config.TrainConfig.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


def partner_probabilities(labels: np.ndarray, label: float, method: str, sigma: float) -> np.ndarray:
    """P(j | an example of `label`) over the training examples' `labels` (it sums to 1)."""
    labels = np.asarray(labels, dtype=np.float64)
    if method == "mixup":
        return np.full(len(labels), 1.0 / len(labels))
    if method != "cmixup":
        raise ValueError(f"method {method!r}: use mixup or cmixup")
    weights = np.exp(-0.5 * ((labels - label) / sigma) ** 2)  # the example itself has weight 1: never all zero
    return weights / weights.sum()


class MixedPairs(Dataset):
    """A labelled training dataset whose items are mixed with a partner (see the module docstring).

    `dataset[i]` gives (uint8 image tensor, float target); `labels` are its targets in the same order. The pair
    stream is reproducible: `set_seed` (the training loop calls it each epoch, loader workers at their start)."""

    def __init__(self, dataset: Dataset, labels: np.ndarray, method: str, alpha: float, sigma: float):
        if method not in ("mixup", "cmixup"):
            raise ValueError(f"method {method!r}: use mixup or cmixup")
        if len(labels) != len(dataset):
            raise ValueError(f"{len(dataset)} examples but {len(labels)} labels")
        self.dataset, self.labels = dataset, np.asarray(labels, dtype=np.float64)
        self.method, self.alpha, self.sigma = method, alpha, sigma
        self.transform = getattr(dataset, "transform", None)  # utils.augment.worker_init reseeds it in each worker
        self.rng = np.random.default_rng(0)

    def set_seed(self, seed: int) -> None:
        self.rng = np.random.default_rng([seed, 0x6D69])  # a stream apart from the augmentation's

    def __len__(self) -> int:
        return len(self.dataset)

    def draw(self, index: int) -> tuple[int, float]:
        """The partner and the weight of example `index` (the next draw of the pair stream)."""
        p = partner_probabilities(self.labels, self.labels[index], self.method, self.sigma)
        return int(self.rng.choice(len(p), p=p)), float(self.rng.beta(self.alpha, self.alpha))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        partner, lam = self.draw(index)
        image, target = self.dataset[index]
        other, other_target = self.dataset[partner]
        mixed = (lam * image.float() + (1.0 - lam) * other.float()).round_().to(torch.uint8)
        return mixed, (lam * target + (1.0 - lam) * other_target).float()
