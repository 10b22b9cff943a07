"""C-Mixup (utils.mixup): partners drawn by label distance as the kernel says, items mixed as the weights say."""
import math

import numpy as np
import pytest
import torch

from utils import data, mixup
from utils.config import ConfigError, TrainConfig


class _Items(torch.utils.data.Dataset):
    """Image i is filled with the grey level 10 i; its target is the label."""

    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.full((1, 4, 4), 10 * i, dtype=torch.uint8), torch.tensor(self.labels[i], dtype=torch.float32)


def test_partner_probabilities_are_the_gaussian_label_kernel():
    labels = np.array([0.0, 0.0, 10.0, 50.0])
    # sigma 5: exp(-0^2/50) = 1, 1, exp(-100/50) = 0.13534, exp(-2500/50) ~ 2e-22
    weights = np.array([1.0, 1.0, math.exp(-2.0), math.exp(-50.0)])
    np.testing.assert_allclose(mixup.partner_probabilities(labels, 0.0, "cmixup", 5.0), weights / weights.sum())
    np.testing.assert_allclose(mixup.partner_probabilities(labels, 0.0, "mixup", 5.0), [0.25] * 4)


def test_partners_are_drawn_with_those_probabilities():
    labels = np.array([0.0, 0.0, 10.0, 50.0])
    pairs = mixup.MixedPairs(_Items(labels), labels, "cmixup", alpha=2.0, sigma=5.0)
    pairs.set_seed(3)
    partners = np.array([pairs.draw(0)[0] for _ in range(4000)])
    frequencies = np.bincount(partners, minlength=4) / len(partners)
    np.testing.assert_allclose(frequencies, [0.4683, 0.4683, 0.0634, 0.0], atol=0.025)
    weights = np.array([pairs.draw(3)[1] for _ in range(4000)])
    assert abs(weights.mean() - 0.5) < 0.02 and abs(weights.var() - 0.05) < 0.006  # Beta(2, 2): mean 1/2, var 1/20
    assert {pairs.draw(3)[0] for _ in range(200)} == {3}  # 50 % is 40 points from the next label: only itself


def test_an_item_is_its_slice_and_its_partner_mixed_by_the_drawn_weight():
    labels = np.array([0.0, 4.0, 8.0, 12.0, 30.0])
    pairs, twin = (mixup.MixedPairs(_Items(labels), labels, "cmixup", alpha=2.0, sigma=6.0) for _ in range(2))
    pairs.set_seed(11)
    twin.set_seed(11)  # the same stream: its draws are the ones the item used
    for index in (0, 2, 4, 1):
        image, target = pairs[index]
        partner, lam = twin.draw(index)
        assert image.dtype == torch.uint8
        assert torch.equal(image, torch.full((1, 4, 4), round(lam * 10 * index + (1 - lam) * 10 * partner),
                                             dtype=torch.uint8))
        assert target.item() == pytest.approx(lam * labels[index] + (1 - lam) * labels[partner], abs=1e-5)


def test_the_pair_stream_is_a_function_of_the_seed():
    labels = np.linspace(0, 100, 16)
    dataset = data.SliceDataset(np.zeros((16, 8, 8, 3), np.uint8), labels, lambda image: torch.zeros(1, 8, 8))
    a, b = (mixup.MixedPairs(dataset, labels, "mixup", 2.0, 5.0) for _ in range(2))
    a.set_seed(5)
    b.set_seed(5)
    assert [a.draw(i) for i in range(16)] == [b.draw(i) for i in range(16)]
    b.set_seed(6)
    assert [a.draw(i) for i in range(16)] != [b.draw(i) for i in range(16)]


@pytest.mark.parametrize("key, value", [("mixup", "manifold"), ("mixup_alpha", 0.0), ("cmixup_sigma", -1.0)])
def test_mixup_settings_are_checked(key, value):
    with pytest.raises(ConfigError, match=key):
        TrainConfig(**{key: value})
