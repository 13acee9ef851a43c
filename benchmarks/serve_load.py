"""Load test of the Serve scoring service against the bare model, on loopback only.

For each model (random weights: `tiny` = 32-wide 2-head ViT at 98->84 px, `vit_s` = ViT-S/14 at the
reference 448->392 px) it prints:
  * decode: decode_image + resize_crop_image + normalize of the request image (ms, one image);
  * bare forward: Predictor.predict at batch 1 and at the served batch size (ms per call and per image);
  * served: p50 / p99 latency, throughput and errors at each concurrency, with dynamic batching
    (serve.max_batch_size) and without it (max_batch_size 1), same replica resources.
Request loops are bounded (--requests per level) and target 127.0.0.1 only. Never asserts.

    .venv/bin/python benchmarks/serve_load.py --models tiny --requests 500
    .venv/bin/python benchmarks/serve_load.py --models tiny,vit_s --requests 200 --requests-vit-s 48
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray socket on loopback

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dinomaly import Dinomaly  # noqa: E402
from dinomaly.checkpoint import save  # noqa: E402
from dinomaly.config import Config, DinomalyConfig, apply_overrides  # noqa: E402
from dinomaly.data.transforms import decode_image, normalize, resize_crop_image  # noqa: E402
from dinomaly.inference import Predictor  # noqa: E402

MODELS = {
    "tiny": dict(encoder="vit_small_patch14_reg4_dinov2", encoder_weights="none",
                 encoder_kwargs={"embed_dim": 32, "num_heads": 2}, image_size=98, crop_size=84),
    "vit_s": dict(encoder="vit_small_patch14_reg4_dinov2", encoder_weights="none", image_size=448, crop_size=392),
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request_image(size_px: int) -> bytes:
    """A camera-like JPEG: smooth gradient plus noise, size_px square."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, size_px, dtype=np.float32)
    array = (ramp[None, :, None] + rng.normal(0, 12, (size_px, size_px, 3))).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bare_figures(config: Config, checkpoint: Path, image: bytes, batch: int, repeats: int) -> dict[str, float]:
    """Median ms of decode+transforms (1 image), forward at batch 1 and at `batch` (whole call)."""
    predictor = Predictor.from_checkpoint(checkpoint)
    m = config.model

    def decode():
        return normalize(resize_crop_image(decode_image(image), m.image_size, m.crop_size)[None])

    one = decode()
    many = one.repeat(batch, 1, 1, 1)
    return {"decode_ms": median_ms(decode, repeats * 4),
            "forward_b1_ms": median_ms(lambda: predictor.predict(one), repeats),
            f"forward_b{batch}_ms": median_ms(lambda: predictor.predict(many), max(3, repeats // batch))}


async def load(url: str, image: bytes, concurrency: int, total: int) -> dict[str, float]:
    """`total` POSTs by `concurrency` workers; latency percentiles, throughput, error count."""
    latencies: list[float] = []
    errors = 0
    remaining = iter(range(total))
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        for _ in remaining:
            start = time.perf_counter()
            try:
                async with session.post(url, data=image, headers={"Content-Type": "image/jpeg"}) as response:
                    await response.read()
                    ok = response.status == 200
            except (TimeoutError, aiohttp.ClientError):
                ok = False
            latencies.append((time.perf_counter() - start) * 1e3)
            errors += not ok

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ordered = np.sort(latencies)
    return {"p50_ms": float(np.percentile(ordered, 50)), "p99_ms": float(np.percentile(ordered, 99)),
            "req_per_s": total / wall, "errors": errors, "requests": total}


def serve_figures(config: Config, checkpoint: Path, image: bytes, levels: list[int], total: int,
                  batch: int) -> list[tuple[str, int, dict[str, float]]]:
    from ray import serve

    from dinomaly.distributed.serve.app import build_app

    rows = []
    for label, max_batch in (("batched", batch), ("unbatched", 1)):
        served = apply_overrides(config, {"serve.max_batch_size": max_batch, "serve.max_ongoing_requests": 64})
        serve.run(build_app(str(checkpoint), served), name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{config.serve.port}/v1/predict"
        asyncio.run(load(url, image, 1, min(total, 10)))  # warm the proxy and the replica
        for concurrency in levels if label == "batched" else [1, max(levels)]:
            rows.append((label, concurrency, asyncio.run(load(url, image, concurrency, total))))
        serve.delete("bench")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny", help="comma-separated: tiny, vit_s")
    parser.add_argument("--requests", type=int, default=300, help="requests per concurrency level (tiny)")
    parser.add_argument("--requests-vit-s", type=int, default=48, help="requests per level for vit_s")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--batch", type=int, default=8, help="serve.max_batch_size of the batched runs")
    parser.add_argument("--cpus", type=float, default=2.0, help="CPUs per replica (= torch threads)")
    parser.add_argument("--image-px", type=int, default=512, help="side of the request JPEG")
    args = parser.parse_args()
    import ray

    levels = [int(c) for c in args.concurrency.split(",")]
    image = request_image(args.image_px)
    torch.set_num_threads(max(1, int(args.cpus)))
    port = free_port()
    ray.init(num_cpus=max(2, int(args.cpus) + 1), include_dashboard=False, log_to_driver=False)
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    print(f"request image: {args.image_px}x{args.image_px} JPEG, {len(image)} bytes; replica: {args.cpus} CPUs; "
          f"batched = max_batch_size {args.batch}, wait 5 ms")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.models.split(","):
                total = args.requests_vit_s if name == "vit_s" else args.requests
                config = apply_overrides(Config(name=name, model=DinomalyConfig(**MODELS[name])), {
                    "serve.port": port, "serve.num_cpus": args.cpus, "serve.threshold": 0.5,
                    "serve.batch_wait_timeout_s": 0.005})
                checkpoint = save(Path(tmp) / name, Dinomaly(config.model), config)
                bare = bare_figures(config, checkpoint, image, args.batch, repeats=20 if name == "tiny" else 5)
                print(f"\n== {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in bare.items())
                      + f" ({bare[f'forward_b{args.batch}_ms'] / args.batch:.2f} ms/image at batch {args.batch})")
                print(f"{'mode':<10} {'conc':>4} {'reqs':>6} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
                for label, concurrency, row in serve_figures(config, checkpoint, image, levels, total, args.batch):
                    print(f"{label:<10} {concurrency:>4} {row['requests']:>6} {row['errors']:>6} {row['p50_ms']:>8.1f} "
                          f"{row['p99_ms']:>8.1f} {row['req_per_s']:>8.1f}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
