"""Hyper-parameter search on Ray Tune: many Ray Train runs of one config, ranked, tracked and registered.

    outcome = run_sweep(config)                 # Ray initialised; config.tune says what to search
    outcome = run_sweep(config, resume=True)    # finish an interrupted sweep (finished trials are kept)

Driver steps: check the search space against the config (before any Ray work) -> training / evaluation
rows and the objective -> the encoder-feature cache (a Ray task, once per dataset + encoder) -> the MLflow
parent run -> Tuner.fit (or Tuner.restore) over dinomaly.distributed.tune.trial.run_trial with ASHA on the
objective (the searcher seeded by tune.seed) -> the ranking of every trial by its best evaluation
(tune_results.csv / .json, the parent run's table, a metrics.json per trial) -> the best trial's best-evaluated
checkpoint registered, and aliased (tune.champion_alias) when it beats the current holder.
The search space is parsed and checked in tune/space.py, the ranking made in tune/ranking.py, MLflow kept
in tune/tracking.py, and each trial run by tune/trial.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from dinomaly.checkpoint import METADATA_FILE
from dinomaly.config import Config
from dinomaly.config.paths import with_absolute_paths
from dinomaly.distributed.cluster import storage_for
from dinomaly.distributed.resources import Request, amounts, check_resources
from dinomaly.distributed.train.run import load_tables
from dinomaly.distributed.tune.ranking import RANKED, SweepOutcome, rank_trials, trial_record, write_results
from dinomaly.distributed.tune.space import SearchSpace, check_search_space
from dinomaly.distributed.tune.tracking import finish_tracking, open_parent_run
from dinomaly.distributed.tune.trial import SweepSpec, objective_mode, run_trial
from dinomaly.results import write_metrics_json

logger = logging.getLogger(__name__)


def expected_trials(config: Config) -> int:
    """Trials the sweep will have: num_samples times the grid's size."""
    return config.tune.num_samples * SearchSpace.from_config(config).grid_size()


# --------------------------------------------------------------------------- data and objective


def holdout_split(train_rows: pa.Table, fraction: float) -> tuple[pa.Table, pa.Table]:
    """(training rows, held-out rows): every class keeps evenly spaced images (by URI) out of training."""
    keep, held = [], []
    categories = train_rows.column("category").to_pylist()
    uris = train_rows.column("image_uri").to_pylist()
    for name in sorted(set(categories)):
        members = sorted((i for i, c in enumerate(categories) if c == name), key=lambda i: uris[i])
        count = max(1, round(len(members) * fraction)) if len(members) > 1 else 0
        picked = {members[round((j + 0.5) * len(members) / count - 0.5)] for j in range(count)} if count else set()
        held += sorted(picked)
        keep += [i for i in members if i not in picked]
    return train_rows.take(sorted(keep)), train_rows.take(held)


def sweep_inputs(config: Config) -> tuple[str, pa.Table, pa.Table]:
    """(objective, training rows, evaluation rows): labelled test rows, or held-out normals of the train split."""
    train_rows, test_rows = load_tables(config)
    has_defects = test_rows.num_rows and pc.any(pc.equal(test_rows.column("label"), 1)).as_py()
    objective = config.tune.objective
    if objective == "auto":
        objective = "labelled" if has_defects else "holdout_loss"
    if objective == "labelled":
        if not has_defects:
            raise ValueError(f"tune.objective=labelled but the test split of {config.data.root} has no defective "
                             "images; use tune.objective=holdout_loss (or auto)")
        return objective, train_rows, test_rows
    space = set(config.tune.search_space)
    if space & {"model.bottleneck_dropout", "model.fuse_groups", "model", "model.decoder_depth"}:
        logger.warning("the holdout_loss objective rewards models that reconstruct everything well; it favours "
                       "low dropout and loose layer groups, so its ranking of %s is not a ranking by anomaly "
                       "detection. Label a few defective images for a labelled objective", sorted(space))
    train_rows, held = holdout_split(train_rows, config.tune.holdout_fraction)
    if train_rows.num_rows < config.train.batch_size:
        raise ValueError(f"after holding out {held.num_rows} normals only {train_rows.num_rows} training images are "
                         f"left, fewer than train.batch_size={config.train.batch_size}")
    return objective, train_rows, held


