"""What every job needs from Ray: the same environment, one way to start or join a cluster, and storage.

Ray reads these variables when it starts, so they are set (as defaults a user can override) before any
module of the Ray layer imports Ray:
- RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes a local Ray on Linux use 127.0.0.1 for its node address, so every
  socket it opens listens on loopback only (without it Ray binds the machine's external interface);
- RAY_TRAIN_ENABLE_PRINT_PATCH=0 stops Ray Train from printing every worker `print` twice on the driver.
"""

from __future__ import annotations

import os
from typing import Any

RAY_ENVIRONMENT = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def set_ray_environment() -> None:
    for key, value in RAY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def attaching_to_cluster() -> bool:
    """True when ray.init() joins an existing cluster (RAY_ADDRESS, e.g. under `ray job submit`)."""
    return bool(os.environ.get("RAY_ADDRESS"))


def ensure_ray(log_to_driver: bool = True) -> bool:
    """Join RAY_ADDRESS when set (ray job submit), else start a local loopback Ray; True if this call started it."""
    set_ray_environment()
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(log_to_driver=log_to_driver, configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the entry points print their own progress lines
    context.print_on_execution_start = False
    return started


def storage_for(uri: str, data_config=None) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for Ray's RunConfig: local folders as they are, s3:// resolved."""
    from dinomaly.data.storage import filesystem_for, split_uri

    scheme, path = split_uri(uri)
    if not scheme:
        return path, None
    filesystem, path = filesystem_for(uri, data_config)
    return path, filesystem
