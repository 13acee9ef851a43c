"""The driver side of a training run: check everything, start or attach Ray, fit, write the outputs.

    config = prepare_config(load_config("demo", overrides))      # deterministic mode, absolute MLflow URI
    check_before_start(config, init_from=...)                    # every user error, before any Ray work
    ensure_ray()                                                 # attach via RAY_ADDRESS or start local Ray
    outcomes = train(config, on_progress=print, output_dir=...)  # one per run ('separate': one per class)

Checks raise ValueError / FileNotFoundError / PermissionError / ConnectionError with the fix, so an
entry point can print one line and exit non-zero.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import yaml

from dinomaly.config import Config, apply_overrides, to_dict
from dinomaly.data.manifest import load_manifest, select
from dinomaly.distributed.cluster import attaching_to_cluster, ensure_ray  # noqa: F401 - ensure_ray re-exported
from dinomaly.distributed.resources import (
    check_resources,
    is_start_timeout,
    start_timeout_error,
    train_request,
)
from dinomaly.distributed.tracking import close_run, json_safe, open_run, resolve_tracking_uri

logger = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    """What one Ray Train run produced, as the driver sees it."""

    name: str
    summary: dict[str, Any]  # rank 0's return value: records, metrics, thresholds, timings
    checkpoint_uri: str | None  # the latest checkpoint on storage
    mlflow_run_id: str | None
    output_dir: Path | None = None
    children: list[TrainOutcome] = field(default_factory=list)


def prepare_config(config: Config) -> Config:
    """Apply deterministic mode (manifest order, local reader, dropout 0) and pin the MLflow URI absolutely."""
    overrides: dict[str, Any] = {"tracking.tracking_uri": resolve_tracking_uri(config.tracking)}
    if config.train.deterministic:
        overrides.update({"data.shuffle": False, "train.data_source": "local", "model.bottleneck_dropout": 0.0})
    return apply_overrides(config, overrides)


def check_before_start(config: Config, init_from: str = "", attaching: bool | None = None) -> None:
    """Fail on the driver, before Ray starts, for anything a worker would only find out later."""
    from dinomaly.data.storage import check_reachable, split_uri

    tc = config.train
    attaching = attaching_to_cluster() if attaching is None else attaching
    if not attaching:
        cpus = os.cpu_count() or 1
        if tc.num_workers > cpus:
            raise ValueError(f"train.num_workers={tc.num_workers} is more than the {cpus} CPUs of this machine; "
                             f"use --workers {cpus} or fewer, or submit to a cluster with `ray job submit`")
        if tc.use_gpu:
            import torch

            if torch.cuda.device_count() < tc.num_workers:
                raise ValueError(f"train.use_gpu needs {tc.num_workers} GPUs (one per worker) but this machine has "
                                 f"{torch.cuda.device_count()}; lower --workers or drop --gpu")
    scheme, path = split_uri(config.output_root)
    if scheme:
        check_reachable(f"{scheme}://{path.split('/', 1)[0]}", config.data)  # the bucket; the prefix may be new
    else:
        _check_writable(Path(path))
    if init_from and not Path(init_from).exists():
        raise FileNotFoundError(f"--init-from {init_from} does not exist; give an official Dinomaly .pth or a "
                                "checkpoint directory written by pipelines/train.py")
    if config.data.root:
        check_reachable(config.data.root, config.data)


def _check_writable(folder: Path) -> None:
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise PermissionError(f"cannot write checkpoints under {folder} ({existing} is not a writable folder); "
                              "set --storage-path / output_root to a writable folder or an s3:// prefix")


def run_exists(config: Config) -> bool:
    """True when Ray Train already has a run named config.name under output_root (it would resume it)."""
    from dinomaly.data.storage import filesystem_for

    filesystem, root = filesystem_for(config.output_root, config.data)
    marker = f"{root.rstrip('/')}/{config.name}/checkpoint_manager_snapshot.json"
    return filesystem.get_file_info(marker).type != pafs.FileType.NotFound


def check_resume(config: Config, resume: bool) -> None:
    """--resume needs an earlier run of this name; without it, an earlier run is an error, not a silent resume."""
    if config.train.setting == "separate":
        return  # per-class runs (<name>-<class>) resume by themselves when rerun
    exists = run_exists(config)
    where = f"{config.output_root}/{config.name}"
    if resume and not exists:
        raise FileNotFoundError(f"nothing to resume: no checkpointed run at {where}; check --name / --storage-path")
    if exists and not resume:
        raise ValueError(f"a run named '{config.name}' already exists at {where}; pass --resume to continue it "
                         "or --name <new name> to start afresh")


def load_tables(config: Config) -> tuple[pa.Table, pa.Table]:
    """(train rows, test rows) of the configured data; errors name what is missing."""
    manifest = load_manifest(config.data)
    train_rows, test_rows = select(manifest, split="train"), select(manifest, split="test")
    if train_rows.num_rows < config.train.batch_size:
        raise ValueError(f"{config.data.root} has {train_rows.num_rows} training images, fewer than "
                         f"train.batch_size={config.train.batch_size}; lower the batch or add images")
    return train_rows, test_rows


def train(config: Config, *, init_from: str = "", batches: list | None = None, stop_at_step: int | None = None,
          on_progress: Callable[[dict], None] | None = None, output_dir: str | Path | None = None,
          status_dir: str = "") -> TrainOutcome:
    """Run training as configured (Ray must be initialised); 'separate' trains one model per class.

    batches: fixed global batches instead of config.data (then nothing is evaluated). output_dir: where the
    final checkpoint, config.yaml and metrics.json are written (None = nowhere). Raises ResourcesUnavailable
    (naming what holds them) when the workers' CPUs/GPUs never fit or stay taken for cluster.start_timeout_s.
    """
    config = prepare_config(config)
    if config.train.setting == "separate" and batches is None:
        return _train_separate(config, init_from, on_progress, output_dir)
    return _train_one(config, init_from=init_from, batches=batches, stop_at_step=stop_at_step,
                      on_progress=on_progress, output_dir=output_dir, status_dir=status_dir)


def _train_one(config: Config, *, init_from: str, batches: list | None, stop_at_step: int | None,
               on_progress: Callable[[dict], None] | None, output_dir: str | Path | None,
               status_dir: str) -> TrainOutcome:
    import ray

    # torch/timm-heavy imports here, so that a refused configuration fails within a second or two
    from dinomaly.distributed.train.batches import ManifestBatches, RayDataBatches, TensorBatches
    from dinomaly.distributed.train.worker import TrainJob, build_trainer, worker_resources

    datasets, test_rows = None, None
    if batches is not None:
        source = TensorBatches(list(batches))
    else:
        train_rows, test_rows = load_tables(config)
        if config.train.data_source == "local":
            source = ManifestBatches(train_rows, config)
        else:
            from dinomaly.distributed.train.data import train_dataset

            datasets, source = {"train": train_dataset(train_rows, config)}, RayDataBatches(config)
    cluster_cpus = ray.cluster_resources().get("CPU")
    request = train_request(config, worker_resources(config, datasets is not None, cluster_cpus))
    check_resources(request, config.cluster.start_timeout_s)  # bounded wait; before the MLflow run opens
    run_id = open_run(config, config.name) if config.tracking.enabled else None
    progress = _progress_queue() if on_progress else None
    job = TrainJob(config=config, source=source, test_table=test_rows, init_from=init_from, mlflow_run_id=run_id,
                   stop_at_step=stop_at_step, progress=progress, status_dir=status_dir)
    trainer = build_trainer(config, job, datasets, cluster_cpus)
    status, data_errors = "FAILED", None
    try:
        try:
            result = _fit_with_progress(trainer, progress, on_progress)
        except Exception as err:  # the resources went elsewhere after the check: Train's bounded retries ran out
            if is_start_timeout(err):
                raise start_timeout_error(request, config.cluster.start_timeout_s) from err
            raise
        status = "FINISHED" if stop_at_step is None or stop_at_step >= config.train.total_steps else "KILLED"
    finally:
        if datasets is not None:
            data_errors = _report_data_errors(datasets["train"], config, run_id)
        if run_id:
            close_run(config.tracking.tracking_uri, run_id, status=status)
        if progress is not None:
            progress.shutdown(force=True)
    summary = dict(result.return_value or {})
    if data_errors is not None:
        summary["data_errors"] = data_errors
    outcome = TrainOutcome(name=config.name, summary=summary,
                           checkpoint_uri=result.checkpoint.path if result.checkpoint else None, mlflow_run_id=run_id)
    if output_dir is not None and result.checkpoint is not None:
        write_outputs(outcome, config, result.checkpoint, Path(output_dir))
    return outcome


def _report_data_errors(dataset, config: Config, run_id: str | None) -> dict:
    """Unreadable training files (skipped and counted by the Ray Data pipeline): logged, and in MLflow."""
    from dinomaly.distributed.train.data import count_errors

    errors = count_errors(dataset)
    if errors["data_errors"]:
        logger.warning("%d unreadable training files were skipped, e.g. %s", errors["data_errors"],
                       errors["error_files"][:3])
    if run_id:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
        client.log_metric(run_id, "data_errors", errors["data_errors"])
        client.log_dict(run_id, json_safe(errors), "data_errors.json")
    return errors


def _progress_queue():
    """The progress queue actor, pinned to the driver's node: on another node it would die with that node
    and fail every restored attempt of a run that is meant to survive the node (cluster/README.md)."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})


