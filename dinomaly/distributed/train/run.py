"""The driver side of a training run: check everything, start or attach Ray, fit, write the outputs.

    config = load_config("demo", overrides)
    check_before_start(config, init_from=..., resume=...)        # every user error, before any Ray work
    ensure_ray()                                                 # attach via RAY_ADDRESS or start local Ray
    result = train(config, on_progress=print, output_dir=...)    # a TrainResult ('separate': one child per class)

Checks raise ValueError / FileNotFoundError / PermissionError / ConnectionError with the fix, so an
entry point can print one line and exit non-zero.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from dinomaly.config import Config, apply_overrides, to_dict
from dinomaly.config.paths import absolute_path, with_absolute_paths
from dinomaly.data.manifest import load_manifest, select
from dinomaly.data.storage import storage_uri
from dinomaly.distributed.cluster import attaching_to_cluster, ensure_ray
from dinomaly.distributed.resources import (
    check_resources,
    is_start_timeout,
    start_timeout_error,
    train_request,
)
from dinomaly.distributed.tracking import close_run, open_run, resolve_tracking_uri, run_logger
from dinomaly.distributed.train.result import TrainResult
from dinomaly.distributed.train.resume import check_resume, run_exists
from dinomaly.results import write_metrics_json
from dinomaly.tables import format_decision_table, per_class_table

logger = logging.getLogger(__name__)


def prepare_config(config: Config) -> Config:
    """(train() applies it.) Apply deterministic mode (manifest order, local reader, dropout 0) and make the
    MLflow URI and every local path absolute: workers and trials run in other folders."""
    config = with_absolute_paths(config)
    overrides: dict[str, Any] = {"tracking.tracking_uri": resolve_tracking_uri(config.tracking)}
    if config.train.deterministic:
        overrides.update({"data.shuffle": False, "train.data_source": "local", "model.bottleneck_dropout": 0.0,
                          "data.fast_decode": False})
    return apply_overrides(config, overrides)


def check_before_start(config: Config, init_from: str = "", attaching: bool | None = None,
                       resume: bool | None = None) -> None:
    """Fail on the driver, before Ray starts, for anything a worker would only find out later.

    resume: also check the run's storage against --resume (check_resume); None skips that check.
    """
    from dinomaly import preflight
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
        preflight.check_writable_folder(Path(path), "checkpoints", "set --storage-path / output_root to a "
                                        "writable folder or an s3:// prefix")
    if init_from and resume:
        raise ValueError("--init-from starts a new run from weights and --resume continues a run from its "
                         "checkpoint; drop one of them (or give a new --name to fine-tune)")
    if resume is not None:
        check_resume(config, resume)
    # what workers build and read, checked here in well under a second (no weights loaded)
    if init_from:
        preflight.check_weights_source(init_from)
    else:  # --init-from brings the encoder's weights too
        preflight.check_encoder_weights(config.model.encoder_weights)
    preflight.check_model_builds(config.model)
    if config.tracking.enabled:
        preflight.check_tracking_store(resolve_tracking_uri(config.tracking))
    if config.data.root:
        check_reachable(config.data.root, config.data)
        check_data(config)


def check_data(config: Config) -> None:
    """The manifest's rows as training will use them (unknown data.categories, too few images) and every test
    mask's size from the file headers: a data error found inside a worker would only show after Ray started."""
    from dinomaly.data.mask_check import check_mask_sizes

    _, test_rows = load_tables(config)
    check_mask_sizes(test_rows, config.data)


def load_tables(config: Config) -> tuple[pa.Table, pa.Table]:
    """(train rows, test rows) of the configured data; errors name what is missing.

    The one check that the training images fill a global batch (every batch source drops the last partial one).
    """
    manifest = load_manifest(config.data)
    train_rows, test_rows = select(manifest, split="train"), select(manifest, split="test")
    if train_rows.num_rows < config.train.batch_size:
        raise ValueError(f"{config.data.root} has {train_rows.num_rows} training images, fewer than "
                         f"train.batch_size={config.train.batch_size}; lower the batch or add images")
    return train_rows, test_rows


def hold_back(train_rows: pa.Table, config: Config) -> tuple[pa.Table, pa.Table]:
    """(rows to train on, each class's held-back normal rows): train.calibration_share of them, at least
    train.calibration_min_images, drawn by train.seed (dinomaly.calibration.holdout_indices); never trained on,
    they set the per-class thresholds after training. Refused when what is left no longer fills a batch."""
    from dinomaly.calibration import holdout_indices

    tc = config.train
    keep, held, small = holdout_indices(train_rows.column("category").to_pylist(),
                                        train_rows.column("label").to_numpy(), tc.calibration_share,
                                        tc.calibration_min_images, tc.seed)
    if small:
        logger.warning("classes with fewer than %d normal training images hold none back for calibration; their "
                       "thresholds come from the test split's normals: %s", 2 * tc.calibration_min_images, small)
    if held.size:
        logger.info("held back %d normal training images for calibration (never trained on)", held.size)
    if keep.size < tc.batch_size:
        raise ValueError(f"after holding back {held.size} calibration images, {keep.size} training images are "
                         f"fewer than train.batch_size={tc.batch_size}; lower the batch or train.calibration_share")
    return train_rows.take(keep), train_rows.take(held)


