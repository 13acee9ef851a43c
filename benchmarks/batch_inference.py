"""Throughput and memory of Ray Data batch inference (evaluate / predict) against a plain single-process loop.

Test sets are generated: a small demo dataset (4 classes, 64 px, with masks) whose test images are linked
under N distinct names into a manifest, so 20,000 "images" cost seconds to make. The model is a tiny
random-init DINOv2-reg encoder (width 32, 10 blocks) at 64 -> 56 px; maps are the reference 256 x 256.

Each measurement runs in a fresh process (peak RSS is per process) and prints one JSON line:
    loop      decode + Predictor in one process (torch on all cores)          images/s
    loop+metrics  the same, plus MetricAccumulator (exact) per class          images/s, peak RSS
    evaluate  pipelines/evaluate.py's library path on a local Ray             images/s (Ray start excluded),
              driver peak RssAnon (private memory) and RSS (incl. object-store pages, <= 1 GiB store),
              peak RssAnon summed over the whole local cluster, the metric state's peak bytes
    predict   pipelines/predict.py's library path into a local folder         images/s
Never asserts. Run: .venv/bin/python benchmarks/batch_inference.py --suite [--sizes 2000,20000]
            or:  .venv/bin/python benchmarks/batch_inference.py --what evaluate --images 2000 --pixel-metrics streaming
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from procfs import kib_field

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
REPO = Path(__file__).resolve().parent.parent
OBJECT_STORE_BYTES = 1024**3  # explicit, so the shared-memory part of the driver's RSS has a known bound
TINY = ["model.encoder=vit_small_patch14_reg4_dinov2", "model.encoder_weights=none",
        "model.encoder_kwargs={embed_dim: 32, num_heads: 2, depth: 10}", "model.image_size=64", "model.crop_size=56",
        "eval.batch_size=32", "data.layout=manifest"]


def make_inputs(work: Path, images: int) -> tuple[Path, Path]:
    """(manifest of `images` test rows linked to a small demo test set, tiny checkpoint); cached in `work`."""
    import pyarrow as pa
    import torch

    from dinomaly import Dinomaly
    from dinomaly.checkpoint import save
    from dinomaly.config import load_config
    from dinomaly.data.demo import generate_demo_dataset
    from dinomaly.data.manifest import (
        MANIFEST_SCHEMA,
        build_manifest,
        records_from_config,
        select,
        write_manifest,
    )

    checkpoint = work / "checkpoint"
    if not checkpoint.exists():
        config = load_config(None, TINY)
        torch.manual_seed(0)
        save(checkpoint, Dinomaly(config.model), config, metadata={"thresholds": {"image_f1_optimal": 0.3}})
    manifest = work / f"test_{images}.parquet"
    if manifest.exists():
        return manifest, checkpoint
    root = generate_demo_dataset(work / "demo", train_per_class=1, test_good_per_class=6, test_defect_per_class=6,
                                 size=64)
    config = load_config(None, [*TINY[:-1], f"data.root={root}", "data.layout=mvtec"])
    source = select(build_manifest(records_from_config(config.data)), split="test").to_pylist()
    links = work / f"links_{images}"
    rows = []
    for i in range(images):
        row = dict(source[i % len(source)])
        link = links / row["category"] / f"{i:06d}.png"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(row["image_uri"])
        rows.append({**row, "image_uri": str(link)})
    rows.sort(key=lambda r: r["category"])
    write_manifest(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), str(manifest))
    return manifest, checkpoint


class ClusterMemory:
    """Samples RssAnon (private memory: what a process really holds) of this process alone and summed over it
    and all its descendants (the local Ray). ru_maxrss would also count the object store's shared-memory pages
    the driver has read (RssShmem), which stay mapped up to the store's size."""

    def __init__(self, interval_s: float = 0.5):
        self.peak_bytes = self.driver_peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self, interval_s: float) -> None:
        while not self._stop.is_set():
            self.driver_peak_bytes = max(self.driver_peak_bytes, kib_field(os.getpid(), "status", "RssAnon"))
            self.peak_bytes = max(self.peak_bytes, sum(kib_field(p, "status", "RssAnon") for p in _descendants(os.getpid())))
            self._stop.wait(interval_s)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_loop(manifest: Path, checkpoint: Path, with_metrics: bool) -> dict:
    import torch

    from dinomaly.data.dataset import ManifestDataset, iterate_batches
    from dinomaly.data.manifest import read_manifest
    from dinomaly.inference import Predictor, resize_masks
    from dinomaly.metrics import MetricAccumulator

    torch.set_num_threads(os.cpu_count() or 1)
    predictor = Predictor.from_checkpoint(checkpoint)
    dataset = ManifestDataset(read_manifest(str(manifest)), predictor.model.config, with_masks=with_metrics)
    accumulator, start = MetricAccumulator(), time.perf_counter()
    for batch in iterate_batches(dataset, predictor.eval_config.batch_size):
        result = predictor.predict(batch.images)
        if with_metrics:
            accumulator.update(batch.categories, batch.labels.numpy(), result.scores,
                               resize_masks(batch.masks, 256).numpy(), result.maps)
    if with_metrics:
        accumulator.compute()
    seconds = time.perf_counter() - start
    return {"images_per_s": len(dataset) / seconds, "seconds": seconds, "driver_peak_rss_mb": peak_rss_bytes() / 2**20}


