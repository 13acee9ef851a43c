"""The reference evaluation (utils.py evaluation_batch) of a manifest's test split, split over the workers.

Classes, not images, are divided among the ranks (balanced by image count): each rank scores its
classes and computes their seven metrics locally, so only small per-class results (metrics, image
labels and scores) travel to rank 0 through torch.distributed.gather_object, and the pixel-level
metrics, the expensive part, run in parallel. With fewer classes than ranks some ranks idle.
Rank 0 then builds the per-class table, the means and the thresholds. In a training run each rank also
scores its classes' held-back normal training images, and rank 0 sets the per-class thresholds at
eval.target_fpr from them (dinomaly.calibration; the test split's normals for a class without any).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from dinomaly.calibration import ThresholdTable, labelled_summary
from dinomaly.config import Config
from dinomaly.data.dataset import ManifestDataset, iterate_batches
from dinomaly.data.manifest import select
from dinomaly.data.transforms import denormalize
from dinomaly.heatmap import class_scales, grid
from dinomaly.inference import Predictor, resize_masks
from dinomaly.metrics import MetricAccumulator
from dinomaly.tables import per_class_table
from dinomaly.thresholds import f1_optimal_threshold, normal_quantile_threshold

logger = logging.getLogger(__name__)

@dataclass
class ClassResult:
    """One class: its seven metrics, the image labels and scores behind the image-level ones, and the scores of
    its held-back normal training images (empty when none were scored)."""

    metrics: dict[str, float]
    labels: list[int]
    scores: list[float]
    calibration_scores: list[float] = field(default_factory=list)


@dataclass
class Evaluation:
    """Per-class rows (+ 'mean' row), the results behind them and the thresholds derived from the scores."""

    rows: list[dict] = field(default_factory=list)
    classes: dict[str, ClassResult] = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)

    @property
    def mean(self) -> dict[str, float]:
        return {k: v for k, v in self.rows[-1].items() if k != "class"}

    def by_class(self) -> dict[str, dict[str, float]]:
        """{class: metrics, ..., 'mean': metrics}, as logged to MLflow and written to metrics.json."""
        return {str(r["class"]): {k: v for k, v in r.items() if k != "class"} for r in self.rows}


def assign_classes(counts: dict[str, int], world: int) -> list[list[str]]:
    """Classes per rank, largest first onto the least-loaded rank; deterministic for equal inputs."""
    loads, shares = [0] * world, [[] for _ in range(world)]
    for name in sorted(counts, key=lambda c: (-counts[c], c)):
        rank = loads.index(min(loads))
        shares[rank].append(name)
        loads[rank] += counts[name]
    return shares


def evaluate_classes(model: torch.nn.Module, test_table: pa.Table, classes: list[str], config: Config,
                     device: torch.device, calibration_table: pa.Table | None = None) -> dict[str, ClassResult]:
    """Score the test images of `classes` and compute each class's metrics (no communication); with a
    calibration_table, also score its rows of `classes` (held-back normal images: scores only)."""
    if not classes:
        return {}
    held = score_normals(model, calibration_table, classes, config, device) if calibration_table is not None else {}
    dataset = ManifestDataset(select(test_table, categories=classes), config.model, strict=config.data.strict,
                              max_pixels=config.data.max_image_pixels or None)
    predictor = Predictor(model, config.eval, device=device)
    accumulator = MetricAccumulator(aupro=config.eval.aupro)
    labels: dict[str, list[int]] = {c: [] for c in classes}
    scores: dict[str, list[float]] = {c: [] for c in classes}
    for batch in iterate_batches(dataset, config.eval.batch_size, config.data.loader_workers):
        result = predictor.predict(batch.images)
        masks = resize_masks(batch.masks, config.eval.resize)[:, 0].numpy()
        accumulator.update(batch.categories, batch.labels.numpy(), result.scores, masks, result.maps)
        for name, label, score in zip(batch.categories, batch.labels.tolist(), result.scores.tolist()):
            labels[name].append(label)
            scores[name].append(score)
    if dataset.corrupt.count:
        logger.warning("evaluation skipped %d unreadable test images: %s", dataset.corrupt.count,
                       dataset.corrupt.uris[:5])
    return {name: ClassResult(metrics, labels[name], scores[name], held.get(name, []))
            for name, metrics in accumulator.compute().items()}


def score_normals(model: torch.nn.Module, table: pa.Table, classes: list[str], config: Config,
                  device: torch.device) -> dict[str, list[float]]:
    """{class: image scores} of `table`'s rows of `classes` (unreadable images skipped and logged)."""
    rows = table.filter(pc.is_in(table.column("category"), pa.array(classes, pa.string())))
    scores: dict[str, list[float]] = {}
    if rows.num_rows == 0:
        return scores
    dataset = ManifestDataset(rows, config.model, strict=config.data.strict,
                              max_pixels=config.data.max_image_pixels or None)
    predictor = Predictor(model, config.eval, device=device)
    for batch in iterate_batches(dataset, config.eval.batch_size, config.data.loader_workers):
        for name, score in zip(batch.categories, predictor.predict(batch.images).scores.tolist()):
            scores.setdefault(name, []).append(score)
    if dataset.corrupt.count:
        logger.warning("calibration skipped %d unreadable images: %s", dataset.corrupt.count, dataset.corrupt.uris[:5])
    return scores


