"""Ray Train around dinomaly.loop.train_steps: DDP workers, checkpoints, restarts, evaluation, MLflow.

The per-worker function is thin. It builds the model (fresh, from --init-from weights, or from the
run's latest checkpoint), wraps it in DDP with the frozen encoder left out of synchronisation, takes
this rank's rows of every global batch (dinomaly.distributed.train.batches) and runs train_steps in chunks
between log / evaluation / checkpoint points. Each point ends in ray.train.report on every rank (a
barrier); rank 0 attaches the checkpoint (dinomaly.checkpoint.save output) and does all MLflow logging.
Reference semantics under DDP: the hard-mining threshold over the global batch (loss global_batch),
gradients averaged by DDP and clipped on that all-reduced gradient, one schedule step per optimiser step.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
import torch.distributed as dist

from dinomaly.checkpoint import load, load_official, save
from dinomaly.config import Config
from dinomaly.distributed.cluster import storage_for
from dinomaly.distributed.tracking import git_commit, json_safe, run_logger
from dinomaly.distributed.train.batches import ManifestBatches, RayDataBatches, TensorBatches
from dinomaly.distributed.train.evaluation import Evaluation, evaluate_distributed, heatmap_grid
from dinomaly.loop import TrainState, seed_everything, train_steps
from dinomaly.model.dinomaly import Dinomaly

logger = logging.getLogger(__name__)

BatchSource = TensorBatches | ManifestBatches | RayDataBatches


@dataclass
class TrainJob:
    """Everything the workers need, shipped once through train_loop_config.

    stop_at_step: end this invocation after that step (the schedule still spans train.total_steps), with a
    checkpoint, so a later fit() of the same run resumes there. progress: a ray.util.queue.Queue that rank 0
    feeds with one dict per report. status_dir: each worker keeps rank<r>.json there ({pid, step}), for
    operators and fault-injection tests to find the worker processes; a file hold-rank<r>-step<s> placed
    there makes rank r, once it has reported step s, rename it to hold-rank<r>-step<s>.held and wait
    until that file is deleted (or the process killed), so a test can kill a worker at a known step.
    """

    config: Config
    source: BatchSource
    test_table: pa.Table | None = None
    init_from: str = ""
    mlflow_run_id: str | None = None
    stop_at_step: int | None = None
    progress: Any = None
    status_dir: str = ""
    threads_per_worker: int = 1


@dataclass
class _Timed:
    """Wraps an iterator and adds up the seconds spent waiting in next(): the data-wait time."""

    source: Iterator[torch.Tensor]
    wait_s: float = 0.0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return next(self.source)
        finally:
            self.wait_s += time.perf_counter() - start


# --------------------------------------------------------------------------- worker: model and state


def _weights_from(path: str, config: Config) -> dict[str, torch.Tensor]:
    """State dict of an official ViTill .pth/.safetensors file or of one of our checkpoint directories."""
    if Path(path).is_dir():
        return load(path).model.state_dict()
    return load_official(path, config.model).state_dict()


def _initial_model(job: TrainJob) -> tuple[Dinomaly, dict | None]:
    """(model on CPU, saved train state or None): the run's latest checkpoint, else --init-from, else fresh."""
    import ray.train

    config = job.config
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            loaded = load(directory)
        model = Dinomaly(config.model, load_encoder_weights=False)
        model.load_state_dict(loaded.model.state_dict())
        return model, loaded.train_state
    model = Dinomaly(config.model, load_encoder_weights=not job.init_from)
    if job.init_from:
        try:
            model.load_state_dict(_weights_from(job.init_from, config))
        except RuntimeError as err:
            raise ValueError(f"--init-from {job.init_from} does not fit the configured model ({err}); set "
                             "model.* (encoder, encoder_kwargs, decoder_depth, ...) to the weights' architecture") \
                from err
    return model, None


def _distribute(model: Dinomaly, world: int) -> torch.nn.Module:
    """Move to this worker's device; with several workers wrap in DDP that syncs bottleneck + decoder only."""
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    if world > 1:  # the frozen encoder is identical everywhere: neither broadcast nor all-reduced
        frozen = [f"encoder.{name}" for name, _ in model.encoder.named_parameters()]
        frozen += [f"encoder.{name}" for name, _ in model.encoder.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return ray.train.torch.prepare_model(model)


def _restore_rank_rng(saved: dict | None, rank: int, world: int, seed: int, step: int,
                      device: torch.device) -> None:
    """Each rank continues its own dropout stream; rank 0 of a fresh run keeps the seed's stream (= local loop)."""
    states = (saved or {}).get("worker_rng") or []
    if len(states) == world:
        torch.set_rng_state(states[rank]["torch"].cpu())
        if "cuda" in states[rank] and device.type == "cuda":
            torch.cuda.set_rng_state(states[rank]["cuda"].cpu(), device)
    elif rank > 0:
        torch.manual_seed(seed + rank + 7919 * step)  # distinct masks per rank (new world size: fresh streams)


def _train_state_dict(state: TrainState, world: int) -> dict:
    """TrainState.state_dict() plus every rank's RNG (a collective: all ranks call it)."""
    saved = state.state_dict()
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, {k: v.cpu() for k, v in state.rng_state.items()})
        saved["worker_rng"] = gathered
    else:
        saved["worker_rng"] = [dict(state.rng_state)]
    return saved


