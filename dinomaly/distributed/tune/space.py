"""The search-space mini-language, parsed once into a typed spec that gives Tune's domains and decodes samples.

tune.search_space maps a dotted config key to a spec text (the config keeps it as plain data):

    uniform(lo, hi) | loguniform(lo, hi) | randint(lo, hi) (hi excluded) | choice(v1, ...) | grid(v1, ...) | a value

Arguments are read as one YAML flow list, so choice() takes lists and mappings: choice([[0, 1]], [[0], [1]]).
A mapping value sets the keys below its dotted key together: model: choice({decoder_depth: 4, ...}).
choice()/grid() values travel through Tune as JSON text (Optuna samples scalars only) and `decode` reads them back.

    space = SearchSpace.from_config(config)     # ValueError naming the key for a malformed spec
    tuner = tune.Tuner(..., param_space=space.to_tune())
    overrides = space.decode(params)            # in the trial: Tune's sample -> config overrides
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from dinomaly.config import Config, apply_overrides, flatten, read_float_text, read_yaml
from dinomaly.metrics import METRIC_NAMES

SearchKind = Literal["constant", "uniform", "loguniform", "randint", "choice", "grid"]
SEARCH_KINDS = ("uniform", "loguniform", "randint", "choice", "grid")
RANGE_KINDS = ("uniform", "loguniform", "randint")
_SPEC = re.compile(r"\s*(?P<kind>[a-z]+)\s*\((?P<args>.*)\)\s*", re.DOTALL)
_LINKED_EXAMPLE = "model: choice({decoder_depth: 4, target_layers: [6, 7, 8, 9], fuse_groups: [[0, 1], [2, 3]]})"


@dataclass(frozen=True)
class SearchDimension:
    """One key of the space: 'uniform(0, 0.6)' -> kind 'uniform', args (0, 0.6); a plain value v -> 'constant'."""

    key: str
    kind: SearchKind
    args: tuple[Any, ...]
    text: Any  # the spec as written, for messages

    @classmethod
    def parse(cls, key: str, spec: Any) -> SearchDimension:
        """ValueError naming the key and the fix when the spec is malformed."""
        where = f"tune.search_space[{key!r}]={spec!r}"
        match = _SPEC.fullmatch(spec) if isinstance(spec, str) else None
        if match is None or match["kind"] not in SEARCH_KINDS:
            if isinstance(spec, str) and re.fullmatch(r"\s*[a-z_]+\s*\(.*", spec, re.DOTALL):
                raise ValueError(f"{where}: unknown or malformed search kind; use one of "
                                 f"{', '.join(k + '(...)' for k in SEARCH_KINDS)}")
            # a plain value is YAML like any other (--space gives text: '0.001' is the number, as in --set)
            value = read_float_text(read_yaml(spec, where)) if isinstance(spec, str) and spec.strip() else spec
            return cls(key, "constant", (value,), spec)
        args = read_yaml(f"[{match['args']}]", f"{where}: the argument list")
        kind = match["kind"]
        args = [read_float_text(a) for a in args]
        if kind in RANGE_KINDS:
            if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                raise ValueError(f"{where}: {kind} takes two numbers (low, high)")
            if not args[0] < args[1] or (kind == "loguniform" and args[0] <= 0):
                raise ValueError(f"{where}: need low < high (and low > 0 for loguniform)")
        elif not args:
            raise ValueError(f"{where}: {kind} needs at least one value")
        return cls(key, kind, tuple(args), spec)

    @property
    def categorical(self) -> bool:
        """choice()/grid(): values are sent to Tune as JSON text."""
        return self.kind in ("choice", "grid")

    def is_grid(self, algorithm: str) -> bool:
        """Whether Tune runs every value: grid(), or choice() under tune.search_algorithm=grid."""
        return self.kind == "grid" or (self.kind == "choice" and algorithm == "grid")

    def to_tune(self, algorithm: str) -> Any:
        """This dimension as a Ray Tune domain (or the plain value of a constant)."""
        from ray import tune

        if self.kind == "constant":
            return self.args[0]
        if self.categorical:
            values = [json.dumps(a) for a in self.args]
            return tune.grid_search(values) if self.is_grid(algorithm) else tune.choice(values)
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](*self.args)

    def decode(self, sampled: Any) -> dict[str, Any]:
        """A value Tune sampled for this key -> config overrides."""
        return overrides_of(self.key, json.loads(sampled) if self.categorical else sampled)

    def candidates(self) -> tuple[Any, ...]:
        """Values to check against the config alone: a range's two ends, every choice, the constant."""
        return self.args


