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

Writes to --output: metrics.json, per_class.{txt,csv,md}, scores.parquet (one row per test image, unreadable
images with their error) and, with --heatmaps N, heatmaps/<class>/ overlays of the N highest-scored normal
images (false alarms) and the N highest-scored defective images, plus a grid per class.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import dinomaly.distributed  # noqa: F401 - sets Ray's loopback environment before Ray is imported
from dinomaly.config import help_text
from dinomaly.metrics import format_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=help_text(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint dir, s3:// prefix, models:/... or official .pth")
    parser.add_argument("--data", required=True, help="manifest (.parquet) or dataset root (folder or s3:// prefix)")
    parser.add_argument("--config", default=None, help="YAML preset or path (required for official .pth weights)")
    parser.add_argument("--output", default=None, help="output folder (default: runs/evaluate-<model name>)")
    parser.add_argument("--heatmaps", type=int, default=0, metavar="N",
                        help="overlays of the N highest-scored normal and defective images per class")
    parser.add_argument("--mlflow", action="store_true", help="log metrics and outputs to MLflow (tracking.*)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set eval.actors=2 --set eval.pixel_metrics=streaming")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import ray

    from dinomaly.distributed.batch.evaluate import evaluate, log_to_mlflow, test_rows, write_outputs
    from dinomaly.distributed.batch.scoring import load_bundle
    from dinomaly.distributed.cluster import ensure_ray
    from dinomaly.distributed.resources import ResourcesUnavailable

    try:  # data.layout stays the preset's / checkpoint's (e.g. realiad + its json variant); .parquet = manifest
        bundle = load_bundle(args.model, args.config, [f"data.root={args.data}", *args.set])
        table = test_rows(bundle.config)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    output = Path(args.output or f"runs/evaluate-{bundle.name or 'model'}")
    started = ensure_ray()  # attach to RAY_ADDRESS / a running Ray, or start (and stop) one
    try:
        result = evaluate(ray.put(bundle), bundle.config, table, heatmaps=args.heatmaps)
        info = write_outputs(result, bundle, bundle.config, output)
        print(format_table(result.rows))
        print(f"{info['images']} test images ({len(info['unreadable'])} unreadable) in {result.seconds:.1f} s; "
              f"results in {output}")
        if args.mlflow:
            run_name = f"evaluate-{bundle.name}-{time.strftime('%Y%m%dT%H%M%S')}"
            run_id = log_to_mlflow(info, bundle.config, output, run_name)
            print(f"logged to MLflow run {run_id}")
    except ResourcesUnavailable as err:  # never fits, or not free within cluster.start_timeout_s
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if started:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
