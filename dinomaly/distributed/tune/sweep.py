"""Hyper-parameter search on Ray Tune: many Ray Train runs of one config, ranked, tracked and registered.

    outcome = run_sweep(config)                 # Ray initialised; config.tune says what to search
    outcome = run_sweep(config, resume=True)    # finish an interrupted sweep (finished trials are kept)

Driver steps: check the search space against the config (before any Ray work) -> training / evaluation
rows and the objective -> the encoder-feature cache (a Ray task, once per dataset + encoder) -> the MLflow
parent run -> Tuner.fit (or Tuner.restore) over dinomaly.distributed.tune.trial.run_trial with ASHA on the
objective -> the ranking of every trial (tune_results.csv / .json, the parent run's table) -> the best
trial's checkpoint registered, and aliased (tune.champion_alias) when it beats the current holder.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from dinomaly.config import Config, apply_overrides, flatten, parse_search_spec
from dinomaly.distributed.cluster import storage_for
from dinomaly.distributed.resources import Request, amounts, check_resources
from dinomaly.distributed.train.run import load_tables
from dinomaly.distributed.tune.tracking import finish_tracking, open_parent_run
from dinomaly.distributed.tune.trial import SweepSpec, run_trial
from dinomaly.metrics import METRIC_NAMES

logger = logging.getLogger(__name__)

RESULT_FILES = ("tune_results.csv", "tune_results.json")
STATUS_ORDER = {"completed": 0, "early_stopped": 1, "interrupted": 2, "pending": 3, "failed": 4}


@dataclass
class SweepOutcome:
    """The ranked trials (best first) and what happened to the best one."""

    rows: list[dict[str, Any]]
    objective: str  # 'labelled' or 'holdout_loss'
    mode: str  # 'max' or 'min'
    experiment_path: str
    interrupted: bool = False
    parent_run_id: str | None = None
    registered_version: str | None = None
    champion: bool = False
    files: list[Path] = field(default_factory=list)

    @property
    def best(self) -> dict[str, Any] | None:
        return self.rows[0] if self.rows and self.rows[0]["status"] in ("completed", "early_stopped") else None


# --------------------------------------------------------------------------- the search space


def check_search_space(config: Config) -> None:
    """Every key must be a config path, and each of its values (range ends, choices) a valid config alone.

    Keys that only make sense together (decoder_depth with target_layers and fuse_groups) go in one mapping
    value: model: choice({decoder_depth: 4, target_layers: [6, 7, 8, 9], fuse_groups: [[0, 1], [2, 3]]}).
    """
    from dinomaly.distributed.tune.trial import decode_params

    tc = config.tune
    if tc.search_algorithm == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError as err:
            raise ValueError("tune.search_algorithm='optuna' needs the optuna package (pip install optuna); "
                             "or use random / grid") from err
    bad_metrics = [m for m in tc.metrics if m not in METRIC_NAMES]
    if bad_metrics:
        raise ValueError(f"tune.metrics has {bad_metrics}; choose from {list(METRIC_NAMES)}")
    keys = set(flatten(config)) | {f.name for f in dataclasses.fields(config) if dataclasses.is_dataclass(
        getattr(config, f.name))}
    for key, spec in tc.search_space.items():
        if key not in keys:
            last = key.split(".")[-1]
            close = [k for k in sorted(keys) if k.split(".")[-1].endswith(last)] or difflib.get_close_matches(
                key, sorted(keys), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"tune.search_space key {key!r} is not a config key{hint} (pipelines/tune.py --help "
                             "lists them; a section name such as 'model' takes a mapping of its keys)")
        kind, args = parse_search_spec(key, spec)
        if kind == "grid" and tc.search_algorithm == "optuna":
            raise ValueError(f"tune.search_space[{key!r}] uses grid(); Optuna samples, use choice() instead")
        values = [json.dumps(a) for a in args] if kind in ("choice", "grid") else args
        for value in values:
            try:
                apply_overrides(config, decode_params({key: value}, tc.search_space))
            except ValueError as err:
                raise ValueError(f"tune.search_space[{key!r}]={spec!r}: the value {value} is not valid on its own "
                                 f"({err}); put linked keys in one mapping, e.g. model: choice({{decoder_depth: "
                                 f"4, target_layers: [6, 7, 8, 9], fuse_groups: [[0, 1], [2, 3]]}})") from err


def tune_param_space(config: Config) -> dict[str, Any]:
    """tune.search_space -> Tune domains; choice()/grid() values go as JSON text (decoded in the trial)."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, spec in config.tune.search_space.items():
        kind, args = parse_search_spec(key, spec)
        if kind == "constant":
            space[key] = args[0]
        elif kind == "grid" or (kind == "choice" and config.tune.search_algorithm == "grid"):
            space[key] = tune.grid_search([json.dumps(a) for a in args])
        elif kind == "choice":
            space[key] = tune.choice([json.dumps(a) for a in args])
        else:
            space[key] = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind](*args)
    return space


