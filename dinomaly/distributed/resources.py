"""Bounded waits for cluster resources, with the holders named, before a job starts.

A Ray job whose CPUs/GPUs are held by something else (a Serve app's replicas, a forgotten actor, another
job's worker group) otherwise waits without end: Ray Train V2 retries "The worker group startup timed out
after 60.0 seconds" forever, a Ray Data actor pool or a Serve deployment waits for replicas that never
start. Every entry point describes what it needs as a `Request` and calls `check_resources` first:

    request = train_request(config, {"CPU": 1.0})        # "train run 'demo' needs 2 workers x 1 CPU (2 CPU)"
    check_resources(request, config.cluster.start_timeout_s)

A request larger than the cluster (in total, or one worker bigger than any node; on an autoscaling
cluster, larger than its configured maximum) fails at once with `ResourcesUnavailable`; one that could
fit later waits, logging "waiting for resources: ..." once a minute, for at most
cluster.start_timeout_s (0 = forever), then fails with the same numbers and what holds the resources
(`holders()`: Serve apps, actors, placement groups, via Ray's State API).

Free resources are not compared by numbers (racy, and blind to how bundles fit on nodes): the wait
reserves a placement group with the request's bundles, the way Ray Train places its workers, and waits
for Ray to grant it; it is removed right before the job starts so the job can take the same resources.
Something can still take them in that short gap, so Ray Train's own start-up retries are bounded too
(`bound_train_start`), and Ray Data's wait for its actor pool (`wait_for_batch_resources`).
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from dinomaly.config import Config
from dinomaly.distributed.holders import EPS, PROBE_PREFIX, amounts, holders, number_text

logger = logging.getLogger(__name__)

NOTE_INTERVAL_S = 60.0  # one "waiting for resources" line a minute
FIRST_LOOK_S = 1.0  # a request that is granted within this is not reported as waiting
TRAIN_START_ATTEMPTS = 3  # Ray Train start-up attempts that share cluster.start_timeout_s

# Ray Train V2 reads these (ray/train/v2/_internal/constants.py; DataParallelTrainer passes the driver's
# value on to its controller actor): the per-attempt wait for the worker group's placement group.
TRAIN_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


class ResourcesUnavailable(RuntimeError):
    """The cluster cannot give a job its resources: never (`never_fits`) or not within the time allowed."""

    def __init__(self, message: str, never_fits: bool = False):
        super().__init__(message)
        self.never_fits = never_fits


@dataclass(frozen=True)
class Request:
    """What a job needs from the cluster: one bundle per worker / actor / replica, all at the same time.

    what: the job, as the user knows it ("train run 'demo'", "evaluate", "Serve app 'dinomaly'").
    label: the bundles in words ("2 workers x 1 CPU"). fix: what the user can lower ("lower --workers").
    """

    what: str
    bundles: tuple[dict[str, float], ...]
    label: str
    fix: str = ""

    @property
    def total(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for bundle in self.bundles:
            for key, value in bundle.items():
                total[key] = total.get(key, 0.0) + value
        return {k: v for k, v in total.items() if v > EPS}

    def placeable(self) -> list[dict[str, float]]:
        """The bundles without zero amounts (Ray refuses empty bundles and zero-valued resources)."""
        bundles = [{k: float(v) for k, v in b.items() if v > EPS} for b in self.bundles]
        return [b for b in bundles if b]

    def needs(self) -> str:
        """'train run 'x' needs 2 workers x 1 CPU (2 CPU)'."""
        return f"{self.what} needs {self.label} ({amounts(self.total)})"


def _per_item(unit: str, count: int, each: dict[str, float]) -> str:
    shown = amounts(each)
    return f"{count} {unit}{'' if count == 1 else 's'} x {shown if ',' not in shown else f'({shown})'}"


# --------------------------------------------------------------------------- what each job needs


def train_request(config: Config, per_worker: dict[str, float], what: str = "") -> Request:
    """A Ray Train run: train.num_workers bundles of `per_worker` (training.worker_resources)."""
    count = config.train.num_workers
    return Request(what=what or f"train run '{config.name}'", bundles=tuple(dict(per_worker) for _ in range(count)),
                   label=_per_item("worker", count, per_worker),
                   fix="lower --workers (train.num_workers) or train.cpus_per_worker")


def batch_request(config: Config, what: str) -> Request:
    """evaluate / predict: eval.actors model actors (+ one CPU reading images beside GPU actors)."""
    e = config.eval
    each = {"CPU": e.cpus_per_actor, "GPU": e.gpus_per_actor}
    bundles = [dict(each) for _ in range(e.actors)]
    label = _per_item("model actor", e.actors, each)
    if e.gpus_per_actor > 0:  # reading runs in CPU tasks beside GPU actors (dinomaly.distributed.batch.scoring)
        bundles.append({"CPU": 1.0})
        label += " + 1 CPU reading images"
    return Request(what=what, bundles=tuple(bundles), label=label,
                   fix="lower eval.actors, eval.cpus_per_actor or eval.gpus_per_actor")


def serve_request(config: Config, app_name: str) -> Request:
    """A Serve app: serve.num_replicas replicas (the initial count when autoscaling) of num_cpus/num_gpus."""
    s = config.serve
    each = {"CPU": s.num_cpus, "GPU": s.num_gpus}
    return Request(what=f"Serve app '{app_name}'", bundles=tuple(dict(each) for _ in range(s.num_replicas)),
                   label=_per_item("replica", s.num_replicas, each),
                   fix="lower serve.num_replicas, serve.num_cpus or serve.num_gpus")


# --------------------------------------------------------------------------- checking and waiting


def check_resources(request: Request, timeout_s: float, on_progress: Callable[[str], None] | None = None) -> None:
    """Return once the cluster can place `request` (Ray must be initialised); else ResourcesUnavailable.

    Never fits (more than the cluster has, or a bundle larger than every node): raises at once. Otherwise
    waits up to timeout_s seconds (0 = forever), passing "waiting for resources: ..." to on_progress
    (default: a log warning) when the request is not granted within a second, then once a minute.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = request.placeable()
    if not bundles:
        return
    never = _never_fits(request, bundles)
    if never:
        raise ResourcesUnavailable(f"{request.needs()}, which never fits: {never}; {request.fix}", never_fits=True)
    note = on_progress or logger.warning
    # A placement group asks Ray's scheduler itself: bundle-to-node fit, atomically, and it is what an
    # autoscaler scales up for. It only reserves: it is removed before the job asks for the same resources.
    group = placement_group(bundles, strategy="PACK", name=f"{PROBE_PREFIX}{uuid.uuid4().hex[:8]}")
    try:
        ready = group.ready()
        start = time.monotonic()
        deadline = start + timeout_s if timeout_s > 0 else math.inf
        wait = FIRST_LOOK_S
        while True:
            granted, _ = ray.wait([ready], timeout=max(0.0, min(wait, deadline - time.monotonic())))
            if granted:
                if wait > FIRST_LOOK_S:
                    note(f"resources granted after {time.monotonic() - start:.0f} s: {request.needs()}")
                return
            if deadline - time.monotonic() < 0.05:  # ray.wait may return a hair early
                raise ResourcesUnavailable(
                    f"{describe(request)}; still not free after {number_text(timeout_s)} s "
                    f"(cluster.start_timeout_s); free them, {request.fix}, or raise cluster.start_timeout_s "
                    "(0 = wait forever)")
            left = "" if math.isinf(deadline) else f"; giving up in {deadline - time.monotonic():.0f} s"
            note(f"waiting for resources: {describe(request)}{left}")
            wait = NOTE_INTERVAL_S
    finally:
        remove_placement_group(group)