def _fit_with_progress(trainer, progress, on_progress):
    """trainer.fit() in this thread (it handles Ctrl-C), progress notes pumped to on_progress meanwhile."""
    if progress is None:
        return trainer.fit()
    from ray.util.queue import Empty

    done = threading.Event()

    def pump() -> None:
        while True:
            try:
                on_progress(progress.get(timeout=0.5))
            except Empty:
                if done.is_set():
                    return

    thread = threading.Thread(target=pump, name="train-progress", daemon=True)
    thread.start()
    try:
        return trainer.fit()
    finally:
        done.set()
        thread.join(timeout=10)


def write_outputs(outcome: TrainOutcome, config: Config, checkpoint, output_dir: Path) -> None:
    """<output_dir>/checkpoint/ (the final checkpoint), config.yaml (resolved) and metrics.json."""
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.to_directory(str(output_dir / "checkpoint"))
    (output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    summary = outcome.summary
    metrics = dict(run=config.name, step=summary.get("final_step"), metrics=summary.get("metrics"),
                   thresholds=summary.get("thresholds"), mlflow_run_id=outcome.mlflow_run_id,
                   registered_model=config.tracking.registered_model_name if summary.get("model_version") else None,
                   model_version=summary.get("model_version"), checkpoint_uri=outcome.checkpoint_uri,
                   data_errors=summary.get("data_errors"))
    (output_dir / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=1) + "\n")
    outcome.output_dir = output_dir


