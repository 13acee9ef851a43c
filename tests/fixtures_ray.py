"""One local Ray cluster for the whole test session, shared by the Data, Train, Tune and Serve tests.

Starting Ray costs 3-9 s on 2 cores, so it happens once. The cluster declares 4 logical CPUs on
the 2 real ones: with only 2, two 1-CPU Train workers leave none for Ray Data's read/map tasks and
a lazy training dataset hangs forever (shared/ray-notes.md section 2). The loopback-only variables
are set in conftest.py before Ray is imported.
"""

from __future__ import annotations

import pytest

RAY_TEST_CPUS = 4
RAY_TEST_OBJECT_STORE_BYTES = 1024**3


@pytest.fixture(scope="session")
def ray_session():
    """ray.init for the session (4 logical CPUs, 1 GiB object store, no dashboard); Serve and Ray stopped after."""
    import ray
    import ray.data

    if ray.is_initialized():  # someone else's cluster: use it, leave it running
        yield ray.get_runtime_context()
        return
    context = ray.init(num_cpus=RAY_TEST_CPUS, include_dashboard=False, log_to_driver=False,
                       object_store_memory=RAY_TEST_OBJECT_STORE_BYTES, configure_logging=False)
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = False
    try:
        yield context
    finally:
        import sys

        if "ray.serve" in sys.modules:  # only if a test started Serve
            from ray import serve

            try:
                serve.shutdown()
            except Exception as err:  # noqa: BLE001 - teardown must go on to ray.shutdown
                print(f"serve.shutdown failed during teardown: {err}", file=sys.stderr)
        ray.shutdown()