def describe(request: Request) -> str:
    """'train run 'x' needs 2 workers x 1 CPU (2 CPU); the cluster has 4 CPU, 0.5 free; held by: ...'."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    have = "; ".join(f"{number_text(total.get(k, 0.0))} {k}, {number_text(free.get(k, 0.0))} free" for k in request.total)
    held = holders()
    return f"{request.needs()}; the cluster has {have}; held by: {'; '.join(held) if held else 'nothing listed'}"


def _never_fits(request: Request, bundles: list[dict[str, float]]) -> str:
    """Why `request` can never be placed ('' = it could be, now or later)."""
    import ray

    total = ray.cluster_resources()
    nodes = [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]
    limits = _autoscaler_limits()
    if limits is not None:  # an autoscaler may add nodes: compare with the most it may ever have
        most, shapes = limits
        total = {k: max(total.get(k, 0.0), most.get(k, 0.0)) for k in set(total) | set(most)}
        nodes += shapes
    for key, need in request.total.items():
        if need > total.get(key, 0.0) + EPS:
            scope = "at most (autoscaling included)" if limits is not None else "in all"
            return f"the cluster has {number_text(total.get(key, 0.0))} {key} {scope}"
    for bundle in bundles:
        if not any(all(node.get(k, 0.0) + EPS >= v for k, v in bundle.items()) for node in nodes):
            largest = {k: max((node.get(k, 0.0) for node in nodes), default=0.0) for k in bundle}
            return (f"each needs {amounts(bundle)} on one node, and no node has that much (the largest have "
                    f"{', '.join(f'{number_text(v)} {k}' for k, v in largest.items())})")
    return ""


def _autoscaler_limits() -> tuple[dict[str, float], list[dict[str, float]]] | None:
    """(most resources, node shapes) the autoscaler may provide, or None without an autoscaler config.

    The same (private) source as Ray Train's own up-front check, WorkerGroup.
    _check_cluster_resources_and_raise_if_insufficient in ray/train/v2/.../worker_group.py.
    """
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
        most = state.get_max_resources_from_cluster_config()
        if config is None or not most:
            return None
        shapes = [dict(group.resources) for group in config.node_group_configs if group.max_count != 0]
        return {k: float(v) for k, v in most.items()}, [{k: float(v) for k, v in s.items()} for s in shapes]
    except Exception:  # noqa: BLE001 - a private API: without it, compare with the nodes there are
        return None


# --------------------------------------------------------------------------- bounding Ray's own waits


_train_timeout_set: str | None = None  # the value bound_train_start last put in the environment


def bound_train_start(timeout_s: float) -> int:
    """Bound Ray Train's own worker-group start-up to about timeout_s in all; returns controller_failure_limit.

    Ray Train V2 waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (default 60) for the workers' placement group,
    then raises WorkerGroupStartupTimeoutError, a controller error it retries up to
    FailureConfig.controller_failure_limit times (default -1 = forever; ray/train/v2/_internal/execution/
    failure_handling/default.py). This splits timeout_s into TRAIN_START_ATTEMPTS attempts (or honours a
    per-attempt value the user exported) and limits the retries so the attempts add up to timeout_s.
    0 = wait forever: Ray's defaults. Must run before fit(): the trainer passes the variable to its controller.
    """
    global _train_timeout_set
    value = os.environ.get(TRAIN_START_TIMEOUT_ENV)
    ours = value is not None and value == _train_timeout_set
    if timeout_s <= 0:
        if ours:
            del os.environ[TRAIN_START_TIMEOUT_ENV]
            _train_timeout_set = None
        return -1
    if value is not None and not ours:
        try:
            per_attempt = float(value)
        except ValueError:
            per_attempt = 60.0  # Ray itself would fail on it; no better guess
    else:
        per_attempt = max(1.0, timeout_s / TRAIN_START_ATTEMPTS)
        _train_timeout_set = f"{per_attempt:g}"
        os.environ[TRAIN_START_TIMEOUT_ENV] = _train_timeout_set
    return max(0, math.floor(timeout_s / per_attempt + EPS) - 1) if per_attempt > 0 else 0


def is_start_timeout(err: BaseException) -> bool:
    """True when a Ray Train failure is its worker group not getting resources in time."""
    # Ray 2.60 exports ControllerError but keeps WorkerGroupStartupTimeoutError internal
    # (ray/train/v2/_internal/exceptions.py): match it by name rather than import a private module.
    failure = getattr(err, "controller_failure", None)
    return any(type(e).__name__ == "WorkerGroupStartupTimeoutError" for e in (err, failure) if e is not None)


def start_timeout_error(request: Request, timeout_s: float) -> ResourcesUnavailable:
    """The error for a Ray Train run whose workers could not be placed within its bounded retries."""
    return ResourcesUnavailable(
        f"{describe(request)}; Ray Train could not place its workers within {number_text(timeout_s)} s "
        f"(cluster.start_timeout_s); free them, {request.fix}, or raise cluster.start_timeout_s (0 = wait forever)")


_data_wait_set: int | None = None


def check_local_gpus(gpus: float, what: str) -> None:
    """Before Ray starts: a local Ray that this job starts itself has this machine's GPUs only, so a GPU request
    (what: the setting that asks for it) that this machine cannot meet is refused here, not after Ray starts.
    Joining a running cluster (RAY_ADDRESS, or `ray start` on this machine) skips the check: Ray knows its GPUs."""
    from ray._private.utils import read_ray_address  # where ray.init() looks when given no address

    if gpus <= 0 or os.environ.get("RAY_ADDRESS") or read_ray_address():
        return
    import torch

    have = torch.cuda.device_count()
    if have < gpus:
        raise ValueError(f"{what} asks for {number_text(gpus)} GPU(s) but this machine has {have}; drop --gpu, "
                         "or submit the job to a Ray cluster with GPUs (ray job submit)")


def wait_for_batch_resources(config: Config, what: str, on_progress: Callable[[str], None] | None = None) -> None:
    """Before an evaluate/predict run: wait (bounded) for its actor pool's resources, and bound Ray Data's
    own wait for the pool's actors (DataContext.wait_for_min_actors_s, default -1 = forever) to
    cluster.start_timeout_s, unless the user set it; datasets created afterwards carry the bound."""
    global _data_wait_set
    from ray.data import DataContext

    timeout_s = config.cluster.start_timeout_s
    context = DataContext.get_current()
    if context.wait_for_min_actors_s <= 0 or context.wait_for_min_actors_s == _data_wait_set:
        _data_wait_set = math.ceil(timeout_s) if timeout_s > 0 else -1
        context.wait_for_min_actors_s = _data_wait_set
    check_resources(batch_request(config, what), timeout_s, on_progress)
