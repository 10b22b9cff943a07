"""SAM/ASAM against hand-computed updates; BN statistics, schedulers, autocast, clipping, state round-trip."""
import copy

import pytest
import torch
from timm.scheduler import CosineLRScheduler
from torch import nn

from utils.sam import SAM, frozen_bn_stats, sam_train_step

RHO = 0.05


def linear_problem():
    """Linear(3, 1) with fixed weights and data; loss = mean squared error."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
        model.bias.fill_(0.1)
    x = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0], [0.3, -0.2, 1.0], [2.0, 1.0, -1.0]])
    y = torch.tensor([[1.0], [0.0], [2.0], [-1.0]])
    return model, x, y


def hand_gradient(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """d/dw, d/db of mean((x w^T + b - y)^2), written out by hand."""
    residual = x @ w.T + b - y  # (N, 1)
    n = x.shape[0]
    return (2.0 / n) * residual.T @ x, (2.0 / n) * residual.sum(0)


def sam_step(model, optimizer, x, y, **kwargs):
    return sam_train_step(model, optimizer, lambda: ((model(x) - y) ** 2).mean(), **kwargs)


def test_sgd_step_matches_hand_update():
    model, x, y = linear_problem()
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    lr = 0.1
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=lr)
    sam_step(model, optimizer, x, y)

    gw, gb = hand_gradient(w, b, x, y)
    norm = torch.sqrt((gw ** 2).sum() + (gb ** 2).sum())
    w_adv, b_adv = w + RHO * gw / norm, b + RHO * gb / norm
    gw2, gb2 = hand_gradient(w_adv, b_adv, x, y)
    torch.testing.assert_close(model.weight.detach(), w - lr * gw2)
    torch.testing.assert_close(model.bias.detach(), b - lr * gb2)


def test_sgd_momentum_weight_decay_two_steps_match_hand_update():
    model, x, y = linear_problem()
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    lr, momentum, decay = 0.05, 0.9, 1e-2
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=lr, momentum=momentum, weight_decay=decay)
    buf_w = buf_b = None
    for _ in range(2):
        sam_step(model, optimizer, x, y)
        gw, gb = hand_gradient(w, b, x, y)
        norm = torch.sqrt((gw ** 2).sum() + (gb ** 2).sum())
        gw2, gb2 = hand_gradient(w + RHO * gw / norm, b + RHO * gb / norm, x, y)
        # torch SGD: d = g + decay * w; buf = d (first step) else momentum * buf + d; w -= lr * buf
        dw, db = gw2 + decay * w, gb2 + decay * b
        buf_w = dw if buf_w is None else momentum * buf_w + dw
        buf_b = db if buf_b is None else momentum * buf_b + db
        w, b = w - lr * buf_w, b - lr * buf_b
        torch.testing.assert_close(model.weight.detach(), w)
        torch.testing.assert_close(model.bias.detach(), b)


def test_asam_perturbation_formula():
    model, x, y = linear_problem()
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1)
    ((model(x) - y) ** 2).mean().backward()
    optimizer.first_step()
    gw, gb = hand_gradient(w, b, x, y)
    norm = torch.sqrt(((w * gw) ** 2).sum() + ((b * gb) ** 2).sum())
    want_w, want_b = 0.5 * w ** 2 * gw / norm, 0.5 * b ** 2 * gb / norm
    torch.testing.assert_close(optimizer.state[model.weight]["e_w"], want_w)
    torch.testing.assert_close(optimizer.state[model.bias]["e_w"], want_b)
    torch.testing.assert_close(model.weight.detach(), w + want_w)
    # ASAM differs from SAM: the perturbation scales with |w|
    sam_e_w = 0.5 * gw / torch.sqrt((gw ** 2).sum() + (gb ** 2).sum())
    assert not torch.allclose(want_w, sam_e_w)
    optimizer.second_step()
    assert "climbed" not in optimizer.state[model.weight]  # a second second_step would not restore stale weights


def bn_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1))


def test_bn_running_stats_update_once_per_step():
    model = bn_model()
    reference = copy.deepcopy(model).train()
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    with torch.no_grad():
        reference(x)  # one plain training forward from the same start
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1)
    model.train()
    sam_step(model, optimizer, x, y)
    bn, ref_bn = model[1], reference[1]
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    assert bn.num_batches_tracked.item() == 1
    assert bn.momentum == 0.1  # restored


def test_frozen_bn_stats_restores_momentum_none_and_counter():
    bn = nn.BatchNorm1d(2, momentum=None)
    before = (bn.running_mean.clone(), bn.running_var.clone())
    with frozen_bn_stats(bn):
        bn(torch.randn(5, 2) * 3 + 1)
        assert bn.momentum == 0.0
    assert bn.momentum is None
    assert bn.num_batches_tracked.item() == 0
    torch.testing.assert_close(bn.running_mean, before[0])
    torch.testing.assert_close(bn.running_var, before[1])


def test_timm_cosine_scheduler_drives_base_lr():
    model, x, y = linear_problem()
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1)
    scheduler = CosineLRScheduler(optimizer, t_initial=10, warmup_t=2, warmup_lr_init=1e-5)
    assert optimizer.base_optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)
    scheduler.step(1)
    lr = 1e-5 + (0.1 - 1e-5) / 2  # timm linear warmup, epoch 1 of 2
    assert optimizer.base_optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    # the update really uses that lr
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    sam_step(model, optimizer, x, y)
    gw, gb = hand_gradient(w, b, x, y)
    norm = torch.sqrt((gw ** 2).sum() + (gb ** 2).sum())
    gw2, _ = hand_gradient(w + RHO * gw / norm, b + RHO * gb / norm, x, y)
    torch.testing.assert_close(model.weight.detach(), w - lr * gw2)
    scheduler.step(5)
    assert optimizer.base_optimizer.param_groups[0]["lr"] < 0.1


def test_bf16_autocast_step_updates_weights():
    model = bn_model().train()
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9)
    loss = sam_step(model, optimizer, x, y,
                    autocast_ctx=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_clipping_applies_to_second_step_gradient():
    model, x, y = linear_problem()
    y = y * 100  # large gradient
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=1.0)
    sam_step(model, optimizer, x, y, clip_grad_norm=0.5)
    gw, gb = hand_gradient(w, b, x, y)
    norm = torch.sqrt((gw ** 2).sum() + (gb ** 2).sum())
    gw2, gb2 = hand_gradient(w + RHO * gw / norm, b + RHO * gb / norm, x, y)
    norm2 = torch.sqrt((gw2 ** 2).sum() + (gb2 ** 2).sum())
    assert norm2 > 0.5
    update_w, update_b = w - model.weight.detach(), b - model.bias.detach()  # lr 1: update = clipped gradient
    update_norm = torch.sqrt((update_w ** 2).sum() + (update_b ** 2).sum())
    assert update_norm.item() <= 0.5 + 1e-5
    assert update_norm.item() == pytest.approx(0.5, rel=1e-4)
    torch.testing.assert_close(update_w, gw2 * 0.5 / norm2, rtol=1e-4, atol=1e-6)


def test_state_dict_round_trip_restores_momentum():
    model, x, y = linear_problem()
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.05, momentum=0.9)
    for _ in range(2):
        sam_step(model, optimizer, x, y)
    saved_state = copy.deepcopy(optimizer.state_dict())
    resumed_model = copy.deepcopy(model)
    resumed = SAM(resumed_model.parameters(), torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9)
    resumed.load_state_dict(saved_state)
    assert resumed.param_groups is resumed.base_optimizer.param_groups
    assert resumed.param_groups[0]["rho"] == RHO
    torch.testing.assert_close(resumed.base_optimizer.state[resumed_model.weight]["momentum_buffer"],
                               optimizer.base_optimizer.state[model.weight]["momentum_buffer"])
    sam_step(model, optimizer, x, y)
    sam_step(resumed_model, resumed, x, y)
    torch.testing.assert_close(resumed_model.weight, model.weight)


def test_step_with_closure_equals_train_step():
    model, x, y = linear_problem()
    twin = copy.deepcopy(model)
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1)
    twin_optimizer = SAM(twin.parameters(), torch.optim.SGD, rho=RHO, lr=0.1)

    def closure():
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    closure()
    optimizer.step(closure)
    sam_step(twin, twin_optimizer, x, y)
    torch.testing.assert_close(model.weight, twin.weight)


def test_a_loss_scaled_step_equals_the_unscaled_one():
    """fp16's GradScaler: both passes backpropagate S * loss; the climb is scale-free and the base step unscaled."""
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=1024.0)):
        model, x, y = linear_problem()
        optimizer = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9)
        for _ in range(2):
            sam_step(model, optimizer, x, y, scaler=scaler, clip_grad_norm=0.5)
        results.append([p.detach().clone() for p in model.parameters()])
    for unscaled, scaled in zip(*results, strict=True):
        torch.testing.assert_close(scaled, unscaled)


@pytest.mark.parametrize("overflow_pass", [1, 2])
def test_an_fp16_overflow_in_either_pass_skips_the_update_and_backs_the_scale_off(overflow_pass):
    model, x, y = linear_problem()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    calls = []

    def loss():
        calls.append(1)
        value = ((model(x) - y) ** 2).mean()
        return value * float("inf") if len(calls) == overflow_pass else value

    sam_train_step(model, optimizer, loss, scaler=scaler)
    assert len(calls) == overflow_pass  # an overflow at w skips the second pass too
    assert scaler.get_scale() == 512.0
    for p, old in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), old, rtol=0, atol=0)  # w exactly as before, not w + e_w
        assert p.grad is None
    assert not optimizer.base_optimizer.state  # no momentum buffer made from a skipped step
    sam_step(model, optimizer, x, y, scaler=scaler)  # and the next step goes through
    assert not torch.equal(model.weight.detach(), before[0])