def _param_digest(model: Dinomaly) -> str:
    digest = hashlib.sha256()
    for param in model.trainable_parameters():
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- worker: the loop


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


def _global_losses(records: list[dict], world: int) -> list[dict]:
    """Per-rank loss = local batch mean; the global batch's loss is their mean (equal local batches)."""
    if world == 1 or not records:
        return records
    losses = torch.tensor([r["loss"] for r in records], dtype=torch.float64)
    dist.all_reduce(losses)
    return [dict(r, loss=float(v) / world) for r, v in zip(records, losses)]


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


def train_worker(loop_config: dict) -> dict:
    """The Ray Train per-worker function; rank 0 returns the run summary (Result.return_value)."""
    import ray.train
    import ray.train.torch
    from ray.train.v2._internal.execution import context as train_context

    # Ray Train logs every report at INFO under a logger named by its file path (LoggingConfig misses it);
    # the driver's progress lines already carry the same numbers.
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    started = time.time()
    job: TrainJob = loop_config["job"]
    config, tc = job.config, job.config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(job.threads_per_worker)
    device = ray.train.torch.get_device()
    seed_everything(tc.seed)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    model, saved = _initial_model(job)
    wrapped = _distribute(model, world)
    state = TrainState.from_state_dict(wrapped, config, saved) if saved else TrainState.create(wrapped, config)
    _restore_rank_rng(saved, rank, world, tc.seed, state.step, device)
    start_step = state.step
    _write_status(job, rank, start_step)
    tracker = run_logger(config, job.mlflow_run_id, rank)
    batches = _Timed(job.source.iterate(rank, world, state.step))
    end = min(tc.total_steps, job.stop_at_step or tc.total_steps)
    summary: dict[str, Any] = dict(start_step=start_step, records=[], evaluations={}, worker_start_time=started)
    evaluation: Evaluation | None = None
    while state.step < end:
        target = next_boundary(state.step, end, config, first=state.step == start_step)
        chunk_start, wait_start = time.perf_counter(), batches.wait_s
        records, state = train_steps(wrapped, itertools.islice(batches, target - state.step), config, state)
        if state.step < target:
            raise ValueError(f"the batch source ran out at step {state.step} of {end}; give more batches or "
                             "lower train.total_steps")
        elapsed = time.perf_counter() - chunk_start
        records = _global_losses(records, world)
        summary["records"] += records
        summary.setdefault("first_step_time", time.time())
        point = dict(step=state.step, loss=sum(r["loss"] for r in records) / len(records), lr=records[-1]["lr"],
                     p=records[-1]["p"], grad_norm=records[-1]["grad_norm"],
                     images_per_s=len(records) * tc.batch_size / elapsed,
                     data_wait_fraction=(batches.wait_s - wait_start) / elapsed)
        finished = state.step == tc.total_steps
        if job.test_table is not None and (finished or _is_multiple(state.step, tc.eval_every)):
            evaluation = evaluate_distributed(model, job.test_table, config, rank, world, device)
        if evaluation is not None and rank == 0:
            tracker.log_evaluation(state.step, evaluation.by_class())
            summary["evaluations"][state.step] = evaluation.by_class()
        if _is_multiple(state.step, tc.log_every) or state.step in (start_step + 1, end):
            tracker.log_steps([point])
        checkpointing = state.step == end or _is_multiple(state.step, tc.checkpoint_every)
        _report(job, model, state, point, evaluation, finished, checkpointing, rank, world, summary)
        evaluation = None
        _write_status(job, rank, state.step)
    summary["param_digests"] = _gather_digests(model, world)
    summary.update(final_step=state.step, data_wait_s=batches.wait_s, mlflow_run_id=job.mlflow_run_id)
    return summary if rank == 0 else {}


def _gather_digests(model: Dinomaly, world: int) -> list[str]:
    digest = _param_digest(model)
    if world == 1:
        return [digest]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, digest)
    return gathered


