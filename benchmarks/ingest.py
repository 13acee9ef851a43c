"""Ingest throughput and memory of the Ray Data pipeline (dinomaly.distributed.train.data).

    throughput: images/s decoded + resized + cropped (+ normalised on the consumer) to crop px, from the
                local disk and from a moto S3 server, Ray Data (our map over manifest rows, and the
                read_binary_files variant) vs torch DataLoader(ManifestDataset) with as many workers
                as Ray has CPUs, on the same JPEG files.
    scale:      N small JPEGs + a manifest written into the S3 server, streamed through train_dataset
                once; images/s and the peak memory of the driver and every Ray process together
                (sum of RSS, and of PSS, which counts shared object-store pages once), sampled at 2 Hz.
                --packed: a Real-IAD-like set (30 classes x 5 views, defective test samples with
                masks; deterministic, generated in parallel and cached under --cache), packed into
                Parquet shards (dinomaly.data.pack), uploaded to the S3 server and streamed from there;
                also the S3 requests the stream made (counted in the server's request log).
                --large N: N JPEGs each of 1024 and 2048 px streamed the same way, with fast decoding
                (JPEG DCT scaling) off and on.
    epochs:     why training does not read shards with ray.data.read_parquet: a packed Real-IAD-like set on
                the S3 server, consumed for --epochs epochs by one trainer-like loop (a busy CPU step of
                --step-ms per batch, the trainer's prefetch thread), from (a) train_dataset, every epoch in
                one stream, (b) ray.data.read_parquet(shards, shuffle=FileShuffleConfig(seed)) -> the same
                decode, one execution per epoch (Ray's pattern), and (c) one such read_parquet per epoch,
                joined with Dataset.union into one execution (Ray's way to chain datasets); they alternate.
                Prints the time spent waiting for batches: in total, before the first, and at each epoch's
                start.

Usage (prints figures, never asserts):
    .venv/bin/python benchmarks/ingest.py throughput [--count 400] [--size 512] [--workers 2]
    .venv/bin/python benchmarks/ingest.py scale --count 15000 [--size 64]
    .venv/bin/python benchmarks/ingest.py scale --count 150000 --packed [--large 1000]
    .venv/bin/python benchmarks/ingest.py epochs --count 1200 --shard-mb 4 [--step-ms 150] [--epochs 4]
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import re
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
from procfs import kib_field  # noqa: E402

from dinomaly.config import Config, apply_overrides  # noqa: E402
from dinomaly.data.dataset import ManifestDataset, collate_samples  # noqa: E402
from dinomaly.data.manifest import MANIFEST_SCHEMA, read_manifest, write_manifest  # noqa: E402
from dinomaly.data.storage import filesystem_for, upload_tree  # noqa: E402
from dinomaly.data.transforms import decode_image, normalize, resize_crop_image  # noqa: E402
from dinomaly.distributed.train.data import (  # noqa: E402
    TARGET_BLOCK_BYTES,
    count_errors,
    iter_train_batches,
    train_dataset,
)

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
def moto_server(request_log: Path | None = None):
    """moto S3 on 127.0.0.1 (free port) with bucket 'bench'; AWS_* set for this process; stopped after.

    request_log: where the server's access log goes (one line per request: see count_requests)."""
    import subprocess

    port = fixtures_s3._free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(request_log, "wb") if request_log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=log)
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
        if request_log:
            log.close()


def count_requests(request_log: Path) -> int:
    """HTTP requests in the server's access log ('... "GET /bench/... HTTP/1.1" 206 -', some methods wrapped in
    colour codes), the readiness polls of /moto-api/ left out."""
    request = re.compile(rb'"(?:\x1b\[[0-9;]*m)*(?:GET|PUT|HEAD|POST|DELETE) ')
    return sum(1 for line in request_log.read_bytes().splitlines()
               if request.search(line) and b"/moto-api/" not in line)


def bench_config(image_size: int, crop: int, shuffle: bool = True) -> Config:
    return apply_overrides(Config(), {"model.image_size": image_size, "model.crop_size": crop,
                                      "data.shuffle": shuffle})


