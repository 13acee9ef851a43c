"""Evaluate a model on a test set with Ray Data: reference maps on an actor pool, metrics per class, streamed.

The driver never holds the test set's maps. Batches arrive in manifest order (classes one after the other)
and go into one `MetricAccumulator` per class; when the last image of a class has arrived its seven metrics
are computed and its state is dropped. With eval.pixel_metrics='exact' memory is that of the largest class
(4 B per normal pixel; the reference numbers); with 'streaming' the normal pixels take bounded memory whatever
the test-set size (anomalous pixels, 12 B each, and image scores are always kept exactly).
Unreadable images are reported (metrics.json, scores.parquet), never silently dropped, and left out of
the metrics.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dinomaly.calibration import ThresholdTable, labelled_summary, stored_table
from dinomaly.config import Config
from dinomaly.data.manifest import load_manifest, select
from dinomaly.data.storage import split_uri, upload_tree
from dinomaly.distributed.batch.scoring import ModelBundle, ScoreSpec, add_decisions, score_rows
from dinomaly.metrics import METRIC_NAMES, MetricAccumulator
from dinomaly.results import MetricsRecord, replace_atomically, write_metrics_json
from dinomaly.tables import format_csv, format_decision_table, format_markdown, format_table, per_class_table
from dinomaly.thresholds import f1_optimal_threshold, normal_quantile_threshold

logger = logging.getLogger(__name__)

SCORE_COLUMNS = ("uri", "category", "defect", "label", "score", "error", "peak_row", "peak_col")


def test_rows(config: Config) -> pa.Table:
    """The test split of config.data (manifest or dataset root) as rows for score_rows, classes contiguous."""
    table = select(load_manifest(config.data), split="test")
    if table.num_rows == 0:
        raise ValueError(f"{config.data.root} has no test images; evaluation needs a test split")
    classes = list(dict.fromkeys(table.column("category").to_pylist()))
    order = pc.sort_indices(pa.table({"c": pc.index_in(table.column("category"), pa.array(classes)),
                                      "i": pa.array(np.arange(table.num_rows))}),
                            sort_keys=[("c", "ascending"), ("i", "ascending")])
    table = table.take(order)
    packed = ("shard_uri", "shard_row") if "shard_uri" in table.column_names else ()  # where packed bytes are
    return pa.table({"uri": table.column("image_uri"), "mask_uri": table.column("mask_uri"),
                     "label": table.column("label"), "category": table.column("category"),
                     "defect": table.column("defect"), **{name: table.column(name) for name in packed}})


@dataclass(order=True)
class Example:
    """An image kept for the heatmap overlays (the heap orders by score)."""

    score: float
    uri: str = field(compare=False)
    label: int = field(compare=False)
    anomaly_map: np.ndarray = field(compare=False, repr=False)
    mask: np.ndarray = field(compare=False, repr=False)


class ClassStreams:
    """Per-class metric state, filled batch by batch; a class is computed and freed when complete."""

    def __init__(self, expected: dict[str, int], config: Config, examples_per_kind: int):
        self.expected, self.seen = dict(expected), dict.fromkeys(expected, 0)
        self.eval_config, self.examples_per_kind = config.eval, examples_per_kind
        self.open: dict[str, MetricAccumulator] = {}
        self.results: dict[str, dict[str, float]] = {}
        self.examples: dict[tuple[str, int], list[Example]] = {}
        self.peak_metric_bytes = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        ok = batch["error"] == ""
        for name in dict.fromkeys(batch["category"].tolist()):
            pick = batch["category"] == name
            use = pick & ok
            if use.any():
                acc = self.open.setdefault(name, MetricAccumulator(self.eval_config.aupro,
                                                                   self.eval_config.pixel_metrics))
                acc.update(name, batch["label"][use], batch["score"][use], batch["mask"][use], batch["map"][use])
                self._keep_examples(name, batch, use)
            self.peak_metric_bytes = max(self.peak_metric_bytes, sum(a.nbytes for a in self.open.values()))
            self.seen[name] += int(pick.sum())
            if self.seen[name] == self.expected[name]:
                self._close(name)

    def _keep_examples(self, name: str, batch: dict[str, np.ndarray], use: np.ndarray) -> None:
        if not self.examples_per_kind:
            return
        for i in np.flatnonzero(use):
            label = int(batch["label"][i])
            heap = self.examples.setdefault((name, label), [])
            if len(heap) == self.examples_per_kind and batch["score"][i] <= heap[0].score:
                continue  # not among the highest: skip the map copy
            item = Example(float(batch["score"][i]), str(batch["uri"][i]), label, batch["map"][i].copy(),
                           batch["mask"][i].copy())
            (heapq.heappush if len(heap) < self.examples_per_kind else heapq.heappushpop)(heap, item)

    def _close(self, name: str) -> None:
        acc = self.open.pop(name, None)
        if acc is None:
            logger.warning("class %s: no readable test image, its metrics are NaN", name)
            self.results[name] = dict.fromkeys(METRIC_NAMES, math.nan)
            return
        self.results[name] = acc.compute_class(name)
        logger.info("class %s: %s", name, ", ".join(f"{k}={v:.4f}" for k, v in self.results[name].items()))

    def finish(self) -> dict[str, dict[str, float]]:
        missing = {n: self.expected[n] - self.seen[n] for n in self.expected if self.seen[n] != self.expected[n]}
        if missing:
            raise RuntimeError(f"the scoring pipeline returned a different number of rows than it was given "
                               f"(missing per class: {missing}); this is a bug, please report it")
        return {name: self.results[name] for name in self.expected}


@dataclass
class EvalResult:
    """Per-class metrics and everything written next to them."""

    results: dict[str, dict[str, float]]
    scores: pa.Table  # one row per test image: SCORE_COLUMNS
    examples: dict[tuple[str, int], list[Example]]
    seconds: float
    peak_metric_bytes: int

    @property
    def rows(self) -> list[dict]:
        return per_class_table(self.results)

    @property
    def errors(self) -> pa.Table:
        return self.scores.filter(pc.not_equal(self.scores.column("error"), ""))


def evaluate(bundle_ref, config: Config, table: pa.Table, heatmaps: int = 0) -> EvalResult:
    """Score `table` (test_rows) with an actor pool and compute the reference metrics per class.

    bundle_ref: ray.put(ModelBundle). heatmaps: how many highest-scored normal and highest-scored defective
    images per class to keep for overlays.
    """
    from dinomaly.distributed.resources import wait_for_batch_resources

    wait_for_batch_resources(config, "evaluate")  # the actor pool's CPUs/GPUs, within cluster.start_timeout_s
    expected = Counter(table.column("category").to_pylist())  # insertion order = class order
    streams = ClassStreams(dict(expected), config, heatmaps)
    dataset = score_rows(table, bundle_ref, config, ScoreSpec(keep_maps=True), with_masks=True, preserve_order=True)
    parts, start = [], time.perf_counter()
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        streams.add(batch)
        # copies: a zero-copy view would pin the whole block (maps included) in the object store
        parts.append(pa.table({k: np.array(batch[k]) for k in SCORE_COLUMNS}))
    seconds = time.perf_counter() - start
    results = streams.finish()
    scores = pa.concat_tables(parts) if parts else pa.table({k: [] for k in SCORE_COLUMNS})
    return EvalResult(results, scores, streams.examples, seconds, streams.peak_metric_bytes)


def thresholds(scores: pa.Table, config: Config, table: ThresholdTable | None = None) -> dict[str, Any]:
    """Image-score thresholds over the readable test images, pooled and per class (training's names), and the
    FPR and recall per class at the model's own threshold table (`table`; without one, a table at
    eval.target_fpr from the test split's normals, marked 'test-normals') next to the test-tuned F1-optimal."""
    ok = scores.filter(pc.equal(scores.column("error"), ""))
    labels, values = ok.column("label").to_numpy(), ok.column("score").to_numpy()
    categories = np.asarray(ok.column("category").to_pylist(), dtype=object)
    quantile = config.tracking.normal_quantile
    best, f1 = f1_optimal_threshold(labels, values)
    per_class = {}
    for name in dict.fromkeys(categories.tolist()):
        pick = categories == name
        per_class[name] = {"image_f1_optimal": f1_optimal_threshold(labels[pick], values[pick])[0],
                           "image_normal_quantile": normal_quantile_threshold(labels[pick], values[pick], quantile)}
    by_class = {name: categories == name for name in per_class}
    summary = labelled_summary({n: labels[pick] for n, pick in by_class.items()},
                               {n: values[pick] for n, pick in by_class.items()}, config.eval.target_fpr,
                               config.train.seed, table=table)
    return {"image_f1_optimal": best, "image_f1_at_threshold": f1,
            "image_normal_quantile": normal_quantile_threshold(labels, values, quantile), "normal_quantile": quantile,
            "per_class": per_class, **summary}


def metrics_record(result: EvalResult, bundle: ModelBundle, config: Config) -> MetricsRecord:
    """What metrics.json holds for an evaluation (the layout of dinomaly.results, NaN written as null)."""
    images = result.scores.num_rows
    return MetricsRecord.from_rows(
        "evaluate", result.rows, thresholds(result.scores, config, stored_table(bundle.metadata, bundle.tags)),
        model={"source": bundle.source, "name": bundle.name, "version": bundle.version},
        data=config.data.root,
        settings={"aupro": config.eval.aupro, "pixel_metrics": config.eval.pixel_metrics,
                  "resize": config.eval.resize, "image_size": config.model.image_size,
                  "crop_size": config.model.crop_size},
        images=images,
        unreadable=[{"uri": u, "error": e} for u, e in zip(result.errors.column("uri").to_pylist(),
                                                           result.errors.column("error").to_pylist())],
        seconds=result.seconds,
        images_per_s=images / result.seconds if result.seconds > 0 else None)


def write_evaluation_files(result: EvalResult, bundle: ModelBundle, config: Config,
                           output: Path) -> dict[str, Any]:
    """metrics.json, per_class.{txt,csv,md}, scores.parquet and heatmaps/ under `output`; returns metrics.json's
    content.

    Each file appears whole (replace_atomically); what a killed run left half-written is deleted first.
    """
    output.mkdir(parents=True, exist_ok=True)
    for stale in [*output.glob(".*.tmp"), *output.glob("heatmaps/*/.*.tmp")]:
        stale.unlink(missing_ok=True)
    info = write_metrics_json(output / "metrics.json", metrics_record(result, bundle, config))
    texts = {"per_class.txt": format_table(result.rows) + "\n", "per_class.csv": format_csv(result.rows),
             "per_class.md": format_markdown(result.rows) + "\n"}
    for name, text in texts.items():
        replace_atomically(output / name, lambda path, text=text: path.write_text(text))
    # + class, threshold, verdict, normalised score: the model's own thresholds (as served); a model without
    # any is decided by the table metrics.json reports (from the test split's normals, marked as such)
    fallback = (info.get("thresholds") or {}).get("calibration")
    table = bundle.thresholds() or (ThresholdTable.from_dict(fallback) if fallback else None)
    decided = add_decisions(result.scores, table)
    replace_atomically(output / "scores.parquet", lambda path: pq.write_table(decided, path))
    if result.examples:
        write_heatmaps(result.examples, config, output / "heatmaps", table)
    return info


def write_heatmaps(examples: dict[tuple[str, int], list[Example]], config: Config, folder: Path,
                   thresholds: ThresholdTable | None = None) -> list[Path]:
    """One overlay PNG per kept image (re-read and cropped here) and one grid per class.

    Files: <class>/normal_<rank>_<name>.png (highest-scored normal images: likely false alarms),
    <class>/defect_<rank>_<name>.png (highest-scored defective images), <class>/grid.png. Every map is
    coloured on a fixed scale tied to its class's threshold in `thresholds` (dinomaly.heatmap.colour_scale: the
    threshold is mid-ramp in every class; without thresholds, the highest value over all kept maps). An image
    that can no longer be read is left out, with a warning.
    """
    from dinomaly.data.reader import RowError, RowReader
    from dinomaly.distributed.batch.scoring import heatmap_name
    from dinomaly.heatmap import class_scales, encode_png, grid, png_bytes

    reader = RowReader(config.model.image_size, config.model.crop_size, keep_errors=True,
                       max_pixels=config.data.max_image_pixels or None, storage=config.data)
    all_maps = [ex.anomaly_map for kept in examples.values() for ex in kept]  # the scale without thresholds
    written = []
    for name, group in itertools.groupby(sorted(examples), key=lambda key: key[0]):
        (folder / name).mkdir(parents=True, exist_ok=True)
        shown, images, captions = [], [], []
        [scale] = class_scales([name], thresholds, all_maps)
        for _, label in group:
            for rank, ex in enumerate(sorted(examples[(name, label)], reverse=True)):
                read = reader.read(ex.uri)
                if isinstance(read, RowError):
                    continue
                kind = "defect" if label else "normal"
                path = folder / name / f"{kind}_{rank}_{heatmap_name(ex.uri)}"
                png = png_bytes(ex.anomaly_map, scale, read.image, ex.mask)
                replace_atomically(path, lambda target, png=png: target.write_bytes(png))
                shown.append(ex)
                images.append(read.image)
                captions.append(f"{kind} score {ex.score:.4f} {Path(ex.uri).name}")
                written.append(path)
        if shown:
            png = encode_png(grid(images, [ex.anomaly_map for ex in shown], scale, captions,
                                  [ex.mask for ex in shown]))
            replace_atomically(folder / name / "grid.png", lambda target, png=png: target.write_bytes(png))
    return written


def log_to_mlflow(info: dict[str, Any], config: Config, output: Path, run_name: str) -> str:
    """An MLflow run with the config, the model source, metrics test/<class>/<metric> and the output files."""
    from mlflow.entities import Metric, Param

    from dinomaly.distributed.tracking import close_run, open_run, resolve_tracking_uri

    tracking = replace(config.tracking, tracking_uri=resolve_tracking_uri(config.tracking))
    config = replace(config, tracking=tracking)
    run_id = open_run(config, run_name)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking.tracking_uri)
    now = int(time.time() * 1000)
    per_class = {**info["classes"], "mean": info["mean"]}
    metrics = [Metric(f"test/{name}/{k}", float(v), now, 0)
               for name, values in per_class.items() for k, v in values.items() if v is not None]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start:start + 1000])
    client.log_batch(run_id, params=[Param("evaluate.model", info["model"]["source"][:6000]),
                                     Param("evaluate.data", str(info["data"])[:6000])])
    client.log_artifacts(run_id, str(output))
    close_run(tracking.tracking_uri, run_id, succeeded=True)
    return run_id