STATUS_DIR_ENV = "DINOMALY_STATUS_DIR"  # a folder every worker can write: see TrainJob.status_dir


def run(config: Config, *, init_from: str = "", output: str | Path | None = None) -> TrainResult:
    """The train job as the entry points run it: start or join Ray, train with a progress line per report,
    write <output> (default runs/<name>) and print the summary. Call check_before_start first.
    $DINOMALY_STATUS_DIR, when set, is the workers' status folder (their pids and steps; TrainJob.status_dir)."""
    from dinomaly.distributed.train.progress import ProgressFormatter, summary_lines

    ensure_ray()
    progress = ProgressFormatter()
    try:
        result = train(config, init_from=init_from, output_dir=output or Path("runs") / config.name,
                       on_progress=lambda note: print(progress(note), flush=True),
                       status_dir=os.environ.get(STATUS_DIR_ENV, ""))
    except TrainingInterrupted:
        print(f"interrupted: the run's checkpoints are in {config.output_root.rstrip('/')}/{config.name}; the same "
              "command with --resume continues from the latest one Ray recorded", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    print("\n".join(summary_lines(result)))
    for one in result.children or (result,):
        if (one.thresholds or {}).get("decisions"):
            print(f"\n{one.name}: thresholds at eval.target_fpr={config.eval.target_fpr} from normal images, on the "
                  f"labelled test split:\n{format_decision_table(one.thresholds['decisions'])}")
    return result


def train(config: Config, *, init_from: str = "", batches: list | None = None, stop_at_step: int | None = None,
          on_progress: Callable[[dict], None] | None = None, output_dir: str | Path | None = None,
          status_dir: str = "") -> TrainResult:
    """Run training as configured (Ray must be initialised); 'separate' trains one model per class.

    batches: fixed global batches instead of config.data (then nothing is evaluated). output_dir: where the
    final checkpoint, config.yaml and metrics.json are written (None = nowhere). Applies prepare_config. Raises ResourcesUnavailable
    (naming what holds them) when the workers' CPUs/GPUs never fit or stay taken for cluster.start_timeout_s,
    and dinomaly.loop.TrainingDiverged (a ValueError) when the loss, gradient norm or weights went NaN/inf: the
    workers stopped there, the MLflow run is FAILED, nothing was registered and no final outputs were written.
    """
    config, init_from = prepare_config(config), absolute_path(init_from)
    if config.train.setting == "separate" and batches is None:
        return _train_separate(config, init_from, on_progress, output_dir)
    return _train_one(config, init_from=init_from, batches=batches, stop_at_step=stop_at_step,
                      on_progress=on_progress, output_dir=output_dir, status_dir=status_dir)


def _train_one(config: Config, *, init_from: str, batches: list | None, stop_at_step: int | None,
               on_progress: Callable[[dict], None] | None, output_dir: str | Path | None,
               status_dir: str) -> TrainResult:
    import ray

    # torch/timm-heavy imports here, so that a refused configuration fails within a second or two
    from dinomaly.distributed.train.batches import ManifestBatches, RayDataBatches, TensorBatches
    from dinomaly.distributed.train.skeleton import build_trainer, worker_resources
    from dinomaly.distributed.train.worker import TrainJob, train_worker
    from dinomaly.loop import TrainingDiverged

    datasets, test_rows, calibration_rows = None, None, None
    if batches is not None:
        source = TensorBatches(list(batches))
    else:
        train_rows, test_rows = load_tables(config)
        train_rows, calibration_rows = hold_back(train_rows, config)
        if config.train.data_source == "local":
            source = ManifestBatches(train_rows, config)
        else:
            from dinomaly.distributed.train.data import train_dataset

            datasets, source = {"train": train_dataset(train_rows, config)}, RayDataBatches(config)
    resources = worker_resources(config, datasets is not None, ray.cluster_resources().get("CPU"))
    request = train_request(config, resources)
    check_resources(request, config.cluster.start_timeout_s)  # bounded wait; before the MLflow run opens
    # a run started afresh (its Ray run folder gone or new) gets a new MLflow run, never an old unfinished one
    run_id = open_run(config, config.name, reopen=run_exists(config)) if config.tracking.enabled else None
    progress = _progress_queue() if on_progress else None
    job = TrainJob(config=config, source=source, init_from=init_from, stop_at_step=stop_at_step, test_table=test_rows,
                   calibration_table=calibration_rows, mlflow_run_id=run_id, progress=progress, status_dir=status_dir)
    trainer = build_trainer(train_worker, job, resources, name=config.name, storage=config.output_root,
                            max_failures=config.train.max_failures, keep_checkpoints=config.train.keep_checkpoints,
                            datasets=datasets)
    status, data_errors = "FAILED", None
    try:
        try:
            result = _fit_with_progress(trainer, progress, on_progress)
        except Exception as err:  # the resources went elsewhere after the check: Train's bounded retries ran out
            if is_start_timeout(err):
                raise start_timeout_error(request, config.cluster.start_timeout_s) from err
            raise
        status = "FINISHED" if stop_at_step is None or stop_at_step >= config.train.total_steps else "KILLED"
        if result.return_value.diverged:  # the workers stopped at it and reported nothing more
            status = "FAILED"
    finally:
        if datasets is not None:
            data_errors = _data_errors(datasets["train"], config, run_id)
        if run_id:
            close_run(config.tracking.tracking_uri, run_id, status=status)
        if progress is not None:
            progress.shutdown(force=True)
    log, checkpoint = result.return_value, result.checkpoint
    if log.diverged:
        run_name = f"{config.name}: " if config.train.setting == "separate" else ""
        raise TrainingDiverged(f"{run_name}{log.diverged} and train again under a new --name; nothing was registered"
                               + (" and no final checkpoint or metrics.json written" if output_dir is not None else ""))
    written = Path(output_dir) if output_dir is not None and checkpoint is not None else None
    outcome = TrainResult(config=config, final_step=log.final_step, rows=log.rows, thresholds=log.thresholds,
                          checkpoint_uri=storage_uri(checkpoint.path if checkpoint else None, config.output_root),
                          mlflow_run_id=run_id,
                          model_version=log.model_version, data_errors=data_errors, output_dir=written, log=log)
    if written is not None:
        write_run_folder(outcome, checkpoint)
    return outcome


def _data_errors(dataset, config: Config, run_id: str | None) -> dict:
    """Unreadable training files (skipped and counted by the Ray Data pipeline): logged, and in the MLflow run."""
    from dinomaly.distributed.train.data import count_errors

    errors = count_errors(dataset)
    if errors["data_errors"]:
        logger.warning("%d unreadable training files were skipped, e.g. %s", errors["data_errors"],
                       errors["error_files"][:3])
    run_logger(config, run_id, rank=0).log_data_errors(errors)
    return errors


def _progress_queue():
    """The progress queue actor, pinned to the driver's node: on another node it would die with that node
    and fail every restored attempt of a run that is meant to survive the node (cluster/README.md)."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})


class TrainingInterrupted(Exception):
    """Ctrl-C during fit(): Ray Train's SIGINT handler aborts the run and ends fit() with SystemExit."""


def _fit_with_progress(trainer, progress, on_progress):
    """trainer.fit() in this thread (it handles Ctrl-C), progress notes pumped to on_progress meanwhile."""
    try:
        return _fit_pumping(trainer, progress, on_progress)
    except SystemExit as err:
        raise TrainingInterrupted from err


def _fit_pumping(trainer, progress, on_progress):
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


def write_run_folder(result: TrainResult, checkpoint=None) -> None:
    """result.output_dir/: checkpoint/ (the final Ray checkpoint, when given), best_checkpoint/ (train.keep_best),
    config.yaml (as run), metrics.json."""
    folder = result.output_dir
    folder.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None:
        checkpoint.to_directory(str(folder / "checkpoint"))
        best = result.log.best if result.log is not None else None
        if best:  # on the same storage as the last one
            type(checkpoint)(path=best["path"], filesystem=checkpoint.filesystem).to_directory(
                str(folder / "best_checkpoint"))
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(result.config), sort_keys=False))
    write_metrics_json(folder / "metrics.json", result.metrics_record())


