"""Train Dinomaly with Ray Train (DDP workers), evaluate per class, track in MLflow.

    python pipelines/train.py --config demo --data demo_data --workers 2
    python pipelines/train.py --config mvtec_uni --data s3://bucket/mvtec.parquet --workers 4 --gpu
    ray job submit --working-dir . -- python pipelines/train.py --config mvtec_uni --data s3://bucket/mvtec
    python pipelines/train.py --config mvtec_uni --data /data/mvtec --init-from dinomaly_vitb_uni.pth --steps 2000

Plain `python` starts a local Ray; under `ray job submit` (RAY_ADDRESS set) it joins that cluster.
When the workers' CPUs/GPUs are taken, it waits at most cluster.start_timeout_s (default 600 s; 0 = forever),
then exits with status 1 and names what holds them.
Outputs: --output DIR (default runs/<name>/) gets checkpoint/, config.yaml and metrics.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import dinomaly.distributed  # noqa: F401 - sets Ray's loopback environment before Ray is imported
from dinomaly.config import Config, apply_overrides, load_config
from dinomaly.config.cli import entry_parser, start_logging

FLAG_KEYS = {  # convenience flag -> config key (anything else: --set key=value)
    "data": "data.root", "categories": "data.categories", "setting": "train.setting", "encoder": "model.encoder",
    "encoder_weights": "model.encoder_weights", "steps": "train.total_steps", "batch_size": "train.batch_size",
    "workers": "train.num_workers", "gpu": "train.use_gpu", "storage_path": "output_root",
    "experiment": "tracking.experiment_name", "deterministic": "train.deterministic", "name": "name",
}


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser(__doc__, config_default="demo", set_example="--set train.lr=1e-3 --set "
                          "model.bottleneck_dropout=0.4 (keys listed below)",
                          config_help="YAML preset name in configs/ (demo, mvtec_uni, ...) or a path (default demo)")
    add = parser.add_argument
    add("--data", help="dataset root (folder or s3://bucket/prefix) or a .parquet manifest (data.root)")
    add("--categories", help="comma-separated classes to train on (data.categories; default all)")
    add("--setting", choices=["unified", "separate"], help="one model for all classes, or one per class trained "
        "as parallel Ray Train runs (train.setting)")
    add("--encoder", help="timm encoder, e.g. vit_base_patch14_reg4_dinov2 (model.encoder)")
    add("--encoder-weights", help="'hub', 'none' or a DINOv2 weight file (model.encoder_weights)")
    add("--steps", type=int, help="optimiser steps in the run (train.total_steps)")
    add("--batch-size", type=int, help="global batch, split evenly over the workers (train.batch_size)")
    add("--workers", type=int, help="Ray Train workers = DDP ranks (train.num_workers)")
    add("--gpu", action="store_const", const=True, help="one GPU per worker, NCCL, bf16 autocast (train.use_gpu; "
        "train.precision=bf16 unless --set train.precision=fp32)")
    add("--storage-path", help="folder or s3:// prefix for Ray checkpoints (output_root); the run lives in <it>/<name>")
    add("--experiment", help="MLflow experiment name (tracking.experiment_name)")
    add("--name", help="run name: Ray run, MLflow run and output folder (name)")
    add("--deterministic", action="store_const", const=True, help="manifest order, no shuffle, dropout 0, fixed "
        "seeds: the same result on any worker count (train.deterministic)")
    add("--output", type=Path, help="where checkpoint/, config.yaml and metrics.json go (default runs/<name>/)")
    add("--resume", action="store_true", help="continue the run of this name from its latest checkpoint "
        "(optimiser, schedule, step and RNG restored)")
    add("--init-from", default="", metavar="PATH", help="start from these weights with a fresh optimiser and "
        "schedule (fine-tuning): an official Dinomaly ViTill .pth or a checkpoint directory of ours")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    config = load_config(args.config, args.set)
    overrides = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None}
    if args.gpu and not any(o.split("=", 1)[0].strip() == "train.precision" for o in args.set):
        overrides["train.precision"] = "bf16"
    if "data.categories" in overrides:
        overrides["data.categories"] = [c.strip() for c in overrides["data.categories"].split(",") if c.strip()]
    return apply_overrides(config, overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start_logging()
    from dinomaly.distributed.entry import run_job
    from dinomaly.distributed.train import run as launch

    def check() -> Config:
        config = config_from_args(args)
        launch.check_before_start(config, init_from=args.init_from, resume=args.resume)
        return config

    return run_job(check, lambda config: launch.run(config, init_from=args.init_from, output=args.output))


if __name__ == "__main__":
    sys.exit(main())
