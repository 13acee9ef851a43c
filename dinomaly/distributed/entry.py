"""How every entry point ends, the same way for every job: one line on a known failure, an exit code.

    return run_job(check=lambda: ..., run=lambda checked: ...)

`check` validates everything it can before any cluster work (flags, config, paths, reachability, the
model); a ValueError or OSError there is the user's to fix: one line, exit 2. `run` does the job; the
cluster not giving it its resources (never, or not within cluster.start_timeout_s) ends it with exit 1, and a
`UsageError` it raises (a conflict only found once the job looked, e.g. an output folder of another run)
with exit 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

from dinomaly.distributed.resources import ResourcesUnavailable

T = TypeVar("T")
USER_ERROR = 2
NO_RESOURCES = 1


class UsageError(Exception):
    """A user error that only the job itself can find; the message says the fix."""


def run_job(check: Callable[[], T], run: Callable[[T], int | None], prefix: str = "") -> int:
    try:
        checked = check()
    except (ValueError, OSError) as err:  # FileNotFoundError, PermissionError, ConnectionError included
        print(f"error: {prefix}{err}", file=sys.stderr)
        return USER_ERROR
    try:
        code = run(checked)
        return code if isinstance(code, int) else 0
    except UsageError as err:
        print(f"error: {prefix}{err}", file=sys.stderr)
        return USER_ERROR
    except ResourcesUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return NO_RESOURCES
