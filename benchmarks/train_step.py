"""Throughput of one training step (forward + loss + backward + clip + StableAdamW) on this machine.

For each model size and precision: one warm-up step (its FLOPs counted with FlopCounterMode), then one
timed step; prints images/s, the step's FLOPs and the fraction of this machine's big-matmul FLOP/s.
Random encoder weights (nothing is downloaded). Usage:
    .venv/bin/python benchmarks/train_step.py [--cases tiny vit_s vit_b] [--precisions fp32 bf16]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dinomaly.config import Config, DinomalyConfig, TrainConfig
from dinomaly.loop import TrainState, seed_everything, train_steps
from dinomaly.model.dinomaly import Dinomaly

# name: (timm encoder, encoder_kwargs, crop size px, batch)
CASES = {
    "tiny": ("vit_small_patch14_reg4_dinov2", {"embed_dim": 48, "num_heads": 3}, 112, 8),
    "vit_s": ("vit_small_patch14_reg4_dinov2", {}, 224, 8),
    "vit_b": ("vit_base_patch14_reg4_dinov2", {}, 392, 16),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_flops_per_s(dtype: torch.dtype, n: int = 2048, reps: int = 8) -> float:
    """Measured FLOP/s of a big square torch.matmul: the practical peak the step is compared with."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    start = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def build(case: str, precision: str) -> tuple[Dinomaly, Config, torch.Tensor]:
    encoder, kwargs, size, batch = CASES[case]
    model_config = DinomalyConfig(encoder=encoder, encoder_weights="none", encoder_kwargs=kwargs,
                                  image_size=size, crop_size=size)
    config = Config(model=model_config, train=TrainConfig(batch_size=batch, precision=precision,
                                                          global_hard_mining=False))
    return Dinomaly(model_config), config, torch.randn(batch, 3, size, size)


def bench(case: str, precision: str, flops: float | None) -> tuple[float, float, float]:
    """(seconds of the timed step, images/s, FLOPs of one step)."""
    seed_everything(1)
    model, config, images = build(case, precision)
    state = TrainState.create(model, config)
    counter = FlopCounterMode(display=False) if flops is None else None
    if counter is not None:
        with counter:
            _, state = train_steps(model, [images], config, state, check_finite=False)
        flops = float(counter.get_total_flops())
    else:
        _, state = train_steps(model, [images], config, state, check_finite=False)
    start = time.perf_counter()
    train_steps(model, [images], config, state, check_finite=False)
    seconds = time.perf_counter() - start
    return seconds, images.shape[0] / seconds, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--precisions", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the random-encoder warning of every build
    if args.threads:
        torch.set_num_threads(args.threads)
    peaks = {p: matmul_flops_per_s(DTYPES[p]) for p in args.precisions}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; matmul 2048^3: "
          + ", ".join(f"{p} {v / 1e9:.1f} GFLOP/s" for p, v in peaks.items()))
    print(f"{'case':8} {'prec':5} {'batch':>5} {'px':>4} {'step s':>8} {'img/s':>8} {'GFLOP/step':>11} "
          f"{'GFLOP/s':>8} {'of peak':>8}")
    for case in args.cases:
        flops = None
        for precision in args.precisions:
            seconds, rate, flops = bench(case, precision, flops)
            achieved = flops / seconds
            _, _, size, batch = CASES[case]
            print(f"{case:8} {precision:5} {batch:5d} {size:4d} {seconds:8.3f} {rate:8.2f} {flops / 1e9:11.1f} "
                  f"{achieved / 1e9:8.1f} {achieved / peaks[precision]:8.1%}", flush=True)


if __name__ == "__main__":
    main()
