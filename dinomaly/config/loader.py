"""Building a `Config`: YAML presets plus `section.key=value` overrides, type checks, flattening, `--help`.

The same `Config` object is validated on the driver, shipped to Ray workers, flattened into MLflow
params and stored as JSON next to every checkpoint, so a checkpoint always knows how it was built.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml

from dinomaly.config.jobs import Config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # the repository's presets, next to dinomaly/

_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def read_float_text(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads 1e-3 (no dot) as the string '1e-3': return such text as a float, else value."""
    return float(value) if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value) else value


def read_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, with a syntax error turned into a one-line ValueError naming `where` and the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{where} is not valid YAML{at}: {problem}; check the brackets, quotes and "
                         "indentation there") from err


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


_SCALARS = {  # type -> (accepts the YAML value, what the error says it must be); bool is not an int here
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _check_type(path: str, value: Any, tp: Any) -> Any:
    """Coerce a YAML value to the annotated type, or raise a ValueError naming the key."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"{path}={value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_type(path, value, arg)
            except ValueError:
                continue
        raise ValueError(f"{path}={value!r} does not match {tp}")
    if tp is type(None):
        if value is not None:
            raise ValueError(f"{path}={value!r} must be null")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path}={value!r} must be a list")
        (arg,) = typing.get_args(tp)
        return [_check_type(f"{path}[{i}]", v, arg) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{path}={value!r} must be a mapping")
        return dict(value)
    if tp in _SCALARS:
        value = read_float_text(value) if tp is float else value
        accepts, what = _SCALARS[tp]
        if not accepts(value):
            raise ValueError(f"{path}={value!r} must be {what}")
        return float(value) if tp is float else value
    return value


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys are errors that name the closest field."""
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in names:
            initials = "".join(word[:1] for word in key.split("_"))  # learning_rate -> lr
            close = [initials] if initials in names else difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{(path + '.') if path else ''}{close[0]}'?" if close else ""
            raise ValueError(f"unknown config key '{where}'{hint} (known: {', '.join(names)})")
        tp = hints[key]
        kwargs[key] = from_dict(tp, value, where) if _is_dataclass_type(tp) else _check_type(where, value, tp)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override '{dotted}': '{key}' is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=1e-3' -> ('train.lr', 0.001); values are parsed as YAML (lists, numbers, booleans)."""
    if "=" not in text:
        raise ValueError(f"override '{text}' must look like section.key=value, e.g. train.total_steps=500")
    key, raw = text.split("=", 1)
    value = read_yaml(raw, f"override {text!r}") if raw.strip() else ""
    return key.strip(), value


def apply_overrides(config: Config, overrides: dict[str, Any] | list[str]) -> Config:
    """Return a new validated Config with dotted-path overrides applied (used by CLI and Tune)."""
    tree = to_dict(config)
    items = [parse_override(o) for o in overrides] if isinstance(overrides, list) else list(overrides.items())
    for key, value in items:
        _set_path(tree, key, value)
    return from_dict(Config, tree)


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Load a YAML preset (a path or a name in configs/, e.g. 'demo') and apply overrides."""
    tree: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file() and (CONFIG_DIR / f"{path}.yaml").exists():
            p = CONFIG_DIR / f"{path}.yaml"
        if not p.is_file():
            presets = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
            raise FileNotFoundError(f"config '{path}' not found; pass a YAML file or a preset: {presets}")
        tree = read_yaml(p.read_text(), f"config file {str(p)!r}") or {}
    config = from_dict(Config, tree)
    return apply_overrides(config, overrides or [])


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """{'model.encoder': ..., 'train.lr': ...}: MLflow params and Tune search-space keys."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        else:
            out[key] = value
    return out


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, help, default) for every field: the config part of each pipeline's --help."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            rows.extend(describe(tp, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f"{prefix}{f.name}", f.metadata.get("doc", ""), default))
    return rows


def help_text(reads: Iterable[str] | None = None) -> str:
    """The config part of --help. reads: the sections ("model") and keys ("tune.metrics") a job uses, "" for
    the top-level keys; None lists every key."""
    rows = describe()
    if reads is not None:
        wanted = tuple(reads)
        rows = [row for row in rows if any(_within(row[0], part) for part in wanted)]
    lines = ["config keys (override with --set key=value); the defaults shown are the built-in ones, and a preset",
             "(--config demo, mvtec_uni, ...: configs/<preset>.yaml) sets some of them differently:"]
    for key, text, default in rows:
        lines.append(f"  {key} = {default!r}\n      {text}")
    if reads is not None:
        lines.append(f"  (only the {len(rows)} keys this job reads; the other {len(describe()) - len(rows)} are for "
                     "other pipelines: tune.py --help lists training's and tuning's, serve.py --help serving's)")
    return "\n".join(lines)


def _within(key: str, part: str) -> bool:
    if part == "":
        return "." not in key
    return key == part or key.startswith(part + ".")