# --------------------------------------------------------------------------- the job as the entry point runs it


def prepare(model: str, data: str, preset: str | None, overrides: list[str]) -> tuple[ModelBundle, pa.Table]:
    """The model and its test rows, checked before any Ray work; ValueError/OSError name the fix.

    data.layout stays the preset's or the checkpoint's (e.g. realiad and its json variant); a .parquet path is
    read as a manifest."""
    from dinomaly.data.mask_check import check_mask_sizes
    from dinomaly.distributed.batch.scoring import load_bundle

    bundle = load_bundle(model, preset, [f"data.root={data}", *overrides])
    table = test_rows(bundle.config)
    check_mask_sizes(table, bundle.config.data, image_column="uri")  # before Ray, not in a worker
    return bundle, table


def output_uri(bundle: ModelBundle, output: str | Path | None) -> str:
    """--output as given (a folder or an s3:// / gs:// prefix), else runs/evaluate-<model name>."""
    text = str(output or f"runs/evaluate-{bundle.name or 'model'}")
    return text.rstrip("/") or text


@contextmanager
def _local_folder(output: str):
    """The folder the files are written to: `output` itself, or for an object store a temporary folder
    uploaded to it afterwards (the writers and MLflow's log_artifacts need local files)."""
    scheme, path = split_uri(output)
    if not scheme:  # file:// URIs included
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="dinomaly-evaluate-") as folder:
        yield Path(folder)


