"""One Tune trial: a driver function that runs a Ray Train run of the trial's config and reports to Tune.

Ray 2.60 pattern (Ray Train V2 no longer accepts Tuner(TorchTrainer)): the Tune trainable is a plain
function that builds and fits a TorchTrainer whose RunConfig carries TuneReportCallback, so every
ray.train.report of rank 0 reaches Tune (ASHA decides on it). The Train run is named after the trial id
under the sweep's storage, so a restored sweep re-runs the function and the Train run resumes from its
latest checkpoint.

The workers run the worker skeleton of training runs (dinomaly.distributed.train.skeleton) with TrialHooks,
on images or on the feature cache (dinomaly.features): they stop at tune.evaluations evenly spaced points,
compute the objective there and report it with a checkpoint (with the per-class threshold table of that
evaluation in its metadata); the Train run keeps the latest checkpoint (to resume) and the one of the best
objective (to register). A loss or gradient norm that is NaN/inf (or above tune.max_loss) fails the trial with
TrialDiverged; Tune records the reason and the sweep goes on. So does a trial whose workers' CPUs/GPUs are
not free within cluster.start_timeout_s (TrialFailed naming what holds them).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

from dinomaly.calibration import METADATA_KEY as CALIBRATION_KEY
from dinomaly.calibration import build_table
from dinomaly.config import Config, apply_overrides
from dinomaly.data.dataset import ManifestDataset, iterate_batches
from dinomaly.distributed.resources import (
    ResourcesUnavailable,
    check_resources,
    is_start_timeout,
    start_timeout_error,
    train_request,
)
from dinomaly.distributed.tracking import NullRunLogger, open_run, run_logger
from dinomaly.distributed.train.batches import ManifestBatches
from dinomaly.distributed.train.evaluation import evaluate_distributed, score_normals
from dinomaly.distributed.train.skeleton import (
    Chunk,
    WorkerJob,
    WorkerRun,
    build_trainer,
    run_worker,
    worker_resources,
)
from dinomaly.distributed.tune.space import SearchSpace
from dinomaly.features import FeatureBatches, FeatureCache
from dinomaly.loop import divergence
from dinomaly.loss import hard_mining_cosine_loss
from dinomaly.model.dinomaly import Dinomaly
from dinomaly.results import json_safe

logger = logging.getLogger(__name__)

Objective = Literal["labelled", "holdout_loss"]
SWEEP_TAG, ROLE_TAG, TRIAL_TAG = "dinomaly.sweep", "dinomaly.role", "dinomaly.trial_id"


class TrialDiverged(RuntimeError):
    """The trial's training loss or gradient norm went NaN/inf or above tune.max_loss."""


class TrialFailed(RuntimeError):
    """A trial's Train run failed; the message is the one-line reason (shown in the ranking)."""


@dataclass
class SweepSpec:
    """What every trial needs, shipped once through tune.with_parameters."""

    config: Config  # the base config (tracking URI absolute)
    objective: Objective
    train_rows: pa.Table  # training images (held-out normals removed for holdout_loss)
    eval_rows: pa.Table | None  # labelled test rows, or the held-out normal rows
    cache_uri: str | None
    train_storage: str  # Train runs live at <train_storage>/<trial_id>
    parent_run_id: str | None


def trial_config(base: Config, params: dict[str, Any], trial_id: str) -> Config:
    """The trial's validated config (ValueError names the bad value); its name is the trial id."""
    overrides = SearchSpace.from_config(base).decode(params)
    return apply_overrides(base, {**overrides, "name": f"{base.name}-{trial_id}"})


def evaluation_steps(total_steps: int, evaluations: int) -> list[int]:
    """The steps at which a trial evaluates: evenly spaced, the last one = total_steps."""
    return sorted({max(1, round(total_steps * k / evaluations)) for k in range(1, evaluations + 1)})


# --------------------------------------------------------------------------- the Tune trainable (driver fn)