def summarize(results: dict[str, ClassResult], config: Config, calibrate: bool = False) -> Evaluation:
    """Rows in class order + mean; thresholds pooled over all classes and per class. With calibrate, also
    thresholds['calibration'] (a dinomaly.calibration.ThresholdTable as a dict) and thresholds['decisions']
    (its FPR and recall per class on this labelled test split, next to the test-tuned F1-optimal threshold)."""
    ordered = {name: results[name] for name in sorted(results)}
    rows = per_class_table({name: r.metrics for name, r in ordered.items()})
    labels = np.concatenate([r.labels for r in ordered.values()])
    scores = np.concatenate([r.scores for r in ordered.values()])
    quantile = config.tracking.normal_quantile
    f1_threshold, f1 = f1_optimal_threshold(labels, scores)
    thresholds = {
        "image_f1_optimal": f1_threshold, "image_f1_at_threshold": f1,
        "image_normal_quantile": normal_quantile_threshold(labels, scores, quantile), "normal_quantile": quantile,
        "per_class": {name: {"image_f1_optimal": f1_optimal_threshold(r.labels, r.scores)[0],
                             "image_normal_quantile": normal_quantile_threshold(r.labels, r.scores, quantile)}
                      for name, r in ordered.items()},
    }
    if calibrate:
        thresholds.update(labelled_summary({n: r.labels for n, r in ordered.items()},
                                           {n: r.scores for n, r in ordered.items()}, config.eval.target_fpr,
                                           config.train.seed, {n: r.calibration_scores for n, r in ordered.items()}))
    return Evaluation(rows=rows, classes=ordered, thresholds=thresholds)


def evaluate_distributed(model: torch.nn.Module, test_table: pa.Table, config: Config, rank: int, world: int,
                         device: torch.device, calibration_table: pa.Table | None = None) -> Evaluation | None:
    """Every rank evaluates its share of classes; rank 0 gathers them and returns the Evaluation, others None.
    With a calibration_table (held-back normal rows, possibly empty) the Evaluation also holds the per-class
    thresholds at eval.target_fpr (summarize's calibrate)."""
    counts = dict(zip(*np.unique(np.asarray(test_table.column("category").to_pylist()), return_counts=True)))
    shares = assign_classes({str(k): int(v) for k, v in counts.items()}, world)
    local = evaluate_classes(model, test_table, shares[rank], config, device, calibration_table)
    if world > 1 and dist.is_initialized():
        gathered: list | None = [None] * world if rank == 0 else None
        dist.gather_object(local, gathered, dst=0)
        if rank != 0:
            return None
        local = {name: result for part in gathered for name, result in part.items()}
    return summarize(local, config, calibrate=calibration_table is not None) if local else None


def heatmap_grid(model: torch.nn.Module, test_table: pa.Table, config: Config, count: int, device: torch.device,
                 thresholds: ThresholdTable | float | None = None):
    """A PIL grid of `count` normal and `count` defective test images (spread over classes): image | overlay.

    Maps are coloured on dinomaly.heatmap's fixed scale tied to each row's class threshold (`class_scales`),
    as evaluate and Serve colour them, so a normal part never looks as hot as a broken one.
    """
    picks = []
    for label in (0, 1):
        rows = test_table.filter(pc.equal(test_table.column("label"), label))
        by_class: dict[str, list[int]] = {}
        for i, name in enumerate(rows.column("category").to_pylist()):
            by_class.setdefault(name, []).append(i)
        order = [idx for group in zip(*by_class.values()) for idx in group] if by_class else []
        picks.append(rows.take(order[:count]) if order else None)
    tables = [t for t in picks if t is not None and t.num_rows]
    if count == 0 or not tables:
        return None
    dataset = ManifestDataset(pa.concat_tables(tables), config.model, max_pixels=config.data.max_image_pixels or None)
    batch = next(iterate_batches(dataset, len(dataset)), None)
    if batch is None:
        return None
    result = Predictor(model, config.eval, device=device).predict(batch.images)
    images = [denormalize(image) for image in batch.images]
    captions = [f"{c} {'defect' if lab else 'good'} score {s:.4f}" for c, lab, s in
                zip(batch.categories, batch.labels.tolist(), result.scores.tolist())]
    maps = list(result.maps)
    return grid(images, maps, class_scales(list(batch.categories), thresholds, maps), captions,
                [mask[0].numpy() for mask in batch.masks])
