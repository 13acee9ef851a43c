"""Time the seven metrics on an MVTec-sized test set (1,725 maps of 256 x 256, about a third normal).

Prints wall-clock seconds for compute_metrics (reference and exact AUPRO) and for MetricAccumulator fed in
batches of 16 (exact and streaming), plus the streaming mode's largest difference from the exact numbers.
Never asserts. Run: .venv/bin/python benchmarks/metrics.py [--num 1725] [--size 256]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from dinomaly.metrics import METRIC_NAMES, MetricAccumulator, compute_metrics


def ellipses(rng: np.random.Generator, size: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` random ellipses: (mask [size, size] bool, smooth response peaking inside them)."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    mask = np.zeros((size, size), bool)
    response = np.zeros((size, size), np.float32)
    for _ in range(count):
        cy, cx = rng.uniform(0.1, 0.9, 2)
        ry, rx = rng.uniform(0.01, 0.12, 2)
        d2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        mask |= d2 <= 1
        response = np.maximum(response, rng.uniform(0.1, 0.6) * np.exp(-0.5 * d2))
    return mask, response


def generate(num: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labels [N], top-1% scores [N], masks [N, size, size] bool, float32 maps; 1/3 normal, some false positives."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(num) % 3 != 0).astype(np.int64)
    masks = np.zeros((num, size, size), bool)
    maps = np.empty((num, size, size), np.float32)
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, num, 64):
        stop = min(start + 64, num)
        noise = torch.rand(stop - start, 1, 16, 16, generator=generator)
        maps[start:stop] = 0.05 + 0.15 * F.interpolate(noise, size=(size, size), mode="bilinear")[:, 0].numpy()
    for i in range(num):
        if labels[i] or rng.random() < 0.2:  # anomalies, and false-positive blobs on some normal images
            mask, response = ellipses(rng, size, int(rng.integers(1, 4)))
            maps[i] += response
            if labels[i]:
                masks[i] = mask
    k = int(size * size * 0.01)
    scores = np.sort(maps.reshape(num, -1), axis=1)[:, -k:].mean(axis=1)
    return labels, scores, masks, maps


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def accumulate(pixel_mode: str, data, batch: int = 16) -> dict[str, float]:
    labels, scores, masks, maps = data
    acc = MetricAccumulator(pixel_mode=pixel_mode)
    for start in range(0, labels.size, batch):
        part = slice(start, start + batch)
        acc.update("all", labels[part], scores[part], masks[part], maps[part])
    return acc.compute_class("all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=1725)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data, seconds = timed(lambda: generate(args.num, args.size))
    labels, _, masks, _ = data
    print(f"set: {args.num} maps of {args.size}x{args.size}, {int((labels == 0).sum())} normal, "
          f"{masks.mean():.2%} anomalous pixels (generated in {seconds:.1f} s)")
    reference, seconds = timed(lambda: compute_metrics(*data))
    print(f"compute_metrics, aupro='reference': {seconds:6.2f} s  (all seven metrics)")
    exact, seconds = timed(lambda: compute_metrics(*data, aupro="exact"))
    print(f"compute_metrics, aupro='exact':     {seconds:6.2f} s")
    accumulated, seconds = timed(lambda: accumulate("exact", data))
    print(f"MetricAccumulator exact, batches of 16: {seconds:6.2f} s")
    streamed, seconds = timed(lambda: accumulate("streaming", data))
    print(f"MetricAccumulator streaming, batches of 16: {seconds:6.2f} s")
    for name, other in (("accumulator exact", accumulated), ("accumulator streaming", streamed)):
        worst = max(abs(other[k] - reference[k]) for k in METRIC_NAMES)
        print(f"max |{name} - compute_metrics| over the seven metrics: {worst:.2e}")
    print("metrics: " + ", ".join(f"{k}={reference[k]:.4f}" for k in METRIC_NAMES)
          + f", exact pixel_aupro={exact['pixel_aupro']:.4f}")


if __name__ == "__main__":
    main()
