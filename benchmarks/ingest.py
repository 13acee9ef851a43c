"""Ingest throughput and memory of the Ray Data pipeline (dinomaly.distributed.train.data).

    throughput: images/s decoded + resized + cropped (+ normalised on the consumer) to crop px, from the
                local disk and from a moto S3 server, Ray Data (our map over manifest rows, and the
                read_binary_files variant) vs torch DataLoader(ManifestDataset) with as many workers
                as Ray has CPUs, on the same JPEG files.
    scale:      N small JPEGs + a manifest written into the S3 server, streamed through train_dataset
                once; images/s and the peak memory of the driver and every Ray process together
                (sum of RSS, and of PSS, which counts shared object-store pages once), sampled at 2 Hz.

Usage (prints figures, never asserts):
    .venv/bin/python benchmarks/ingest.py throughput [--count 400] [--size 512] [--workers 2]
    .venv/bin/python benchmarks/ingest.py scale --count 15000 [--size 64]
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
import ray.data  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dinomaly.config import Config, apply_overrides  # noqa: E402
from dinomaly.data.dataset import ManifestDataset, collate_samples  # noqa: E402
from dinomaly.data.manifest import MANIFEST_SCHEMA, write_manifest  # noqa: E402
from dinomaly.data.storage import filesystem_for, upload_tree  # noqa: E402
from dinomaly.data.transforms import decode_image, normalize, resize_crop_image  # noqa: E402
from dinomaly.distributed.train.data import count_errors, iter_train_batches, train_dataset  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import fixtures_s3  # noqa: E402  (the test suite's moto server helpers)


def jpeg_variants(size: int, count: int, seed: int = 0) -> list[bytes]:
    """`count` distinct photo-like JPEGs (smooth shapes + mild noise, quality 90)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.int16)
        noisy = np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(noisy).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def manifest_for(uris: list[str], sizes: list[int]) -> pa.Table:
    n = len(uris)
    return pa.Table.from_pydict({
        "image_uri": uris, "mask_uri": [None] * n, "label": [0] * n, "category": ["bench"] * n,
        "defect": ["good"] * n, "split": ["train"] * n, "sample_id": [None] * n, "view": [None] * n,
        "size_bytes": sizes}, schema=MANIFEST_SCHEMA)


@contextmanager
def moto_server():
    """moto S3 on 127.0.0.1 (free port) with bucket 'bench'; AWS_* set for this process; stopped after."""
    import subprocess

    port = fixtures_s3._free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        fixtures_s3._wait_ready(process, endpoint, 60)
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
        server = fixtures_s3.MotoS3(endpoint_url=endpoint, bucket="bench")
        server.client().create_bucket(Bucket="bench")
        yield server, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


def bench_config(image_size: int, crop: int, shuffle: bool = True) -> Config:
    return apply_overrides(Config(), {"model.image_size": image_size, "model.crop_size": crop,
                                      "data.shuffle": shuffle})


def ray_epochs(manifest: pa.Table | str, config: Config, batch: int) -> Iterator[float]:
    """images/s of successive epochs of train_dataset -> iter_train_batches (normalised float batches)."""
    dataset = train_dataset(manifest, config)
    while True:
        start, images = time.perf_counter(), 0
        for images_batch in iter_train_batches(dataset, batch, max_epochs=1):
            images += images_batch.shape[0]
        yield images / (time.perf_counter() - start)


def read_binary_epochs(uris: list[str], config: Config, batch: int) -> Iterator[float]:
    """The alternative reader: ray.data.read_binary_files + a decode map (no labels, no error accounting)."""
    fs, _ = filesystem_for(uris[0])
    paths = [filesystem_for(u)[1] for u in uris]
    size, crop = config.model.image_size, config.model.crop_size

    def decode(b: dict) -> dict:
        return {"image": np.stack([resize_crop_image(decode_image(x), size, crop) for x in b["bytes"]])}

    dataset = ray.data.read_binary_files(paths, filesystem=fs).map_batches(decode, batch_size=16)
    while True:
        start, images = time.perf_counter(), 0
        for b in dataset.iter_batches(batch_size=batch, batch_format="numpy", drop_last=True):
            images += normalize(np.require(b["image"], requirements="W")).shape[0]
        yield images / (time.perf_counter() - start)


