"""The model-only stages of benchmarks/gpu_check.sh: FLOPs of a training step and its measured speed.

    flops  FLOPs of one ViT-B/14 @392 training image, counted on the real architecture (batch 1, any
           device): the frozen encoder's forward (no backward) and the bottleneck + decoder's forward and
           backward; then images/s at a stated fraction of a stated peak (default: 40 % of an H100's
           989 TFLOP/s bf16 dense).
    step   one timed optimiser step (after one warm-up step) of ViT-B@392 at --batch, per precision, on
           CUDA when there is one (else CPU): images/s, and the card's name.
    data   the generated demo data set and its manifest under --work (for the Train and evaluate stages).
    serve  Serve p50/p99 latency at each --concurrency (one client thread per request in flight), the
           model on its own replica (one GPU with --gpus 1), on 127.0.0.1 only.

Random encoder weights (nothing is downloaded). Prints figures; never asserts.
    .venv/bin/python benchmarks/gpu_check.py flops
    .venv/bin/python benchmarks/gpu_check.py step --batch 16 --precisions bf16 fp32
    .venv/bin/python benchmarks/gpu_check.py step --model tiny --batch 4      # the CPU smoke test
    .venv/bin/python benchmarks/gpu_check.py serve --gpus 1 --concurrency 1 32 --requests 256
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from dinomaly.checkpoint import save
from dinomaly.config import Config, DinomalyConfig, TrainConfig, apply_overrides
from dinomaly.loop import TrainState, seed_everything, train_steps
from dinomaly.model.dinomaly import Dinomaly

# name: (timm encoder, encoder_kwargs, resize px, crop px); training steps take crop-sized inputs
MODELS = {
    "vit_b": ("vit_base_patch14_reg4_dinov2", {}, 448, 392),
    "tiny": ("vit_small_patch14_reg4_dinov2", {"embed_dim": 48, "num_heads": 3}, 128, 112),
}


def model_config(name: str) -> DinomalyConfig:
    encoder, kwargs, image_size, crop_size = MODELS[name]
    return DinomalyConfig(encoder=encoder, encoder_weights="none", encoder_kwargs=kwargs,
                          image_size=image_size, crop_size=crop_size)


def build(name: str, batch: int, precision: str, device: torch.device) -> tuple[Dinomaly, Config, torch.Tensor]:
    model = model_config(name)
    size = model.crop_size
    config = Config(model=model, train=TrainConfig(batch_size=batch, precision=precision, global_hard_mining=False))
    return Dinomaly(model).to(device), config, torch.randn(batch, 3, size, size, device=device)


def count_flops(name: str) -> tuple[float, float]:
    """(encoder forward, bottleneck + decoder forward + backward) FLOPs of one image, fp32 on CPU."""
    model, config, images = build(name, 1, "fp32", torch.device("cpu"))
    with FlopCounterMode(display=False) as encoder_counter, torch.no_grad():
        model.encoder(images)
    with FlopCounterMode(display=False) as step_counter:
        train_steps(model, [images], config, check_finite=False)
    encoder = float(encoder_counter.get_total_flops())
    return encoder, float(step_counter.get_total_flops()) - encoder


def time_step(name: str, batch: int, precision: str, device: torch.device) -> float:
    """Images/s of one optimiser step after one warm-up step."""
    seed_everything(1)
    model, config, images = build(name, batch, precision, device)
    state = TrainState.create(model, config)
    _, state = train_steps(model, [images], config, state, check_finite=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    train_steps(model, [images], config, state, check_finite=False)  # .item() of the loss waits for the GPU
    return batch / (time.perf_counter() - start)


def write_demo_data(work: Path) -> None:
    """The demo data set (MVTec layout, masks) and its manifest, as `make demo` makes them."""
    from dinomaly.data.demo import generate_demo_dataset
    from dinomaly.data.manifest import build_manifest, records_from_config, write_manifest

    root = generate_demo_dataset(str(work / "demo_data"))
    config = apply_overrides(Config(), {"data.root": str(root), "data.layout": "mvtec"})
    uri = write_manifest(build_manifest(records_from_config(config.data)), str(work / "demo_data/manifest.parquet"))
    print(f"demo data: {uri}")


def timed_posts(url: str, body: bytes, concurrency: int, total: int) -> list[tuple[float, bool]]:
    """(latency ms, answered 200) of `total` POSTs, `concurrency` in flight at once (one thread each)."""
    import requests

    def post(_: int) -> tuple[float, bool]:
        start = time.perf_counter()
        try:
            ok = requests.post(url, data=body, headers={"Content-Type": "image/jpeg"}, timeout=300).ok
        except requests.RequestException:
            ok = False
        return (time.perf_counter() - start) * 1e3, ok

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(post, range(total)))


def serve_latency(name: str, gpus: int, levels: list[int], requests: int, batch: int) -> None:
    """p50/p99 at each concurrency, dynamic batching up to `batch`, one replica, on 127.0.0.1 only."""
    import ray
    from ray import serve

    from dinomaly.distributed.serve.app import build_app

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decode_rate import natural_jpeg

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a time limit still runs the shutdown below
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            with socket.socket() as probe:  # a free port: the default 8000 may be taken on a shared machine
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            config = apply_overrides(Config(name=name, model=model_config(name)), {
                "serve.port": port, "serve.num_cpus": 2, "serve.num_gpus": gpus, "serve.threshold": 0.5, "serve.max_batch_size": batch,
                "serve.batch_wait_timeout_s": 0.005, "serve.max_ongoing_requests": max(64, batch)})
            serve.start(http_options={"host": "127.0.0.1", "port": config.serve.port})
            serve.run(build_app(str(save(Path(tmp) / name, Dinomaly(config.model), config)), config),
                      name="gpu-check", route_prefix="/")
            url, image = f"http://127.0.0.1:{config.serve.port}/v1/predict", natural_jpeg(512, seed=0)
            timed_posts(url, image, 4, 8)  # warm the proxy and the replica
            for level in levels:
                results = timed_posts(url, image, level, requests)
                latency = np.array([ms for ms, _ in results])
                print(f"serve {name} (max_batch_size {batch}) concurrency {level}: p50 "
                      f"{np.percentile(latency, 50):.1f} ms, p99 {np.percentile(latency, 99):.1f} ms, "
                      f"{sum(not ok for _, ok in results)} errors of {len(results)}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["flops", "step", "data", "serve"])
    parser.add_argument("--model", choices=list(MODELS), default="vit_b")
    parser.add_argument("--batch", type=int, default=16, help="images per step (step)")
    parser.add_argument("--precisions", nargs="+", choices=["bf16", "fp32"], default=["bf16", "fp32"])
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak (flops; H100 SXM bf16)")
    parser.add_argument("--utilisation", type=float, default=0.40, help="fraction of the peak (flops)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dinomaly-gpu-check")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs of the Serve replica (serve)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="(serve)")
    parser.add_argument("--requests", type=int, default=256, help="requests per concurrency level (serve)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the random-encoder warning of every build
    if args.stage == "data":
        return write_demo_data(args.work)
    if args.stage == "serve":
        return serve_latency(args.model, args.gpus, args.concurrency, args.requests, args.batch)
    if args.stage == "flops":
        encoder, decoder = count_flops(args.model)
        total = encoder + decoder
        rate = args.peak_tflops * 1e12 * args.utilisation / total
        print(f"{args.model} @{MODELS[args.model][3]} px, one image: encoder forward {encoder / 1e9:.1f} GFLOP, "
              f"bottleneck + decoder forward + backward {decoder / 1e9:.1f} GFLOP, step {total / 1e9:.1f} GFLOP")
        print(f"at {args.utilisation:.0%} of {args.peak_tflops:g} TFLOP/s: {rate:.0f} images/s per GPU")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (no CUDA device)"
    for precision in args.precisions:
        rate = time_step(args.model, args.batch, precision, device)
        print(f"step {args.model} batch {args.batch} {precision}: {rate:.1f} images/s on {card}", flush=True)


if __name__ == "__main__":
    main()
