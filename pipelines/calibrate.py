"""Recalibrate a trained model's per-class thresholds on new normal images, without retraining.

    python pipelines/calibrate.py --model runs/demo/checkpoint --data camera2/manifest.parquet --output runs/demo-cam2
    python pipelines/calibrate.py --model models:/dinomaly@champion --data s3://bucket/cam2.parquet \\
        --target-fpr 0.005 --output runs/champion-cam2

For a new camera, new lighting, or a preset trained on its whole training set (calibration_share 0). Only the
manifest's normal rows (label 0, any split) are scored, with the batch-scoring actors (eval.actors, --workers);
defective rows are left out and counted, and so are the images the model was trained on (found from its saved
data config, when readable here). Each class needs at least 8 normal images. Per class, the threshold is
the lowest score cut at which at most --target-fpr of its normal images are called anomalous (score >=
threshold), with a bootstrap interval; the global threshold pools all classes. Classes the new images do not
cover keep their previous thresholds.

Writes a new model version: --output gets a checkpoint folder (the same weights and trained config, the new
table in metadata.json); it must be a new or empty folder, never the --model folder. A model read from the
registry also gets a new registry version tagged with the table.
"""

from __future__ import annotations

import argparse
import sys

import dinomaly.distributed  # noqa: F401 - sets Ray's loopback environment before Ray is imported
from dinomaly.config.cli import actor_settings, entry_parser, local_output, start_logging


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser(__doc__, keys=("model", "data", "eval", "tracking", "cluster", "train.seed"),
                          flags=("config", "data", "output", "set", "model", "workers", "gpu"),
                          required=("model", "data", "output"), set_example="--set eval.actors=2",
                          help={"data": "the new normal images: a .parquet manifest, a dataset layout root (folder) "
                                        "or an s3:// prefix; only label-0 rows are used",
                                "output": "required: a new or empty folder for the new checkpoint (weights, config, table)",
                                "workers": "model actors scoring images (eval.actors)",
                                "gpu": "one GPU per model actor (eval.gpus_per_actor=1)"})
    parser.add_argument("--target-fpr", type=float, default=None, metavar="RATE",
                        help="share of normal images allowed above the threshold (default: the model's "
                             "eval.target_fpr, 0.01)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start_logging()
    from dinomaly.distributed.batch import calibrate
    from dinomaly.distributed.cluster import check_job_storage
    from dinomaly.distributed.entry import run_job

    def check():
        local_output(args.output, "; write the new version to a local folder, then copy it to the bucket "
                                  "(an s3:// checkpoint prefix is a valid --model)")
        calibrate.check_output(args.model, args.output)
        job = calibrate.prepare(args.model, args.data, args.config, actor_settings(args), args.target_fpr)
        check_job_storage({"--output": args.output}, job.registry.tracking_uri if job.registry else None)
        return job

    return run_job(check, lambda job: calibrate.run(job, args.output), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