def expected_trials(config: Config) -> int:
    """Trials the sweep will have: num_samples times the grid's size."""
    size = 1
    for key, spec in config.tune.search_space.items():
        kind, args = parse_search_spec(key, spec)
        if kind == "grid" or (kind == "choice" and config.tune.search_algorithm == "grid"):
            size *= len(args)
    return config.tune.num_samples * size


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
    root = config.tune.cache_root or f"{config.output_root.rstrip('/')}/feature_cache"
    device = "cuda" if config.train.use_gpu else "cpu"
    needs = {"CPU": config.train.cpus_per_worker or 1.0, "GPU": 1.0 if config.train.use_gpu else 0.0}
    check_resources(Request(what=f"the feature cache of sweep '{config.name}'", bundles=(needs,),
                            label=f"1 task x {amounts(needs)}", fix="lower train.cpus_per_worker or set "
                            "tune.feature_cache=false"), config.cluster.start_timeout_s)
    task = ray.remote(num_cpus=needs["CPU"], num_gpus=needs["GPU"])(build_feature_cache)
    return ray.get(task.remote(rows, config, root, config.eval.batch_size, device))


# --------------------------------------------------------------------------- running


def _tuner(config: Config, spec: SweepSpec, mode: str, callbacks: list):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    tc = config.tune
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), {"cpu": tc.driver_cpus})
    scheduler = (ASHAScheduler(time_attr="evaluation", max_t=tc.evaluations, grace_period=tc.grace_period,
                               reduction_factor=tc.reduction_factor) if tc.scheduler == "asha" else FIFOScheduler())
    search_alg = None
    if tc.search_algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=config.train.seed)
    storage_path, filesystem = storage_for(config.output_root, config.data)
    return tune.Tuner(
        trainable, param_space=tune_param_space(config),
        tune_config=tune.TuneConfig(metric="objective", mode=mode, num_samples=tc.num_samples, search_alg=search_alg,
                                    scheduler=scheduler, max_concurrent_trials=max_concurrent(config),
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=config.name, storage_path=storage_path, storage_filesystem=filesystem,
                                  failure_config=tune.FailureConfig(max_failures=0), callbacks=callbacks))


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


def run_sweep(config: Config, *, resume: bool = False, output_dir: str | Path | None = None,
              callbacks: list | None = None) -> SweepOutcome:
    """Run (or with resume=True finish) the sweep described by config.tune; Ray must be initialised.

    output_dir: where tune_results.csv/.json go (None = the sweep folder when it is local). callbacks: extra
    ray.tune.Callback objects. Failed trials do not raise: they are ranked last with their reason (a trial
    whose workers do not get their CPUs/GPUs within cluster.start_timeout_s is one). ResourcesUnavailable
    when not even a trial's driver (tune.driver_cpus) or the feature-cache task can be placed in that time.
    """
    from ray import tune

    check_search_space(config)
    path = experiment_path(config)
    storage_path, filesystem = storage_for(path, config.data)
    exists = tune.Tuner.can_restore(storage_path, storage_filesystem=filesystem)
    if resume and not exists:
        raise FileNotFoundError(f"no sweep to resume at {path}; run without --resume to start it")
    if exists and not resume:
        raise ValueError(f"a sweep named {config.name!r} already exists at {path}; pass --resume to finish it, or "
                         "start a new one with --set name=<new name>")
    objective, train_rows, eval_rows = sweep_inputs(config)
    mode = "max" if objective == "labelled" else "min"
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
    rows, interrupted = rank_trials(grid, config, mode)
    outcome = SweepOutcome(rows=rows, objective=objective, mode=mode, experiment_path=path,
                           interrupted=interrupted, parent_run_id=parent)
    if parent:
        finish_tracking(config, outcome)
    outcome.files = write_results(outcome, Path(output_dir) if output_dir else _local_folder(path))
    return outcome


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


# --------------------------------------------------------------------------- ranking and results


def _status(trial, result, evaluations: int) -> str:
    if result.error is not None or trial.status == "ERROR":
        return "failed"
    if trial.status in ("RUNNING", "PENDING", "PAUSED"):  # loaded from storage, RUNNING reads back as PENDING
        return "interrupted" if result.metrics else "pending"
    if not result.metrics:
        return "pending"
    if result.metrics.get("evaluation", 0) >= evaluations:
        return "completed"
    return "early_stopped"  # TERMINATED before its last evaluation: the scheduler stopped it


def _reason(error: BaseException | None) -> str:
    if error is None:
        return ""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    marked = [line for line in lines if line.startswith(("TrialFailed", "TrialDiverged", "ValueError",
                                                         "ResourcesUnavailable"))
              or "TrialFailed:" in line or "TrialDiverged:" in line or "ResourcesUnavailable:" in line]
    return (marked[-1] if marked else lines[-1] if lines else type(error).__name__)[:500]


