"""Hyper-parameter search: many training runs of one config on Ray Tune, ranked, tracked, the best registered.

    python pipelines/tune.py --config demo --num-samples 8
    python pipelines/tune.py --config mvtec_uni --set data.root=/data/mvtec \\
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
Outputs: the ranking (printed; tune_results.csv/.json in --output-dir, default <output_root>/<name>/),
an MLflow parent run with a child run per trial, and the best model registered as
tracking.registered_model_name (alias tune.champion_alias when it beats the current holder).
Exit status: 0 done, 1 no trial succeeded (or the cluster cannot host one), 2 bad options, 3 interrupted
(finish with --resume).
"""

from __future__ import annotations

import argparse
import sys

import dinomaly.distributed  # noqa: F401 - sets Ray's loopback environment before Ray is imported
from dinomaly.config import Config, apply_overrides, load_config
from dinomaly.config.cli import entry_parser, start_logging


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser(__doc__, config_default="demo", set_example="--set tune.max_concurrent_trials=2 "
                          "(keys listed below)",
                          config_help="YAML preset in configs/ (demo, mvtec_uni, ...) or a path (default demo)")
    add = parser.add_argument
    add("--space", action="append", default=[], metavar="KEY=SPEC",
        help="search-space entry, repeatable; given at all, these replace tune.search_space")
    add("--num-samples", type=int, help="trials to sample (tune.num_samples)")
    add("--resume", action="store_true", help="finish the interrupted sweep of this name: finished trials are "
        "kept, unfinished ones continue from their latest checkpoint")
    add("--output-dir", help="folder for tune_results.csv/.json (default: the sweep folder <output_root>/<name>)")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    config = load_config(args.config, args.set)
    overrides = {}
    if args.space:
        overrides["tune.search_space"] = dict(_space_entry(text) for text in args.space)
    if args.num_samples is not None:
        overrides["tune.num_samples"] = args.num_samples
    return apply_overrides(config, overrides)


def _space_entry(text: str) -> tuple[str, str]:
    key, sep, spec = text.partition("=")
    if not sep or not key.strip() or not spec.strip():
        raise ValueError(f"--space {text!r} must look like KEY=SPEC, e.g. 'train.lr=loguniform(1e-4, 1e-2)'")
    return key.strip(), spec.strip()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start_logging()
    from dinomaly.distributed.entry import run_job
    from dinomaly.distributed.train.run import check_before_start, prepare_config
    from dinomaly.distributed.tune import sweep
    from dinomaly.distributed.tune.space import check_search_space

    def check() -> Config:
        config = prepare_config(config_from_args(args))
        check_search_space(config)  # a bad space fails here, before any Ray work, with the fix named
        check_before_start(config)
        return config

    return run_job(check, lambda config: sweep.run(config, resume=args.resume, output_dir=args.output_dir))


if __name__ == "__main__":
    sys.exit(main())
