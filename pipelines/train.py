"""Train Dinomaly with Ray Train (DDP workers), evaluate per class, track in MLflow.

    python pipelines/train.py --config demo --data demo_data --workers 2
    python pipelines/train.py --config mvtec_uni --data s3://bucket/mvtec.parquet --workers 4 --gpu
    python pipelines/train.py --config demo --data demo_data --output runs/try2      # a new folder: a new run
    ray job submit --working-dir . -- python pipelines/train.py --config mvtec_uni --data s3://bucket/mvtec \\
        --output /abs/runs/mvtec        # plus MLFLOW_TRACKING_URI: a job's working folder is temporary
    python pipelines/train.py --config mvtec_uni --data /data/mvtec --init-from dinomaly_vitb_uni.pth --steps 2000

Plain `python` starts a local Ray; under `ray job submit` (RAY_ADDRESS set) it joins that cluster.
When the workers' CPUs/GPUs are taken, it waits at most cluster.start_timeout_s (default 600 s; 0 = forever),
then exits with status 1 and names what holds them.
Outputs: --output DIR (default runs/<name>/) gets checkpoint/, config.yaml, metrics.json and, unless
--storage-path names another place, Ray's run folder DIR/<name> (checkpoints, state).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import dinomaly.distributed  # noqa: F401 - sets Ray's loopback environment before Ray is imported
from dinomaly.config import Config, apply_overrides
from dinomaly.config.cli import entry_parser, local_output, start_logging, training_config

FLAG_KEYS = {  # train's own flags -> config keys (the shared ones: cli.TRAINING_KEYS; anything else: --set)
    "setting": "train.setting", "encoder": "model.encoder", "encoder_weights": "model.encoder_weights",
    "steps": "train.total_steps", "batch_size": "train.batch_size", "experiment": "tracking.experiment_name",
    "deterministic": "train.deterministic",
}


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser(__doc__, keys=("", "model", "data", "train", "eval", "tracking", "cluster", "tune.metrics"),
                          flags=("config", "data", "name", "output", "set", "storage_path", "resume",
                                          "workers", "gpu"), defaults={"config": "demo"},
                          set_example="--set train.lr=1e-3 --set model.bottleneck_dropout=0.4",
                          help={"workers": "Ray Train workers = DDP ranks (train.num_workers)",
                                "gpu": "one GPU per worker, NCCL, bf16 autocast (train.use_gpu; train.precision=bf16 "
                                       "unless --set train.precision=fp32)",
                                "resume": "continue the run of this name (in --output / --storage-path) from its "
                                          "latest checkpoint (optimiser, schedule, step and RNG restored)"})
    add = parser.add_argument
    add("--categories", help="comma-separated classes to train on (data.categories; default all)")
    add("--setting", choices=["unified", "separate"], help="one model for all classes, or one per class trained "
        "as parallel Ray Train runs (train.setting)")
    add("--encoder", help="timm encoder, e.g. vit_base_patch14_reg4_dinov2 (model.encoder)")
    add("--encoder-weights", help="'hub', 'none' or a DINOv2 weight file (model.encoder_weights)")
    add("--steps", type=int, help="optimiser steps in the run (train.total_steps)")
    add("--batch-size", type=int, help="global batch, split evenly over the workers (train.batch_size)")
    add("--experiment", help="MLflow experiment name (tracking.experiment_name)")
    add("--deterministic", action="store_const", const=True, help="manifest order, no shuffle, dropout 0, fixed "
        "seeds: the same result on any worker count (train.deterministic)")
    add("--init-from", default="", metavar="PATH", help="start from these weights with a fresh optimiser and "
        "schedule (fine-tuning): an official Dinomaly ViTill .pth or a checkpoint directory of ours")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    config = training_config(args, FLAG_KEYS)
    if args.categories is None:
        return config
    return apply_overrides(config, {"data.categories": [c.strip() for c in args.categories.split(",") if c.strip()]})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start_logging()
    from dinomaly.distributed.cluster import check_job_storage
    from dinomaly.distributed.entry import run_job
    from dinomaly.distributed.train import run as launch
    from dinomaly.distributed.train.resume import finished_step

    def check() -> tuple[Config, Path]:
        local_output(args.output, "; keep --output local and pass --storage-path s3://... for Ray's run folders")
        config = config_from_args(args)
        output = args.output or Path("runs") / config.name
        check_job_storage({"--output": str(output), "--storage-path": config.output_root},
                          config.tracking.tracking_uri if config.tracking.enabled else None)
        launch.check_before_start(config, init_from=args.init_from, resume=args.resume)
        return config, output

    def run(checked: tuple[Config, Path]) -> int:
        config, output = checked
        step = finished_step(config) if args.resume else None
        if step is not None:  # resuming would start Ray and train nothing
            print(f"run '{config.name}' already finished at step {step} (train.total_steps="
                  f"{config.train.total_steps}): nothing to resume, nothing was trained; its checkpoints are in "
                  f"{config.output_root.rstrip('/')}/{config.name}")
            return 0
        launch.run(config, init_from=args.init_from, output=output)
        return 0

    return run_job(check, run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
