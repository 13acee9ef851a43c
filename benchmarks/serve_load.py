"""Serving efficiency: the Serve scoring service against the bare model, on loopback only.

For each model (random weights: `tiny` = 32-wide 2-head ViT at 98->84 px, `vit_s` =
vit_small_patch14_reg4_dinov2 at 224 px) it prints:
  * bare: decode (decode_image as the replica does it, with data.fast_decode, then resize_crop_image and
    normalize of the request JPEG), forward at batch 1 and at the served batch size (Predictor.predict:
    network, map, blur, top-1 % score), in the replica's thread count;
  * served: p50 / p99 latency, throughput and errors at each concurrency, plus the replica's own time per
    request (elapsed_ms in the answer) so that client p50 - replica p50 = proxy + HTTP + JSON on the way;
    with --direct (serve.direct_ingress) also straight to the replica's own port, without the proxy hop;
  * efficiency = served images/s at concurrency 32 / bare images/s at the served batch size, and
    p50 at concurrency 1 against bare forward(batch 1) + decode + 10 ms.
The load client runs pinned to its own core (--client-core; os.sched_setaffinity), the replica (every thread)
on the others, so the client does not steal the model's CPU; Serve's proxy and controller are not pinned.
Request loops are bounded. Never asserts.

    .venv/bin/python benchmarks/serve_load.py                      # tiny and vit_s, the figures above
    .venv/bin/python benchmarks/serve_load.py --models tiny --requests 500 --heatmap
    .venv/bin/python benchmarks/serve_load.py --direct                             # also without the proxy hop
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
    "vit_s": dict(encoder="vit_small_patch14_reg4_dinov2", encoder_weights="none", image_size=224, crop_size=224),
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

    draft_px = m.image_size if config.data.fast_decode else None  # as the replica decodes (data.fast_decode)

    def decode():
        return normalize(resize_crop_image(decode_image(image, draft_px=draft_px), m.image_size, m.crop_size)[None])

    one = decode()
    many = one.repeat(batch, 1, 1, 1)
    return {"decode_ms": median_ms(decode, repeats * 4),
            "forward_b1_ms": median_ms(lambda: predictor.predict(one), repeats),
            "forward_batch_ms": median_ms(lambda: predictor.predict(many), max(3, repeats // batch))}


async def load(url: str, image: bytes, concurrency: int, total: int) -> dict[str, float]:
    """`total` POSTs by `concurrency` workers; latency percentiles, throughput, errors, replica time."""
    latencies: list[float] = []
    inside: list[float] = []  # the replica's elapsed_ms: handler start to answer built
    errors = 0
    remaining = iter(range(total))
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=300)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        for _ in remaining:
            start = time.perf_counter()
            try:
                async with session.post(url, data=image, headers={"Content-Type": "image/jpeg"}) as response:
                    body = await response.json(content_type=None)
                    ok = response.status == 200
            except (TimeoutError, aiohttp.ClientError, ValueError):
                ok = False
            if ok:  # failures count as errors, never as fast answers
                latencies.append((time.perf_counter() - start) * 1e3)
                inside.append(body["elapsed_ms"])
            errors += not ok

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    def percentile(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else float("nan")

    return {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "replica_p50_ms": percentile(inside, 50), "img_per_s": (total - errors) / wall, "errors": errors,
            "requests": total}


def run_load(url: str, image: bytes, concurrency: int, total: int, client_cores: set[int]) -> dict[str, float]:
    """`load` with this process pinned to `client_cores`; the affinity is restored afterwards."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, client_cores)
    try:
        return asyncio.run(load(url, image, concurrency, total))
    finally:
        os.sched_setaffinity(0, before)


def pin_process(pid: int, cores: set[int]) -> None:
    """Every thread of process `pid` onto `cores` (sched_setaffinity on a pid moves one thread only)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cores)


def serve_figures(config: Config, checkpoint: Path, image: bytes, levels: list[int], total: int,
                  cores: tuple[set[int], set[int]], query: str) -> dict[str, list[tuple[int, dict[str, float]]]]:
    """{path: [(concurrency, figures)]}: through Serve's proxy and, with serve.direct_ingress, straight to the
    replica's own port; the two alternate level by level."""
    import requests
    from ray import serve

    from dinomaly.distributed.serve.app import build_app

    model_cores, client_cores = cores
    served = apply_overrides(config, {"serve.max_ongoing_requests": max(64, config.serve.max_batch_size)})
    serve.run(build_app(str(checkpoint), served), name="bench", route_prefix="/")
    base = f"http://127.0.0.1:{config.serve.port}/"
    replica = requests.get(f"{base}v1/model", timeout=60).json()["replica"]
    pin_process(replica["pid"], model_cores)
    bases = {"via the proxy": base}
    deadline = time.monotonic() + 30
    while config.serve.direct_ingress and not replica.get("direct_url") and time.monotonic() < deadline:
        time.sleep(0.5)  # the replica's own server starts after the model has loaded
        replica = requests.get(f"{base}v1/model", timeout=60).json()["replica"]
    if replica.get("direct_url"):
        bases["direct to the replica"] = replica["direct_url"]
    rows: dict[str, list[tuple[int, dict[str, float]]]] = {path: [] for path in bases}
    try:
        for url in bases.values():
            run_load(f"{url}v1/predict{query}", image, 4, min(total, 16), client_cores)  # warm up
        for concurrency in levels:
            for path, url in bases.items():
                rows[path].append((concurrency, run_load(f"{url}v1/predict{query}", image, concurrency, total,
                                                         client_cores)))
    finally:
        serve.delete("bench")
    return rows


