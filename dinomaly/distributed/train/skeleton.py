"""The one worker skeleton of every Ray Train run (training and Tune trials) and the one TorchTrainer builder.

Every worker seeds, starts its batch source at the step it resumes from (a Ray Data pipeline then starts up
while the rest is set up), builds its model (the run's latest checkpoint, else --init-from weights, else
fresh), wraps the trainable part in DDP, restores its own dropout RNG stream and runs
dinomaly.loop.train_steps in chunks up to the steps its hooks ask for. At each such step the hooks evaluate, log and report: training
(dinomaly.distributed.train.worker) checkpoints, logs to MLflow and writes the final outputs; a Tune trial
(dinomaly.distributed.tune.trial) computes its objective and reports it to Tune.

Reference semantics under DDP: the hard-mining threshold over the global batch (loss global_batch),
gradients averaged by DDP and clipped on that all-reduced gradient, one schedule step per optimiser step;
the loss in the records is the global batch's (the mean of the ranks' equal-sized local batches).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from dinomaly.checkpoint import load, load_official, save
from dinomaly.config import Config
from dinomaly.distributed.cluster import storage_for
from dinomaly.distributed.train.batches import ManifestBatches, RayDataBatches, TensorBatches
from dinomaly.features import FeatureBatches, FeatureInput
from dinomaly.loop import TrainState, divergence, seed_everything, train_steps
from dinomaly.model.dinomaly import Dinomaly

logger = logging.getLogger(__name__)

BatchSource = TensorBatches | ManifestBatches | RayDataBatches | FeatureBatches
RANK_SEED_STRIDE = 7919  # a fresh rank > 0 stream: seed + rank + stride * step (distinct masks per rank and start)


@dataclass
class WorkerJob:
    """What every worker needs, shipped once through train_loop_config; each job type adds its hooks' inputs.

    stop_at_step: end this invocation after that step (the schedule still spans train.total_steps), so a
    later fit() of the same run resumes there. threads: torch threads per worker (set by build_trainer).
    """

    config: Config
    source: BatchSource
    init_from: str = ""
    stop_at_step: int | None = None
    threads: int = 1


@dataclass
class Chunk:
    """The steps of one train_steps call: per-step records (loss = the global batch's), wall and data-wait time."""

    records: list[dict]
    seconds: float
    data_wait_s: float
    step_waits: list[float] = field(default_factory=list)  # this rank's wait for each step's batch


@dataclass
class Start:
    """A worker's initial model and, when restored from the run's checkpoint, its train state and metadata."""

    model: Dinomaly
    train_state: dict | None = None
    metadata: dict = field(default_factory=dict)
    checkpoint_path: str | None = None


@dataclass
class WorkerRun:
    """One worker's running state, as the hooks see it."""

    config: Config
    rank: int
    world: int
    device: torch.device
    start: Start
    runner: torch.nn.Module  # what forward() trains: the model, or a FeatureInput around it
    trained: torch.nn.Module  # runner as DDP sees it
    state: TrainState
    end: int
    start_step: int = 0
    stopped: bool = False  # set by a hook at a stop (on every rank alike): the loop ends there

    @property
    def model(self) -> Dinomaly:
        return self.start.model

    def report(self, metrics: dict, *, checkpoint: bool = False, metadata: dict | None = None,
               after_save: Callable[[str], None] | None = None) -> None:
        """ray.train.report on every rank (a barrier). With checkpoint, every rank's RNG is gathered (a
        collective) and rank 0 saves the checkpoint with `metadata`, hands its folder to after_save, and
        attaches it."""
        import ray.train

        train_state = train_state_dict(self.state, self.world) if checkpoint else None
        with tempfile.TemporaryDirectory() as tmp:
            attached = None
            if checkpoint and self.rank == 0:
                save(tmp, self.model, self.config, train_state=train_state, metadata=metadata)
                if after_save is not None:
                    after_save(tmp)
                attached = ray.train.Checkpoint.from_directory(tmp)
            name = f"checkpoint_{self.state.step:07d}" if checkpoint else None
            ray.train.report(metrics, checkpoint=attached, checkpoint_dir_name=name)


class Hooks(Protocol):
    """What a job does at the points of the shared loop."""

    def start(self, run: WorkerRun) -> None: ...

    def next_stop(self, run: WorkerRun) -> int:
        """The next step (> run.state.step, <= run.end) after which at_stop runs."""

    def at_stop(self, run: WorkerRun, chunk: Chunk) -> None:
        """Runs on every rank; setting run.stopped (alike on all ranks, e.g. agreed_divergence) ends the loop."""

    def finish(self, run: WorkerRun) -> Any:
        """The worker function's return value (Result.return_value is rank 0's)."""


# --------------------------------------------------------------------------- worker


def run_worker(job: WorkerJob, hooks: Hooks) -> Any:
    """The shared per-worker function body: set up, train in chunks to the hooks' stops, finish."""
    import ray.train
    import ray.train.torch

    quiet_report_log()
    config, tc = job.config, job.config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(job.threads)
    device = ray.train.torch.get_device()
    seed_everything(tc.seed)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    restored = restored_start(job)
    saved = restored.train_state if restored else None
    if saved and rank == 0:  # --resume, or Ray Train's restart after a lost worker
        print(f"resuming at step {int(saved['step'])} from {restored.checkpoint_path}", flush=True)
    # the batch source starts now (a Ray Data pipeline: its executor and first reads), so its start-up runs
    # while the model is built, moved, wrapped and the hooks start, not while step 1 waits
    batches = _Timed(job.source.iterate(rank, world, int(saved["step"]) if saved else 0))
    try:
        start = restored or initial_model(job)
        runner = FeatureInput(start.model) if isinstance(job.source, FeatureBatches) else start.model
        trained = distribute(runner, start.model, device)
        state = TrainState.from_state_dict(trained, config, saved) if saved else TrainState.create(trained, config)
        restore_rank_rng(saved, rank, world, tc.seed, state.step, device)
        end = min(tc.total_steps, job.stop_at_step or tc.total_steps)
        run = WorkerRun(config, rank, world, device, start, runner, trained, state, end, start_step=state.step)
        hooks.start(run)
        while run.state.step < run.end and not run.stopped:
            hooks.at_stop(run, _train_chunk(run, batches, hooks.next_stop(run)))
    finally:
        batches.close()  # ends its reads: a Ray Data pipeline shuts down once every worker has closed
    return hooks.finish(run)


def quiet_report_log() -> None:
    """Ray 2.60's Train logs every report at INFO under a logger named by its source file (logging.getLogger(
    __file__) in ray/train/v2/_internal/execution/context.py), which LoggingConfig does not reach and no public
    setting turns off; the driver's progress lines carry the same numbers."""
    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


def restored_start(job: WorkerJob) -> Start | None:
    """The run's latest checkpoint (model, train state, metadata); None when the run starts afresh."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        loaded = load(directory)
    model = Dinomaly(job.config.model, load_encoder_weights=False)
    model.load_state_dict(loaded.model.state_dict())
    return Start(model, loaded.train_state, loaded.metadata or {}, checkpoint.path)


def initial_model(job: WorkerJob) -> Start:
    """A fresh run's model: the --init-from weights, else the configured encoder weights and a new decoder."""
    config = job.config
    model = Dinomaly(config.model, load_encoder_weights=not job.init_from)
    if job.init_from:
        try:
            model.load_state_dict(_weights_from(job.init_from, config))
        except RuntimeError as err:
            raise ValueError(f"--init-from {job.init_from} does not fit the configured model ({err}); set "
                             "model.* (encoder, encoder_kwargs, decoder_depth, ...) to the weights' architecture") \
                from err
    return Start(model)


def _weights_from(path: str, config: Config) -> dict[str, torch.Tensor]:
    """State dict of an official ViTill .pth/.safetensors file or of one of our checkpoint directories."""
    if Path(path).is_dir():
        return load(path).model.state_dict()
    return load_official(path, config.model).state_dict()


class TrainableOnly(torch.nn.Module):
    """`runner` as DDP sees it: only the bottleneck and decoder are registered, so DDP neither broadcasts nor
    all-reduces the frozen encoder (identical on every rank); forward() and train() go to the whole runner."""

    def __init__(self, runner: torch.nn.Module, model: Dinomaly):
        super().__init__()
        self.bottleneck, self.decoder = model.bottleneck, model.decoder
        self._whole = [runner]  # in a list: not a registered submodule

    def forward(self, inputs: torch.Tensor):
        return self._whole[0](inputs)

    def train(self, mode: bool = True) -> TrainableOnly:
        self.training = mode
        self._whole[0].train(mode)  # Dinomaly keeps its encoder in eval mode
        return self

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self._whole[0].trainable_parameters()


def distribute(runner: torch.nn.Module, model: Dinomaly, device: torch.device) -> torch.nn.Module:
    """runner on this worker's device; with several workers, its trainable part wrapped in DDP."""
    import ray.train.torch

    runner.to(device)
    return ray.train.torch.prepare_model(TrainableOnly(runner, model))


def restore_rank_rng(saved: dict | None, rank: int, world: int, seed: int, step: int, device: torch.device) -> None:
    """Each rank continues its own dropout stream; rank 0 of a fresh run keeps the seed's stream (= local loop)."""
    states = (saved or {}).get("worker_rng") or []
    if len(states) == world:
        torch.set_rng_state(states[rank]["torch"].cpu())
        if "cuda" in states[rank] and device.type == "cuda":
            torch.cuda.set_rng_state(states[rank]["cuda"].cpu(), device)
    elif rank > 0:
        torch.manual_seed(seed + rank + RANK_SEED_STRIDE * step)  # a new world size gets fresh streams


def train_state_dict(state: TrainState, world: int) -> dict:
    """TrainState.state_dict() plus every rank's RNG (a collective: all ranks call it)."""
    saved = state.state_dict()
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, {k: v.cpu() for k, v in state.rng_state.items()})
        saved["worker_rng"] = gathered
    else:
        saved["worker_rng"] = [dict(state.rng_state)]
    return saved


