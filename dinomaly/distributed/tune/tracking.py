"""MLflow for a sweep: the parent run, the closing of every trial's child run, the best model in the registry.

Parent run (tags dinomaly.sweep=<name>, dinomaly.role=sweep): the search space (params space.<key> and
search_space.json), the tune.* settings and the objective; at the end the ranking (tune_results.csv /
.json / .md artifacts) and best_objective / trials_<status> metrics. Child runs (one per trial, opened by
the trial itself, dinomaly.role=trial, nested with mlflow.parentRunId) get their final status here:
FINISHED for completed and early-stopped trials, FAILED (with the reason in tag tune.error) for failed
ones, KILLED for trials an interrupt left unfinished (a resumed sweep re-opens them).

The best trial's best-evaluated checkpoint (the one its objective was measured on, see tune/ranking.py) is
logged to its child run and registered as a new version of tracking.registered_model_name, tagged with that
objective (value, name, mode, data) and its step, and with the per-class threshold table of that evaluation
(tag "calibration": with holdout_loss from the held-out normal images, never trained on; with the labelled
objective from the test split's normals, marked 'test-normals', until pipelines/calibrate.py replaces it). The alias
tune.champion_alias moves to it only when it beats the objective stored on the current holder; a holder
scored by another objective or on other data is never replaced automatically.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path

from dinomaly.calibration import METADATA_KEY as CALIBRATION_KEY
from dinomaly.checkpoint import METADATA_FILE
from dinomaly.config import Config, flatten
from dinomaly.distributed.tracking import default_artifact_location, git_commit
from dinomaly.distributed.tune.ranking import SweepOutcome, format_ranking, ranking_csv, summary
from dinomaly.distributed.tune.trial import ROLE_TAG, SWEEP_TAG, TRIAL_TAG

logger = logging.getLogger(__name__)

RUN_STATUS = {"completed": "FINISHED", "early_stopped": "FINISHED", "failed": "FAILED", "interrupted": "KILLED",
              "pending": "KILLED"}


def _client(config: Config):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=config.tracking.tracking_uri, registry_uri=config.tracking.tracking_uri)


def _experiment_id(client, config: Config) -> str:
    experiment = client.get_experiment_by_name(config.tracking.experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    location = default_artifact_location(config.tracking.tracking_uri)
    return client.create_experiment(config.tracking.experiment_name, artifact_location=location)


def open_parent_run(config: Config, objective: str) -> str:
    """The sweep's parent run, created with the search space and tune settings, or re-opened on resume."""
    from mlflow.entities import Param

    client = _client(config)
    experiment_id = _experiment_id(client, config)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{config.name}' and "
                               f"tags.`{ROLE_TAG}` = 'sweep'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=config.name, tags={SWEEP_TAG: config.name, ROLE_TAG: "sweep"})
    params = {f"space.{k}": str(v) for k, v in config.tune.search_space.items()}
    params.update({k: str(v) for k, v in flatten(config).items()
                   if k.startswith(("tune.", "train.", "data.")) and k != "tune.search_space"})
    params.update(objective=objective, git_commit=git_commit())
    client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
    client.log_text(run.info.run_id, json.dumps(config.tune.search_space, indent=1), "search_space.json")
    return run.info.run_id


def objective_name(config: Config, objective: str) -> str:
    """What the objective measures, so values are only ever compared with values of the same kind."""
    if objective == "labelled":
        return f"mean({'+'.join(config.tune.metrics)}) on the test split"
    return "holdout_loss (held-out normal training images)"


def finish_tracking(config: Config, outcome: SweepOutcome) -> None:
    """Close the child runs, log the ranking to the parent run and register the best trial's model.

    Adds mlflow_run_id to each ranking row and sets outcome.registered_version / outcome.champion.
    """
    client = _client(config)
    children = client.search_runs([_experiment_id(client, config)], filter_string=(
        f"tags.`{SWEEP_TAG}` = '{config.name}' and tags.`{ROLE_TAG}` = 'trial'"))
    runs = {run.data.tags.get(TRIAL_TAG): run.info.run_id for run in children}
    for row in outcome.rows:
        row["mlflow_run_id"] = runs.get(row["trial_id"], "")
        if row["mlflow_run_id"]:
            client.set_tag(row["mlflow_run_id"], "tune.status", row["status"])
            if row["error"]:
                client.set_tag(row["mlflow_run_id"], "tune.error", row["error"])
            client.set_terminated(row["mlflow_run_id"], status=RUN_STATUS[row["status"]])
    best = outcome.best
    if best is not None and not outcome.interrupted and config.tracking.registered_model_name:
        outcome.registered_version, outcome.champion = register_best(config, outcome, client)
    parent = outcome.parent_run_id
    client.log_text(parent, ranking_csv(outcome.rows), "tune_results.csv")
    client.log_text(parent, json.dumps(summary(outcome), indent=1, default=str), "tune_results.json")
    client.log_text(parent, format_ranking(outcome) + "\n", "tune_results.txt")
    counts = summary(outcome)["counts"]
    metrics = {f"trials_{status}": float(counts.get(status, 0)) for status in RUN_STATUS}
    if best is not None and isinstance(best["objective"], float) and math.isfinite(best["objective"]):
        metrics["best_objective"] = best["objective"]
        client.set_tag(parent, "best_trial", best["trial_id"])
        client.set_tag(parent, "best_run_id", best.get("mlflow_run_id", ""))
    for key, value in metrics.items():
        client.log_metric(parent, key, value)
    client.set_terminated(parent, status="KILLED" if outcome.interrupted else "FINISHED")


