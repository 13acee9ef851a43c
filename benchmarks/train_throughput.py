"""Ray Train throughput on this machine: images/s for 1 vs 2 CPU workers, data-wait fraction, time to first step.

Model and data: configs/demo.yaml (48-wide random ViT, 112 px crops, global batch 8) on the generated demo
set. For each worker count and batch source ('local' = each worker reads its rows from the manifest,
'ray_data' = Ray Data shards), one run of --steps steps; the first chunk (one step: start-up, warm-up) is
left out of the rates. Then `python pipelines/train.py` is timed from process start to its first optimiser
step (Ray start-up, worker start, model build). Prints figures; asserts nothing. Usage:
    .venv/bin/python benchmarks/train_throughput.py [--steps 60] [--workers 1 2] [--sources local ray_data]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

REPO = Path(__file__).resolve().parent.parent


def measure(config, notes: list[dict]) -> dict:
    """Images/s and data-wait fraction over every chunk but the first, from the workers' progress notes."""
    batch = config.train.batch_size
    seconds = images = waited = 0.0
    for previous, note in zip(notes, notes[1:]):
        steps = note["step"] - previous["step"]
        chunk_s = steps * batch / note["images_per_s"]
        seconds, images, waited = seconds + chunk_s, images + steps * batch, waited + chunk_s * note["data_wait_fraction"]
    return dict(images_per_s=images / seconds, data_wait=waited / seconds)


def run_fit(data_root: str, storage: str, workers: int, source: str, steps: int) -> dict:
    from dinomaly.config import load_config
    from dinomaly.distributed.train.run import train

    config = load_config("demo", {"data.root": data_root, "train.num_workers": workers, "train.data_source": source,
                                  "train.total_steps": 2 * steps, "train.log_every": 10, "train.checkpoint_every": 0,
                                  "output_root": storage, "name": f"w{workers}-{source}", "tracking.enabled": False})
    notes: list[dict] = []
    started = time.monotonic()
    outcome = train(config, stop_at_step=steps, on_progress=notes.append)  # stop early: no final evaluation
    figures = measure(config, notes)
    figures.update(wall_s=time.monotonic() - started,
                   worker_to_first_step_s=outcome.log.first_step_time - outcome.log.worker_start_time)
    return figures


def time_to_first_step(data_root: str, storage: str) -> float:
    """Seconds from launching `python pipelines/train.py` to its first progress line (step 1)."""
    command = [sys.executable, str(REPO / "pipelines" / "train.py"), "--config", "demo", "--data", data_root,
               "--workers", "2", "--steps", "30", "--storage-path", storage, "--name", "first-step",
               "--output", str(Path(storage) / "out"), "--set", "tracking.enabled=false"]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=storage)
    first = float("nan")
    for line in process.stdout:
        if "step 1/" in line and first != first:
            first = time.monotonic() - started
    process.wait()
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sources", nargs="+", default=["local", "ray_data"], choices=["local", "ray_data"])
    args = parser.parse_args()
    import ray

    from dinomaly.data.demo import generate_demo_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data_root = str(generate_demo_dataset(Path(tmp) / "demo_data"))
        ray.init(log_to_driver=False)
        try:
            print(f"demo model, global batch 8, {args.steps} steps, {os.cpu_count()} CPUs, load average "
                  f"{os.getloadavg()[0]:.1f}")
            print(f"{'workers':>7}  {'source':>8}  {'images/s':>8}  {'data wait':>9}  {'worker->step 1':>14}  wall")
            for source in args.sources:
                for workers in args.workers:
                    f = run_fit(data_root, str(Path(tmp) / "runs"), workers, source, args.steps)
                    print(f"{workers:>7}  {source:>8}  {f['images_per_s']:>8.1f}  {100 * f['data_wait']:>8.1f}%  "
                          f"{f['worker_to_first_step_s']:>13.1f}s  {f['wall_s']:.0f}s", flush=True)
        finally:
            ray.shutdown()
        print(f"python pipelines/train.py -> first optimiser step: {time_to_first_step(data_root, tmp):.1f} s")


if __name__ == "__main__":
    main()
