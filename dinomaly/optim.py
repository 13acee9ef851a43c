"""StableAdamW and the warm-up + cosine learning-rate schedule of the reference training loop.

Reference: guojiajeremy/Dinomaly optimizers/StableAdamW.py and utils.py WarmCosineScheduler @c5c76d0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from dinomaly.config import TrainConfig


def warm_cosine(step: int, total_steps: int, warmup_steps: int = 100, base_lr: float = 2e-3,
                final_lr: float = 2e-4) -> float:
    """Learning rate of 0-based `step`: linear warm-up from 0 (endpoint included), then cosine to final_lr.

    `np.linspace(0, base_lr, warmup_steps)[step]` for step < warmup_steps (so step 0 runs at lr 0 and
    base_lr is used at warmup_steps - 1 and warmup_steps), then
    `final_lr + 0.5 * (base_lr - final_lr) * (1 + cos(pi * i / (total_steps - warmup_steps)))` with
    i = step - warmup_steps; final_lr from total_steps on.

    Reference: utils.py WarmCosineScheduler @c5c76d0 (start_warmup_value 0).
    """
    if step >= total_steps:
        return final_lr
    if step < warmup_steps:
        if warmup_steps == 1:
            return 0.0  # np.linspace(0, base_lr, 1) == [0.0]
        if step == warmup_steps - 1:
            return base_lr  # linspace sets its endpoint exactly
        return step * (base_lr / (warmup_steps - 1))  # linspace: arange * (stop - start) / (num - 1)
    i = step - warmup_steps
    return final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * i / (total_steps - warmup_steps)))


# No library optimiser reproduces the reference: timm has no StableAdamW, and optimi's StableAdamW
# has no AMSGrad, takes the RMS of g^2 / v instead of g / denom and scales weight decay differently.
class StableAdamW(torch.optim.Optimizer):
    """AdamW (AMSGrad) whose per-tensor step is divided by max(1, RMS(g / denom) / clip_threshold).

    Per tensor with a gradient g, at the group's lr: p *= 1 - lr * wd; m = b1 m + (1 - b1) g;
    v = b2 v + (1 - b2) g^2; vmax = max(vmax, v); denom = sqrt(vmax) / sqrt(1 - b2^t) + eps;
    s = max(1, RMS(g / denom) / clip_threshold); p -= lr / (1 - b1^t) / s * m / denom.
    The ops run as torch._foreach_* over the whole group, in the reference's order and float32
    rounding; the per-tensor scale stays on the device (no host sync per tensor).

    Reference: optimizers/StableAdamW.py StableAdamW.step @c5c76d0.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 1e-2, eps: float = 1e-8, amsgrad: bool = True,
                 clip_threshold: float = 1.0) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"StableAdamW needs lr, eps and weight_decay >= 0, got lr={lr}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"StableAdamW betas={betas} must be two numbers in [0, 1)")
        if clip_threshold <= 0:
            raise ValueError(f"StableAdamW clip_threshold={clip_threshold} must be > 0")
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps, amsgrad=amsgrad,
                        clip_threshold=clip_threshold)
        super().__init__(params, defaults)

    def _init_state(self, p: torch.Tensor, amsgrad: bool) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params)
        return loss

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, wd, eps, amsgrad = group["lr"], group["weight_decay"], group["eps"], group["amsgrad"]
        beta1, beta2 = group["betas"]
        if any(p.grad.is_sparse for p in params):
            raise ValueError("StableAdamW does not support sparse gradients; use dense parameters")
        grads = [p.grad for p in params]
        states = [self._init_state(p, amsgrad) for p in params]
        for state in states:
            state["step"] += 1
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]

        torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        second = exp_avg_sqs
        if amsgrad:
            second = [s["max_exp_avg_sq"] for s in states]
            torch._foreach_maximum_(second, exp_avg_sqs)
        denoms = torch._foreach_sqrt(second)
        torch._foreach_div_(denoms, [math.sqrt(1 - beta2 ** s["step"]) for s in states])
        torch._foreach_add_(denoms, eps)

        # s = max(1, RMS(g / denom) / clip): one norm per tensor, then the scales as one [N] tensor
        device = params[0].device
        norms = torch.stack(torch._foreach_norm(torch._foreach_div(grads, denoms)))
        root_numels = torch.tensor([p.numel() ** 0.5 for p in params], dtype=norms.dtype, device=device)
        scaled = norms / root_numels / group["clip_threshold"]
        base = torch.tensor([lr / (1 - beta1 ** s["step"]) for s in states], dtype=norms.dtype, device=device)
        # reference: lr / bc1 / s, which Python evaluates as reciprocal(s) * (lr / bc1) when s > 1
        neg_steps = -torch.where(scaled > 1.0, scaled.reciprocal() * base, base)
        # reference addcdiv_: p + (value * m) / denom, in that order
        updates = torch._foreach_mul(exp_avgs, list(neg_steps.unbind()))
        torch._foreach_div_(updates, denoms)
        torch._foreach_add_(params, updates)


def build_optimizer(model: torch.nn.Module, train_config: TrainConfig) -> StableAdamW:
    """StableAdamW over model.trainable_parameters() (bottleneck, then decoder): one group, decay on all."""
    return StableAdamW([{"params": list(model.trainable_parameters())}], lr=train_config.lr,
                       betas=tuple(train_config.betas), weight_decay=train_config.weight_decay,
                       eps=train_config.eps, amsgrad=True)


def build_scheduler(optimizer: torch.optim.Optimizer, train_config: TrainConfig) -> LambdaLR:
    """LambdaLR over warm_cosine; step it once after each optimizer.step() (the first step runs at lr 0)."""
    tc = train_config
    for group in optimizer.param_groups:
        group["initial_lr"] = tc.lr  # LambdaLR's base: lr = train.lr * warm_cosine(step) / train.lr
    return LambdaLR(optimizer, lambda step: warm_cosine(step, tc.total_steps, tc.warmup_steps, tc.lr,
                                                        tc.final_lr) / tc.lr)
