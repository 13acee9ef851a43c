"""Evaluate a model on a test set with Ray Data: the reference maps, scores and seven metrics per class.

    python pipelines/evaluate.py --model runs/demo/checkpoint --data demo_data --heatmaps 2
    python pipelines/evaluate.py --model models:/dinomaly@champion --data s3://bucket/mvtec.parquet --mlflow
    python pipelines/evaluate.py --model dinomaly_mvtec_uni.pth --config mvtec_uni --data /data/mvtec_anomaly_detection

--model: a checkpoint directory, an s3:// prefix, models:/<name>@<alias> or models:/<name>/<version>, or
official Dinomaly weights (.pth) together with --config naming their architecture (mvtec_uni, visa_uni,
realiad_uni: ViT-B, 448 -> 392). Images are scored by a pool of eval.actors model actors (eval.batch_size,
eval.cpus_per_actor, eval.gpus_per_actor); the driver computes the metrics class by class as batches arrive.

Pixel metrics (eval.pixel_metrics): 'exact' (default) gives the reference numbers and holds the normal-pixel
scores of one class at a time (4 B per pixel: about 256 KB per test image of the class being computed);
'streaming' holds them as counts of values rounded to 20 mantissa bits (tens of MB whatever the test-set
size; only the ground-truth anomalous pixels, 12 B each, and one score per image still accumulate) and moves
the pixel metrics by about 1e-6 (image metrics stay exact). eval.aupro: 'reference' (200
thresholds, as the paper) or 'exact'.

Writes to --output (a folder or an s3:// prefix): metrics.json, per_class.{txt,csv,md}, scores.parquet (one
row per test image, unreadable images with their error) and, with --heatmaps N, heatmaps/<class>/ overlays of
the N highest-scored normal images (false alarms) and the N highest-scored defective images, plus a grid per
class.
"""

from __future__ import annotations

import argparse
import sys

import dinomaly.distributed  # noqa: F401 - sets Ray's loopback environment before Ray is imported
from dinomaly.config.cli import ACTOR_HELP, actor_settings, at_least, entry_parser, start_logging


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser(__doc__, keys=("model", "data", "eval", "tracking", "cluster", "serve.threshold", "serve.threshold_method", "train.seed"),
                          flags=("config", "data", "output", "set", "model", "workers", "gpu"),
                          required=("model", "data"),
                          set_example="--set eval.actors=2 --set eval.pixel_metrics=streaming",
                          help={"config": "YAML preset name or path (required for official .pth weights)",
                                "data": "the test images: a .parquet manifest, a dataset layout root (folder) or "
                                        "an s3:// prefix",
                                "output": "folder or s3:// prefix that receives metrics.json, per_class.*, "
                                          "scores.parquet and heatmaps/ (default runs/evaluate-<model name>)",
                                **ACTOR_HELP})
    parser.add_argument("--heatmaps", type=at_least(0), default=0, metavar="N",
                        help="overlays of the N highest-scored normal and defective images per class")
    parser.add_argument("--mlflow", action="store_true", help="log metrics and outputs to MLflow (tracking.*)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start_logging()
    from dinomaly.data.storage import check_output_writable
    from dinomaly.distributed.batch import evaluate
    from dinomaly.distributed.cluster import check_job_storage
    from dinomaly.distributed.entry import run_job
    from dinomaly.distributed.resources import check_local_gpus

    def check():
        bundle, table = evaluate.prepare(args.model, args.data, args.config, actor_settings(args))
        check_local_gpus(bundle.config.eval.gpus_per_actor, "eval.gpus_per_actor (--gpu)")
        output = evaluate.output_uri(bundle, args.output)
        check_job_storage({"--output": output}, bundle.config.tracking.tracking_uri if args.mlflow else None)
        check_output_writable(output, bundle.config.data)
        return bundle, table

    return run_job(check, lambda checked: evaluate.run(*checked, args.output, heatmaps=args.heatmaps,
                                                       mlflow=args.mlflow), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
