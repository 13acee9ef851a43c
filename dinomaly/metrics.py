"""The seven evaluation metrics of the reference, vectorised.

Reference: guojiajeremy/Dinomaly utils.py evaluation_batch, compute_pro, f1_score_max @c5c76d0, with sklearn's
roc_auc_score and average_precision_score. Everything is computed from one sort: the scores of the positives
(anomalous images / pixels) are reduced to their distinct values, and each is located among the sorted
negatives by binary search. That gives sklearn's ROC/PR curves at every positive value, which is all that
AUROC (Mann-Whitney with half ties), AP (recall only moves at positive values) and F1-max (adding negatives at
a fixed recall only lowers precision) need. numpy's SIMD sort does 1e8 float32 in about half a second;
torchmetrics' curves argsort with torch (about 30x slower here) and need int64 indices for every pixel.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

METRIC_NAMES = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max",
                "pixel_aupro")
AuproMode = Literal["reference", "exact"]
PRO_FPR_LIMIT = 0.3
_CHUNK_IMAGES = 64  # images labelled at once: bounds the int32 label buffer
# 8-connected regions inside each image of an [N, H, W] stack, never across images (skimage label's default)
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


class SortedCounts:
    """Negatives as sorted values with optional multiplicities; answers 'how many are < x / <= x'."""

    def __init__(self, values: np.ndarray, counts: np.ndarray | None = None):
        self.values = values  # ascending
        self._cumulative = None if counts is None else np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.total = int(values.size if counts is None else self._cumulative[-1])

    def _count_before(self, index: np.ndarray) -> np.ndarray:
        return index.astype(np.int64) if self._cumulative is None else self._cumulative[index]

    def count_lt(self, x: np.ndarray) -> np.ndarray:
        return self._count_before(np.searchsorted(self.values, x, side="left"))

    def count_le(self, x: np.ndarray) -> np.ndarray:
        return self._count_before(np.searchsorted(self.values, x, side="right"))


def ranking_metrics(positives: np.ndarray, negatives: SortedCounts) -> tuple[float, float, float]:
    """(AUROC, AP, F1-max) of positive vs negative scores, equal to sklearn's and the reference's f1_score_max.

    AUROC = P(pos > neg) + P(pos == neg) / 2, which is what roc_auc_score's trapezoid computes.
    Reference: utils.py f1_score_max @c5c76d0 (2PR / (P + R + 1e-7), the appended (P=1, R=0) point dropped).
    """
    if positives.size == 0 or negatives.total == 0:
        logger.warning("AUROC/AP/F1 need both classes (got %d positives, %d negatives): NaN",
                       positives.size, negatives.total)
        return math.nan, math.nan, math.nan
    values, counts = np.unique(positives, return_counts=True)  # ascending distinct positive scores
    below = negatives.count_lt(values)
    ties = negatives.count_le(values) - below
    num_pos, num_neg = int(counts.sum()), negatives.total
    auroc = float(np.sum(counts * (2 * below + ties)) / (2 * num_pos * num_neg))
    # descending thresholds t = each distinct positive value; predicted positive = score >= t
    tp = np.cumsum(counts[::-1])
    fp = num_neg - below[::-1]
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    ap = float(np.sum(np.diff(recall, prepend=0.0) * precision))
    f1_max = float(np.max(2 * precision * recall / (recall + precision + 1e-7)))
    return auroc, ap, f1_max


def _sorted_negatives(values: np.ndarray) -> SortedCounts:
    return SortedCounts(np.sort(values))


def split_pixels(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Split a [N, H, W] stack into anomalous pixel values, their region ids, normal pixel values.

    Regions: 8-connected components of each image's mask (skimage.measure.label's default, as compute_pro),
    numbered 0..R-1. Returns (positive values [P], region ids [P] int64, negative values [M], R).
    """
    positives, regions, negatives, num_regions = [], [], [], 0
    for start in range(0, masks.shape[0], _CHUNK_IMAGES):
        mask, amap = masks[start:start + _CHUNK_IMAGES], maps[start:start + _CHUNK_IMAGES]
        labels, count = ndimage.label(mask, structure=_REGION_STRUCTURE)
        positives.append(amap[mask])
        regions.append(labels[mask].astype(np.int64) + (num_regions - 1))
        negatives.append(amap[~mask])
        num_regions += count
    return np.concatenate(positives), np.concatenate(regions), np.concatenate(negatives), num_regions


def pro_thresholds(map_min: np.floating, map_max: np.floating, num: int = 200) -> np.ndarray:
    """compute_pro's thresholds: np.arange(min, max, (max - min) / num) on the map dtype's scalars.

    The step is rounded to the map dtype (float32), the values come out float64, and the count is 200 or
    201 depending on that rounding. Reference: utils.py compute_pro @c5c76d0.
    """
    step = (map_max - map_min) / num
    if not step > 0:
        return np.empty(0)
    return np.arange(map_min, map_max, step)