def ray_epochs(manifest: pa.Table | str, config: Config, batch: int) -> Iterator[float]:
    """images/s of successive epochs of train_dataset -> iter_train_batches (normalised float batches)."""
    dataset = train_dataset(manifest, config, epochs=1)
    while True:
        start, images = time.perf_counter(), 0
        for images_batch in iter_train_batches(dataset, batch, max_passes=1):
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
        self.shmem_at_peak = 0  # of the peak PSS: shared-memory mappings (Ray's object store in /dev/shm)
        self.stop_event = threading.Event()

    def sample(self) -> None:
        me = self.psutil.Process()
        procs = [me] + [p for p in me.children(recursive=True) if p.pid not in self.exclude]
        rss = pss = shmem = 0
        parts = []
        for proc in procs:
            try:
                info, name = proc.memory_full_info(), proc.name()
                shmem += kib_field(proc.pid, "smaps_rollup", "Pss_Shmem")
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            parts.append((name, getattr(info, "pss", info.rss)))
        if pss > self.peak_pss:
            self.at_peak = sorted(parts, key=lambda part: -part[1])
            self.shmem_at_peak = shmem
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


# --------------------------------------------------------------------------- a Real-IAD-like set, packed

CLASSES, VIEWS = 30, 5


def realiad_row(i: int) -> dict:
    """Image i: sample i // 5 seen from view i % 5 + 1; classes take turns; a fifth of the samples are test
    samples, half of those defective (with a mask)."""
    sample, view = divmod(i, VIEWS)
    split = "test" if sample % 5 == 0 else "train"
    defective = split == "test" and sample % 10 == 0
    category = f"class{sample % CLASSES:02d}"
    name = f"{category}/S{sample:06d}_C{view + 1}"
    return dict(name=name, category=category, view=f"C{view + 1}", sample_id=f"S{sample:06d}", split=split,
                label=int(defective), defect="defect" if defective else "good")


DISTINCT_CONTENTS = 256  # encoded images per size; each file is made unique by a JPEG comment segment


@functools.lru_cache(maxsize=1)
def _contents(size: int) -> tuple[bytes, ...]:
    """DISTINCT_CONTENTS photo-like JPEGs of `size` px (smooth colour field + noise, quality 85), seeded."""
    out = []
    for k in range(DISTINCT_CONTENTS):
        rng = np.random.default_rng([7, k])
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(smooth + rng.integers(-12, 13, smooth.shape, dtype=np.int16), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
        out.append(buffer.getvalue())
    return tuple(out)


def unique_jpeg(size: int, i: int) -> bytes:
    """Image i: content i % DISTINCT_CONTENTS with a COM segment naming i after the SOI marker, so every file
    differs (encoding 150,000 distinct images took hours on a busy 2-core machine; decoding costs the same)."""
    data, comment = _contents(size)[i % DISTINCT_CONTENTS], f"dinomaly-bench {i}".encode()
    return data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]