def overrides_of(key: str, value: Any) -> dict[str, Any]:
    """{key: value}, or for a mapping value one override per key below `key` (linked keys set together)."""
    if isinstance(value, dict):
        return {f"{key}.{sub}": v for sub, v in value.items()}
    return {key: value}


@dataclass(frozen=True)
class SearchSpace:
    """tune.search_space parsed: its dimensions in the config's order, and the search algorithm they serve."""

    dimensions: tuple[SearchDimension, ...]
    algorithm: str = "random"

    @classmethod
    def parse(cls, space: Mapping[str, Any], algorithm: str = "random") -> SearchSpace:
        return cls(tuple(SearchDimension.parse(key, spec) for key, spec in space.items()), algorithm)

    @classmethod
    def from_config(cls, config: Config) -> SearchSpace:
        return cls.parse(config.tune.search_space, config.tune.search_algorithm)

    def to_tune(self) -> dict[str, Any]:
        """Ray Tune's param_space."""
        return {d.key: d.to_tune(self.algorithm) for d in self.dimensions}

    def decode(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Tune's sampled values (a trial's config) -> config overrides."""
        by_key = {d.key: d for d in self.dimensions}
        overrides: dict[str, Any] = {}
        for key, value in params.items():
            overrides.update(by_key[key].decode(value) if key in by_key else overrides_of(key, value))
        return overrides

    def grid_size(self) -> int:
        """Combinations Tune runs per sample: the product of the grid dimensions' sizes."""
        size = 1
        for dimension in self.dimensions:
            if dimension.is_grid(self.algorithm):
                size *= len(dimension.args)
        return size


def check_search_space(config: Config) -> SearchSpace:
    """The parsed space, once every key is a config path and each value (range ends, choices) is a valid
    config alone; also the tune settings that only the tune package can check (metrics, Optuna).

    Keys that only make sense together (decoder_depth with target_layers and fuse_groups) go in one mapping
    value: model: choice({decoder_depth: 4, target_layers: [6, 7, 8, 9], fuse_groups: [[0, 1], [2, 3]]}).
    """
    tc = config.tune
    if tc.search_algorithm == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError as err:
            raise ValueError("tune.search_algorithm='optuna' needs the optuna package (pip install optuna); "
                             "or use random / grid") from err
    bad_metrics = [m for m in tc.metrics if m not in METRIC_NAMES]
    if bad_metrics:
        raise ValueError(f"tune.metrics has {bad_metrics}; choose from {list(METRIC_NAMES)}")
    space = SearchSpace.from_config(config)
    keys = set(flatten(config)) | {f.name for f in dataclasses.fields(config) if dataclasses.is_dataclass(
        getattr(config, f.name))}
    for dimension in space.dimensions:
        _check_key(dimension.key, keys)
        if dimension.kind == "grid" and tc.search_algorithm == "optuna":
            raise ValueError(f"tune.search_space[{dimension.key!r}] uses grid(); Optuna samples, use choice() instead")
        for value in dimension.candidates():
            try:
                apply_overrides(config, overrides_of(dimension.key, value))
            except ValueError as err:
                shown = json.dumps(value) if dimension.categorical else value
                raise ValueError(f"tune.search_space[{dimension.key!r}]={dimension.text!r}: the value {shown} is "
                                 f"not valid on its own ({err}); put linked keys in one mapping, e.g. "
                                 f"{_LINKED_EXAMPLE}") from err
    return space


def _check_key(key: str, keys: set[str]) -> None:
    if key in keys:
        return
    last = key.split(".")[-1]
    close = [k for k in sorted(keys) if k.split(".")[-1].endswith(last)] or difflib.get_close_matches(
        key, sorted(keys), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ValueError(f"tune.search_space key {key!r} is not a config key{hint} (pipelines/tune.py --help "
                     "lists them; a section name such as 'model' takes a mapping of its keys)")
