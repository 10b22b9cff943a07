"""Losses (eq 1-3) against independent hand computations in plain python."""
import math

import numpy as np
import pytest
import torch

from utils.losses import (
    NUM_BINS,
    _BlackboxRanks,
    balanced_mse,
    check_targets,
    descending_ranks,
    head_loss,
    kl_to_target,
    lds_weights,
    ranksim,
    sample_weights,
    smooth_l1,
    target_distribution,
)


def hand_integer_distribution(label: int) -> list[float]:
    """eq 3 for an integer label, mass outside 0..100 folded onto the nearest edge bin."""
    dist = [0.0] * 101
    for offset, weight in ((-2, 0.05), (-1, 0.15), (0, 0.6), (1, 0.15), (2, 0.05)):
        dist[min(100, max(0, label + offset))] += weight
    return dist


def hand_distribution(label: float) -> list[float]:
    lower = min(int(math.floor(label)), 99)
    frac = label - lower
    low, high = hand_integer_distribution(lower), hand_integer_distribution(lower + 1)
    return [(1 - frac) * a + frac * b for a, b in zip(low, high)]


def hand_smooth_l1(pred, target) -> float:
    total = 0.0
    for p, t in zip(pred, target):
        d = abs(p - t)
        total += 0.5 * d * d if d < 1 else d - 0.5
    return total / len(pred)


def test_distribution_edges_by_hand():
    dist = target_distribution(torch.tensor([0.0, 1.0, 99.0, 100.0]))
    assert dist.shape == (4, NUM_BINS)
    expected = {0: {0: 0.8, 1: 0.15, 2: 0.05}, 1: {0: 0.2, 1: 0.6, 2: 0.15, 3: 0.05},
                2: {100: 0.2, 99: 0.6, 98: 0.15, 97: 0.05}, 3: {100: 0.8, 99: 0.15, 98: 0.05}}
    for row, bins in expected.items():
        want = np.zeros(NUM_BINS)
        for index, value in bins.items():
            want[index] = value
        np.testing.assert_allclose(dist[row].numpy(), want, atol=1e-7)


def test_distribution_fractional_label_by_hand():
    dist = target_distribution(torch.tensor([37.4], dtype=torch.float64))[0].numpy()
    # 0.6 * t(37) + 0.4 * t(38)
    want = {35: 0.6 * 0.05, 36: 0.6 * 0.15 + 0.4 * 0.05, 37: 0.6 * 0.6 + 0.4 * 0.15,
            38: 0.6 * 0.15 + 0.4 * 0.6, 39: 0.6 * 0.05 + 0.4 * 0.15, 40: 0.4 * 0.05}
    assert want == pytest.approx({35: 0.03, 36: 0.11, 37: 0.42, 38: 0.33, 39: 0.09, 40: 0.02})
    for index in range(NUM_BINS):
        assert dist[index] == pytest.approx(want.get(index, 0.0), abs=1e-7), index


def test_distribution_matches_hand_loop_and_sums_to_one():
    labels = [0.0, 0.3, 1.0, 1.5, 2.0, 37.4, 50.0, 98.2, 99.0, 99.9, 100.0]
    dist = target_distribution(torch.tensor(labels, dtype=torch.float64)).double().numpy()
    for row, label in zip(dist, labels):
        np.testing.assert_allclose(row, hand_distribution(label), atol=1e-7)
    np.testing.assert_allclose(dist.sum(axis=1), 1.0, atol=1e-6)
    # the mean of the distribution is the label away from the edges
    bins = np.arange(NUM_BINS)
    assert (dist[5] * bins).sum() == pytest.approx(37.4, abs=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), -0.5, 100.5])
def test_bad_targets_raise(bad):
    with pytest.raises(ValueError, match="1 of 3 targets"):
        check_targets(torch.tensor([10.0, bad, 20.0]))
    with pytest.raises(ValueError):
        target_distribution(torch.tensor([bad]))
    outputs = {"reg": torch.zeros(2)}
    with pytest.raises(ValueError, match="outside"):
        head_loss(outputs, torch.tensor([1.0, bad]), "reg")


def test_smooth_l1_by_hand():
    pred, target = [0.2, 3.0, -1.0, 50.0], [0.0, 1.5, -1.2, 40.0]
    assert smooth_l1(torch.tensor(pred), torch.tensor(target)).item() == pytest.approx(
        hand_smooth_l1(pred, target), rel=1e-6)


