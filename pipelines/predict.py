"""Score a folder, bucket prefix or manifest of unlabelled images into Parquet, with Ray Data; resumable.

    python pipelines/predict.py --model runs/demo/checkpoint --input incoming/ --output scored/
    python pipelines/predict.py --model models:/dinomaly@champion --heatmaps
        --input s3://bucket/new --output s3://bucket/scored

Results: <output>/results/*.parquet (pandas.read_parquet('<output>/results')), <output>/summary.json;
every file appears whole, so the output can be read even while a run writes it or after it was killed.
One row per input image: uri, score, is_anomalous (score >= the model's threshold), threshold,
peak_row/peak_col (centroid of the top-1% anomaly-map pixels, in ORIGINAL image pixels; peak_row_map /
peak_col_map: the same in the eval.resize x eval.resize map), height, width, heatmap_uri (with --heatmaps:
an overlay PNG under <output>/heatmaps/, colours 0 .. 2 x threshold) and error (null = scored; unreadable
images are kept with the reason). The threshold comes from --threshold, else the registry tag or the
checkpoint's metadata (training writes it). An existing output is resumed (images already there are skipped)
unless --overwrite; results of another model or threshold are never mixed in.
"""

from __future__ import annotations

import argparse
import logging
import sys

import dinomaly.distributed  # noqa: F401 - sets Ray's loopback environment before Ray is imported
from dinomaly.config import help_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=help_text(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint dir, s3:// prefix, models:/... or official .pth")
    parser.add_argument("--input", required=True, help="image folder, s3:// prefix, or a .parquet manifest")
    parser.add_argument("--output", required=True, help="result folder or s3:// prefix")
    parser.add_argument("--config", default=None, help="YAML preset or path (required for official .pth weights)")
    parser.add_argument("--threshold", type=float, default=None, help="image-score threshold of the verdict")
    parser.add_argument("--heatmaps", action="store_true", help="write an overlay PNG per image")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing output instead of resuming")
    parser.add_argument("--rows-per-file", type=int, default=2000, metavar="N",
                        help="rows per Parquet part (default 2000); a killed run loses at most the unwritten ones")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set eval.actors=2 --set eval.gpus_per_actor=1")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rows_per_file < 1:
        print(f"error: --rows-per-file {args.rows_per_file} must be at least 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import ray

    from dinomaly.distributed.batch.predict import list_inputs, predict
    from dinomaly.distributed.batch.scoring import load_bundle
    from dinomaly.distributed.cluster import ensure_ray
    from dinomaly.distributed.resources import ResourcesUnavailable
    from dinomaly.serving_api import resolve_threshold

    try:
        bundle = load_bundle(args.model, args.config, args.set)
        threshold, where = resolve_threshold(args.threshold, bundle.config.serve.threshold_method, bundle.metadata,
                                             bundle.tags)
        inputs = list_inputs(args.input, bundle.config)
    except (ValueError, FileNotFoundError, OSError) as err:
        hint = " (pass --threshold)" if "threshold" in str(err) else ""
        print(f"error: {err}{hint}", file=sys.stderr)
        return 2
    started = ensure_ray()  # attach to RAY_ADDRESS / a running Ray, or start (and stop) one
    try:
        summary = predict(ray.put(bundle), bundle, bundle.config, inputs, args.output, threshold,
                          heatmaps=args.heatmaps, overwrite=args.overwrite, rows_per_file=args.rows_per_file,
                          progress=sys.stderr.isatty())
    except ValueError as err:  # an output of another run without --overwrite
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ResourcesUnavailable as err:  # never fits, or not free within cluster.start_timeout_s
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if started:
            ray.shutdown()
    rate = f"{summary.anomaly_rate:.1%}" if summary.anomaly_rate == summary.anomaly_rate else "n/a"
    print(f"{summary.inputs} images: {summary.skipped} already scored, {summary.scored} scored and {summary.errors} "
          f"unreadable now ({summary.images_per_s:.1f} images/s); threshold {threshold:.6g} ({where}); "
          f"output {summary.output}: {summary.total_rows} rows, {summary.total_errors} unreadable, "
          f"anomaly rate {rate}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