def _train_separate(config: Config, init_from: str, on_progress, output_dir) -> TrainOutcome:
    """One Ray Train run per class (<name>-<class>, registered as <model>-<class>), as many at once as fit."""
    import ray

    from dinomaly.distributed.train.worker import worker_resources

    manifest = load_manifest(config.data)
    classes = sorted(set(manifest.column("category").to_pylist()))
    per_worker = worker_resources(config, config.train.data_source == "ray_data", ray.cluster_resources().get("CPU"))
    # as many runs at once as the resources free now hold (not the cluster's total): a run queued behind its
    # siblings waits for their end and could run out of cluster.start_timeout_s
    free = ray.available_resources()
    check_resources(train_request(config, per_worker), config.cluster.start_timeout_s)  # one run must fit
    per_run_cpus = config.train.num_workers * (config.train.cpus_per_worker or 1.0)
    parallel = int(free.get("CPU", 0.0) // per_run_cpus)
    if config.train.use_gpu:
        parallel = min(parallel, int(free.get("GPU", 0.0) // config.train.num_workers))
    parallel = max(1, min(len(classes), parallel))
    registered = config.tracking.registered_model_name

    def one(name: str) -> TrainOutcome:
        child = apply_overrides(config, {"name": f"{config.name}-{name}", "data.categories": [name],
                                         "tracking.registered_model_name": f"{registered}-{name}" if registered
                                         else ""})
        child_dir = Path(output_dir) / name if output_dir is not None else None
        return _train_one(child, init_from=init_from, batches=None, stop_at_step=None, on_progress=on_progress,
                          output_dir=child_dir, status_dir="")

    logger.info("training %d classes separately, %d at a time", len(classes), parallel)
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        children = list(pool.map(one, classes))
    metrics = {c.name.removeprefix(f"{config.name}-"): (c.summary.get("metrics") or {}).get("mean", {})
               for c in children}
    present = [m for m in metrics.values() if m]
    if present:
        metrics["mean"] = {k: sum(m[k] for m in present) / len(present) for k in present[0]}
    summary = dict(metrics=metrics, final_step=config.train.total_steps, separate=True)
    outcome = TrainOutcome(name=config.name, summary=summary, checkpoint_uri=None, mlflow_run_id=None,
                           children=children)
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "metrics.json").write_text(json.dumps(json_safe(dict(
            run=config.name, setting="separate", metrics=metrics,
            runs={c.name: str(c.output_dir) for c in children})), indent=1) + "\n")
        outcome.output_dir = Path(output_dir)
    return outcome
