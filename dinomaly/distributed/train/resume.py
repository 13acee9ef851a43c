"""Whether a run of this name already exists on its storage, and where it stands: --resume's checks.

Ray Train keeps one record per run, <output_root>/<name>/checkpoint_manager_snapshot.json, naming its
checkpoints and the metrics reported with them; it is there once the run has reported a checkpoint.
"""

from __future__ import annotations

import json

import pyarrow.fs as pafs

from dinomaly.config import Config
from dinomaly.data.storage import filesystem_for

RAY_RUN_RECORD = "checkpoint_manager_snapshot.json"


def _record_path(config: Config) -> tuple[pafs.FileSystem, str]:
    filesystem, root = filesystem_for(config.output_root, config.data)
    return filesystem, f"{root.rstrip('/')}/{config.name}/{RAY_RUN_RECORD}"


def run_exists(config: Config) -> bool:
    """True when Ray Train already has a run named config.name under output_root (it would resume it)."""
    filesystem, record = _record_path(config)
    return filesystem.get_file_info(record).type != pafs.FileType.NotFound


def check_resume(config: Config, resume: bool) -> None:
    """--resume needs an earlier run of this name; without it, an earlier run is an error, not a silent resume."""
    if config.train.setting == "separate":
        return  # per-class runs (<name>-<class>) resume by themselves when rerun
    exists = run_exists(config)
    where = f"{config.output_root}/{config.name}"
    if resume and not exists:
        raise FileNotFoundError(f"nothing to resume: no checkpointed run at {where}; check --name, --output and "
                                "--storage-path")
    if exists and not resume:
        raise ValueError(f"a run named '{config.name}' already exists at {where}; pass --resume to continue it, "
                         "or start a new run with --name <new name> or --output <new folder>")


def finished_step(config: Config) -> int | None:
    """The step of the run's latest checkpoint when it has reached train.total_steps (resuming would train
    nothing); None otherwise, or when the record cannot be read."""
    filesystem, record = _record_path(config)
    try:
        with filesystem.open_input_stream(record) as handle:
            step = json.loads(handle.read())["latest_checkpoint_result"]["metrics"]["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) and step >= config.train.total_steps else None