def rank_trials(grid, config: Config, mode: str) -> tuple[list[dict[str, Any]], bool]:
    """Rows for every trial, best first (completed, then early stopped, by objective), and whether the
    sweep stopped before every trial finished (an interrupt)."""
    from ray.tune import ExperimentAnalysis

    # statuses as last saved to storage: an interrupt saves RUNNING there, then marks in-memory trials TERMINATED
    storage_path, filesystem = storage_for(experiment_path(config), config.data)
    trials = {t.trial_id: t for t in ExperimentAnalysis(storage_path, storage_filesystem=filesystem).trials}
    unfinished = any(t.status not in ("TERMINATED", "ERROR") for t in trials.values())
    interrupted = unfinished or len(trials) < expected_trials(config)
    rows = []
    for result in grid:
        trial_id = Path(result.path).name
        metrics = result.metrics or {}
        row = dict(trial_id=trial_id, status=_status(trials[trial_id], result, config.tune.evaluations),
                   objective=metrics.get("objective"), evaluations=metrics.get("evaluation", 0),
                   step=metrics.get("step", 0))
        row.update({k: v for k, v in metrics.items() if k.startswith("mean_") or k == "holdout_loss"})
        row.update({f"config/{k}": v for k, v in (result.config or {}).items()})
        row.update(error=_reason(result.error), checkpoint=metrics.get("checkpoint_path", ""))
        rows.append(row)
    sign = -1 if mode == "max" else 1

    def key(row):
        value = row["objective"]
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        return STATUS_ORDER[row["status"]], 0 if finite else 1, sign * value if finite else 0.0, row["trial_id"]

    rows.sort(key=key)
    for number, row in enumerate(rows, start=1):
        row["rank"] = number
    return [dict(rank=r.pop("rank"), **r) for r in rows], interrupted


def ranking_csv(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def format_ranking(outcome: SweepOutcome, digits: int = 4) -> str:
    """A fixed-width table: rank, trial, status, objective, evaluations, sampled values, reason."""
    if not outcome.rows:
        return "no trials"
    params = [k for k in outcome.rows[0] if k.startswith("config/")]
    header = ["rank", "trial", "status", f"objective ({outcome.mode})", "evals", *(p[7:] for p in params), "error"]
    lines = [header]
    for row in outcome.rows:
        value = row["objective"]
        shown = f"{value:.{digits}f}" if isinstance(value, float) and math.isfinite(value) else "-"
        cells = [str(row["rank"]), row["trial_id"], row["status"], shown, str(row["evaluations"])]
        cells += [_short(row.get(p)) for p in params] + [row["error"][:80]]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_results(outcome: SweepOutcome, folder: Path | None) -> list[Path]:
    """tune_results.csv and tune_results.json (summary + rows) in `folder`; [] when there is none."""
    if folder is None:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = (folder / name for name in RESULT_FILES)
    csv_path.write_text(ranking_csv(outcome.rows))
    json_path.write_text(json.dumps(summary(outcome), indent=1, default=str) + "\n")
    return [csv_path, json_path]


def summary(outcome: SweepOutcome) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for row in outcome.rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return dict(objective=outcome.objective, mode=outcome.mode, experiment_path=outcome.experiment_path,
                interrupted=outcome.interrupted, counts=counts, best=outcome.best, trials=outcome.rows,
                parent_run_id=outcome.parent_run_id)


def report_lines(outcome: SweepOutcome, config: Config) -> list[str]:
    """The closing summary: the best trial (config, metrics, checkpoint), the files, MLflow; or why none."""
    lines = [f"results: {', '.join(str(p) for p in outcome.files) or '(no local folder; see MLflow)'}"]
    if outcome.parent_run_id:
        lines.append(f"MLflow: parent run {outcome.parent_run_id} in experiment {config.tracking.experiment_name!r} "
                     f"at {config.tracking.tracking_uri}")
    if outcome.interrupted:
        lines.append(f"sweep interrupted before every trial finished; finish it with --resume (same --config/--set): "
                     f"{outcome.experiment_path}")
    best = outcome.best
    if best is None:
        failed = [row for row in outcome.rows if row["status"] == "failed"]
        lines.append(f"no trial succeeded: {len(failed)} of {len(outcome.rows)} trials failed")
        lines += [f"  {row['trial_id']}: {row['error'] or 'no reason recorded'}" for row in failed]
        return lines
    values = {k[7:]: v for k, v in best.items() if k.startswith("config/")}
    measured = {k: v for k, v in best.items() if k.startswith("mean_") or k == "holdout_loss"}
    lines += [f"best trial {best['trial_id']} ({best['status']}): objective {best['objective']:.4f} "
              f"({outcome.objective}, {outcome.mode})", f"  config: {values}", f"  metrics: {measured}",
              f"  checkpoint: {best['checkpoint']}"]
    if outcome.registered_version:
        alias = config.tune.champion_alias
        state = f"now @{alias}" if outcome.champion else f"@{alias} kept on the previous version"
        lines.append(f"  registered {config.tracking.registered_model_name} version {outcome.registered_version} "
                     f"({state})")
    return lines