def ensure_feature_cache(config: Config, train_rows: pa.Table, eval_rows: pa.Table, objective: str) -> str:
    """Build (or find) the feature cache of all training-split images in a Ray task with a trial's resources."""
    import ray

    from dinomaly.features import build_feature_cache

    rows = pa.concat_tables([train_rows, eval_rows]) if objective == "holdout_loss" else train_rows
    root = cache_root(config)
    device = "cuda" if config.train.use_gpu else "cpu"
    needs = {"CPU": config.train.cpus_per_worker or 1.0, "GPU": 1.0 if config.train.use_gpu else 0.0}
    check_resources(Request(what=f"the feature cache of sweep '{config.name}'", bundles=(needs,),
                            label=f"1 task x {amounts(needs)}", fix="lower train.cpus_per_worker or set "
                            "tune.feature_cache=false"), config.cluster.start_timeout_s)
    task = ray.remote(num_cpus=needs["CPU"], num_gpus=needs["GPU"])(build_feature_cache)
    return ray.get(task.remote(rows, config, root, config.eval.batch_size, device))


def cache_root(config: Config) -> str:
    """Where the feature caches go: tune.cache_root, else <output_root>/feature_cache."""
    return config.tune.cache_root or f"{config.output_root.rstrip('/')}/feature_cache"


def check_cache_root(config: Config) -> None:
    """The feature-cache folder can be written (a file there fails the cache task inside Ray otherwise)."""
    from dinomaly.data.storage import check_reachable, split_uri
    from dinomaly.preflight import check_writable_folder

    if not config.tune.feature_cache:
        return
    scheme, path = split_uri(cache_root(config))
    if scheme:
        check_reachable(f"{scheme}://{path.split('/', 1)[0]}", config.data)
        return
    check_writable_folder(Path(path), "the feature cache", "set tune.cache_root to a folder (or an s3:// prefix), "
                          "or tune.feature_cache=false")


# --------------------------------------------------------------------------- running


def _tuner(config: Config, spec: SweepSpec, mode: str, callbacks: list):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    tc = config.tune
    concurrent = max_concurrent(config)
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), {"cpu": tc.driver_cpus})
    scheduler = (ASHAScheduler(time_attr="evaluation", max_t=tc.evaluations, grace_period=tc.grace_period,
                               reduction_factor=tc.reduction_factor) if tc.scheduler == "asha" else FIFOScheduler())
    storage_path, filesystem = storage_for(config.output_root, config.data)
    return tune.Tuner(
        trainable, param_space=SearchSpace.from_config(config).to_tune(),
        tune_config=tune.TuneConfig(metric="objective", mode=mode, num_samples=tc.num_samples,
                                    search_alg=search_algorithm(config, concurrent), scheduler=scheduler,
                                    max_concurrent_trials=concurrent if tc.search_algorithm == "optuna" else None,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=config.name, storage_path=storage_path, storage_filesystem=filesystem,
                                  failure_config=tune.FailureConfig(max_failures=0), callbacks=callbacks))


def search_algorithm(config: Config, concurrent: int):
    """The searcher, seeded by tune.seed: Tune's variant generator (random, and grid with its sampled ranges;
    grid values come in a fixed order) or Optuna's TPE sampler. Same seed and config = same trials, same order."""
    if config.tune.search_algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=config.tune.seed)  # TuneConfig.max_concurrent_trials limits it
    from ray.tune.search import BasicVariantGenerator

    # Tune ignores TuneConfig.max_concurrent_trials for a generator passed in: it takes the limit itself
    return BasicVariantGenerator(max_concurrent=concurrent, random_state=config.tune.seed)