def _report(job: TrainJob, model: Dinomaly, state: TrainState, point: dict, evaluation: Evaluation | None,
            finished: bool, checkpointing: bool, rank: int, world: int, summary: dict) -> None:
    """ray.train.report on every rank; rank 0 adds the checkpoint, the final artifacts and the progress note."""
    import ray.train

    metrics = dict(point)
    if evaluation is not None:
        metrics.update({f"test/mean/{k}": v for k, v in evaluation.mean.items()})
    final = evaluation if finished else None
    train_state = _train_state_dict(state, world) if checkpointing else None  # collective
    if job.progress is not None and rank == 0:
        job.progress.put_nowait(dict(metrics, run=job.config.name, total_steps=job.config.train.total_steps))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if checkpointing and rank == 0:
            metadata = dict(step=state.step, run_name=job.config.name, mlflow_run_id=job.mlflow_run_id,
                            git_commit=git_commit())
            if final is not None:
                metadata.update(metrics=json_safe(final.by_class()), thresholds=json_safe(final.thresholds))
            save(tmp, model, job.config, train_state=train_state, metadata=metadata)
            if final is not None:
                summary.update(_finish(job, model, final, tmp))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        name = f"checkpoint_{state.step:07d}" if checkpointing else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def _finish(job: TrainJob, model: Dinomaly, final: Evaluation, checkpoint_dir: str) -> dict:
    """Rank 0 at the end: heatmap grid, MLflow artifacts and registry version; the summary's final fields."""
    config = job.config
    tracker = run_logger(config, job.mlflow_run_id, 0)
    heatmaps = None
    if tracker.run_id and config.tracking.heatmap_images and job.test_table is not None:
        heatmaps = heatmap_grid(model, job.test_table, config, config.tracking.heatmap_images,
                                next(model.parameters()).device)
    tags = {**{f"mean_{k}": v for k, v in final.mean.items()},
            "threshold_image_f1_optimal": final.thresholds["image_f1_optimal"],
            "threshold_image_normal_quantile": final.thresholds["image_normal_quantile"],
            "normal_quantile": final.thresholds["normal_quantile"], "run_name": config.name}
    version = tracker.log_final(config, final.rows, heatmaps, checkpoint_dir, tags)
    return dict(rows=json_safe(final.rows), metrics=json_safe(final.by_class()),
                thresholds=json_safe(final.thresholds), model_version=version)


# --------------------------------------------------------------------------- driver: the trainer


def worker_resources(config: Config, uses_ray_data: bool, cluster_cpus: float | None) -> dict[str, float]:
    """CPUs (and GPU) per worker. Auto (train.cpus_per_worker 0): 1 CPU, or less when the workers would take
    every CPU and leave Ray Data's read/decode tasks none (they then never run: shared/ray-notes.md section 2)."""
    tc = config.train
    cpus = tc.cpus_per_worker or 1.0
    if not tc.cpus_per_worker and uses_ray_data and cluster_cpus and cluster_cpus - tc.num_workers * cpus < 1:
        cpus = max(0.25, (cluster_cpus - 1) / tc.num_workers)
        logger.info("%d workers get %.2f CPU each so that Ray Data keeps one CPU", tc.num_workers, cpus)
    resources = {"CPU": cpus}
    if tc.use_gpu:
        resources["GPU"] = 1.0
    return resources


def build_trainer(config: Config, job: TrainJob, datasets: dict | None = None, cluster_cpus: float | None = None):
    """TorchTrainer for `job`: config.train.num_workers DDP workers, checkpoints under output_root/<name>.

    Run again with the same config.name and output_root to resume from the latest checkpoint.
    datasets: Ray Data datasets ({'train': ...}, split across the workers) for a RayDataBatches source.
    """
    import dataclasses

    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dinomaly.distributed.resources import bound_train_start

    tc = config.train
    resources = worker_resources(config, bool(datasets), cluster_cpus)
    job = dataclasses.replace(job, threads_per_worker=max(1, int(resources["CPU"])))
    storage_path, filesystem = storage_for(config.output_root, config.data)
    run_config = RunConfig(
        name=config.name, storage_path=storage_path, storage_filesystem=filesystem,
        checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints or None),
        # worker start-up retries bounded by cluster.start_timeout_s (Ray's default retries them forever)
        failure_config=FailureConfig(max_failures=tc.max_failures,
                                     controller_failure_limit=bound_train_start(config.cluster.start_timeout_s)),
        logging_config=LoggingConfig(log_level="WARNING"))  # rank 0's progress notes replace Ray's per-report lines
    return TorchTrainer(
        train_worker, train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources),
        run_config=run_config, datasets=datasets or None,
        dataset_config=DataConfig(datasets_to_split=["train"]) if datasets else None)
