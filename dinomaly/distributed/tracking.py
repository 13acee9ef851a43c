"""MLflow tracking of a training run: the driver opens the run, rank 0 of the workers logs into it.

The driver resolves the tracking URI to an absolute one (Ray workers run in a session folder, so a
relative `sqlite:///mlflow.db` would land there), creates the experiment with an explicit artifact
location, and opens (or, for a resumed Ray run of the same name, re-opens) the MLflow run; the workers
get its id. Only rank 0 logs (`run_logger` hands every other rank a no-op), through `MlflowClient`
calls on that run id, so no fluent global state crosses processes; the driver logs the count of unreadable
training files into the same run through the same logger.

Logged: the flattened config and git commit as params; loss, lr, p, grad_norm, images/s and the data-wait
fraction per log step; per-class and mean metrics per evaluation (`test/<class>/<metric>`); artifacts
config.yaml, per_class.csv, per_class.md, heatmaps.png, checkpoint/; and a Model Registry version whose
source is the logged checkpoint directory, tagged with the mean metrics and the thresholds (with
train.keep_best also best_checkpoint/ and its own version, tagged checkpoint=best).
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from dinomaly.config import Config, TrackingConfig, flatten, to_dict
from dinomaly.results import json_safe
from dinomaly.tables import format_csv, format_markdown

logger = logging.getLogger(__name__)

RUN_NAME_TAG = "dinomaly.run_name"  # the Ray run name: a resumed Ray run re-opens the MLflow run with it
_PARAM_VALUE_LIMIT = 6000  # MLflow's maximum param value length


def resolve_tracking_uri(tracking: TrackingConfig, cwd: str | Path | None = None) -> str:
    """tracking.tracking_uri, else MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db; sqlite paths made absolute."""
    uri = tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "") or "sqlite:///mlflow.db"
    base = Path(cwd) if cwd is not None else Path.cwd()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(base / uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:
        raise ValueError(f"tracking URI {uri!r} has no scheme; use sqlite:///<path>/mlflow.db or http://host:port "
                         "(the file store is disabled in MLflow 3)")
    return uri


def default_artifact_location(tracking_uri: str) -> str | None:
    """file://<folder of the sqlite db>/mlartifacts for a local store; None (the server decides) otherwise."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def git_commit(repo: str | Path | None = None) -> str:
    """HEAD of the repository holding this package ('+dirty' if modified); 'unknown' outside a checkout."""
    where = str(repo or Path(__file__).resolve().parents[2])
    try:
        sha = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"  # e.g. under `ray job submit`, which ships the working dir without .git
    return sha + ("+dirty" if dirty else "")


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _experiment_id(client, tracking: TrackingConfig, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(tracking.experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    location = default_artifact_location(tracking_uri)
    return client.create_experiment(tracking.experiment_name, artifact_location=location)


def open_run(config: Config, run_name: str, reopen: bool = True) -> str:
    """On the driver: the id of the MLflow run for Ray run `run_name`, created or (when unfinished and `reopen`:
    the Ray run resumes) re-opened.

    A new run gets the flattened config, the git commit and the tracking URI as params and tags.
    config.tracking.tracking_uri must already be resolved (resolve_tracking_uri).
    """
    from mlflow.entities import Param, RunStatus

    client = _client(config.tracking.tracking_uri)
    experiment_id = _experiment_id(client, config.tracking, config.tracking.tracking_uri)
    previous = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
    if reopen and previous and previous[0].info.status != RunStatus.to_string(RunStatus.FINISHED):
        run_id = previous[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        logger.info("re-opened MLflow run %s for resumed run %s", run_id, run_name)
        return run_id
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name})
    params = {key: str(value)[:_PARAM_VALUE_LIMIT] for key, value in flatten(config).items()}
    params["git_commit"] = git_commit()
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    return run.info.run_id


def close_run(tracking_uri: str, run_id: str, succeeded: bool = True, status: str | None = None) -> None:
    """On the driver, after fit: FINISHED / FAILED by `succeeded`, or an explicit status (KILLED = stopped early).

    Every status but FINISHED lets open_run re-open the run when the Ray run resumes.
    """
    _client(tracking_uri).set_terminated(run_id, status=status or ("FINISHED" if succeeded else "FAILED"))


class NullRunLogger:
    """What every rank but 0 (and every rank when tracking is off) gets: all calls do nothing."""

    run_id: str | None = None

    def log_steps(self, records: list[dict[str, float]]) -> None:
        pass

    def log_evaluation(self, step: int, results: dict[str, dict[str, float]]) -> None:
        pass

    def log_data_errors(self, errors: dict) -> None:
        pass

    def log_final(self, config: Config, rows: list[dict], heatmaps, checkpoint_dir: str | Path,
                  tags: dict[str, Any]) -> str | None:
        return None

    def log_checkpoint(self, checkpoint_dir: str | Path, artifact_path: str, tags: dict[str, Any]) -> str | None:
        return None


class RunLogger(NullRunLogger):
    """Logs into an open MLflow run from a Ray Train worker (rank 0)."""

    def __init__(self, tracking_uri: str, run_id: str, registered_model_name: str):
        self.client = _client(tracking_uri)
        self.run_id = run_id
        self.registered_model_name = registered_model_name

    def log_steps(self, records: list[dict[str, float]]) -> None:
        """One metric point per key per record; records carry `step` (the 1-based optimiser step)."""
        from mlflow.entities import Metric

        now = _now_ms()
        metrics = [Metric(key, float(value), now, int(record["step"]))
                   for record in records for key, value in record.items() if key != "step"]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def log_evaluation(self, step: int, results: dict[str, dict[str, float]]) -> None:
        """results: {class or 'mean': {metric: value}} -> metrics test/<class>/<metric> at `step`."""
        self.log_steps([{"step": step, **{f"test/{name}/{k}": v for k, v in metrics.items()}}
                        for name, metrics in results.items()])

    def log_data_errors(self, errors: dict) -> None:
        """The count of unreadable training files as metric data_errors, and the listing as data_errors.json."""
        self.client.log_metric(self.run_id, "data_errors", errors["data_errors"])
        self.client.log_dict(self.run_id, json_safe(errors), "data_errors.json")

    def log_final(self, config: Config, rows: list[dict], heatmaps, checkpoint_dir: str | Path,
                  tags: dict[str, Any]) -> str | None:
        """Artifacts (config, per-class tables, heatmap grid, checkpoint) and the registry version; its number."""
        client, run_id = self.client, self.run_id
        client.log_text(run_id, yaml.safe_dump(to_dict(config), sort_keys=False), "config.yaml")
        client.log_text(run_id, format_csv(rows), "per_class.csv")
        client.log_text(run_id, format_markdown(rows) + "\n", "per_class.md")
        if heatmaps is not None:
            with tempfile.TemporaryDirectory() as tmp:
                heatmaps.save(Path(tmp) / "heatmaps.png")
                client.log_artifact(run_id, str(Path(tmp) / "heatmaps.png"))
        client.set_tag(run_id, "checkpoint_artifact", "checkpoint")
        return self.log_checkpoint(checkpoint_dir, "checkpoint", tags)

    def log_checkpoint(self, checkpoint_dir: str | Path, artifact_path: str, tags: dict[str, Any]) -> str | None:
        """The checkpoint folder as artifact `artifact_path`, registered from there (when a model name is set)."""
        self.client.log_artifacts(self.run_id, str(checkpoint_dir), artifact_path)
        if not self.registered_model_name:
            return None
        return self._register(tags, artifact_path)

    def _register(self, tags: dict[str, Any], artifact_path: str = "checkpoint") -> str:
        from mlflow.exceptions import MlflowException

        name = self.registered_model_name
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(
                name, description="Dinomaly anomaly detector; the version source is a dinomaly checkpoint "
                                  "directory (load with dinomaly.checkpoint.load)")
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
        version = self.client.create_model_version(name, source=source, run_id=self.run_id,
                                                   tags={k: str(v) for k, v in tags.items()})
        logger.info("registered %s version %s from %s", name, version.version, source)
        return version.version


def register_checkpoint(config: Config, run_name: str, checkpoint_dir: str | Path, tags: dict[str, Any]
                        ) -> tuple[str, str]:
    """On the driver: a new MLflow run holding `checkpoint_dir` as its checkpoint artifact, and a new registry
    version of tracking.registered_model_name from it (a model recalibrated without retraining); (run id,
    version). config.tracking.tracking_uri must already be resolved."""
    run_id = open_run(config, run_name)
    logger_ = RunLogger(config.tracking.tracking_uri, run_id, config.tracking.registered_model_name)
    try:
        logger_.client.log_artifacts(run_id, str(checkpoint_dir), "checkpoint")
        logger_.client.set_tag(run_id, "checkpoint_artifact", "checkpoint")
        version = logger_._register(tags)
    except BaseException:
        close_run(config.tracking.tracking_uri, run_id, succeeded=False)
        raise
    close_run(config.tracking.tracking_uri, run_id)
    return run_id, version


def run_logger(config: Config, run_id: str | None, rank: int) -> NullRunLogger:
    """A RunLogger on rank 0 when tracking is on and a run is open; a NullRunLogger elsewhere."""
    if rank != 0 or not config.tracking.enabled or not run_id:
        return NullRunLogger()
    return RunLogger(config.tracking.tracking_uri, run_id, config.tracking.registered_model_name)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