def run_ray(what: str, manifest: Path, checkpoint: Path, pixel_metrics: str, actors: int) -> dict:
    import ray

    from dinomaly.distributed.batch.evaluate import evaluate, test_rows
    from dinomaly.distributed.batch.predict import list_inputs, predict
    from dinomaly.distributed.batch.scoring import load_bundle

    overrides = [f"data.root={manifest}", f"eval.pixel_metrics={pixel_metrics}", f"eval.actors={actors}"]
    bundle = load_bundle(str(checkpoint), None, overrides)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=OBJECT_STORE_BYTES)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        with ClusterMemory() as memory:
            reference, start = ray.put(bundle), time.perf_counter()
            if what == "evaluate":
                result = evaluate(reference, bundle.config, test_rows(bundle.config))
                extra = {"metric_state_peak_mb": result.peak_metric_bytes / 2**20, "images": result.scores.num_rows}
            else:
                with tempfile.TemporaryDirectory() as out:
                    summary = predict(reference, bundle, bundle.config, list_inputs(str(manifest), bundle.config),
                                      out, threshold=0.3)
                extra = {"images": summary.scored + summary.errors}
            seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    return {"images_per_s": extra["images"] / seconds, "seconds": seconds, **extra,
            "driver_peak_rss_anon_mb": memory.driver_peak_bytes / 2**20, "driver_peak_rss_mb": peak_rss_bytes() / 2**20,
            "cluster_peak_rss_anon_mb": memory.peak_bytes / 2**20}


def measure(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    manifest, checkpoint = make_inputs(work, args.images)
    if args.what in ("loop", "loop+metrics"):
        out = run_loop(manifest, checkpoint, with_metrics=args.what == "loop+metrics")
    else:
        out = run_ray(args.what, manifest, checkpoint, args.pixel_metrics, args.actors)
    return {"what": args.what, "images": args.images, "pixel_metrics": args.pixel_metrics, "actors": args.actors,
            **{k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}}


def suite(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    plans = [("loop", sizes[0], "exact"), ("loop+metrics", sizes[0], "exact"), ("evaluate", sizes[0], "exact"),
             ("predict", sizes[0], "exact")]
    plans += [("evaluate", size, mode) for size in sizes for mode in ("streaming", "exact")]
    seen = set()
    for what, size, mode in plans:
        if (what, size, mode) in seen:
            continue
        seen.add((what, size, mode))
        command = [sys.executable, __file__, "--what", what, "--images", str(size), "--pixel-metrics", mode,
                   "--actors", str(args.actors), "--work", args.work]
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else f"{what} {size} {mode} failed: {done.stderr[-2000:]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=["loop", "loop+metrics", "evaluate", "predict"], default="evaluate")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--pixel-metrics", choices=["exact", "streaming"], default="streaming")
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "dinomaly-bench-batch"))
    parser.add_argument("--suite", action="store_true", help="all measurements, one subprocess each")
    parser.add_argument("--sizes", default="2000,20000")
    args = parser.parse_args()
    if args.suite:
        suite(args)
    else:
        print(json.dumps(measure(args)), flush=True)


if __name__ == "__main__":
    main()
