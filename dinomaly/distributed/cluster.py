"""What every job needs from Ray: the same environment, one way to start or join a cluster, and storage.

Ray reads these variables when it starts, so they are set (as defaults a user can override) before any
module of the Ray layer imports Ray:
- RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes a local Ray on Linux use 127.0.0.1 for its node address, so every
  socket it opens listens on loopback only (without it Ray binds the machine's external interface);
- RAY_TRAIN_ENABLE_PRINT_PATCH=0 stops Ray Train from printing every worker `print` twice on the driver;
- PYTHONWARNINGS gains a filter for one deprecation warning that Ray Train 2.60 raises in its own
  DatasetManager actor on every run (it reads `ExecutionOptions.exclude_resources` itself); the processes of
  a Ray that this process starts inherit it.

Under `ray job submit --working-dir`, the job's working folder is Ray's unpacked package
(<Ray temp dir>/session_*/runtime_resources/working_dir_files/_ray_pkg_*), deleted with the session; a
relative path there is lost. `check_job_storage` therefore refuses, before any work, a relative output, Ray
run folder or MLflow store inside a job: they must be absolute paths or URIs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

RAY_ENVIRONMENT = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
RAY_OWN_WARNING = "ignore:`ExecutionOptions.exclude_resources` is deprecated"  # a PYTHONWARNINGS entry


def set_ray_environment() -> None:
    for key, value in RAY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    filters = [entry for entry in os.environ.get("PYTHONWARNINGS", "").split(",") if entry]
    if RAY_OWN_WARNING not in filters:
        os.environ["PYTHONWARNINGS"] = ",".join([*filters, RAY_OWN_WARNING])


def attaching_to_cluster() -> bool:
    """True when ray.init() joins an existing cluster (RAY_ADDRESS, e.g. under `ray job submit`)."""
    return bool(os.environ.get("RAY_ADDRESS"))


def in_ray_job(cwd: str | Path | None = None) -> bool:
    """True when this process is a submitted Ray job (or runs in Ray's package folder of one)."""
    if os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return True
    return "/runtime_resources/working_dir_files/" in str(Path(cwd or os.getcwd()).resolve()) + "/"


def _stable(location: str) -> bool:
    """An absolute path or a URI with a scheme; sqlite:///x (three slashes) is a relative sqlite file."""
    if location.startswith("sqlite:"):
        return location.startswith("sqlite:////")
    return "://" in location or Path(location).is_absolute()


def check_job_storage(locations: dict[str, str], tracking_uri: str | None = None) -> None:
    """Inside a Ray job, every place the job writes must outlive Ray's temporary working folder.

    locations: what -> path or URI (e.g. {"--output": "runs/demo", "--storage-path": "runs"}); tracking_uri:
    the MLflow store as configured (tracking.tracking_uri, else MLFLOW_TRACKING_URI, else the relative
    default sqlite:///mlflow.db), None when the job logs nothing to MLflow. Outside a job: nothing to check.
    """
    if not in_ray_job():
        return
    named = dict(locations)
    if tracking_uri is not None:
        named["MLflow store"] = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "") or "sqlite:///mlflow.db"
    lost = [f"{what} {where}" for what, where in named.items() if not _stable(str(where))]
    if lost:
        raise ValueError(f"inside a Ray job the working folder {os.getcwd()} is deleted with the Ray session, so "
                         f"these would be lost: {', '.join(lost)}; pass absolute paths or s3:// URIs to --output "
                         "and --storage-path, and set MLFLOW_TRACKING_URI (e.g. --runtime-env-json "
                         "'{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"sqlite:////abs/path/mlflow.db\"}}' "
                         "or an http:// MLflow server)")


def ensure_ray(log_to_driver: bool = True) -> bool:
    """Join RAY_ADDRESS when set (ray job submit), else start a local loopback Ray; True if this call started it."""
    set_ray_environment()
    import ray

    started = not ray.is_initialized()
    if started:
        if not attaching_to_cluster():
            # one local node, never drained: Ray Train's watcher for drained nodes would be one more process,
            # and its start logs an error-level line about its own restart policy
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
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
