"""The training run's hooks on the shared worker skeleton (dinomaly.distributed.train.skeleton).

The loop stops at every log, evaluation and checkpoint step (the first chunk is one step, for an early
progress line). There every rank reports (a barrier); evaluation is split over the ranks by class; rank 0
logs to MLflow, feeds the driver's progress queue and attaches the checkpoint (dinomaly.checkpoint.save
output). At the last step rank 0 also logs the final artifacts and registers the model version; with
train.keep_best it also keeps and registers the best-evaluated checkpoint (dinomaly.distributed.train.best).
A stop whose steps or weights went non-finite ends the run there, on every rank, before any of that: the
workers return normally (raising would make Ray Train restart the run from its latest checkpoint, to diverge
again) and rank 0's WorkerLog says why, for the driver to fail the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch.distributed as dist

from dinomaly.calibration import METADATA_KEY as CALIBRATION_KEY
from dinomaly.calibration import ThresholdTable
from dinomaly.config import Config
from dinomaly.distributed.tracking import NullRunLogger, git_commit, run_logger
from dinomaly.distributed.train.best import BEST_FOLDER, BestCheckpoint, BestKeeper, best_version_tags
from dinomaly.distributed.train.best import METADATA_KEY as BEST_KEY
from dinomaly.distributed.train.evaluation import Evaluation, evaluate_distributed, heatmap_grid
from dinomaly.distributed.train.skeleton import Chunk, WorkerJob, WorkerRun, agreed_divergence, run_worker
from dinomaly.loop import diverged_message
from dinomaly.model.dinomaly import Dinomaly
from dinomaly.results import json_safe


@dataclass
class TrainJob(WorkerJob):
    """A training run's workers: the skeleton's job plus evaluation data, MLflow run and driver channels.

    progress: a ray.util.queue.Queue that rank 0 feeds with one dict per report. status_dir: each worker
    keeps rank<r>.json there ({pid, step}), for operators and fault-injection tests to find the worker
    processes; a file hold-rank<r>-step<s> placed there makes rank r, once it has reported step s, rename it
    to hold-rank<r>-step<s>.held and wait until that file is deleted (or the process killed), so a test can
    kill a worker at a known step.
    """

    test_table: pa.Table | None = None
    calibration_table: pa.Table | None = None  # held-back normal training images, scored at each evaluation
    mlflow_run_id: str | None = None
    progress: Any = None
    status_dir: str = ""


@dataclass
class WorkerLog:
    """What rank 0 hands back to the driver (Result.return_value): steps, final evaluation, timings."""

    start_step: int
    final_step: int = 0
    records: list[dict] = field(default_factory=list)  # one per step: step, loss, grad_norm, lr, p
    rows: list[dict] = field(default_factory=list)  # final per-class metrics + 'mean' (none when not evaluated)
    thresholds: dict | None = None
    model_version: str | None = None
    param_digests: list[str] = field(default_factory=list)  # one per rank: equal when the ranks agree
    data_wait_s: float = 0.0  # waiting for batches, within train_s
    train_s: float = 0.0  # wall time of the training chunks (steps and waits)
    step_waits: list[float] = field(default_factory=list)  # the wait for each step's batch
    worker_start_time: float = 0.0
    first_step_time: float | None = None
    best: dict | None = None  # train.keep_best: the best evaluation (BestCheckpoint fields)
    diverged: str | None = None  # why the run stopped early: its loss, gradient norm or weights went non-finite


def data_wait(log: WorkerLog | None) -> dict | None:
    """How long rank 0's training loop waited for its next batch (None when it ran no step).

    share: wait / wall time of the steps, the whole run; steady_share: the same without the first step,
    whose wait is the pipeline's start-up (paid once per run, not per step); first_wait_s: that start-up;
    median_wait_ms / mean_step_ms: per step, a figure that machine load shifts less than the shares.
    """
    if log is None or not log.step_waits or log.train_s <= 0:
        return None
    waits, first = log.step_waits, log.step_waits[0]
    steady_s = log.train_s - first - (log.train_s - sum(waits)) / len(waits)  # less step 1 (wait + compute)
    return {"share": log.data_wait_s / log.train_s,
            "steady_share": (sum(waits) - first) / steady_s if len(waits) > 1 and steady_s > 0 else None,
            "first_wait_s": first, "median_wait_ms": 1000 * statistics.median(waits),
            "mean_step_ms": 1000 * log.train_s / len(waits), "steps": len(waits)}


def train_worker(loop_config: dict) -> WorkerLog | None:
    """The Ray Train per-worker function of a training run; rank 0 returns its WorkerLog."""
    started = time.time()
    job: TrainJob = loop_config["job"]
    return run_worker(job, TrainingHooks(job, started))


class TrainingHooks:
    """Log every train.log_every steps, evaluate every eval_every and at the end, checkpoint every
    checkpoint_every and where this invocation stops."""

    def __init__(self, job: TrainJob, started: float):
        self.job, self.started = job, started
        self.tracker = NullRunLogger()
        self.log = WorkerLog(start_step=0)
        self.keeper: BestKeeper | None = None  # rank 0 with train.keep_best

    def start(self, run: WorkerRun) -> None:
        self.tracker = run_logger(run.config, self.job.mlflow_run_id, run.rank)
        self.log = WorkerLog(start_step=run.start_step, worker_start_time=self.started)
        if run.config.train.keep_best and run.rank == 0:
            import ray.train

            storage = ray.train.get_context().get_storage()
            self.keeper = BestKeeper(run.config.tune.metrics, (storage.storage_filesystem, storage.experiment_fs_path))
            self.keeper.restore(run.start.metadata)
        _write_status(self.job, run.rank, run.start_step)

    def next_stop(self, run: WorkerRun) -> int:
        return next_boundary(run.state.step, run.end, run.config, first=run.state.step == run.start_step)

    def at_stop(self, run: WorkerRun, chunk: Chunk) -> None:
        found = agreed_divergence(run, chunk)
        if found is not None:  # nothing of a diverged model is evaluated, checkpointed, logged or registered
            self.log.diverged, run.stopped = diverged_message(found), True
            return
        job, tc, step = self.job, run.config.train, run.state.step
        records = chunk.records
        self.log.records += records
        self.log.data_wait_s += chunk.data_wait_s
        self.log.train_s += chunk.seconds
        self.log.step_waits += chunk.step_waits
        self.log.first_step_time = self.log.first_step_time or time.time()
        point = dict(step=step, loss=sum(r["loss"] for r in records) / len(records), lr=records[-1]["lr"],
                     p=records[-1]["p"], grad_norm=records[-1]["grad_norm"],
                     images_per_s=len(records) * tc.batch_size / chunk.seconds,
                     data_wait_fraction=chunk.data_wait_s / chunk.seconds)
        finished = step == tc.total_steps
        evaluation = None
        if job.test_table is not None and (finished or _is_multiple(step, tc.eval_every)):
            evaluation = evaluate_distributed(run.model, job.test_table, run.config, run.rank, run.world, run.device,
                                              calibration_table=job.calibration_table)
        metrics = dict(point)
        if evaluation is not None:  # rank 0 only
            self.tracker.log_evaluation(step, evaluation.by_class())
            metrics.update({f"test/mean/{k}": v for k, v in evaluation.mean.items()})
            if self.keeper is not None:
                self.keeper.consider(step, evaluation.rows, evaluation.thresholds, run.model, run.config)
        if _is_multiple(step, tc.log_every) or step in (run.start_step + 1, run.end):
            self.tracker.log_steps([point])
        if step == run.end and (waited := data_wait(self.log)):  # the run's shares, as metrics.json has them
            self.tracker.log_steps([{"step": step, "data_wait_share": waited["share"],
                                     **({"data_wait_steady_share": waited["steady_share"]}
                                        if waited["steady_share"] is not None else {})}])
        if job.progress is not None and run.rank == 0:
            job.progress.put_nowait(dict(metrics, run=run.config.name, total_steps=tc.total_steps))
        checkpointing = step == run.end or _is_multiple(step, tc.checkpoint_every)
        final = evaluation if finished else None
        metadata = self._metadata(run, final) if checkpointing and run.rank == 0 else None
        after_save = (lambda folder: self._finish(run, final, folder)) if final is not None else None
        run.report(metrics, checkpoint=checkpointing, metadata=metadata, after_save=after_save)
        _write_status(job, run.rank, step)

    def finish(self, run: WorkerRun) -> WorkerLog | None:
        digests = _gather_digests(run.model, run.world)  # a collective
        if run.rank != 0:
            return None
        self.log.param_digests, self.log.final_step = digests, run.state.step
        return self.log

    def _metadata(self, run: WorkerRun, final: Evaluation | None) -> dict:
        metadata = dict(step=run.state.step, run_name=run.config.name, mlflow_run_id=self.job.mlflow_run_id,
                        git_commit=git_commit())
        if self.keeper is not None and self.keeper.best is not None:  # a restored run compares against it
            metadata[BEST_KEY] = self.keeper.best.to_dict()
        if final is not None:
            metadata.update(metrics=json_safe(final.by_class()), thresholds=json_safe(final.thresholds))
            if "calibration" in final.thresholds:  # the per-class table the service and exports read
                metadata[CALIBRATION_KEY] = final.thresholds["calibration"]
        return metadata

    def _finish(self, run: WorkerRun, final: Evaluation, checkpoint_dir: str) -> None:
        """Rank 0 at the end: heatmap grid, MLflow artifacts and registry version; the log's final fields."""
        config = run.config
        heatmaps = None
        if self.tracker.run_id and config.tracking.heatmap_images and self.job.test_table is not None:
            table = final.thresholds.get("calibration")  # per class, from normal images; else the F1 cut
            heatmaps = heatmap_grid(run.model, self.job.test_table, config, config.tracking.heatmap_images, run.device,
                                    ThresholdTable.from_dict(table) if table else final.thresholds["image_f1_optimal"])
        tags = {**{f"mean_{k}": v for k, v in final.mean.items()},
                "threshold_image_f1_optimal": final.thresholds["image_f1_optimal"],
                "threshold_image_normal_quantile": final.thresholds["image_normal_quantile"],
                "normal_quantile": final.thresholds["normal_quantile"], "run_name": config.name}
        if "calibration" in final.thresholds:
            tags[CALIBRATION_KEY] = json.dumps(json_safe(final.thresholds["calibration"]))
        if self.keeper is not None:
            tags["checkpoint"] = "last"
        self.log.model_version = self.tracker.log_final(config, final.rows, heatmaps, checkpoint_dir, tags)
        self.log.rows, self.log.thresholds = final.rows, final.thresholds
        if self.keeper is not None and self.keeper.best is not None:
            self.log.best = self._register_best(run, self.keeper.best)

    def _register_best(self, run: WorkerRun, best: BestCheckpoint) -> dict:
        """The best checkpoint's registry version (the last one's when the last evaluation was the best)."""
        if best.step == run.state.step:
            best.model_version = self.log.model_version
            return best.to_dict()
        with tempfile.TemporaryDirectory() as tmp:
            best.model_version = self.tracker.log_checkpoint(self.keeper.download(tmp), BEST_FOLDER,
                                                             best_version_tags(best, run.config.name))
        return best.to_dict()


