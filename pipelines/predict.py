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
import sys

import dinomaly.distributed  # noqa: F401 - sets Ray's loopback environment before Ray is imported
from dinomaly.config.cli import entry_parser, start_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = entry_parser(__doc__, config_help="YAML preset or path (required for official .pth weights)",
                          set_example="--set eval.actors=2 --set eval.gpus_per_actor=1", model=True)
    parser.add_argument("--input", required=True, help="image folder, s3:// prefix, or a .parquet manifest")
    parser.add_argument("--output", required=True, help="result folder or s3:// prefix")
    parser.add_argument("--threshold", type=float, default=None, help="image-score threshold of the verdict")
    parser.add_argument("--heatmaps", action="store_true", help="write an overlay PNG per image")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing output instead of resuming")
    parser.add_argument("--rows-per-file", type=int, default=2000, metavar="N",
                        help="rows per Parquet part (default 2000); a killed run loses at most the unwritten ones")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_logging()
    from dinomaly.distributed.batch import predict
    from dinomaly.distributed.entry import run_job

    return run_job(lambda: predict.prepare(args.model, args.input, args.config, args.set, args.threshold,
                                           args.rows_per_file),
                   lambda job: predict.run(job, args.output, heatmaps=args.heatmaps, overwrite=args.overwrite,
                                           rows_per_file=args.rows_per_file))


if __name__ == "__main__":
    sys.exit(main())