def run_trial(params: dict[str, Any], spec: SweepSpec) -> None:
    """The Tune function trainable: build the trial config, open its MLflow child run, fit its Train run."""
    import ray.train
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    config = trial_config(spec.config, params, trial_id)
    run_id = _open_child_run(config, spec, trial_id) if config.tracking.enabled else None
    source = (FeatureBatches(spec.cache_uri, spec.train_rows.column("image_uri").to_pylist(), config)
              if spec.cache_uri else ManifestBatches(spec.train_rows, config))
    resources = worker_resources(config, uses_ray_data=False, cluster_cpus=None)
    job = TrialJob(config=config, source=source, objective=spec.objective, eval_rows=spec.eval_rows,
                   cache_uri=spec.cache_uri, mlflow_run_id=run_id)
    # the latest checkpoint (to resume) and the best-evaluated one (to register): Ray keeps both
    trainer = build_trainer(trial_worker, job, resources, name=trial_id, storage=spec.train_storage,
                            max_failures=0,  # divergence is deterministic: no retry
                            keep_checkpoints=1, keep_best=("objective", objective_mode(spec.objective)),
                            callbacks=[TuneReportCallback()])
    request = train_request(config, resources, what=f"trial {trial_id}")
    try:  # a trial that cannot get its workers in time fails with the reason; the sweep goes on
        check_resources(request, config.cluster.start_timeout_s)
    except ResourcesUnavailable as err:
        raise TrialFailed(str(err)) from None
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as err:
        if is_start_timeout(err):
            raise TrialFailed(str(start_timeout_error(request, config.cluster.start_timeout_s))) from None
        raise TrialFailed(failure_reason(err)) from None


def objective_mode(objective: Objective) -> str:
    """'max' for the labelled objective (metrics), 'min' for holdout_loss."""
    return "max" if objective == "labelled" else "min"


def failure_reason(err: BaseException) -> str:
    """One line: the innermost worker exception's 'Type: message' (Ray wraps it in several tracebacks)."""
    causes = list(getattr(err, "worker_failures", {}).values()) or [err]
    text = str(causes[0]).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if ":" in line and line.split(":", 1)[0].split(".")[-1][:1].isupper() and " " not in line.split(":")[0]:
            return line[:500]
    return (lines[-1] if lines else type(err).__name__)[:500]


def _open_child_run(config: Config, spec: SweepSpec, trial_id: str) -> str:
    """The trial's MLflow run (flattened config as params), nested under the sweep's parent run."""
    from mlflow import MlflowClient

    run_id = open_run(config, config.name)  # re-opened when a restored sweep re-runs an unfinished trial
    client = MlflowClient(config.tracking.tracking_uri)
    tags = {SWEEP_TAG: spec.config.name, ROLE_TAG: "trial", TRIAL_TAG: trial_id}
    if spec.parent_run_id:
        tags["mlflow.parentRunId"] = spec.parent_run_id
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    return run_id


# --------------------------------------------------------------------------- the Train workers


@dataclass
class TrialJob(WorkerJob):
    """The trial's workers: the skeleton's job plus what the objective needs."""

    objective: Objective = "labelled"
    eval_rows: pa.Table | None = None
    cache_uri: str | None = None
    mlflow_run_id: str | None = None


def check_divergence(records: list[dict], max_loss: float) -> None:
    """TrialDiverged at the first step whose loss or gradient norm is not finite, or loss > max_loss (> 0)."""
    for record in records:
        loss = record["loss"]
        if divergence([record]):  # the non-finite rule of plain training runs
            raise TrialDiverged(f"diverged at step {record['step']}: loss {loss}, gradient norm "
                                f"{record['grad_norm']} (lower train.lr or narrow its search range)")
        if max_loss and loss > max_loss:
            raise TrialDiverged(f"diverged at step {record['step']}: loss {loss:.4g} > tune.max_loss={max_loss}")


def trial_worker(loop_config: dict) -> None:
    """The Ray Train per-worker function of a trial (the shared skeleton with TrialHooks)."""
    job: TrialJob = loop_config["job"]
    run_worker(job, TrialHooks(job))