def _trial_name(trial) -> str:
    return trial.trial_id  # stable across restore; the Train run and the MLflow child run use it too


def max_concurrent(config: Config) -> int:
    """tune.max_concurrent_trials, or as many trials as the cluster's CPUs (and GPUs) hold at once."""
    import ray

    if config.tune.max_concurrent_trials:
        return config.tune.max_concurrent_trials
    tc = config.train
    resources = ray.cluster_resources()
    per_trial = tc.num_workers * (tc.cpus_per_worker or 1.0) + config.tune.driver_cpus
    fits = int(resources.get("CPU", 1) // per_trial)
    if tc.use_gpu:
        fits = min(fits, int(resources.get("GPU", 0) // tc.num_workers))
    return max(1, fits)


def experiment_path(config: Config) -> str:
    return f"{config.output_root.rstrip('/')}/{config.name}"


def run(config: Config, *, resume: bool = False, output_dir: str | Path | None = None) -> int:
    """The sweep as the entry points run it: start or join Ray, sweep, print the ranking. Returns the exit
    code: 0 with a best trial, 1 when every trial failed, 3 when interrupted (finish it with resume)."""
    from dinomaly.distributed.cluster import ensure_ray
    from dinomaly.distributed.entry import UsageError
    from dinomaly.distributed.tune.ranking import format_ranking, report_lines

    ensure_ray()
    try:
        outcome = run_sweep(config, resume=resume, output_dir=output_dir)
    except (ValueError, FileNotFoundError) as err:  # e.g. --resume without a sweep, a name already used
        raise UsageError(str(err)) from err
    print(format_ranking(outcome))
    print("\n".join(report_lines(outcome, config)))
    if outcome.interrupted:
        return 3
    return 0 if outcome.best is not None else 1


def check_sweep_name(config: Config, resume: bool) -> str:
    """The sweep's folder: --resume needs an earlier sweep there; without it, an earlier sweep is an error (both
    checked without Ray, so pipelines/tune.py refuses before starting one)."""
    from ray import tune

    path = experiment_path(config)
    storage_path, filesystem = storage_for(path, config.data)
    exists = tune.Tuner.can_restore(storage_path, storage_filesystem=filesystem)
    if resume and not exists:
        raise FileNotFoundError(f"no sweep to resume at {path}; run without --resume to start it")
    if exists and not resume:
        raise ValueError(f"a sweep named {config.name!r} already exists at {path}; pass --resume to finish it, or "
                         "start a new one with --name <new name> or --output <new folder>")
    return path


def run_sweep(config: Config, *, resume: bool = False, output_dir: str | Path | None = None,
              callbacks: list | None = None) -> SweepOutcome:
    """Run (or with resume=True finish) the sweep described by config.tune; Ray must be initialised.

    output_dir: where tune_results.csv/.json go (None = the sweep folder when it is local). callbacks: extra
    ray.tune.Callback objects. Failed trials do not raise: they are ranked last with their reason (a trial
    whose workers do not get their CPUs/GPUs within cluster.start_timeout_s is one). ResourcesUnavailable
    when not even a trial's driver (tune.driver_cpus) or the feature-cache task can be placed in that time.
    """
    from ray import tune

    config = with_absolute_paths(config)  # trials run in their own folders
    check_search_space(config)
    path = check_sweep_name(config, resume)
    storage_path, filesystem = storage_for(path, config.data)
    objective, train_rows, eval_rows = sweep_inputs(config)
    mode = objective_mode(objective)
    cache = ensure_feature_cache(config, train_rows, eval_rows, objective) if config.tune.feature_cache else None
    parent = open_parent_run(config, objective) if config.tracking.enabled else None
    spec = SweepSpec(config=config, objective=objective, train_rows=train_rows, eval_rows=eval_rows, cache_uri=cache,
                     train_storage=f"{path}/train", parent_run_id=parent)
    if resume:
        trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), {"cpu": config.tune.driver_cpus})
        tuner = tune.Tuner.restore(storage_path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   storage_filesystem=filesystem)
    else:
        tuner = _tuner(config, spec, mode, list(callbacks or []))
    # Tune waits without end for a trial's driver slot; each trial then waits (bounded) for its own workers
    driver = {"CPU": config.tune.driver_cpus}
    check_resources(Request(what=f"sweep '{config.name}'", bundles=(driver,), label=f"1 trial driver x "
                            f"{amounts(driver)} to start its trials", fix="lower tune.driver_cpus"),
                    config.cluster.start_timeout_s)
    before = _placement_groups()
    try:
        grid = tuner.fit()
    finally:
        reap_placement_groups(before)
    rows, interrupted = rank_trials(grid, _stored_trials(path, config), evaluations=config.tune.evaluations,
                                    expected=expected_trials(config), mode=mode)
    outcome = SweepOutcome(rows=rows, objective=objective, mode=mode, experiment_path=path,
                           interrupted=interrupted, parent_run_id=parent)
    if parent:
        finish_tracking(config, outcome)
    folder = Path(output_dir) if output_dir else _local_folder(path)
    outcome.files = write_results(outcome, folder)
    if folder is not None:
        write_trial_metrics(outcome, config, folder)
    return outcome


def write_trial_metrics(outcome: SweepOutcome, config: Config, folder: Path) -> list[Path]:
    """<folder>/<trial id>/metrics.json for every completed or early-stopped trial: its best evaluation
    (dinomaly.results layout); in the sweep's own folder that is Tune's trial folder. An interrupted trial gets
    its file when the resumed sweep ends (its last checkpoint may not have reached storage)."""
    storage_filesystem = storage_for(config.output_root, config.data)[1] or pafs.LocalFileSystem()
    written = []
    for row in outcome.rows:
        if row["status"] not in RANKED or not row["checkpoint"]:
            continue
        try:
            with storage_filesystem.open_input_stream(f"{row['checkpoint']}/{METADATA_FILE}") as handle:
                metadata = json.loads(handle.read())
        except FileNotFoundError:
            logger.warning("trial %s: no checkpoint at %s; no metrics.json for it", row["trial_id"], row["checkpoint"])
            continue
        target = folder / row["trial_id"] / "metrics.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        write_metrics_json(target, trial_record(row, outcome, config.name, metadata))
        written.append(target)
    return written


def _stored_trials(path: str, config: Config) -> dict[str, Any]:
    """Trial id -> Tune Trial as last saved to storage (an interrupt saves RUNNING there, then marks the
    in-memory trials TERMINATED, so only the stored status tells an interrupted trial)."""
    from ray.tune import ExperimentAnalysis

    storage_path, filesystem = storage_for(path, config.data)
    return {t.trial_id: t for t in ExperimentAnalysis(storage_path, storage_filesystem=filesystem).trials}


def _placement_groups() -> set[str]:
    import ray

    return set(ray.util.placement_group_table())


def reap_placement_groups(before: set[str]) -> int:
    """Remove this job's placement groups made during the sweep and still reserved after it; their count.

    When Tune stops a trial (ASHA, an interrupt) its Train controller dies with it, and Ray Train frees the
    workers' placement group only if its cleaner can reach the dashboard's State API; without one (e.g.
    ray.init(include_dashboard=False)) the CPUs stay reserved for the rest of the job. Once fit() returns
    no trial of this job runs, so what is left is such a leak. Placement group ids end in their job id.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    leaked = [pg for pg, info in ray.util.placement_group_table().items()
              if pg not in before and info["state"] == "CREATED" and pg.endswith(job)]
    for pg in leaked:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg))))
    if leaked:
        logger.info("freed %d placement groups of stopped trials (no Ray State API to do it)", len(leaked))
    return len(leaked)


def _local_folder(path: str) -> Path | None:
    from dinomaly.data.storage import split_uri

    scheme, local = split_uri(path)
    return None if scheme else Path(local)