def test_kl_by_hand():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, NUM_BINS, generator=generator)
    labels = [0.0, 37.4, 100.0]
    got = kl_to_target(logits, target_distribution(torch.tensor(labels))).item()
    total = 0.0
    for row, label in zip(logits.double().tolist(), labels):
        log_z = math.log(sum(math.exp(v) for v in row))
        for t, logit in zip(hand_distribution(label), row):
            if t > 0:
                total += t * (math.log(t) - (logit - log_z))
    assert got == pytest.approx(total / 3, rel=1e-5)


def fake_outputs(batch: int = 4):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(batch, NUM_BINS, generator=generator)
    probs = logits.softmax(1)
    return {"reg": torch.tensor([3.0, 40.0, 99.0, 0.5]), "expectation": probs @ torch.arange(NUM_BINS).float(),
            "logits": logits}


@pytest.mark.parametrize("head", ["reg", "exp", "ldl"])
def test_head_loss_parts_add_up(head):
    outputs = fake_outputs()
    target = torch.tensor([2.0, 45.5, 100.0, 0.0])
    total, tensor_parts = head_loss(outputs, target, head, kl_weight=0.5)
    # parts stay detached on the device (no sync on the training hot path)
    assert all(v.ndim == 0 and not v.requires_grad for v in tensor_parts.values())
    parts = {k: float(v) for k, v in tensor_parts.items()}
    expected_keys = {"reg": {"loss", "l1_reg"}, "exp": {"loss", "l1_reg", "l1_exp"},
                     "ldl": {"loss", "l1_reg", "l1_exp", "kl"}}[head]
    assert set(parts) == expected_keys
    assert parts["l1_reg"] == pytest.approx(hand_smooth_l1(outputs["reg"].tolist(), target.tolist()), rel=1e-6)
    if head != "reg":
        assert parts["l1_exp"] == pytest.approx(
            hand_smooth_l1(outputs["expectation"].tolist(), target.tolist()), rel=1e-6)
    want = parts["l1_reg"] + parts.get("l1_exp", 0.0) + 0.5 * parts.get("kl", 0.0)
    assert total.item() == pytest.approx(want, rel=1e-6)
    assert parts["loss"] == pytest.approx(total.item(), rel=1e-6)
    assert total.dtype == torch.float32


def test_head_loss_float32_from_bf16_and_unknown_head():
    outputs = {k: v.bfloat16() for k, v in fake_outputs().items()}
    total, _ = head_loss(outputs, torch.tensor([2.0, 45.5, 100.0, 0.0]), "ldl")
    assert total.dtype == torch.float32
    with pytest.raises(ValueError, match="reg.*exp.*ldl"):
        head_loss(outputs, torch.zeros(4), "mse")


# ------------------------------------------------------------------------------------------- imbalance


def hand_lds(labels, mode, sigma):
    """LDS weights by plain loops: histogram over 101 bins, Gaussian kernel truncated at 4 sd, zero padding."""
    counts = [0.0] * 101
    for label in labels:
        counts[min(100, max(0, int(math.floor(label + 0.5))))] += 1
    radius = max(1, math.ceil(4 * sigma))
    kernel = [math.exp(-0.5 * (k / sigma) ** 2) for k in range(-radius, radius + 1)]
    total = sum(kernel)
    density = [sum(counts[i - k] * kernel[k + radius] / total for k in range(-radius, radius + 1) if 0 <= i - k <= 100)
               for i in range(101)]
    smallest = min(d for d in density if d > 0)
    density = [d if d > 0 else smallest for d in density]
    weights = [1 / d if mode == "inverse" else 1 / math.sqrt(d) for d in density]
    mean = sum(weights[min(100, int(math.floor(y + 0.5)))] for y in labels) / len(labels)
    return [w / mean for w in weights]


@pytest.mark.parametrize("mode", ["inverse", "sqrt_inverse"])
def test_lds_weights_match_a_hand_loop_and_weigh_rare_labels_up(mode):
    labels = [0.0] * 30 + [3.0] * 10 + [12.4] * 5 + [55.0] * 2 + [90.0]
    weights = lds_weights(np.array(labels), mode, sigma=2.0)
    np.testing.assert_allclose(weights.numpy(), hand_lds(labels, mode, 2.0), rtol=1e-5)
    assert weights[90] > weights[55] > weights[12] > weights[0]  # the rarer the label, the heavier
    per_slice = sample_weights(weights, torch.tensor(labels))
    assert float(per_slice.mean()) == pytest.approx(1.0, abs=1e-5)  # mean 1 over the training slices
    assert torch.equal(lds_weights(np.array(labels), "none", 2.0), torch.ones(101))