class TrialHooks:
    """Stop every train.log_every steps to catch a divergence early; at each of tune.evaluations evenly spaced
    steps compute the objective and report it, with a checkpoint, to Train and Tune."""

    def __init__(self, job: TrialJob):
        self.job = job
        self.points = evaluation_steps(job.config.train.total_steps, job.config.tune.evaluations)
        self.records: list[dict] = []
        self.tracker = NullRunLogger()

    def start(self, run: WorkerRun) -> None:
        import ray.train

        self.tracker = run_logger(run.config, self.job.mlflow_run_id, run.rank)
        last = run.start.metadata.get("metrics")
        if last:  # an interrupt can fall between this report and Tune seeing it: say it again
            ray.train.report(dict(last, checkpoint_path=run.start.checkpoint_path))

    def next_stop(self, run: WorkerRun) -> int:
        step = run.state.step
        point = next(p for p in self.points if p > step)
        return min(point, step + (run.config.train.log_every or point))

    def at_stop(self, run: WorkerRun, chunk: Chunk) -> None:
        check_divergence(chunk.records, run.config.tune.max_loss)
        self.records += chunk.records
        step = run.state.step
        if step not in self.points:
            return
        self.tracker.log_steps(self.records)
        metrics, thresholds, by_class = _objective(self.job, run.model, run.runner, run.rank, run.world, run.device)
        metrics.update(evaluation=self.points.index(step) + 1, step=step,
                       loss=float(np.mean([r["loss"] for r in self.records])))
        self.tracker.log_steps([{k: v for k, v in metrics.items() if k not in ("evaluation", "loss")}])
        metadata = dict(step=step, run_name=run.config.name, metrics=json_safe(metrics))
        if thresholds:
            metadata["thresholds"] = json_safe(thresholds)
        table = (thresholds or {}).get("calibration")  # the labelled objective's, from the test split's normals
        if table is None and self.job.objective == "holdout_loss" and run.rank == 0:
            table = holdout_table(run.model, self.job, run.device)
        if table:  # the per-class table the service and exports read, registered with the winner
            metadata[CALIBRATION_KEY] = json_safe(table)
        if by_class:  # per-class metrics of this evaluation: the trial's metrics.json when it is the best
            metadata["classes"] = json_safe(by_class)
        run.report(metrics, checkpoint=True, metadata=metadata)
        self.records = []

    def finish(self, run: WorkerRun) -> None:
        return None


def _objective(job: TrialJob, model: Dinomaly, runner: torch.nn.Module, rank: int, world: int,
               device: torch.device) -> tuple[dict[str, float], dict | None, dict | None]:
    """({objective, per-metric means or holdout_loss}, thresholds, {class: metrics, 'mean': ...}); rank 0
    computes them (the labelled objective only has thresholds and per-class metrics)."""
    tune = job.config.tune
    if job.objective == "labelled":
        # no held-back images in a trial: the per-class table comes from the test split's normals (marked
        # 'test-normals'), so the registered champion decides per class until calibrate.py replaces it
        evaluation = evaluate_distributed(model, job.eval_rows, job.config, rank, world, device,
                                          calibration_table=job.eval_rows.slice(0, 0))
        if evaluation is None:  # ranks > 0: rank 0 reports
            return {"objective": float("nan")}, None, None
        values = [evaluation.mean.get(name, float("nan")) for name in tune.metrics]
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            raise TrialFailed(f"objective metrics {tune.metrics} are all NaN on the test split (no defective "
                              "images or masks?); pick others in tune.metrics or use tune.objective=holdout_loss")
        metrics = {f"mean_{name}": float(v) for name, v in zip(tune.metrics, values)}
        return dict(metrics, objective=float(np.mean(finite))), evaluation.thresholds, evaluation.by_class()
    if rank > 0:
        return {"objective": float("nan")}, None, None
    loss = holdout_loss(runner, job, device)
    return {"objective": loss, "holdout_loss": loss}, None, None


def holdout_table(model: Dinomaly, job: TrialJob, device: torch.device) -> dict | None:
    """The per-class threshold table (as a dict) at eval.target_fpr from the held-out normal images, which the
    trial never trains on: calibration data. None when none of them could be scored."""
    rows = job.eval_rows
    scores = score_normals(model, rows, sorted(set(rows.column("category").to_pylist())), job.config, device)
    try:
        return build_table(scores, job.config.eval.target_fpr, "calibration", seed=job.config.train.seed).to_dict()
    except ValueError:
        return None


@torch.no_grad()
def holdout_loss(runner: torch.nn.Module, job: TrialJob, device: torch.device) -> float:
    """Mean global cosine reconstruction loss (eval mode, the trial's own fuse_groups) on held-out normals."""
    config, rows = job.config, job.eval_rows
    runner.eval()
    total, count = 0.0, 0
    if job.cache_uri:
        cache = FeatureCache.open(job.cache_uri, config.data)
        indices = cache.indices_of(rows.column("image_uri").to_pylist())
        batches = (cache.features(indices[i:i + config.eval.batch_size])
                   for i in range(0, len(indices), config.eval.batch_size))
    else:
        dataset = ManifestDataset(rows, config.model, with_masks=False, data_config=config.data)
        batches = (batch.images for batch in iterate_batches(dataset, config.eval.batch_size))
    for inputs in batches:
        enc, dec = runner(inputs.to(device))
        total += float(hard_mining_cosine_loss(enc, dec, p=0.0)) * inputs.shape[0]
        count += inputs.shape[0]
    return total / count