def next_boundary(step: int, end: int, config: Config, first: bool) -> int:
    """The next step (> step) at which to log, evaluate, checkpoint or stop; the first chunk is one step."""
    tc = config.train
    if first:
        return min(step + 1, end)
    candidates = [end] + [(step // every + 1) * every for every in (tc.log_every, tc.eval_every, tc.checkpoint_every)
                          if every > 0]
    return min(candidates)


def _is_multiple(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _write_status(job: TrainJob, rank: int, step: int) -> None:
    """rank<r>.json = {pid, step}; then, if status_dir holds hold-rank<r>-step<s>, hold there (see TrainJob)."""
    if not job.status_dir:
        return
    path = Path(job.status_dir) / f"rank{rank}.json"
    path.with_suffix(".tmp").write_text(json.dumps({"pid": os.getpid(), "step": step}))
    path.with_suffix(".tmp").replace(path)
    request = Path(job.status_dir) / f"hold-rank{rank}-step{step}"
    held = request.with_name(f"{request.name}.held")
    try:
        request.rename(held)  # claimed once: a restarted worker passing the same step goes on
    except FileNotFoundError:
        return
    while held.exists():
        time.sleep(0.1)


def _gather_digests(model: Dinomaly, world: int) -> list[str]:
    digest = hashlib.sha256()
    for param in model.trainable_parameters():
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    if world == 1:
        return [digest.hexdigest()]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, digest.hexdigest())
    return gathered
