"""Sharpness-Aware Minimization around any torch optimizer (paper: training procedure, SAM with rho = 0.05).

SAM (Foret et al., ICLR 2021) minimises the loss at the worst nearby point:
    e_w = rho * g / ||g||                            (first step: climb to w + e_w)
    w  <- base_step(w, grad L(w + e_w))              (second step: descend from w with the gradient taken there)
ASAM (Kwon et al., ICML 2021) makes the neighbourhood scale-invariant with T_w = |w|:
    e_w = rho * T_w^2 g / ||T_w g||   (i.e. rho * w^2 * g / ||w * g||)
Norms run over all parameters together (one global norm, as in both papers), in float32.

Why written here rather than wrapping the ``pytorch-optimizer`` package's SAM: it is ~60 lines, adds no
dependency, and keeps under our control what matters for this project: BatchNorm statistics updated only on the
first pass (``frozen_bn_stats``; or on both, as the seed team's code does), bf16 autocast without a GradScaler,
gradient clipping before the second step, exact restoration of w after the climb, and ``param_groups`` shared with
the base optimizer so timm schedulers drive its learning rate.

Usage (one training step, see ``sam_train_step``)::

    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9)
    loss = sam_train_step(model, optimizer, lambda: criterion(model(x), y))
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer


class SAM(Optimizer):
    """SAM/ASAM wrapper: ``first_step`` climbs to w + e_w, ``second_step`` restores w and runs the base optimizer.

    ``param_groups`` *is* the base optimizer's list, so an LR scheduler acting on this object (e.g. timm's
    ``CosineLRScheduler``) sets the learning rate the base step uses. ``state_dict`` is the base optimizer's
    (momentum buffers etc.; rho and adaptive live in the param groups), so a resumed run continues momentum.
    """

    def __init__(self, params, base_optimizer: type[Optimizer] | Callable[..., Optimizer], rho: float = 0.05,
                 adaptive: bool = False, **base_kwargs: Any) -> None:
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def _params_with_grad(self, group: dict[str, Any]) -> list[torch.Tensor]:
        return [p for p in group["params"] if p.grad is not None]

    def _grad_norm(self) -> torch.Tensor:
        """||g|| (SAM) or ||w * g|| (ASAM) over all parameters with a gradient, in float32.

        The per-parameter work uses torch's fused ``_foreach`` kernels: a ResNeSt50 has ~270 parameter tensors,
        and one small kernel each per operation would cost more GPU launch time than the maths."""
        norms = []
        for group in self.param_groups:
            params = self._params_with_grad(group)
            if not params:
                continue
            grads = [p.grad.float() for p in params]
            if group["adaptive"]:
                grads = torch._foreach_mul(grads, torch._foreach_abs([p.float() for p in params]))
            norms.extend(torch._foreach_norm(grads))
        if not norms:
            raise RuntimeError("SAM.first_step: no parameter has a gradient; call loss.backward() first")
        device = norms[0].device
        return torch.stack([n.to(device) for n in norms]).norm(p=2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, skip_nonfinite: bool = False) -> bool:
        """w <- w + e_w, e_w = rho g/||g|| (ASAM: rho w^2 g/||w g||); remembers w and e_w in ``self.state``.

        e_w is the same for a loss-scaled gradient S*g (fp16 training): no unscaling needed. ``skip_nonfinite``:
        gradients with inf/NaN (an fp16 overflow) leave w as it is and return False (one host sync); else True."""
        grad_norm = self._grad_norm()
        if skip_nonfinite and not torch.isfinite(grad_norm):
            if zero_grad:
                self.zero_grad()
            return False
        for group in self.param_groups:
            params = self._params_with_grad(group)
            if not params:
                continue
            scale = (group["rho"] / (grad_norm + 1e-12)).to(params[0].device)
            e_ws = torch._foreach_mul([p.grad.float() for p in params], scale)
            if group["adaptive"]:
                floats = [p.float() for p in params]
                torch._foreach_mul_(e_ws, torch._foreach_mul(floats, floats))
            for p, e_w in zip(params, e_ws):
                state = self.state[p]
                if "old_p" not in state:  # a persistent buffer per parameter: no allocation per step
                    state["old_p"] = torch.empty_like(p)
                state["e_w"] = e_w
            torch._foreach_copy_([self.state[p]["old_p"] for p in params], params)  # exact restore later
            torch._foreach_add_(params, [e.to(p.dtype) for p, e in zip(params, e_ws)])
            for p in params:
                self.state[p]["climbed"] = True
        if zero_grad:
            self.zero_grad()
        return True

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None) -> None:
        """w <- w (undo the climb), then the base optimizer step with the gradient taken at w + e_w (through
        ``scaler.step`` in fp16 training: unscaled, and skipped on inf/NaN)."""
        for group in self.param_groups:
            climbed = [p for p in group["params"] if self.state[p].pop("climbed", False)]
            if climbed:  # w + e - e != w in floating point: copy the saved w back
                torch._foreach_copy_(climbed, [self.state[p]["old_p"] for p in climbed])
        if scaler is None:
            self.base_optimizer.step()
        else:
            scaler.step(self.base_optimizer)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> None:
        """Both steps. Gradients at w must already exist; ``closure`` must recompute loss and call backward."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that does a full forward and backward pass")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step()

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups  # load_state_dict replaces the list


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Inside the block, BatchNorm layers still normalise with batch statistics but do not update running stats.

    Sets ``momentum = 0`` on every ``_BatchNorm`` (running = 1 * running + 0 * batch). torch still increments
    ``num_batches_tracked`` in that case, so it is saved and restored too. Used around SAM's second pass so BN
    statistics move once per step, as in plain training.
    """
    saved = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            tracked = None if module.num_batches_tracked is None else module.num_batches_tracked.clone()
            saved.append((module, module.momentum, tracked))
            module.momentum = 0.0
    try:
        yield
    finally:
        for module, momentum, tracked in saved:
            module.momentum = momentum
            if tracked is not None:
                module.num_batches_tracked.copy_(tracked)


def sam_train_step(model: nn.Module, optimizer: SAM, compute_loss: Callable[[], torch.Tensor],
                   clip_grad_norm: float | None = None,
                   autocast_ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                   scaler: torch.amp.GradScaler | None = None, bn_update: str = "first") -> torch.Tensor:
    """One SAM update; returns the loss at w (first pass), detached.

    ``compute_loss`` runs the forward pass and returns a scalar loss; it is called twice (at w, then at w + e_w),
    each time inside ``autocast_ctx()`` (e.g. ``lambda: torch.autocast("cuda", dtype=torch.bfloat16)``; bf16 has
    float32's range, so no GradScaler). BN running stats update on the first pass only (`bn_update="first"`), or on
    both passes (`"both"`: the seed team's code, which runs the second pass in train mode). Gradients are clipped to
    ``clip_grad_norm`` (if set) just before the second step, i.e. the gradient that updates the weights; clipping
    the first pass would not change e_w, which is normalised anyway.

    fp16 (``scaler``, a torch.amp.GradScaler): both passes backpropagate the scaled loss; the climb needs no
    unscaling (e_w is scale-free); the second step goes through the scaler. An overflow in the first pass skips the
    whole update and backs the scale off, as the scaler does for an overflow in the second.
    """
    with autocast_ctx():
        loss = compute_loss()
    (loss if scaler is None else scaler.scale(loss)).backward()
    if not optimizer.first_step(zero_grad=True, skip_nonfinite=scaler is not None):
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        return loss.detach()
    with frozen_bn_stats(model) if bn_update == "first" else contextlib.nullcontext():
        with autocast_ctx():
            adversarial_loss = compute_loss()
        (adversarial_loss if scaler is None else scaler.scale(adversarial_loss)).backward()
    if clip_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer.base_optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    optimizer.second_step(zero_grad=True, scaler=scaler)
    if scaler is not None:
        scaler.update()
    return loss.detach()
