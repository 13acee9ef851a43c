"""metrics.json: one layout for every job that measures a model (training, a Tune trial, evaluation).

    {"schema_version": 1, "job": "train" | "tune" | "evaluate",
     "classes": {class: {seven metrics}}, "mean": {seven metrics}, "thresholds": {...} or null,
     ...job-specific fields (train: run, step, describes, checkpoint_uri, ...; tune: sweep, trial_id,
     objective, status, steps_trained, ...; evaluate: model, data, ...)}

metrics.schema.json beside this module is the contract (validate_metrics checks a record against it).
NaN and inf are written as null, so the file is strict JSON.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
SCHEMA_FILE = Path(__file__).with_name("metrics.schema.json")


@dataclass(frozen=True)
class MetricsRecord:
    """What metrics.json holds: per-class metrics, their mean, the image-score thresholds, job fields."""

    job: str
    classes: dict[str, dict[str, float]]
    mean: dict[str, float]
    thresholds: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, job: str, rows: list[dict], thresholds: dict | None = None, **details: Any) -> MetricsRecord:
        """From dinomaly.metrics.per_class_table rows (one per class, then 'mean'); no rows: empty metrics."""
        by_class = {str(r["class"]): {k: v for k, v in r.items() if k != "class"} for r in rows}
        mean = by_class.pop("mean", {})
        return cls(job=job, classes=by_class, mean=mean, thresholds=thresholds, details=details)

    def to_dict(self) -> dict[str, Any]:
        return json_safe({"schema_version": SCHEMA_VERSION, "job": self.job, "classes": self.classes, "mean": self.mean,
                          "thresholds": self.thresholds, **self.details})


def write_metrics_json(path: str | Path, record: MetricsRecord) -> dict[str, Any]:
    """Write `record` to `path` whole or not at all (a hidden file renamed over it); returns what was written."""
    content = record.to_dict()
    replace_atomically(Path(path), lambda target: target.write_text(json.dumps(content, indent=1) + "\n"))
    return content


@cache
def metrics_schema() -> dict[str, Any]:
    """The JSON Schema of metrics.json."""
    return json.loads(SCHEMA_FILE.read_text())


def validate_metrics(content: dict[str, Any]) -> None:
    """ValueError naming the first place where `content` breaks the metrics.json schema."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(metrics_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(content))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ValueError(f"metrics.json does not match schema version {SCHEMA_VERSION} at {where}: {error.message}")


def replace_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """`write` a hidden file beside `path`, then rename it over `path`: whenever the process is killed, a
    reader finds the old file or the new one, never half of one (and globs like *.png skip the hidden one)."""
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


def json_safe(value: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python numbers, recursively (keys as strings): strict JSON."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
