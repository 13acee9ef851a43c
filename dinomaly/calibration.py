"""Per-class decision thresholds at a chosen false-alarm rate, learned from normal images only.

A unified model scores each class on its own scale, so one global cut is wrong for most classes. The table
below holds, per class, the image-score threshold at which a share `target_fpr` of normal images would be
called anomalous, where it came from, and a bootstrap interval; plus a global fallback for requests that name
no class. It travels as JSON: in checkpoint metadata under "calibration" and as a registry version tag.
An image is anomalous when score >= threshold; the normalised score is score / threshold (1.0 = the boundary).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

METADATA_KEY = "calibration"  # checkpoint metadata key and MLflow registry version tag


@dataclass(frozen=True)
class ClassThreshold:
    """One class's cut. source: 'calibration' (held-back normal training images), 'calibrate.py' (new normal
    images), 'test-normals' (the labelled test split's normals: a fallback, optimistic), 'manual' (set at run
    time) or 'test-f1' (F1-optimal on the labelled test split: test-tuned)."""

    threshold: float
    source: str
    target_fpr: float | None = None
    interval: tuple[float, float] | None = None  # bootstrap interval of the threshold (e.g. 95 %)
    n_images: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"threshold={self.threshold!r} must be a finite number > 0")


@dataclass(frozen=True)
class ThresholdTable:
    """Thresholds in force: one per class plus the global one used when a request names no class."""

    global_threshold: ClassThreshold
    classes: dict[str, ClassThreshold] = field(default_factory=dict)

    def for_class(self, name: str | None) -> tuple[str, ClassThreshold]:
        """(class used, its threshold): the named class, or ('global', ...) when none is named.
        An unknown class is a ValueError that lists the known ones."""
        if name is None:
            return "global", self.global_threshold
        if name not in self.classes:
            raise ValueError(f"unknown class {name!r}; this model knows {sorted(self.classes) or 'none'}")
        return name, self.classes[name]

    def to_dict(self) -> dict[str, Any]:
        def one(entry: ClassThreshold) -> dict[str, Any]:
            row = asdict(entry)
            row["interval"] = list(entry.interval) if entry.interval is not None else None
            return row
        return {"global": one(self.global_threshold), "classes": {k: one(v) for k, v in self.classes.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ThresholdTable:
        def one(row: dict[str, Any]) -> ClassThreshold:
            interval = row.get("interval")
            return ClassThreshold(threshold=float(row["threshold"]), source=str(row["source"]),
                                  target_fpr=row.get("target_fpr"),
                                  interval=tuple(interval) if interval is not None else None,
                                  n_images=int(row.get("n_images", 0)))
        try:
            return cls(global_threshold=one(data["global"]),
                       classes={str(k): one(v) for k, v in (data.get("classes") or {}).items()})
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed threshold table ({err!r}): expected {{'global': {{'threshold', "
                             "'source', ...}, 'classes': {class: {...}}}") from err


def stored_table(metadata: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> ThresholdTable | None:
    """The table a model carries: its registry version's tag (JSON text) first, then its checkpoint metadata;
    None when it has neither."""
    value = (tags or {}).get(METADATA_KEY, metadata.get(METADATA_KEY))
    if value is None:
        return None
    try:
        return ThresholdTable.from_dict(json.loads(value) if isinstance(value, str) else value)
    except json.JSONDecodeError as err:
        raise ValueError(f"the model's {METADATA_KEY!r} entry is not JSON ({err}); recalibrate it with "
                         "pipelines/calibrate.py") from err

# --------------------------------------------------------------------------- the threshold at a target FPR

BOOTSTRAP_SAMPLES = 1000  # resamples behind each interval
INTERVAL_LEVEL = 0.95


def allowed_false_alarms(count: int, target_fpr: float) -> int:
    """How many of `count` normal scores may lie at or above the threshold: floor(target_fpr * count)."""
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target_fpr={target_fpr} must be in [0, 1), e.g. 0.01 for one false alarm in 100")
    return int(math.floor(target_fpr * count + 1e-9))  # the epsilon keeps 0.01 * 300 at 3, not 2


def threshold_at_fpr(normal_scores, target_fpr: float) -> float:
    """The lowest threshold at which at most target_fpr of `normal_scores` are called anomalous.

    Rule: anomalous when score >= threshold. With the scores sorted high to low, s(1) >= s(2) >= ..., and
    k = floor(target_fpr * n) false alarms allowed, every threshold above s(k+1) keeps at most k scores at or
    above it; the lowest such value is the next float after s(k+1). So with fewer than 1 / target_fpr
    images (k = 0) the threshold sits just above the highest normal score.
    """
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())[::-1]
    if scores.size == 0 or not np.isfinite(scores).all():
        raise ValueError(f"need at least one finite normal score to calibrate, got {scores.size} scores "
                         f"({int((~np.isfinite(scores)).sum())} not finite)")
    return float(np.nextafter(scores[allowed_false_alarms(scores.size, target_fpr)], np.inf))


def bootstrap_interval(normal_scores, target_fpr: float, samples: int = BOOTSTRAP_SAMPLES,
                       level: float = INTERVAL_LEVEL, seed: int = 0) -> tuple[float, float]:
    """The central `level` percentile interval of threshold_at_fpr over `samples` resamples (with replacement)
    of `normal_scores`: how much the threshold would move with another draw of normal images. Seeded."""
    scores = np.asarray(normal_scores, dtype=np.float64).ravel()
    threshold_at_fpr(scores, target_fpr)  # the same input checks
    picks = np.random.default_rng(seed).integers(0, scores.size, size=(samples, scores.size))
    k = allowed_false_alarms(scores.size, target_fpr)
    kth_highest = -np.partition(-scores[picks], k, axis=1)[:, k]  # s(k+1) of each resample
    cuts = np.nextafter(kth_highest, np.inf)
    tail = (1.0 - level) / 2
    low, high = np.quantile(cuts, [tail, 1.0 - tail])
    return float(low), float(high)


def calibrate(normal_scores, target_fpr: float, source: str, seed: int = 0) -> ClassThreshold:
    """One class's ClassThreshold from its normal images' scores (threshold, bootstrap interval, count)."""
    scores = np.asarray(normal_scores, dtype=np.float64).ravel()
    return ClassThreshold(threshold=threshold_at_fpr(scores, target_fpr), source=source, target_fpr=target_fpr,
                          interval=bootstrap_interval(scores, target_fpr, seed=seed), n_images=int(scores.size))


def build_table(normal_scores: dict[str, Any], target_fpr: float, source: str, seed: int = 0,
                fallback_scores: dict[str, Any] | None = None, fallback_source: str = "test-normals"
                ) -> ThresholdTable:
    """A ThresholdTable: per class from its normal scores, the global threshold from all of them pooled.

    fallback_scores: other normal scores (e.g. the test split's normals) for classes that have none of their
    own, marked `fallback_source`; they make the global threshold only when no class has scores of its own.
    A class with neither gets a copy of the global threshold, marked 'pooled'.
    """
    def usable(scores: dict[str, Any] | None) -> dict[str, np.ndarray]:
        arrays = {name: np.asarray(s, dtype=np.float64).ravel() for name, s in (scores or {}).items()}
        return {name: a for name, a in arrays.items() if a.size}

    own, spare = usable(normal_scores), usable(fallback_scores)
    spare = {name: s for name, s in spare.items() if name not in own}
    if own:
        pooled = calibrate(np.concatenate(list(own.values())), target_fpr, source, seed)
    elif spare:
        pooled = calibrate(np.concatenate(list(spare.values())), target_fpr, fallback_source, seed)
    else:
        raise ValueError("no normal scores to calibrate on; give each class normal images")
    classes = {name: calibrate(s, target_fpr, source, seed) for name, s in own.items()}
    classes.update({name: calibrate(s, target_fpr, fallback_source, seed) for name, s in spare.items()})
    for name in set(normal_scores) | set(fallback_scores or {}):
        classes.setdefault(name, ClassThreshold(threshold=pooled.threshold, source="pooled", target_fpr=target_fpr,
                                                interval=pooled.interval, n_images=pooled.n_images))
    return ThresholdTable(global_threshold=pooled, classes=dict(sorted(classes.items())))


def operating_point(labels, scores, threshold: float) -> dict[str, float]:
    """FPR (normal images at or above `threshold`) and recall (anomalous ones at or above it); NaN when a
    kind is missing."""
    labels = np.asarray(labels).ravel().astype(bool)
    flagged = np.asarray(scores, dtype=np.float64).ravel() >= threshold
    fpr = float(flagged[~labels].mean()) if (~labels).any() else math.nan
    recall = float(flagged[labels].mean()) if labels.any() else math.nan
    return {"fpr": fpr, "recall": recall}


def decision_report(table: ThresholdTable, labels: dict[str, Any], scores: dict[str, Any]) -> dict[str, dict]:
    """Per class (and 'global', over all classes pooled) on a labelled test split: the table's threshold with
    the FPR and recall it achieves there, next to the F1-optimal threshold of that same split ('test_tuned':
    chosen on the labels it is measured on, so optimistic)."""
    from dinomaly.thresholds import f1_optimal_threshold

    def row(entry: ClassThreshold, y, s) -> dict[str, Any]:
        best, f1 = f1_optimal_threshold(y, s)
        tuned = operating_point(y, s, best) if math.isfinite(best) else {"fpr": math.nan, "recall": math.nan}
        point = operating_point(y, s, entry.threshold)
        return {"threshold": entry.threshold, "source": entry.source, "target_fpr": entry.target_fpr,
                "interval": list(entry.interval) if entry.interval else None, "n_images": entry.n_images,
                "test_fpr": point["fpr"], "test_recall": point["recall"], "test_images": int(np.size(y)),
                "test_tuned": {"threshold": best, "f1": f1, "fpr": tuned["fpr"], "recall": tuned["recall"]}}

    report = {name: row(table.for_class(name)[1], labels[name], scores[name])
              for name in sorted(labels) if name in table.classes}
    if labels:
        names = sorted(labels)
        report["global"] = row(table.global_threshold, np.concatenate([np.ravel(labels[n]) for n in names]),
                               np.concatenate([np.ravel(scores[n]) for n in names]))
    return report



def labelled_summary(labels: dict[str, Any], scores: dict[str, Any], target_fpr: float, seed: int = 0,
                       held_back: dict[str, Any] | None = None, table: ThresholdTable | None = None) -> dict[str, Any]:
    """{'target_fpr', 'calibration': a table as a dict, 'decisions': its decision_report} on a labelled test
    split ({class: labels}, {class: scores}). The table is `table` (a model's own) when given; else built from
    each class's held-back normal scores, or for a class without any from its test normals, marked
    'test-normals'. {} when there is no normal score to build one from."""
    if table is None:
        test_normals = {n: np.asarray(scores[n])[np.asarray(labels[n]) == 0] for n in labels}
        try:
            table = build_table(held_back or {}, target_fpr, "calibration", seed=seed, fallback_scores=test_normals)
        except ValueError:
            return {}
    return {"target_fpr": table.global_threshold.target_fpr, "calibration": table.to_dict(),
            "decisions": decision_report(table, labels, scores)}

# --------------------------------------------------------------------------- the held-back training images

MIN_IMAGES = 8  # fewer normal images than this give no usable threshold


def holdout_indices(categories, labels, share: float, min_images: int = MIN_IMAGES, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(rows to train on, rows held back for calibration, {class: normal images} of classes too small to hold
    any back): per class, max(ceil(share * n), min_images) of its n normal rows, drawn by `seed`.

    A class holds images back only if it keeps at least as many to train on (n >= 2 * that count); otherwise
    it holds none back and is listed, and its threshold comes from elsewhere (build_table's fallback).
    Anomalous rows are never held back. share 0 holds nothing back.
    """
    if not 0.0 <= share <= 0.5:
        raise ValueError(f"calibration share={share} must be in [0, 0.5] (0 = train on every image)")
    categories, labels = np.asarray(categories, dtype=object), np.asarray(labels)
    held, small = [], {}
    for name in sorted(set(categories.tolist())) if share > 0 else []:
        normal = np.flatnonzero((categories == name) & (labels == 0))
        count = max(math.ceil(share * normal.size), min_images)
        if 2 * count > normal.size:
            small[name] = int(normal.size)
            continue
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])  # per class: independent of other classes
        held.append(np.sort(rng.choice(normal, size=count, replace=False)))
    held_rows = np.concatenate(held) if held else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(np.arange(categories.size), held_rows), held_rows, small
