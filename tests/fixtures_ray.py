"""One fresh local Ray cluster for the whole test session, shared by the Data, Train, Tune and Serve tests,
and a check after every test module that the module gave back everything it reserved on it.

Starting Ray costs 3-9 s on 2 cores, so it happens once. The cluster declares 4 logical CPUs on the 2 real
ones: with only 2, two 1-CPU Train workers leave none for Ray Data's read/map tasks and a lazy training
dataset waits forever. It is always a new local cluster (`address="local"`), never a `ray start` cluster
that happens to run on the machine. The dashboard runs (on a free loopback port) because Ray's State API
needs it: Ray Train's placement-group cleaner uses it, and so do the messages that name resource holders.
The loopback-only variables are set in conftest.py before Ray is imported.
"""

from __future__ import annotations

import socket
import time

import pytest

RAY_TEST_CPUS = 4
RAY_TEST_OBJECT_STORE_BYTES = 1024**3
RELEASE_GRACE_S = 30.0  # Ray frees an actor's or placement group's resources asynchronously after it ends


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    """A fresh local Ray (4 logical CPUs, 1 GiB object store, dashboard on loopback); stopped after the session."""
    import ray
    import ray.data

    if ray.is_initialized():  # an in-process pipeline call started its own Ray: replace it with ours
        ray.shutdown()
    context = ray.init(address="local", num_cpus=RAY_TEST_CPUS, object_store_memory=RAY_TEST_OBJECT_STORE_BYTES,
                       include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=_free_port(),
                       log_to_driver=False, configure_logging=False)
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = False
    try:
        yield context
    finally:
        _stop_serve()
        ray.shutdown()


def _stop_serve() -> None:
    import sys

    if "ray.serve" not in sys.modules:  # only if a test started Serve
        return
    from ray import serve

    try:
        serve.shutdown()
    except Exception as err:  # noqa: BLE001 - teardown must go on to ray.shutdown
        print(f"serve.shutdown failed during teardown: {err}", file=sys.stderr)


def held_resources() -> dict[str, float]:
    """What is reserved now on the running cluster: CPU, GPU and custom resources (memory aside)."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    return {key: round(value - free.get(key, 0.0), 4) for key, value in total.items()
            if not key.startswith("node:") and key not in ("memory", "object_store_memory")
            and value - free.get(key, 0.0) > 1e-6}


def describe_holders() -> list[str]:
    """Who holds the reserved resources, as the product's error messages name them."""
    try:
        from dinomaly.distributed.holders import holders
    except ImportError:  # pragma: no cover - the product module names holders; keep the check usable without it
        return []
    try:
        return holders()
    except Exception as err:  # noqa: BLE001 - naming is best effort; the held numbers are the finding
        return [f"(could not list holders: {err})"]


def release_everything() -> None:
    """Stop Serve and remove this session's placement groups, so the next module starts clean."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    _stop_serve()
    for pg_id, info in ray.util.placement_group_table().items():
        if info["state"] == "CREATED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))


@pytest.fixture(scope="module", autouse=True)
def module_releases_ray_resources(request):
    """After each test module: the session cluster's free resources must be back to its totals.

    A module that leaves a Serve app, an actor, a Train worker group or a placement group behind makes every
    later Train/Tune run wait for resources that never come; failing here names the module and the holders.
    """
    yield
    import ray

    if not ray.is_initialized():
        return
    deadline = time.monotonic() + RELEASE_GRACE_S
    while (held := held_resources()) and time.monotonic() < deadline:
        time.sleep(0.25)
    if not held:
        return
    holders = describe_holders()
    release_everything()  # the next module must not pay for this one
    pytest.fail(f"{request.module.__name__} left Ray resources reserved after its last test: {held}; "
                f"held by: {'; '.join(holders) or 'unknown'}", pytrace=False)