def _floor_to(thresholds: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Largest value of `dtype` <= each threshold: for x of that dtype, x > th  <=>  x > floor(th).

    Comparing float32 maps with float64 thresholds in float64 is numpy 2's rule (numpy 1 rounded the
    threshold to nearest float32 first, reference README 'numpy < 2').
    """
    rounded = thresholds.astype(dtype)
    return np.where(rounded > thresholds, np.nextafter(rounded, dtype.type(-np.inf)), rounded)


def _sklearn_auc(x: np.ndarray, y: np.ndarray) -> float:
    """sklearn.metrics.auc for a monotonic x (NaN where the reference would get NaN or raise)."""
    if x.size < 2:
        return math.nan
    dx = np.diff(x)
    direction = -1.0 if np.any(dx < 0) and np.all(dx <= 0) else 1.0
    return float(direction * np.trapezoid(y, x))


def aupro_reference(positives: np.ndarray, regions: np.ndarray, num_regions: int, negatives: SortedCounts,
                    map_min: np.floating, map_max: np.floating, num_thresholds: int = 200) -> float:
    """compute_pro, vectorised: the same thresholds, PRO and FPR values and AUC.

    PRO(th) = mean over all regions of (region pixels > th) / area; FPR(th) = (normal pixels > th) / normal
    pixels; keep FPR < 0.3, rescale by the largest kept FPR, trapezoid. Each anomalous pixel is counted once:
    it covers its region at every threshold below its value (one searchsorted + one weighted bincount).
    Reference: utils.py compute_pro @c5c76d0.
    """
    thresholds = pro_thresholds(map_min, map_max, num_thresholds)
    if num_regions == 0 or negatives.total == 0 or thresholds.size == 0:
        logger.warning("AUPRO needs anomalous regions, normal pixels and a non-constant map: NaN")
        return math.nan
    floored = _floor_to(thresholds, positives.dtype)
    area = np.bincount(regions, minlength=num_regions)
    covered_below = np.searchsorted(floored, positives, side="left")  # pixel > th_j for j < this
    weight = np.bincount(covered_below, weights=1.0 / area[regions], minlength=thresholds.size + 1)
    pro = np.cumsum(weight[::-1])[::-1][1:] / num_regions  # [T]: sum over pixels with covered_below > j
    fpr = (negatives.total - negatives.count_le(floored)) / negatives.total
    keep = fpr < PRO_FPR_LIMIT
    if not keep.any():
        return math.nan
    kept_fpr = fpr[keep]
    with np.errstate(invalid="ignore", divide="ignore"):
        return _sklearn_auc(kept_fpr / kept_fpr.max(), pro[keep])


def aupro_exact(positives: np.ndarray, regions: np.ndarray, num_regions: int, negatives: SortedCounts,
                fpr_limit: float = PRO_FPR_LIMIT) -> float:
    """AUPRO over the exact PRO-FPR curve (every distinct score a threshold) up to FPR `fpr_limit`, / limit.

    PRO is a weighted true-positive rate (each anomalous pixel weighs 1 / (regions * its region's area)), so
    the curve is a weighted ROC curve: its corners are at the distinct anomalous values; between them only
    FPR grows. The curve is cut at `fpr_limit` by linear interpolation (anomalib's definition).
    """
    if num_regions == 0 or negatives.total == 0:
        logger.warning("AUPRO needs anomalous regions and normal pixels: NaN")
        return math.nan
    area = np.bincount(regions, minlength=num_regions)
    values, inverse = np.unique(positives, return_inverse=True)
    weight = np.bincount(inverse.ravel(), weights=1.0 / (num_regions * area[regions]))[::-1]
    pro_at = np.cumsum(weight)  # descending thresholds: PRO with score >= value
    fpr_at = (negatives.total - negatives.count_lt(values)[::-1]) / negatives.total
    fpr_before = (negatives.total - negatives.count_le(values)[::-1]) / negatives.total
    pro_before = pro_at - weight
    fpr = np.concatenate([[0.0], np.column_stack([fpr_before, fpr_at]).ravel(), [1.0]])
    pro = np.concatenate([[0.0], np.column_stack([pro_before, pro_at]).ravel(), [pro_at[-1]]])
    end = int(np.searchsorted(fpr, fpr_limit, side="right"))
    if end < fpr.size:
        x0, x1, y0, y1 = fpr[end - 1], fpr[end], pro[end - 1], pro[end]
        fpr = np.append(fpr[:end], fpr_limit)
        pro = np.append(pro[:end], y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    return float(np.trapezoid(pro, fpr) / fpr_limit)


def _as_maps(pixel_masks, pixel_maps) -> tuple[np.ndarray, np.ndarray]:
    masks, maps = np.asarray(pixel_masks), np.asarray(pixel_maps)
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"pixel_masks {masks.shape} and pixel_maps {maps.shape} must both be [N, H, W] "
                         "(or [N, 1, H, W]); resize masks to the map size first (dinomaly.inference.resize_masks)")
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float64)
    elif maps.dtype == np.float16:
        maps = maps.astype(np.float32)
    return masks > 0, maps


def _as_labels(image_labels, image_scores) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(image_labels).ravel(), np.asarray(image_scores).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"image_labels {labels.shape} and image_scores {scores.shape} must have one entry per image")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"image_labels must be 0 (normal) or 1 (anomalous), got values {np.unique(labels)}")
    return labels == 1, scores


def compute_metrics(image_labels, image_scores, pixel_masks, pixel_maps,
                    aupro: AuproMode = "reference") -> dict[str, float]:
    """The seven metrics of one class: image AUROC/AP/F1-max, pixel AUROC/AP/F1-max, pixel AUPRO.

    image_labels [N] (1 = anomalous), image_scores [N], pixel_masks [N, H, W] (> 0 = anomalous), pixel_maps
    [N, H, W] final maps (numpy or CPU tensors). aupro="reference" reproduces compute_pro (200 or 201
    thresholds, FPR < 0.3 rescaled by the largest kept FPR); "exact" integrates the exact curve to FPR 0.3.
    Undefined metrics (one class only, no regions) are NaN. Reference: utils.py evaluation_batch @c5c76d0.
    """
    if aupro not in ("reference", "exact"):
        raise ValueError(f"aupro={aupro!r} must be 'reference' or 'exact'")
    is_anomalous, scores = _as_labels(image_labels, image_scores)
    masks, maps = _as_maps(pixel_masks, pixel_maps)
    if masks.shape[0] != scores.size:
        raise ValueError(f"{scores.size} image scores but {masks.shape[0]} pixel maps")
    image = ranking_metrics(scores[is_anomalous], _sorted_negatives(scores[~is_anomalous]))
    positives, regions, negative_values, num_regions = split_pixels(masks, maps)
    negatives = _sorted_negatives(negative_values)
    del negative_values
    pixel = ranking_metrics(positives, negatives)
    if aupro == "reference":
        pro = aupro_reference(positives, regions, num_regions, negatives, maps.min(), maps.max())
    else:
        pro = aupro_exact(positives, regions, num_regions, negatives)
    return dict(zip(METRIC_NAMES, (*image, *pixel, pro)))


PixelMode = Literal["exact", "streaming"]


class _NegativeStore:
    """Normal-pixel scores of one class: all of them ('exact'), or counts of truncated values ('streaming').

    Streaming truncates each float32 score toward zero to `mantissa_bits` mantissa bits (relative error
    < 2**-mantissa_bits) and keeps (distinct value, count) pairs, compacted every ~4M pixels: memory is bounded
    by the number of distinct truncated values (2**mantissa_bits per octave of the score range).
    """

    _COMPACT_EVERY = 1 << 22

    def __init__(self, mode: PixelMode, mantissa_bits: int):
        self.mode = mode
        self._keep_mask = np.uint32((0xFFFFFFFF << (23 - mantissa_bits)) & 0xFFFFFFFF)
        self._pending: list[np.ndarray] = []
        self._pending_size = 0
        self._values = np.empty(0, dtype=np.float32)
        self._counts = np.empty(0, dtype=np.int64)

    def add(self, values: np.ndarray) -> None:
        if self.mode == "streaming":
            values = (values.view(np.uint32) & self._keep_mask).view(np.float32)
        self._pending.append(values)
        self._pending_size += values.size
        if self.mode == "streaming" and self._pending_size >= self._COMPACT_EVERY:
            self._compact()

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._pending) + self._values.nbytes + self._counts.nbytes

    def _compact(self) -> None:
        if not self._pending:
            return
        new_values, new_counts = np.unique(np.concatenate(self._pending), return_counts=True)
        self._pending, self._pending_size = [], 0
        values = np.concatenate([self._values, new_values])
        counts = np.concatenate([self._counts, new_counts])
        order = np.argsort(values, kind="stable")
        values, counts = values[order], counts[order]
        starts = np.flatnonzero(np.concatenate([[True], values[1:] != values[:-1]]))
        self._values, self._counts = values[starts], np.add.reduceat(counts, starts) if starts.size else counts

    def finish(self) -> SortedCounts:
        if self.mode == "exact":
            return _sorted_negatives(np.concatenate(self._pending or [self._values]))
        self._compact()
        return SortedCounts(self._values, self._counts)


class _ClassState:
    def __init__(self, mode: PixelMode, mantissa_bits: int):
        self.labels: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []
        self.positives: list[np.ndarray] = []
        self.regions: list[np.ndarray] = []
        self.num_regions = 0
        self.negatives = _NegativeStore(mode, mantissa_bits)
        self.map_min = np.float32(np.inf)
        self.map_max = np.float32(-np.inf)


class MetricAccumulator:
    """Collects one evaluation batch by batch, per class; `compute()` gives compute_metrics' dict per class.

    Maps are taken as float32 (the reference's dtype). Image scores, anomalous pixels (12 B each: value and
    region id), the map range and thus the reference PRO thresholds are always kept exactly.
    pixel_mode="exact" also keeps every normal-pixel score (4 B each) and equals compute_metrics on the
    concatenated class. "streaming" keeps normal-pixel scores truncated toward zero to `mantissa_bits`
    (relative error < 2**-mantissa_bits) as (value, count) pairs, so memory stops growing with normal pixels;
    only a normal pixel that close to an anomalous pixel or a PRO threshold can be misordered. On the
    MVTec-sized set of benchmarks/metrics.py (113M pixels) 20 bits (default) store 37 MB instead of 430 MB
    and move the metrics by <= 3e-7 (16 bits: 3 MB, <= 5e-6 on AP/F1, <= 5e-7 on AUROC/AUPRO).
    """

    def __init__(self, aupro: AuproMode = "reference", pixel_mode: PixelMode = "exact", mantissa_bits: int = 20):
        if aupro not in ("reference", "exact"):
            raise ValueError(f"aupro={aupro!r} must be 'reference' or 'exact'")
        if pixel_mode not in ("exact", "streaming"):
            raise ValueError(f"pixel_mode={pixel_mode!r} must be 'exact' or 'streaming'")
        if not 1 <= mantissa_bits <= 23:
            raise ValueError(f"mantissa_bits={mantissa_bits} must be in 1..23 (float32 has 23)")
        self.aupro, self.pixel_mode, self.mantissa_bits = aupro, pixel_mode, mantissa_bits
        self._classes: dict[str, _ClassState] = {}

    @property
    def classes(self) -> list[str]:
        return list(self._classes)

    def update(self, categories: str | list[str], image_labels, image_scores, pixel_masks, pixel_maps) -> None:
        """Add a batch: categories (one for the batch or one per image), labels [B], scores [B],
        masks and final maps [B, H, W] or [B, 1, H, W]."""
        labels, scores = _as_labels(image_labels, image_scores)
        masks, maps = _as_maps(pixel_masks, pixel_maps)
        maps = maps.astype(np.float32, copy=False)
        names = np.array([categories] * labels.size if isinstance(categories, str) else list(categories))
        if not names.size == labels.size == masks.shape[0]:
            raise ValueError(f"batch has {names.size} categories, {labels.size} labels and {masks.shape[0]} maps; "
                             "give one category per image (or one string for the batch)")
        for name in dict.fromkeys(names.tolist()):
            pick = names == name
            state = self._classes.setdefault(name, _ClassState(self.pixel_mode, self.mantissa_bits))
            state.labels.append(labels[pick])
            state.scores.append(scores[pick])
            positives, regions, negatives, num_regions = split_pixels(masks[pick], maps[pick])
            state.positives.append(positives)
            state.regions.append(regions + state.num_regions)
            state.num_regions += num_regions
            state.negatives.add(negatives)
            state.map_min = min(state.map_min, maps[pick].min())
            state.map_max = max(state.map_max, maps[pick].max())

    @property
    def nbytes(self) -> int:
        """Bytes held in accumulated arrays (all classes)."""
        return sum(a.nbytes for s in self._classes.values() for a in (*s.labels, *s.scores, *s.positives, *s.regions))\
            + sum(s.negatives.nbytes for s in self._classes.values())

    def compute_class(self, name: str) -> dict[str, float]:
        if name not in self._classes:
            raise ValueError(f"no batches for class {name!r}; classes seen: {self.classes}")
        state = self._classes[name]
        labels, scores = np.concatenate(state.labels), np.concatenate(state.scores)
        image = ranking_metrics(scores[labels], _sorted_negatives(scores[~labels]))
        positives, regions = np.concatenate(state.positives), np.concatenate(state.regions)
        negatives = state.negatives.finish()
        pixel = ranking_metrics(positives, negatives)
        if self.aupro == "reference":
            pro = aupro_reference(positives, regions, state.num_regions, negatives, state.map_min, state.map_max)
        else:
            pro = aupro_exact(positives, regions, state.num_regions, negatives)
        return dict(zip(METRIC_NAMES, (*image, *pixel, pro)))

    def compute(self) -> dict[str, dict[str, float]]:
        """Metrics of every class, in the order the classes were first seen."""
        return {name: self.compute_class(name) for name in self._classes}