def _download_checkpoint(config: Config, checkpoint_path: str, folder: str) -> None:
    from ray.train import Checkpoint

    from dinomaly.distributed.cluster import storage_for

    filesystem = storage_for(config.output_root, config.data)[1]
    Checkpoint(path=checkpoint_path, filesystem=filesystem).to_directory(folder)


def register_best(config: Config, outcome: SweepOutcome, client) -> tuple[str, bool]:
    """Log the best trial's best-evaluated checkpoint to its run, register it with that evaluation's objective;
    (version, whether it became the champion)."""
    from mlflow.exceptions import MlflowException

    best, name, alias = outcome.best, config.tracking.registered_model_name, config.tune.champion_alias
    run_id = best["mlflow_run_id"]
    if (known := _registered_before(client, name, run_id, best)) is not None:  # a --resume of a finished sweep
        logger.info("%s version %s already holds trial %s's checkpoint of step %s", name, known, best["trial_id"],
                    best["best_step"])
        return known, _holds_alias(client, name, alias, known)
    with tempfile.TemporaryDirectory() as tmp:
        _download_checkpoint(config, best["checkpoint"], tmp)
        client.log_artifacts(run_id, tmp, "checkpoint")
        metadata_path = Path(tmp) / METADATA_FILE
        table = json.loads(metadata_path.read_text()).get(CALIBRATION_KEY) if metadata_path.is_file() else None
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Dinomaly anomaly detector; the version source is a "
                                                         "dinomaly checkpoint directory (dinomaly.checkpoint.load)")
    tags = dict(objective=repr(best["objective"]), objective_name=objective_name(config, outcome.objective),
                objective_mode=outcome.mode, objective_data=config.data.root, sweep=config.name,
                trial_id=best["trial_id"], step=str(best["best_step"]), steps_trained=str(best["steps"]),
                **{k: repr(v) for k, v in best.items() if k.startswith("mean_")})
    if table:  # the evaluation's per-class thresholds, as a training run's version carries them
        tags[CALIBRATION_KEY] = json.dumps(table)
    source = f"{client.get_run(run_id).info.artifact_uri}/checkpoint"
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags).version
    logger.info("registered %s version %s (trial %s, objective %.4f)", name, version, best["trial_id"],
                best["objective"])
    if not alias:
        return str(version), False
    beats, why = _beats_holder(client, name, alias, tags, best["objective"])
    logger.info("%s@%s: %s", name, alias, why)
    if beats:
        client.set_registered_model_alias(name, alias, version)
    return str(version), beats


def _registered_before(client, name: str, run_id: str, best: dict) -> str | None:
    """The version of `name` already registered from this trial's run and checkpoint step, if any."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:  # no such model yet
        return None
    same = [v for v in versions if v.tags.get("trial_id") == best["trial_id"]
            and v.tags.get("step") == str(best["best_step"])]
    return str(max(int(v.version) for v in same)) if same else None


def _holds_alias(client, name: str, alias: str, version: str) -> bool:
    from mlflow.exceptions import MlflowException

    if not alias:
        return False
    try:
        return str(client.get_model_version_by_alias(name, alias).version) == version
    except MlflowException:
        return False


def _beats_holder(client, name: str, alias: str, tags: dict, value: float) -> tuple[bool, str]:
    """(whether `value` should take the alias, why): no holder, or a better objective of the same kind."""
    from mlflow.exceptions import MlflowException

    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return True, "no current holder"
    held = holder.tags
    same = all(held.get(k) == tags[k] for k in ("objective_name", "objective_mode", "objective_data"))
    if not same:
        return False, (f"kept version {holder.version}: it was scored by {held.get('objective_name', 'no objective')} "
                       f"on {held.get('objective_data', '?')}, not comparable; move the alias by hand if wanted")
    current = float(held["objective"])
    better = value > current if tags["objective_mode"] == "max" else value < current
    verdict = "moved" if better else "kept"
    return better, f"{verdict}: new objective {value:.4f} vs version {holder.version}'s {current:.4f}"