def _write_images(job: tuple[str, int, int, int]) -> list[int]:
    """Images start..stop-1 of `size` px (and masks of the defective ones) under `root`; their byte sizes.
    Deterministic: image i depends on i only."""
    root, size, start, stop = job
    sizes = []
    for i in range(start, stop):
        row = realiad_row(i)
        target = Path(root) / f"{row['name']}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        if row["label"]:  # a square defect somewhere in the upper-left quarter
            rng = np.random.default_rng([11, i])
            mask = np.zeros((size, size), np.uint8)
            top, left = rng.integers(0, size // 2, 2)
            mask[top:top + size // 4, left:left + size // 4] = 255
            Image.fromarray(mask).save(Path(root) / f"{row['name']}_mask.png")
        data = unique_jpeg(size, i)
        target.write_bytes(data)
        sizes.append(len(data))
    return sizes


def generate_realiad(root: Path, count: int, size: int, processes: int) -> pa.Table:
    """The manifest of `count` generated images under root (written once, in `processes` processes)."""
    import multiprocessing

    done = root / f".complete-v2-{count}-{size}"
    step = 2000
    jobs = [(str(root), size, start, min(count, start + step)) for start in range(0, count, step)]
    if done.exists():
        sizes = [(root / f"{realiad_row(i)['name']}.jpg").stat().st_size for i in range(count)]
    else:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            sizes = [n for part in pool.map(_write_images, jobs) for n in part]
        done.touch()
    rows = [realiad_row(i) for i in range(count)]
    return pa.Table.from_pydict({
        "image_uri": [str(root / f"{r['name']}.jpg") for r in rows],
        "mask_uri": [str(root / f"{r['name']}_mask.png") if r["label"] else None for r in rows],
        "label": [r["label"] for r in rows], "category": [r["category"] for r in rows],
        "defect": [r["defect"] for r in rows], "split": [r["split"] for r in rows],
        "sample_id": [r["sample_id"] for r in rows], "view": [r["view"] for r in rows], "size_bytes": sizes},
        schema=MANIFEST_SCHEMA)


def packed_on_s3(cache: Path, count: int, size: int, processes: int, shard_mb: int, server) -> pa.Table:
    """Generate (once), pack (resumable) on local disk, upload the shards to the S3 server; the packed
    manifest with its shard URIs on S3."""
    from dinomaly.data.pack import pack_manifest

    folder = cache / f"{count}x{size}"
    started = time.perf_counter()
    manifest = generate_realiad(folder / "images", count, size, processes)
    print(f"generated {count} JPEGs of {size} px ({np.mean(manifest.column('size_bytes').to_numpy()) / 1024:.1f} "
          f"KiB avg) in {time.perf_counter() - started:.0f} s (cached in {folder})", flush=True)
    started = time.perf_counter()
    index = pack_manifest(manifest, str(folder / "packed"), shard_bytes=shard_mb * 1024**2)
    shards = sorted((folder / "packed" / "shards").glob("*.parquet"))
    print(f"packed into {len(shards)} shards ({sum(f.stat().st_size for f in shards) / 1024**3:.2f} GiB) in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    started = time.perf_counter()
    upload_tree(folder / "packed" / "shards", server.uri(f"packed-{count}x{size}/shards"))
    print(f"uploaded to {server.uri(f'packed-{count}x{size}/')} in {time.perf_counter() - started:.0f} s", flush=True)
    table = read_manifest(index)
    local = str(folder / "packed" / "shards")
    on_s3 = pa.array([u.replace(local, server.uri(f"packed-{count}x{size}/shards"))
                      for u in table.column("shard_uri").to_pylist()])
    return table.set_column(table.schema.get_field_index("shard_uri"), "shard_uri", on_s3)


def stream(manifest: pa.Table | str, config: Config, batch: int, exclude: set[int], request_log: Path | None,
           label: str, stop_after: int = 0) -> None:
    """One pass of train_dataset -> iter_train_batches: images/s, peak memory of all Ray processes, S3 requests."""
    sampler = MemorySampler(exclude=exclude)
    sampler.sample()
    baseline_pss = sampler.peak_pss
    sampler.start()
    requests_before = count_requests(request_log) if request_log else 0
    start, images = time.perf_counter(), 0
    dataset = train_dataset(manifest, config, epochs=1)
    for images_batch in iter_train_batches(dataset, batch, max_passes=1):
        images += images_batch.shape[0]
        if images % 10_000 < batch:  # interim figures, for runs cut short
            print(f"  {images} images, {images / (time.perf_counter() - start):.1f} img/s, peak PSS so far "
                  f"{sampler.peak_pss / 1024**3:.2f} GiB", flush=True)
        if stop_after and images >= stop_after:
            break
    elapsed = time.perf_counter() - start
    sampler.stop_event.set()
    sampler.join()
    requests = f"; {count_requests(request_log) - requests_before} S3 requests" if request_log else ""
    print(f"{label}: streamed {images} images ({config.model.image_size} -> {config.model.crop_size} px) in "
          f"{elapsed:.0f} s: {images / elapsed:.1f} img/s; skipped {count_errors(dataset)['data_errors']}{requests}")
    print(f"  peak memory of driver + Ray processes ({sampler.peak_processes} processes): "
          f"sum RSS {sampler.peak_rss / 1024**3:.2f} GiB, sum PSS {sampler.peak_pss / 1024**3:.2f} GiB "
          f"(PSS before streaming {baseline_pss / 1024**3:.2f} GiB; at the peak {sampler.shmem_at_peak / 1024**3:.2f} "
          "GiB of it in shared memory, Ray's object store)")
    print("  at the peak (PSS, MiB): " + ", ".join(f"{n} {m / 1024**2:.0f}" for n, m in sampler.at_peak[:8]),
          flush=True)


def all_as_training(table: pa.Table) -> pa.Table:
    """Every row in the train split, so one training stream reads every image (masks are not read)."""
    return table.set_column(table.schema.get_field_index("split"), "split", pa.array(["train"] * table.num_rows))


def start_ray(args) -> None:
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
             object_store_memory=args.object_store_gib * 1024**3)
    ray.data.DataContext.get_current().enable_progress_bars = False
    torch.set_num_threads(1)


def run_scale(args) -> None:
    config = bench_config(args.image_size, args.crop)
    with tempfile.TemporaryDirectory() as tmp, moto_server(Path(tmp) / "requests.log") as (server, moto_pid):
        log = Path(tmp) / "requests.log"
        if args.packed:
            manifest: pa.Table | str = all_as_training(packed_on_s3(
                Path(args.cache), args.count, args.size, args.processes, args.shard_mb, server))
            large = {px: all_as_training(packed_on_s3(Path(args.cache), args.large, px, args.processes,
                                                      args.shard_mb, server)) for px in (1024, 2048) if args.large}
        else:
            manifest, large = unpacked_on_s3(args, server), {}
        start_ray(args)
        stream(manifest, config, args.batch, {moto_pid}, log, f"{args.count} {'packed' if args.packed else ''}",
               args.stop_after)
        for px, table in large.items():
            for fast in (False, True):
                large_config = apply_overrides(bench_config(448, 392), {"data.fast_decode": fast})  # Real-IAD's
                stream(table, large_config, args.batch, {moto_pid}, log,
                       f"{args.large} JPEGs of {px} px, fast decode {'on' if fast else 'off'}")
        ray.shutdown()


def unpacked_on_s3(args, server) -> pa.Table | str:
    """One object per image (64 distinct contents): the slow way, kept for comparison."""
    variants = jpeg_variants(args.size, 64)
    fs, _ = filesystem_for(server.uri())
    start = time.perf_counter()
    distinct = min(args.distinct or args.count, args.count)
    names = [f"scale/S{i // 5:06d}_C{i % 5 + 1}.jpg" for i in range(distinct)]
    write_objects(fs, [f"bench/{n}" for n in names], variants)
    print(f"wrote {distinct} JPEGs of {args.size}px to {server.uri()} in {time.perf_counter() - start:.0f} s")
    uris = [server.uri(names[i % distinct]) for i in range(args.count)]
    manifest = manifest_for(uris, [len(variants[i % 64]) for i in range(args.count)])
    if distinct == args.count:  # a real manifest file on S3
        return write_manifest(manifest, server.uri("scale.parquet"))
    print(f"manifest: {args.count} rows cycling over the {distinct} objects (each read "
          f"{args.count / distinct:.0f}x), passed as a table")
    return manifest


def read_parquet_dataset(manifest: pa.Table, config: Config, union_epochs: int = 0) -> ray.data.Dataset:
    """The shards through ray.data.read_parquet (whole files in a seeded random order) and the same RowReader
    decode as train_dataset. union_epochs 0: one epoch, so one execution per epoch (Ray's pattern; the
    shuffle is reseeded at each execution); N: N such epochs joined with Dataset.union, one execution."""
    from dinomaly.data.reader import RowPixels, RowReader
    from dinomaly.data.storage import StorageOptions

    uris = sorted(set(manifest.column("shard_uri").to_pylist()))
    fs, _ = filesystem_for(uris[0])
    reader = RowReader(config.model.image_size, config.model.crop_size, storage=StorageOptions.resolve(config.data),
                       fast_decode=config.data.fast_decode)

    def decode(batch: dict) -> dict:
        rows = [reader.decode(u, d) for u, d in zip(batch["image_uri"], batch["image_bytes"])]
        return {"image": np.stack([r.image for r in rows if isinstance(r, RowPixels)])}

    def epoch(seed: int) -> ray.data.Dataset:
        return (ray.data.read_parquet([filesystem_for(u)[1] for u in uris], filesystem=fs,
                                      shuffle=ray.data.FileShuffleConfig(seed=seed))
                .select_columns(["image_uri", "image_bytes"]).map_batches(decode, batch_size=64, batch_format="numpy"))

    epochs = [epoch(config.train.seed + e) for e in range(max(1, union_epochs))]
    data = epochs[0].union(*epochs[1:]) if union_epochs else epochs[0]
    for part in epochs + [data]:  # blocks of train_dataset's size: Ray's default (128 MiB) delays the first one
        part.context.target_max_block_size = 2 * TARGET_BLOCK_BYTES
    return data


def timed_epochs(dataset, config: Config, batch: int, epochs: int, per_epoch: int, step_s: float,
                 one_stream: bool) -> dict[str, float]:
    """Consume `epochs` x `per_epoch` batches like a trainer (busy CPU for step_s per batch); waits in s."""
    # exactly the passes consumed: a further pass would run on into the next reader's measurement
    batches = iter_train_batches(dataset, batch, max_passes=1 if one_stream else epochs)
    waits, start = [], time.perf_counter()
    for _ in range(epochs * per_epoch):
        asked = time.perf_counter()
        if next(batches, None) is None:
            break
        waits.append(time.perf_counter() - asked)
        until = time.perf_counter() + step_s
        while time.perf_counter() < until:  # the step: CPU-bound, as training on this machine is
            pass
    batches.close()
    wall = time.perf_counter() - start
    starts = [waits[i] for i in range(per_epoch, len(waits), per_epoch)]  # epochs 2.. (the first: start-up)
    return {"wall": wall, "wait": sum(waits), "first": waits[0], "boundary": float(np.mean(starts)) if starts else 0.0,
            "steady": sum(waits) - waits[0], "batches": len(waits)}


def run_epochs(args) -> None:
    """Alternate the one-stream reader and read_parquet per epoch, `reps` times each, on the same shards."""
    config = apply_overrides(bench_config(args.image_size, args.crop), {"train.batch_size": args.batch})
    with tempfile.TemporaryDirectory() as tmp, moto_server(Path(tmp) / "requests.log") as (server, _):
        manifest = all_as_training(packed_on_s3(Path(args.cache), args.count, args.size, args.processes,
                                                args.shard_mb, server))
        start_ray(args)
        per_epoch = manifest.num_rows // args.batch
        config = apply_overrides(config, {"train.total_steps": per_epoch * args.epochs})
        print(f"{manifest.num_rows} images in {len(set(manifest.column('shard_uri').to_pylist()))} shards, "
              f"{args.size} -> {args.image_size} -> crop {args.crop}; {args.epochs} epochs of {per_epoch} batches "
              f"of {args.batch}, a {args.step_ms:.0f} ms CPU step each; {args.workers} Ray CPUs", flush=True)
        readers = {"train_dataset: all epochs in one stream (ours)":
                   lambda: (train_dataset(manifest, config, epochs=args.epochs), True),
                   "read_parquet(shards, FileShuffleConfig): one execution per epoch":
                   lambda: (read_parquet_dataset(manifest, config), False),
                   "read_parquet per epoch, joined by Dataset.union: one execution":
                   lambda: (read_parquet_dataset(manifest, config, union_epochs=args.epochs), True)}
        for rep in range(args.reps):
            for name, build in readers.items():
                dataset, one_stream = build()
                r = timed_epochs(dataset, config, args.batch, args.epochs, per_epoch, args.step_ms / 1e3, one_stream)
                print(f"rep {rep + 1} {name}: waited {r['wait']:.2f} s of {r['wall']:.1f} s "
                      f"({100 * r['wait'] / r['wall']:.1f} %); start-up {r['first']:.2f} s; after it "
                      f"{r['steady']:.2f} s ({100 * r['steady'] / r['wall']:.1f} %); mean wait at the start of "
                      f"epochs 2-{args.epochs}: {r['boundary']:.2f} s; {r['batches']} batches", flush=True)
        ray.shutdown()


def main() -> None:
    # `timeout` sends SIGTERM: exit through the context managers so the moto server and Ray stop too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["throughput", "scale", "epochs"])
    parser.add_argument("--count", type=int, default=None, help="images (throughput: 400, scale: 15000)")
    parser.add_argument("--size", type=int, default=None, help="JPEG side in px (throughput: 512, scale: 64)")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--crop", type=int, default=392)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="Ray CPUs = DataLoader workers")
    parser.add_argument("--object-store-gib", type=int, default=2)
    parser.add_argument("--distinct", type=int, default=0,
                        help="scale: distinct objects written (0 = count); manifest rows cycle over them")
    parser.add_argument("--reps", type=int, default=3, help="throughput: timed epochs per reader; epochs: runs")
    parser.add_argument("--epochs", type=int, default=4, help="epochs: epochs per run")
    parser.add_argument("--step-ms", type=float, default=150.0, help="epochs: CPU time of one training step")
    parser.add_argument("--packed", action="store_true", help="scale: a Real-IAD-like set in packed shards")
    parser.add_argument("--large", type=int, default=0, help="scale --packed: also N JPEGs each of 1024, 2048 px")
    parser.add_argument("--shard-mb", type=int, default=256, help="scale --packed: shard size")
    parser.add_argument("--processes", type=int, default=2, help="scale --packed: processes generating images")
    parser.add_argument("--stop-after", type=int, default=0, help="scale: stop streaming after about N images "
                        "(0 = all), to compare memory at the same point across manifest sizes")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dinomaly-ingest-scale"),
                        help="scale --packed: where generated images and shards are kept between runs")
    args = parser.parse_args()
    if args.mode == "throughput":
        args.count, args.size = args.count or 400, args.size or 512
        run_throughput(args)
    elif args.mode == "epochs":
        args.count, args.size = args.count or 1200, args.size or 256
        run_epochs(args)
    else:
        args.count, args.size = args.count or 15000, args.size or (256 if args.packed else 64)
        run_scale(args)


if __name__ == "__main__":
    main()