def test_balanced_mse_by_hand():
    pred, target, sigma = [1.0, 3.0, 10.0], [0.0, 4.0, 12.0], 2.0
    total = 0.0
    for i, p in enumerate(pred):
        logits = [-0.5 * (p - y) ** 2 / sigma ** 2 for y in target]
        total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    want = total / len(pred) * 2 * sigma ** 2
    got = balanced_mse(torch.tensor(pred), torch.tensor(target), sigma)
    assert float(got) == pytest.approx(want, rel=1e-6)
    # a prediction that sits on its own label among far-away others costs ~0; the loss pulls it toward it
    assert float(balanced_mse(torch.tensor([0.0, 50.0]), torch.tensor([0.0, 50.0]), 1.0)) == pytest.approx(0, abs=1e-6)


def test_weighted_head_loss_is_the_weighted_mean_of_each_term_and_bmse_replaces_eq2():
    torch.manual_seed(0)
    logits = torch.randn(4, NUM_BINS)
    probs = logits.softmax(1)
    outputs = {"reg": torch.tensor([1.0, 20.0, 50.0, 90.0]), "expectation": probs @ torch.arange(101.0),
               "logits": logits}
    target, weights = torch.tensor([2.0, 25.0, 45.5, 100.0]), torch.tensor([0.5, 1.0, 1.5, 1.0])
    total, parts = head_loss(outputs, target, "ldl", weights=weights)
    per_reg = [hand_smooth_l1([p], [t]) for p, t in zip(outputs["reg"].tolist(), target.tolist())]
    assert float(parts["l1_reg"]) == pytest.approx(sum(w * v for w, v in zip(weights.tolist(), per_reg)) / 4)
    kl = [float(kl_to_target(logits[i:i + 1], target_distribution(target[i:i + 1]))) for i in range(4)]
    assert float(parts["kl"]) == pytest.approx(sum(w * v for w, v in zip(weights.tolist(), kl)) / 4, rel=1e-5)
    _, bmse_parts = head_loss(outputs, target, "reg", regression_loss="balanced_mse", bmse_sigma=3.0)
    assert set(bmse_parts) == {"bmse_reg", "loss"}
    assert float(bmse_parts["bmse_reg"]) == pytest.approx(float(balanced_mse(outputs["reg"], target, 3.0)))


def test_descending_ranks_and_their_blackbox_gradient_by_hand():
    rows = torch.tensor([[0.1, 0.5, 0.3]], requires_grad=True)
    assert descending_ranks(rows)[0].tolist() == pytest.approx([1.0, 1 / 3, 2 / 3])  # the largest ranks first
    # the gradient: ranks of rows + lambda * grad ([0.6, 0.0, 0.3] -> [1/3, 1, 2/3]) minus the ranks, over lambda
    ranks = _BlackboxRanks.apply(rows, 0.5)
    ranks.backward(torch.tensor([[1.0, -1.0, 0.0]]))
    assert rows.grad[0].tolist() == pytest.approx([-4 / 3, 4 / 3, 0.0])


def unit(degrees):
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_ranksim_by_hand():
    labels = torch.tensor([0.0, 10.0, 50.0])
    # features at 0, 90 and 30 degrees. Slice 0 ranks (itself, 2, 1) by similarity but (itself, 1, 2) by label:
    # squared rank differences (0, 1/9, 1/9), mean 2/27; slices 1 and 2 likewise: 3 x 2/27
    crossed = torch.tensor([unit(0), unit(90), unit(30)])
    assert float(ranksim(crossed, labels)) == pytest.approx(2 / 9)
    # features at 0, 10 and 50 degrees rank the others as their labels do: 0
    assert float(ranksim(torch.tensor([unit(0), unit(10), unit(50)]), labels)) == pytest.approx(0.0)
    # a repeated label counts once: its copies' features are the same here, so any draw gives 2/9
    repeated = torch.cat([crossed, crossed[:1]])
    assert float(ranksim(repeated, torch.tensor([0.0, 10.0, 50.0, 0.0]))) == pytest.approx(2 / 9)
    single = torch.ones(4, 2, requires_grad=True)
    loss = ranksim(single, torch.full((4,), 7.0))
    loss.backward()
    assert loss.item() == 0.0 and single.grad is not None  # one distinct label: nothing to rank, graph kept


def test_ranksim_in_head_loss_adds_its_weighted_part_and_moves_the_features():
    torch.manual_seed(0)
    features = torch.randn(8, 16, requires_grad=True)
    outputs = {"reg": features.sum(1), "features": features}
    target = torch.tensor([0.0, 5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0])
    plain, _ = head_loss(outputs, target, "reg")
    total, parts = head_loss(outputs, target, "reg", ranksim_weight=3.0)
    assert total.item() == pytest.approx(plain.item() + 3.0 * parts["ranksim"].item())
    only_ranksim = total - plain
    only_ranksim.backward()
    assert float(features.grad.abs().sum()) > 0