def report(name: str, batch: int, bare: dict[str, float], rows: list[tuple[int, dict[str, float]]]) -> None:
    bare_rate = batch / bare["forward_batch_ms"] * 1e3
    print(f"\n== {name}: decode {bare['decode_ms']:.2f} ms, forward b1 {bare['forward_b1_ms']:.2f} ms, forward "
          f"b{batch} {bare['forward_batch_ms']:.2f} ms = {bare_rate:.1f} img/s bare at the served batch size")
    print(f"{'conc':>4} {'reqs':>6} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} {'replica p50':>11} {'img/s':>8} "
          f"{'efficiency':>10}")
    for concurrency, row in rows:
        print(f"{concurrency:>4} {row['requests']:>6} {row['errors']:>6} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} "
              f"{row['replica_p50_ms']:>11.1f} {row['img_per_s']:>8.1f} {row['img_per_s'] / bare_rate:>10.2f}",
              flush=True)
    by_level = dict(rows)
    if 1 in by_level:
        budget = bare["forward_b1_ms"] + bare["decode_ms"] + 10.0
        print(f"p50 at concurrency 1: {by_level[1]['p50_ms']:.1f} ms vs bare forward + decode + 10 ms = "
              f"{budget:.1f} ms ({'within' if by_level[1]['p50_ms'] <= budget else 'OVER'}); outside the replica "
              f"(proxy, HTTP, client): {by_level[1]['p50_ms'] - by_level[1]['replica_p50_ms']:.1f} ms")
    if 32 in by_level:
        print(f"efficiency at concurrency 32: {by_level[32]['img_per_s'] / bare_rate:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,vit_s", help="comma-separated: tiny, vit_s")
    parser.add_argument("--requests", type=int, default=400, help="requests per concurrency level (tiny)")
    parser.add_argument("--requests-vit-s", type=int, default=96, help="requests per level for vit_s")
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--batch", type=int, default=8, help="serve.max_batch_size")
    parser.add_argument("--wait-ms", type=float, default=5.0, help="serve.batch_wait_timeout_s in ms")
    parser.add_argument("--image-px", type=int, default=512, help="side of the request JPEG")
    parser.add_argument("--client-core", type=int, default=-1, help="core of the load client (-1 = the last; "
                        "Ray and the replica get the others; with one core, everything shares it)")
    parser.add_argument("--heatmap", action="store_true", help="ask for heatmaps (adds PNG encoding)")
    parser.add_argument("--direct", action="store_true", help="serve.direct_ingress: also load the replica's own "
                        "port (no proxy hop), alternating with the proxy level by level")
    parser.add_argument("--full-decode", action="store_true", help="data.fast_decode=false on both sides (big "
                        "JPEGs decode in full, the reference's pixels)")
    args = parser.parse_args()
    import ray

    cores = sorted(os.sched_getaffinity(0))
    client = {cores[args.client_core]}
    model_cores = set(cores) - client or client  # the replica is pinned here once it runs; bare runs here too
    threads = len(model_cores)
    torch.set_num_threads(threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    image = request_image(args.image_px)
    port = free_port()
    ray.init(address="local", num_cpus=threads + 1, include_dashboard=False, log_to_driver=False)
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    print(f"request image: {args.image_px}x{args.image_px} JPEG, {len(image)} bytes; replica pinned to cores "
          f"{sorted(model_cores)} ({threads} torch threads), load client on core {sorted(client)}; "
          f"max_batch_size {args.batch}, wait {args.wait_ms} ms{', heatmaps' if args.heatmap else ''}; "
          f"{'full' if args.full_decode else 'fast (DCT-scaled)'} JPEG decoding")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.models.split(","):
                total = args.requests_vit_s if name == "vit_s" else args.requests
                config = apply_overrides(Config(name=name, model=DinomalyConfig(**MODELS[name])), {
                    "serve.port": port, "serve.num_cpus": float(threads), "serve.threshold": 0.5,
                    "serve.max_batch_size": args.batch, "serve.batch_wait_timeout_s": args.wait_ms / 1e3,
                    "data.fast_decode": not args.full_decode, "serve.direct_ingress": args.direct})
                checkpoint = save(Path(tmp) / name, Dinomaly(config.model), config)
                os.sched_setaffinity(0, model_cores)
                try:
                    bare = bare_figures(config, checkpoint, image, args.batch, repeats=20 if name == "tiny" else 5)
                finally:
                    os.sched_setaffinity(0, set(cores))
                paths = serve_figures(config, checkpoint, image, levels, total, (model_cores, client),
                                      "?heatmap=true" if args.heatmap else "")
                for path, rows in paths.items():
                    report(f"{name}, {path}", args.batch, bare, rows)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