@dataclass
class _Timed:
    """Wraps an iterator and adds up the seconds spent waiting in next(): the data-wait time."""

    source: Iterator[torch.Tensor]
    wait_s: float = 0.0
    waits: list[float] = field(default_factory=list)  # per next() call, since the last chunk

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return next(self.source)
        finally:
            self.waits.append(time.perf_counter() - start)
            self.wait_s += self.waits[-1]

    def close(self) -> None:
        """Stop the source: a prefetching one ends its thread and its Ray Data iteration."""
        close = getattr(self.source, "close", None)
        if close is not None:
            close()


def _train_chunk(run: WorkerRun, batches: _Timed, target: int) -> Chunk:
    started, waited = time.perf_counter(), batches.wait_s
    batches.waits.clear()
    records, run.state = train_steps(run.trained, itertools.islice(batches, target - run.state.step), run.config,
                                     run.state, check_finite=False)  # the hooks decide, at a stop every rank shares
    if run.state.step < target:
        raise ValueError(f"the batch source ran out at step {run.state.step} of {run.end}; give more batches or "
                         "lower train.total_steps")
    return Chunk(global_losses(records, run.world, run.device), time.perf_counter() - started,
                 batches.wait_s - waited, step_waits=list(batches.waits))


def global_losses(records: list[dict], world: int, device: torch.device | None = None) -> list[dict]:
    """Per-rank loss = local batch mean; the global batch's loss is their mean (equal local batches)."""
    if world == 1 or not records:
        return records
    losses = torch.tensor([r["loss"] for r in records], dtype=torch.float64, device=device)  # NCCL: on the GPU
    dist.all_reduce(losses)
    return [dict(r, loss=float(v) / world) for r, v in zip(records, losses.tolist())]