def run(bundle: ModelBundle, table: pa.Table, output: str | Path | None = None, *, heatmaps: int = 0,
        mlflow: bool = False) -> dict[str, Any]:
    """Start or join Ray (and stop a Ray it started), evaluate, write <output> (a folder or an s3:// prefix;
    default runs/evaluate-<model>), print the per-class table; with mlflow, log it all to a new MLflow run."""
    import ray

    from dinomaly.distributed.cluster import ensure_ray

    target = output_uri(bundle, output)
    started = ensure_ray()
    try:
        result = evaluate(ray.put(bundle), bundle.config, table, heatmaps=heatmaps)
        with _local_folder(target) as folder:
            info = write_evaluation_files(result, bundle, bundle.config, folder)
            if split_uri(target)[0]:
                upload_tree(folder, target, bundle.config.data)
            print(format_table(result.rows))
            if info["thresholds"].get("decisions"):
                print(f"\nthresholds at their target FPR, on this labelled test split:\n"
                      f"{format_decision_table(info['thresholds']['decisions'])}")
            print(f"{info['images']} test images ({len(info['unreadable'])} unreadable) in {result.seconds:.1f} s; "
                  f"results in {target}")
            if mlflow:
                run_id = log_to_mlflow(info, bundle.config, folder,
                                       f"evaluate-{bundle.name}-{time.strftime('%Y%m%dT%H%M%S')}")
                print(f"logged to MLflow run {run_id}")
    finally:
        if started:
            ray.shutdown()
    return info
