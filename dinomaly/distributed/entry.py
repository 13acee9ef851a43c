"""How every entry point ends, the same way for every job: one line on a known failure, an exit code.

    return run_job(check=lambda: ..., run=lambda checked: ..., debug=args.debug)

`check` validates everything it can before any cluster work (flags, config, paths, reachability, the
model, where the job writes); a ValueError or OSError there is the user's to fix: one line, exit 2. `run`
does the job; the cluster not giving it its resources (never, or not within cluster.start_timeout_s) ends it
with exit 1. A `UsageError` it raises (a conflict only found once the job looked, e.g. an output folder of
another run), or a ValueError/OSError raised on this process (a bad data layout, a missing mask, a bucket
that refuses writes), ends it with exit 2. Errors that come back from Ray workers, and anything else, are
bugs and keep their traceback, except the user's own data refused in a worker (a corrupt image in strict
mode, a mask whose size differs from its image): one line, exit 2. `debug=True` (--debug) prints the traceback of a user error as well.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

from dinomaly.data.transforms import CorruptImageError, MaskSizeError
from dinomaly.distributed.resources import ResourcesUnavailable

T = TypeVar("T")
USER_ERROR = 2
NO_RESOURCES = 1
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
DATA_ERRORS = (CorruptImageError, MaskSizeError)  # the user's files, refused wherever they were read


class UsageError(Exception):
    """A user error that only the job itself can find; the message says the fix."""


def _from_ray(err: BaseException) -> bool:
    """True for an error raised in a Ray worker and re-raised here (Ray wraps it, cause class included)."""
    return any(cls.__module__.startswith("ray.") for cls in type(err).__mro__)


def _fail(err: BaseException, code: int, prefix: str, debug: bool) -> int:
    if debug:
        traceback.print_exception(err)
    message = str(err).strip() or type(err).__name__
    print(f"error: {prefix}{message}", file=sys.stderr)
    return code


def run_job(check: Callable[[], T], run: Callable[[T], int | None], prefix: str = "", debug: bool = False,
            interrupted: str = "") -> int:
    """check() then run(checked) as an entry point: a user error is one `error:` line and exit 2, resources
    that never come exit 1, Ctrl-C is one `interrupted` line (with `interrupted`, what to do next) and exit 130."""
    try:
        return _run_job(check, run, prefix, debug)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("interrupted" + (f"; {interrupted}" if interrupted else ""), file=sys.stderr)
        return INTERRUPTED


def _run_job(check: Callable[[], T], run: Callable[[T], int | None], prefix: str, debug: bool) -> int:
    try:
        checked = check()
    except (ValueError, OSError) as err:  # FileNotFoundError, PermissionError, ConnectionError included
        return _fail(err, USER_ERROR, prefix, debug)
    try:
        code = run(checked)
        return code if isinstance(code, int) else 0
    except UsageError as err:
        return _fail(err, USER_ERROR, prefix, debug)
    except ResourcesUnavailable as err:
        return _fail(err, NO_RESOURCES, "", debug)
    except Exception as err:
        refused = _data_error(err)
        if refused is not None:
            return _fail(refused, USER_ERROR, prefix, debug)
        if isinstance(err, (ValueError, OSError)) and not _from_ray(err):
            return _fail(err, USER_ERROR, prefix, debug)
        raise


def _data_error(err: BaseException) -> BaseException | None:
    """The user's refused file behind an error from a Ray worker, if that is what it is. Ray Core keeps the
    worker's error as .cause, Ray Train lists it per worker (worker_failures), a chain links it (__cause__,
    __context__). A Ray Data actor pool wraps it in its own UserCodeException before it is pickled, which drops
    the chain: there only the worker's traceback, the text of Ray's error, still names it."""
    seen, pending = set(), [err]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, DATA_ERRORS):
            return getattr(current, "cause", None) or current  # .cause: the message without Ray's traceback
        named = _named_in_traceback(str(current)) if _from_ray(current) else None
        if named is not None:
            return named
        pending += [current.__cause__, current.__context__, getattr(current, "cause", None)]
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            pending += list(failures.values())
    return None


def _data_error_classes() -> dict[str, type[BaseException]]:
    """'module.Class' -> class for DATA_ERRORS and their subclasses (as a traceback names them)."""
    found, pending = {}, list(DATA_ERRORS)
    while pending:
        cls = pending.pop()
        found[f"{cls.__module__}.{cls.__qualname__}"] = cls
        pending += cls.__subclasses__()
    return found


def _named_in_traceback(text: str) -> BaseException | None:
    """The outermost data error a worker's traceback names ('module.Class: message' lines), rebuilt."""
    classes = _data_error_classes()
    named = None
    for line in text.splitlines():
        name, sep, message = line.partition(": ")
        if sep and name.strip() in classes:
            named = classes[name.strip()](message.strip())
    return named