def agreed_divergence(run: WorkerRun, chunk: Chunk) -> dict | None:
    """dinomaly.loop.divergence of this chunk and the weights, the same on every rank (a collective): a rank
    that stopped alone would leave the others waiting in their next all-reduce."""
    found = divergence(chunk.records, run.model.trainable_parameters())
    if run.world == 1:
        return found
    gathered: list = [None] * run.world
    dist.all_gather_object(gathered, found)
    return min((f for f in gathered if f is not None), key=lambda f: f["step"], default=None)  # rank order on ties


# --------------------------------------------------------------------------- driver


def worker_resources(config: Config, uses_ray_data: bool, cluster_cpus: float | None) -> dict[str, float]:
    """CPUs (and GPU) per worker. Auto (train.cpus_per_worker 0): 1 CPU, or less when the workers would take
    every CPU and leave Ray Data's read/decode tasks none (they would then never run)."""
    tc = config.train
    cpus = tc.cpus_per_worker or 1.0
    if not tc.cpus_per_worker and uses_ray_data and cluster_cpus and cluster_cpus - tc.num_workers * cpus < 1:
        cpus = max(0.25, (cluster_cpus - 1) / tc.num_workers)
        logger.info("%d workers get %.2f CPU each so that Ray Data keeps one CPU", tc.num_workers, cpus)
    resources = {"CPU": cpus}
    if tc.use_gpu:
        resources["GPU"] = 1.0
    return resources


def build_trainer(worker: Callable[[dict], Any], job: WorkerJob, resources: dict[str, float], *, name: str,
                  storage: str, max_failures: int, keep_checkpoints: int, callbacks: list | None = None,
                  datasets: dict | None = None, keep_best: tuple[str, str] | None = None):
    """The TorchTrainer of every run: config.train.num_workers workers of `resources` running worker({'job': job}),
    checkpoints under <storage>/<name> (a later fit of the same name resumes from the latest one).

    keep_checkpoints: 0 keeps all. keep_best: (metric, 'max' | 'min'): keep the keep_checkpoints best
    checkpoints by that reported metric instead of the latest ones (Ray always keeps the latest too).
    datasets: Ray Data datasets ({'train': ...}, split across the workers).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dinomaly.distributed.resources import bound_train_start

    config, tc = job.config, job.config.train
    job = dataclasses.replace(job, threads=max(1, int(resources["CPU"])))
    storage_path, filesystem = storage_for(storage, config.data)
    run_config = RunConfig(
        name=name, storage_path=storage_path, storage_filesystem=filesystem, callbacks=callbacks,
        checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints or None,
                                           checkpoint_score_attribute=keep_best[0] if keep_best else None,
                                           checkpoint_score_order=keep_best[1] if keep_best else "max"),
        # worker start-up retries bounded by cluster.start_timeout_s (Ray's default retries them forever)
        failure_config=FailureConfig(max_failures=max_failures,
                                     controller_failure_limit=bound_train_start(config.cluster.start_timeout_s)),
        logging_config=LoggingConfig(log_level="WARNING"))  # progress notes replace Ray's per-report lines
    return TorchTrainer(
        worker, train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources),
        run_config=run_config, datasets=datasets or None,
        dataset_config=DataConfig(datasets_to_split=["train"]) if datasets else None)
