"""Score a folder, bucket prefix or manifest of unlabelled images into Parquet, with Ray Data; resumable.

    python pipelines/predict.py --model runs/demo/checkpoint --data incoming/ --output scored/
    python pipelines/predict.py --model models:/dinomaly@champion --heatmaps \\
        --data s3://bucket/new --output s3://bucket/scored

Results: <output>/results/*.parquet (pandas.read_parquet('<output>/results')), <output>/summary.json;
every file appears whole, so the output can be read even while a run writes it or after it was killed.
One row per input image: uri, score, is_anomalous (score >= the row's threshold), threshold,
peak_row/peak_col (centroid of the top-1% anomaly-map pixels, in ORIGINAL image pixels; peak_row_map /
peak_col_map: the same in the eval.resize x eval.resize map), height, width, heatmap_uri (with --heatmaps:
an overlay PNG under <output>/heatmaps/, colours 0 .. 2 x threshold) and error (null = scored; unreadable
images are kept with the reason). --threshold T decides every row (the model's per-class thresholds are set
aside); without it, a manifest row's class threshold decides, else the model's global one (registry tag or
checkpoint metadata; training writes them). With a manifest, --set data.categories=[nut,screw] scores only
those classes' rows. An existing output is resumed (images already there are skipped) unless --overwrite;
results of another model or threshold are never mixed in. A packed manifest (prepare_data.py --pack) is read
from its shards; its rows are still named by their image_uri.
"""

from __future__ import annotations

import argparse
import math
import sys

import dinomaly.distributed  # noqa: F401 - sets Ray's loopback environment before Ray is imported
from dinomaly.config.cli import ACTOR_HELP, actor_settings, at_least, entry_parser, start_logging


def score_threshold(text: str) -> float:
    """An image-score threshold: scores are cosine distances, in [0, MAX_SCORE]."""
    from dinomaly.config import MAX_SCORE

    value = float(text)
    if not (math.isfinite(value) and 0 < value <= MAX_SCORE):
        raise argparse.ArgumentTypeError(f"{text} must be in (0, {MAX_SCORE:g}]: anomaly scores are cosine "
                                         f"distances, in [0, {MAX_SCORE:g}]")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser(__doc__, keys=("model", "data", "eval", "tracking", "cluster", "serve.threshold", "serve.threshold_method"),
                          flags=("config", "data", "output", "set", "model", "workers", "gpu"),
                          required=("model", "data", "output"), deprecated={"--input": "data"},
                          set_example="--set eval.actors=2 --set eval.gpus_per_actor=1",
                          help={"config": "YAML preset name or path (required for official .pth weights)",
                                "data": "the images to score: a folder, an s3:// prefix or a .parquet manifest "
                                        "(a packed one is read from its shards)",
                                "output": "required: result folder or s3:// prefix (created if missing): "
                                          "results/*.parquet, summary.json, heatmaps/; an existing one is resumed",
                                **ACTOR_HELP})
    add = parser.add_argument
    add("--threshold", type=score_threshold, default=None, metavar="T",
        help="image-score threshold for every row, overriding the model's per-class and global thresholds "
             "(default: the model's own)")
    add("--heatmaps", action="store_true", help="write an overlay PNG per image")
    add("--overwrite", action="store_true", help="delete an existing output instead of resuming")
    add("--rows-per-file", type=at_least(1), default=2000, metavar="N",
        help="rows per Parquet part (default 2000); a killed run loses at most the unwritten ones")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start_logging()
    from dinomaly.data.storage import check_output_writable
    from dinomaly.distributed.batch import predict
    from dinomaly.distributed.cluster import check_job_storage
    from dinomaly.distributed.entry import run_job
    from dinomaly.distributed.resources import check_local_gpus

    def check():
        check_job_storage({"--output": args.output})
        job = predict.prepare(args.model, args.data, args.config, actor_settings(args), args.threshold,
                              args.rows_per_file)
        check_local_gpus(job.bundle.config.eval.gpus_per_actor, "eval.gpus_per_actor (--gpu)")
        check_output_writable(args.output, job.bundle.config.data)
        return job

    return run_job(check, lambda job: predict.run(job, args.output, heatmaps=args.heatmaps, overwrite=args.overwrite,
                                                  rows_per_file=args.rows_per_file), debug=args.debug,
                   interrupted="run the same command again: the rows already written are kept, the rest are scored")


if __name__ == "__main__":
    sys.exit(main())