def dataloader_epochs(manifest: pa.Table, config: Config, batch: int, workers: int) -> Iterator[float]:
    """torch DataLoader(ManifestDataset) with persistent workers (its best case: no re-fork per epoch)."""
    dataset = ManifestDataset(manifest, config.model, with_masks=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         collate_fn=collate_samples, drop_last=True, persistent_workers=True)
    while True:
        start, images = time.perf_counter(), 0
        for b in loader:
            images += b.images.shape[0]
        yield images / (time.perf_counter() - start)


def run_throughput(args) -> None:
    """Warm each reader with one epoch, then alternate them for `reps` epochs each; print medians."""
    config = bench_config(args.image_size, args.crop)
    variants = jpeg_variants(args.size, args.count)
    with tempfile.TemporaryDirectory() as tmp, moto_server() as (server, _):
        root = Path(tmp) / "jpegs"
        root.mkdir()
        for i, data in enumerate(variants):
            (root / f"{i:06d}.jpg").write_bytes(data)
        local_uris = [str(root / f"{i:06d}.jpg") for i in range(args.count)]
        upload_tree(root, server.uri("jpegs"))
        s3_uris = [server.uri(f"jpegs/{i:06d}.jpg") for i in range(args.count)]
        sizes = [len(v) for v in variants]
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
                 object_store_memory=args.object_store_gib * 1024**3)
        ray.data.DataContext.get_current().enable_progress_bars = False
        torch.set_num_threads(1)
        print(f"{args.count} JPEGs of {args.size}px ({np.mean(sizes) / 1024:.0f} KiB avg) -> {args.image_size} -> "
              f"crop {args.crop}, batch {args.batch}, {args.workers} CPU workers; median of {args.reps} epochs "
              "after a warm-up epoch (min-max)")
        for store, uris in (("local", local_uris), ("s3", s3_uris)):
            manifest = manifest_for(uris, sizes)
            readers = {"ray data: manifest rows -> map_batches (ours)": ray_epochs(manifest, config, args.batch),
                       "ray data: read_binary_files -> map_batches": read_binary_epochs(uris, config, args.batch),
                       f"torch DataLoader(num_workers={args.workers})": dataloader_epochs(
                           manifest, config, args.batch, args.workers)}
            rates: dict[str, list[float]] = {name: [] for name in readers}
            warmup = {name: next(epochs) for name, epochs in readers.items()}
            for _ in range(args.reps):
                for name, epochs in readers.items():
                    rates[name].append(next(epochs))
            for name, values in rates.items():
                print(f"{store:5s} {name:48s} {np.median(values):6.1f} img/s ({min(values):.0f}-{max(values):.0f}; "
                      f"first epoch {warmup[name]:.0f})")
            for epochs in readers.values():
                epochs.close()
        ray.shutdown()


class MemorySampler(threading.Thread):
    """Peak sum of RSS and PSS over this process and its descendants (Ray's), minus excluded PIDs."""

    def __init__(self, exclude: set[int], interval_s: float = 0.5):
        super().__init__(daemon=True)
        import psutil  # ray vendors psutil; importable once ray is imported

        self.psutil, self.exclude, self.interval_s = psutil, exclude, interval_s
        self.peak_rss = self.peak_pss = self.peak_processes = 0
        self.at_peak: list[tuple[str, int]] = []  # (process name, PSS) when the PSS sum peaked
        self.stop_event = threading.Event()

    def sample(self) -> None:
        me = self.psutil.Process()
        procs = [me] + [p for p in me.children(recursive=True) if p.pid not in self.exclude]
        rss = pss = 0
        parts = []
        for proc in procs:
            try:
                info, name = proc.memory_full_info(), proc.name()
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            parts.append((name, getattr(info, "pss", info.rss)))
        if pss > self.peak_pss:
            self.at_peak = sorted(parts, key=lambda part: -part[1])
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_processes = max(self.peak_processes, len(procs))

    def run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            self.sample()


