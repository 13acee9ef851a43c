"""Hyper-parameter search: many training runs of one config on Ray Tune, ranked, tracked, the best registered.

    python pipelines/tune.py --config demo --num-samples 8
    python pipelines/tune.py --config mvtec_uni --data /data/mvtec --output sweeps/mvtec \\
        --space 'model.bottleneck_dropout=uniform(0.0, 0.6)' --space 'train.lr=loguniform(1e-4, 1e-2)'
    python pipelines/tune.py --config demo --resume          # finish an interrupted sweep (same options)

Search space: dotted config keys (tune.search_space in YAML, or --space KEY=SPEC, which replaces it) with
SPEC = uniform(lo, hi) | loguniform(lo, hi) | randint(lo, hi) | choice(v1, v2, ...) | grid(v1, v2, ...) | a
value; values are YAML, e.g. --space 'model.fuse_groups=choice([[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 1], [2, 3],
[4, 5], [6, 7]])'. Keys that must change together go in one mapping: --space 'model=choice({decoder_depth: 8},
{decoder_depth: 4, target_layers: [6, 7, 8, 9], fuse_groups: [[0, 1], [2, 3]]})'. Default: bottleneck dropout
uniform in [0, 0.6] and the four groupings of 8 layers (one group, two, four pairs, layer to layer).

Each trial is a Ray Train run of train.num_workers workers (train.cpus_per_worker CPUs, a GPU each with
train.use_gpu) plus tune.driver_cpus; tune.max_concurrent_trials of them run at once (0 = what fits).
Objective (tune.objective): the mean of tune.metrics on the labelled test split (maximised), or for data
without defective images the reconstruction loss on held-out normal training images (minimised). ASHA
(tune.scheduler) stops trials that fall behind at an evaluation (tune.evaluations per trial). A failing
trial (NaN/diverging loss, OOM, bad config, workers' CPUs/GPUs not free within cluster.start_timeout_s) is
ranked 'failed' with its reason; the sweep goes on.
Outputs: the ranking (printed; tune_results.csv/.json in --output, default the sweep folder runs/<name>/),
an MLflow parent run with a child run per trial, and the best model registered as
tracking.registered_model_name (alias tune.champion_alias when it beats the current holder).
Exit status: 0 done, 1 no trial succeeded (or the cluster cannot host one), 2 bad options, 3 interrupted
(finish with --resume).
"""

from __future__ import annotations

import argparse
import sys

import dinomaly.distributed  # noqa: F401 - sets Ray's loopback environment before Ray is imported
from dinomaly.config import Config, apply_overrides
from dinomaly.config.cli import entry_parser, local_output, start_logging, training_config


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser(__doc__, keys=("", "model", "data", "train", "eval", "tracking", "tune", "cluster"),
                          flags=("config", "data", "name", "output", "set", "storage_path", "resume",
                                          "workers", "gpu"), defaults={"config": "demo"},
                          deprecated={"--output-dir": "output"}, set_example="--set tune.max_concurrent_trials=2",
                          help={"name": "sweep name: Ray Tune experiment, MLflow parent run (name)",
                                "output": "folder that receives everything the sweep writes: tune_results.csv/.json "
                                          "and, unless --storage-path says otherwise, the sweep folder <DIR>/<name> "
                                          "(trials, checkpoints) and feature_cache/; a new folder is a new sweep "
                                          "(default: the sweep folder runs/<name>)",
                                "resume": "finish the interrupted sweep of this name and output: finished trials "
                                          "are kept, unfinished ones continue from their latest checkpoint",
                                "workers": "Ray Train workers of each trial (train.num_workers)",
                                "gpu": "one GPU per trial worker (train.use_gpu; train.precision=bf16 unless --set "
                                       "train.precision=fp32)"})
    add = parser.add_argument
    add("--space", action="append", default=[], metavar="KEY=SPEC",
        help="search-space entry, repeatable; given at all, these replace tune.search_space")
    add("--num-samples", type=int, help="trials to sample (tune.num_samples)")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    config = training_config(args, {"num_samples": "tune.num_samples"})
    if not args.space:
        return config
    return apply_overrides(config, {"tune.search_space": dict(_space_entry(text) for text in args.space)})


def _space_entry(text: str) -> tuple[str, str]:
    key, sep, spec = text.partition("=")
    if not sep or not key.strip() or not spec.strip():
        raise ValueError(f"--space {text!r} must look like KEY=SPEC, e.g. 'train.lr=loguniform(1e-4, 1e-2)'")
    return key.strip(), spec.strip()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start_logging()
    from dinomaly.distributed.cluster import check_job_storage
    from dinomaly.distributed.entry import run_job
    from dinomaly.distributed.train.run import check_before_start, prepare_config
    from dinomaly.distributed.tune import sweep
    from dinomaly.distributed.tune.space import check_search_space

    def check() -> Config:
        local_output(args.output, "; keep --output local and pass --storage-path s3://... for Ray's run folders")
        config = config_from_args(args)
        where = {"--output": args.output or sweep.experiment_path(config), "--storage-path": config.output_root}
        if config.tune.cache_root:
            where["tune.cache_root"] = config.tune.cache_root
        check_job_storage(where, config.tracking.tracking_uri if config.tracking.enabled else None)
        check_before_start(config)  # errors name the paths as given; workers then get them absolute
        sweep.check_cache_root(config)
        config = prepare_config(config)
        check_search_space(config)  # a bad space fails here, before any Ray work, with the fix named
        sweep.check_sweep_name(config, args.resume)
        return config

    return run_job(check, lambda config: sweep.run(config, resume=args.resume, output_dir=args.output),
                   debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
