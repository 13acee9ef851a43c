"""StableAdamW and the warm-cosine schedule against the reference vectors."""

import math

import pytest
import torch
from conftest import reference_model_config

from dinomaly.config import TrainConfig
from dinomaly.loss import hard_mining_cosine_loss
from dinomaly.optim import StableAdamW, build_optimizer, build_scheduler, warm_cosine


class OneTensor(torch.nn.Module):
    """Stand-in with the Dinomaly trainable_parameters() interface, for schedule-only tests."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3))

    def trainable_parameters(self):
        return [self.weight]


def lrs_used(train_config, steps):
    """The lr the optimiser holds at each 0-based iteration, stepping the scheduler after each step."""
    optimizer = build_optimizer(OneTensor(), train_config)
    scheduler = build_scheduler(optimizer, train_config)
    used = []
    for _ in range(steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used


def test_warm_cosine_matches_reference_table(vectors):
    got = [warm_cosine(it, 10_000, 100, 2e-3, 2e-4) for it in vectors["sched/iters"]]
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                               torch.tensor(vectors["sched/lr"], dtype=torch.float64), rtol=0, atol=1e-9)
    assert warm_cosine(0, 10_000) == 0.0 and warm_cosine(10_000, 10_000) == 2e-4 == warm_cosine(12_345, 10_000)


def test_lambda_lr_scheduler_reproduces_reference_lr_per_iteration(vectors):
    used = lrs_used(TrainConfig(total_steps=10_000, warmup_steps=100, lr=2e-3, final_lr=2e-4), 10_002)
    got = [used[it] for it in vectors["sched/iters"]]
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                               torch.tensor(vectors["sched/lr"], dtype=torch.float64), rtol=0, atol=1e-9)
    assert used[10_000] == pytest.approx(2e-4, abs=1e-12) and used[10_001] == pytest.approx(2e-4, abs=1e-12)


def test_short_schedule_matches_trajectory_lrs(trajectory):
    used = lrs_used(TrainConfig(total_steps=60, warmup_steps=5, lr=2e-3, final_lr=2e-4, batch_size=4), 30)
    torch.testing.assert_close(torch.tensor(used, dtype=torch.float64),
                               torch.tensor(trajectory["lr"], dtype=torch.float64), rtol=0, atol=1e-9)


def spec_step(params, states, lr, betas=(0.9, 0.999), wd=1e-4, eps=1e-10, clip=1.0):
    """The reference update written per tensor straight from the README formula (the oracle)."""
    b1, b2 = betas
    for p in params:
        g = p.grad
        p.mul_(1 - lr * wd)
        st = states.setdefault(p, dict(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p), vmax=torch.zeros_like(p)))
        st["t"] += 1
        st["m"].mul_(b1).add_(g, alpha=1 - b1)
        st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
        torch.max(st["vmax"], st["v"], out=st["vmax"])
        denom = (st["vmax"].sqrt() / math.sqrt(1 - b2 ** st["t"])).add_(eps)
        scale = max(1.0, (g / denom).norm(2) / (g.numel() ** 0.5) / clip)
        p.addcdiv_(st["m"], denom, value=-(lr / (1 - b1 ** st["t"]) / scale))


def test_foreach_update_equals_per_tensor_formula_bit_for_bit():
    """Six steps with lr 0, warm-up lrs, a 10x gradient burst (RMS scale > 1) and near-zero gradients."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(32, 128), (128,), (7, 3, 5), (1,), (96, 32)]
    oracle = [torch.randn(s, generator=gen) for s in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in oracle]
    optimizer = StableAdamW(ours, lr=2e-3, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-10)
    states, scaled = {}, False
    for it, (lr, gain) in enumerate([(0.0, 1), (5e-4, 1), (2e-3, 10), (2e-3, 1), (1e-3, 1e-9), (2e-3, 1)]):
        grads = [gain * torch.randn(s, generator=gen) for s in shapes]
        for o, q, g in zip(oracle, ours, grads):
            o.grad, q.grad = g.clone(), g.clone()
        optimizer.param_groups[0]["lr"] = lr
        with torch.no_grad():
            spec_step(oracle, states, lr)
        optimizer.step()
        for o, q in zip(oracle, ours):
            assert torch.equal(o, q), f"step {it + 1} differs"
        st = optimizer.state[ours[0]]
        denom = st["max_exp_avg_sq"].sqrt() / math.sqrt(1 - 0.999 ** st["step"]) + 1e-10
        scaled |= bool((ours[0].grad / denom).norm() / ours[0].numel() ** 0.5 > 1)
    assert scaled, "the test must exercise the RMS clipping branch"


def test_three_steps_match_reference(official_state_dict, vectors):
    """Eval-mode forward, p 0.9, clip 0.1, constant lr 2e-3: loss, pre-clip norm and all parameters."""
    from dinomaly.checkpoint import load_official

    model = load_official(official_state_dict, config=reference_model_config()).eval()
    trainable = list(model.trainable_parameters())
    optimizer = StableAdamW([{"params": trainable}], lr=2e-3, betas=(0.9, 0.999), weight_decay=1e-4,
                            amsgrad=True, eps=1e-10)
    named = {n: p for n, p in model.named_parameters() if n.startswith(("bottleneck.", "decoder."))}
    for step in (1, 2, 3):
        enc, dec = model(vectors["fwd84/images"])
        loss = hard_mining_cosine_loss(enc, dec, 0.9, factor=0.1)
        optimizer.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm=0.1)
        optimizer.step()
        assert loss.item() == pytest.approx(vectors[f"train/step{step}/loss"], abs=1e-5, rel=0)
        assert norm.item() == pytest.approx(vectors[f"train/step{step}/grad_norm"], rel=1e-5, abs=0)
        for name, param in named.items():
            torch.testing.assert_close(param.detach(), vectors[f"train/step{step}/param/{name}"], rtol=0, atol=1e-4,
                                       msg=lambda m, n=name, s=step: f"step {s} {n}: {m}")