def _train_separate(config: Config, init_from: str, on_progress, output_dir) -> TrainResult:
    """One Ray Train run per class (<name>-<class>, registered as <model>-<class>), as many at once as fit."""
    import ray

    from dinomaly.distributed.train.skeleton import worker_resources

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

    def one(name: str) -> TrainResult:
        child = apply_overrides(config, {"name": f"{config.name}-{name}", "data.categories": [name],
                                         "tracking.registered_model_name": f"{registered}-{name}" if registered
                                         else ""})
        child_dir = Path(output_dir) / name if output_dir is not None else None
        return _train_one(child, init_from=init_from, batches=None, stop_at_step=None, on_progress=on_progress,
                          output_dir=child_dir, status_dir="")

    logger.info("training %d classes separately, %d at a time", len(classes), parallel)
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        children = list(pool.map(one, classes))
    means = {c.name.removeprefix(f"{config.name}-"): c.mean for c in children if c.rows}
    outcome = TrainResult(config=config, final_step=config.train.total_steps,
                          rows=per_class_table(means) if means else [], thresholds=None, checkpoint_uri=None,
                          mlflow_run_id=None, model_version=None, data_errors=None,
                          output_dir=Path(output_dir) if output_dir is not None else None, children=tuple(children))
    if outcome.output_dir is not None:
        write_run_folder(outcome)
    return outcome
