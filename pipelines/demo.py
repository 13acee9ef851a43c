"""`make demo`: the whole product on generated data, on this machine, in a few minutes.

    generated MVTec-layout images (demo_data/) -> Parquet manifest -> Ray Train, 2 CPU workers (DDP)
    -> per-class evaluation -> MLflow run (./mlflow.db) + registered model -> runs/demo/

    python pipelines/demo.py [--workers 2] [--steps 300]
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

import dinomaly.distributed  # noqa: F401 - sets Ray's loopback environment before Ray is imported
from dinomaly.config.cli import entry_parser, start_logging


def build_parser():
    parser = entry_parser(__doc__, flags=("data", "workers"), defaults={"data": "demo_data", "workers": 2},
                          keys=False, help={"data": "folder where the demo images and manifest are generated "
                                                    "(default demo_data)",
                                            "workers": "Ray Train workers = DDP ranks (default 2)"})
    parser.add_argument("--steps", type=int, help="optimiser steps (default: configs/demo.yaml's 300); the warm-up "
                                                  "keeps its share of them")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start_logging(logging.WARNING)
    from dinomaly.distributed.entry import run_job

    return run_job(lambda: args, demo, debug=args.debug)


def demo(args) -> int:
    started = time.monotonic()
    from dinomaly.config import load_config
    from dinomaly.data.demo import generate_demo_dataset
    from dinomaly.data.manifest import build_manifest, format_counts, records_from_config, write_manifest
    from dinomaly.distributed.cluster import check_job_storage
    from dinomaly.distributed.train import run as launch
    from dinomaly.distributed.train.progress import data_wait, data_wait_line

    check_job_storage({"--data": args.data, "runs/": "runs"}, "")
    overrides = {"data.root": str(Path(args.data).resolve()), "data.layout": "mvtec", "train.num_workers": args.workers}
    if args.steps is not None:
        preset = load_config("demo").train  # the warm-up keeps its share of the run
        overrides["train.total_steps"] = args.steps
        overrides["train.warmup_steps"] = min(args.steps - 1, args.steps * preset.warmup_steps // preset.total_steps)
    config = load_config("demo", overrides)  # a bad value fails here, before any data is written
    root = generate_demo_dataset(args.data)
    manifest = build_manifest(records_from_config(config.data))
    manifest_uri = write_manifest(manifest, str(Path(args.data) / "manifest.parquet"))
    print(f"demo data in {root}, manifest {manifest_uri}:\n{format_counts(manifest)}\n")
    config = load_config("demo", {**overrides, "data.root": manifest_uri, "data.layout": "manifest"})
    output = Path(config.output_root) / config.name
    if output.exists():  # each demo starts afresh; runs/demo is the demo's own folder
        shutil.rmtree(output)
    launch.check_before_start(config)
    result = launch.run(config, output=output)
    python = os.path.relpath(sys.executable)  # .venv/bin/python under `make demo`
    python = sys.executable if python.startswith("..") else python  # a venv outside this folder: its full path
    bin_dir = Path(python).parent
    print(f"\nNext:\n"
          f"  {bin_dir / 'mlflow'} ui --backend-store-uri {result.config.tracking.tracking_uri}    # runs, heatmaps, "
          "registry\n"
          f"  {python} pipelines/serve.py --model {output / 'checkpoint'}    # HTTP scoring service\n"
          f"  {python} pipelines/evaluate.py --model {output / 'checkpoint'} --data {manifest_uri} --heatmaps 2")
    waited = data_wait(result.log)
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s; "
          + (data_wait_line(waited) if waited else "no training step ran"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
