"""Sweep wall time with and without the encoder-feature cache, and the per-step gain behind it.

1. Per training step, no Ray: train_steps reading images (decode + encoder + decoder) vs reading cached
   encoder features (decoder only), same batches; one thread.
2. Two sweeps of N tiny trials (FIFO scheduler, so both run every step of every trial) on a local Ray with
   --cpus CPUs: wall time, trials per hour, and the one-off cache build. Tracking is off.
Usage:
    .venv/bin/python benchmarks/tune_sweep.py [--trials 8] [--steps 40] [--cpus 2] [--model tiny|vit_s|vit_b] [--skip-sweeps]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

import torch  # noqa: E402

from dinomaly.config import Config, load_config  # noqa: E402
from dinomaly.data.demo import generate_demo_dataset  # noqa: E402
from dinomaly.data.manifest import load_manifest, select  # noqa: E402
from dinomaly.distributed.train.batches import ManifestBatches  # noqa: E402
from dinomaly.features import FeatureBatches, FeatureInput, build_feature_cache  # noqa: E402
from dinomaly.loop import seed_everything, train_steps  # noqa: E402
from dinomaly.model.dinomaly import Dinomaly  # noqa: E402

MODELS = {  # --model: encoder, encoder_kwargs, image size, crop size (random weights: nothing is downloaded)
    "tiny": ("vit_small_patch14_reg4_dinov2", {"embed_dim": 48, "num_heads": 3}, 128, 112),
    "vit_s": ("vit_small_patch14_reg4_dinov2", {}, 256, 224),
    "vit_b": ("vit_base_patch14_reg4_dinov2", {}, 448, 392),
}


def bench_config(work: Path, root: Path, args, name: str, cache: bool) -> Config:
    encoder, kwargs, size, crop = MODELS[args.model]
    return load_config("demo", {
        "model.encoder": encoder, "model.encoder_kwargs": kwargs, "model.image_size": size,
        "name": name, "output_root": str(work / "runs"), "data.root": str(root),
        "model.crop_size": crop, "train.total_steps": args.steps, "train.warmup_steps": 2, "train.batch_size": 8,
        "train.log_every": args.steps, "train.cpus_per_worker": 0.9, "tune.evaluations": 2, "tune.scheduler": "fifo",
        "tune.num_samples": args.trials, "tune.max_concurrent_trials": args.cpus, "tune.feature_cache": cache,
        "tune.search_space": {"model.bottleneck_dropout": "uniform(0.0, 0.6)"}, "tracking.enabled": False})


def time_steps(config: Config, source, wrap, steps: int) -> float:
    """Seconds per training step after one warm-up step."""
    seed_everything(config.train.seed)
    model = wrap(Dinomaly(config.model))
    batches = source.iterate(0, 1, 0)
    train_steps(model, itertools.islice(batches, 1), config)
    start = time.perf_counter()
    train_steps(model, itertools.islice(batches, steps), config)
    return (time.perf_counter() - start) / steps


def per_step(config: Config, cache_root: str, steps: int) -> None:
    rows = select(load_manifest(config.data), split="train")
    start = time.perf_counter()
    uri = build_feature_cache(rows, config, cache_root)
    built = time.perf_counter() - start
    images = time_steps(config, ManifestBatches(rows, config), lambda m: m, steps)
    cached = time_steps(config, FeatureBatches(uri, rows.column("image_uri").to_pylist(), config), FeatureInput,
                        steps)
    print(f"per step (batch {config.train.batch_size}, {config.model.crop_size} px, 1 thread): images "
          f"{images * 1e3:.1f} ms, cached features {cached * 1e3:.1f} ms -> {images / cached:.2f}x; cache of "
          f"{rows.num_rows} images built in {built:.1f} s")


def sweep(config: Config) -> tuple[float, int]:
    from dinomaly.distributed.tune.sweep import run_sweep

    start = time.perf_counter()
    outcome = run_sweep(config)
    wall = time.perf_counter() - start
    done = sum(row["status"] == "completed" for row in outcome.rows)
    print(f"sweep {config.name}: {len(outcome.rows)} trials ({done} completed) in {wall:.1f} s -> "
          f"{3600 * len(outcome.rows) / wall:.0f} trials/hour on this cluster")
    return wall, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40, help="training steps per trial")
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local Ray (= trials at once)")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny", help="encoder size and input px")
    parser.add_argument("--size", type=int, default=128, help="demo image size on disk in px")
    parser.add_argument("--train-per-class", type=int, default=16)
    parser.add_argument("--skip-sweeps", action="store_true", help="only the per-step comparison (no Ray)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="dinomaly-tune-bench-") as tmp:
        work = Path(tmp)
        root = generate_demo_dataset(work / "demo", train_per_class=args.train_per_class, test_good_per_class=3,
                                     test_defect_per_class=3, size=args.size)
        per_step(bench_config(work, root, args, "steps", True), str(work / "step-cache"), 10)
        if args.skip_sweeps:
            return
        import ray

        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            plain, _ = sweep(bench_config(work, root, args, "no-cache", False))
            cached, _ = sweep(bench_config(work, root, args, "cache", True))  # includes building the cache
        finally:
            ray.shutdown()
        print(f"sweep speed-up with the feature cache: {plain / cached:.2f}x ({plain:.1f} s -> {cached:.1f} s)")


if __name__ == "__main__":
    main()