def write_objects(fs, paths: list[str], variants: list[bytes]) -> None:
    def put(i: int) -> None:
        with fs.open_output_stream(paths[i]) as out:
            out.write(variants[i % len(variants)])

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(len(paths))))


def run_scale(args) -> None:
    config = bench_config(args.image_size, args.crop)
    variants = jpeg_variants(args.size, 64)
    with moto_server() as (server, moto_pid):
        fs, _ = filesystem_for(server.uri())
        start = time.perf_counter()
        distinct = min(args.distinct or args.count, args.count)
        names = [f"scale/S{i // 5:06d}_C{i % 5 + 1}.jpg" for i in range(distinct)]
        write_objects(fs, [f"bench/{n}" for n in names], variants)
        print(f"wrote {distinct} JPEGs of {args.size}px to {server.uri()} in {time.perf_counter() - start:.0f} s")
        uris = [server.uri(names[i % distinct]) for i in range(args.count)]
        manifest = manifest_for(uris, [len(variants[i % 64]) for i in range(args.count)])
        if distinct == args.count:  # a real manifest file on S3
            manifest = write_manifest(manifest, server.uri("scale.parquet"))
        else:
            print(f"manifest: {args.count} rows cycling over the {distinct} objects (each read "
                  f"{args.count / distinct:.0f}x), passed as a table")
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
                 object_store_memory=args.object_store_gib * 1024**3)
        ray.data.DataContext.get_current().enable_progress_bars = False
        torch.set_num_threads(1)
        sampler = MemorySampler(exclude={moto_pid})
        sampler.sample()
        baseline_pss = sampler.peak_pss
        sampler.start()
        start, images = time.perf_counter(), 0
        dataset = train_dataset(manifest, config)
        for batch in iter_train_batches(dataset, args.batch, max_epochs=1):
            images += batch.shape[0]
            if images % 10_000 < args.batch:  # interim figures, for runs cut short
                print(f"  {images} images, {images / (time.perf_counter() - start):.1f} img/s, peak PSS so far "
                      f"{sampler.peak_pss / 1024**3:.2f} GiB", flush=True)
        elapsed = time.perf_counter() - start
        sampler.stop_event.set()
        sampler.join()
        print(f"streamed {images} of {args.count} images ({args.image_size} -> {args.crop} px) in {elapsed:.0f} s: "
              f"{images / elapsed:.1f} img/s; skipped {count_errors(dataset)['data_errors']}")
        print(f"peak memory of driver + Ray processes ({sampler.peak_processes} processes): "
              f"sum RSS {sampler.peak_rss / 1024**3:.2f} GiB, sum PSS {sampler.peak_pss / 1024**3:.2f} GiB "
              f"(object store capped at {args.object_store_gib} GiB; PSS before streaming "
              f"{baseline_pss / 1024**3:.2f} GiB)")
        print("  at the peak (PSS, MiB): " + ", ".join(f"{n} {m / 1024**2:.0f}" for n, m in sampler.at_peak[:8]))
        ray.shutdown()


def main() -> None:
    # `timeout` sends SIGTERM: exit through the context managers so the moto server and Ray stop too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["throughput", "scale"])
    parser.add_argument("--count", type=int, default=None, help="images (throughput: 400, scale: 15000)")
    parser.add_argument("--size", type=int, default=None, help="JPEG side in px (throughput: 512, scale: 64)")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--crop", type=int, default=392)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="Ray CPUs = DataLoader workers")
    parser.add_argument("--object-store-gib", type=int, default=2)
    parser.add_argument("--distinct", type=int, default=0,
                        help="scale: distinct objects written (0 = count); manifest rows cycle over them")
    parser.add_argument("--reps", type=int, default=3, help="throughput: timed epochs per reader")
    args = parser.parse_args()
    if args.mode == "throughput":
        args.count, args.size = args.count or 400, args.size or 512
        run_throughput(args)
    else:
        args.count, args.size = args.count or 15000, args.size or 64
        run_scale(args)


if __name__ == "__main__":
    main()
