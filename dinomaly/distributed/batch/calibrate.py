"""Recalibrate a trained model on new normal images (a new camera, new lighting) without retraining.

    manifest rows with label 0 (any split)  --score_rows (Ray Data, model actors)-->  score per image
      --> dinomaly.calibration.build_table per class at the target FPR (source 'calibrate.py')
      --> a new checkpoint folder: the same weights, the new table in metadata.json
      --> for a registry model, a new version of it tagged with the table

Only normal (label 0) rows are used: defective rows, if the manifest has any, are left out and counted.
So are the images the model was trained on, when its own training data can be read here (the train split
of its saved data config, less the rows training held back for calibration): it reconstructs them better
than new parts, so thresholds set on their scores would flag more new good parts than the target FPR.
Classes of the model that the new images do not cover keep their previous thresholds.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinomaly.calibration import (
    METADATA_KEY,
    MIN_IMAGES,
    ThresholdTable,
    build_table,
    holdout_indices,
    stored_table,
)
from dinomaly.config import Config, TrackingConfig, load_config
from dinomaly.data.manifest import load_manifest, select
from dinomaly.data.storage import split_uri
from dinomaly.distributed.batch.scoring import ModelBundle, ScoreSpec, build_model, score_rows
from dinomaly.results import json_safe
from dinomaly.tables import format_threshold_table

logger = logging.getLogger(__name__)

SOURCE = "calibrate.py"


@dataclass
class CalibrationJob:
    """What `run` needs, checked before any Ray work."""

    bundle: ModelBundle
    rows: pa.Table  # uri, category: the normal images to score
    target_fpr: float
    data: str
    registry: TrackingConfig | None  # the registry the model came from (a new version goes there), else None
    skipped_defective: int = 0
    skipped_trained: int = 0  # normal rows left out because the model was trained on them


def trained_uris(saved: Config | None) -> set[str]:
    """The image URIs the model was trained on: the train split of its saved data config, less the rows that
    training held back for calibration (drawn again exactly as training drew them). Empty when that data
    cannot be read here (another machine's folder, a bucket out of reach): nothing is then left out."""
    if saved is None or not saved.data.root:
        return set()
    try:
        train_rows = select(load_manifest(saved.data), split="train")
    except (OSError, ValueError) as err:
        logger.info("the model's training data %s cannot be read here (%s): its images are not left out",
                    saved.data.root, err)
        return set()
    tc = saved.train
    keep, _, _ = holdout_indices(train_rows.column("category").to_pylist(), train_rows.column("label").to_numpy(),
                                 tc.calibration_share, tc.calibration_min_images, tc.seed)
    return set(train_rows.column("image_uri").take(keep).to_pylist())  # absolute paths or URIs, as every manifest


def dataset_base(root: str) -> str:
    """The folder a data set's image paths are relative to: data.root, or the folder of a .parquet manifest."""
    text = root.rstrip("/")
    if text.endswith(".parquet"):
        text = text.rsplit("/", 1)[0] if "/" in text else "."
    return text if split_uri(text)[0] else os.path.abspath(text)


def relative_paths(uris: AbstractSet[str], root: str) -> set[str]:
    """The URIs under data set `root`, as paths relative to it (e.g. nut/train/good/000.png)."""
    base = dataset_base(root) + "/"
    return {uri[len(base):] for uri in uris if uri.startswith(base)}


def normal_rows(config: Config, min_images: int = MIN_IMAGES, trained: AbstractSet[str] = frozenset(),
                trained_root: str = "") -> tuple[pa.Table, int, int]:
    """(uri + category of every label-0 row of config.data that is not in `trained`, the number of label-1
    rows left out, the number of trained-on rows left out).

    Images at the same path under their data set root as training images under `trained_root` (the model's
    data.root) are not left out, since new images may be named like the old ones (nut/train/good/000.png), but
    counted in a warning: they may be a copy of the training set. A class with fewer than min_images normal
    images is refused: its threshold would be noise."""
    manifest = load_manifest(config.data)
    normal = manifest.filter(pc.equal(manifest.column("label"), 0))
    if normal.num_rows == 0:
        raise ValueError(f"{config.data.root} has no normal (label 0) images; calibration needs normal images only")
    uris = normal.column("image_uri").to_pylist()
    seen = [uri in trained for uri in uris]
    if trained_root and not any(seen):
        _warn_if_same_paths(uris, relative_paths(trained, trained_root), dataset_base(config.data.root) + "/")
    fresh = normal.filter(pa.array([not s for s in seen], pa.bool_()))
    if sum(seen):
        logger.warning("%d of the %d normal images trained this model (its training data's train split): left out, "
                       "since its scores on them run low and thresholds set on them would flag more new good "
                       "parts than the target FPR", sum(seen), normal.num_rows)
    counts = Counter(fresh.column("category").to_pylist())
    trained_counts = Counter(c for c, s in zip(normal.column("category").to_pylist(), seen) if s)
    few = {name: counts.get(name, 0) for name in sorted({*counts, *trained_counts}) if counts.get(name, 0) < min_images}
    if few:
        told = {name: trained_counts[name] for name in few if trained_counts[name]}
        raise ValueError(f"classes with fewer than {min_images} normal images: {few}"
                         + (f" (left out as training images of this model: {told})" if told else "")
                         + "; add images or leave them out with --set data.categories=[...]")
    rows = pa.table({"uri": fresh.column("image_uri"), "category": fresh.column("category")})
    return rows, manifest.num_rows - normal.num_rows, sum(seen)


def _warn_if_same_paths(uris: list[str], trained_relative: set[str], base: str) -> None:
    same = [uri for uri in uris if uri.startswith(base) and uri[len(base):] in trained_relative]
    if same:
        logger.warning("%d of the %d normal images sit at the same paths under %s as images this model trained on "
                       "under its data.root (e.g. %s); they are scored. If they are a copy of the training set, "
                       "calibrate on a manifest without them: thresholds set on training images flag more new "
                       "good parts than the target FPR", len(same), len(uris), base.rstrip("/"), same[0][len(base):])


def check_output(model: str, output: str) -> None:
    """Before any work: --output must be a new (or empty) folder, not the model's own folder nor inside it."""
    from dinomaly.export.checked import check_output as check_new_folder

    target = Path(output).resolve()
    if not model.startswith("models:/") and not split_uri(model)[0]:
        source = Path(model).resolve()
        if target == source or source in target.parents:
            raise ValueError(f"--output {output} is the --model folder or inside it; write the new version to "
                             "another folder (the calibrated model is a new checkpoint beside the old one)")
    if target.is_file():
        raise ValueError(f"--output {output} is a file; pass a folder for the new checkpoint")
    check_new_folder(Path(output))


def prepare(model: str, data: str, preset: str | None, overrides: list[str],
            target_fpr: float | None = None) -> CalibrationJob:
    """The model, the normal rows and the target FPR (--target-fpr, else the model's eval.target_fpr)."""
    from dinomaly.distributed.batch.scoring import load_bundle

    settings = [f"data.root={data}", *overrides]
    if target_fpr is not None:
        settings.append(f"eval.target_fpr={target_fpr}")
    bundle = load_bundle(model, preset, settings)
    if bundle.version == "official":
        raise ValueError("official weights carry no config of ours to store a threshold table with; train or "
                         "import them first (pipelines/train.py --init-from ...), then calibrate that checkpoint")
    saved = bundle.saved_config
    rows, defective, trained = normal_rows(bundle.config, trained=trained_uris(saved),
                                           trained_root=saved.data.root if saved else "")
    registry = load_config(preset, overrides).tracking if model.startswith("models:/") else None
    return CalibrationJob(bundle, rows, bundle.config.eval.target_fpr, data, registry, defective, trained)


def score_normals(bundle_ref, config: Config, rows: pa.Table) -> tuple[dict[str, np.ndarray], list[dict]]:
    """({class: scores}, [{uri, error}] of unreadable images) with the batch-scoring actors."""
    from dinomaly.distributed.resources import wait_for_batch_resources

    wait_for_batch_resources(config, "calibrate")
    dataset = score_rows(rows, bundle_ref, config, ScoreSpec(keep_maps=False), with_masks=False)
    scores: dict[str, list[float]] = {}
    unreadable = []
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for uri, name, score, error in zip(batch["uri"], batch["category"], batch["score"], batch["error"]):
            if error:
                unreadable.append({"uri": str(uri), "error": str(error)})
            else:
                scores.setdefault(str(name), []).append(float(score))
    return {name: np.asarray(s) for name, s in sorted(scores.items())}, unreadable


def recalibrated(previous: ThresholdTable | None, scores: dict[str, np.ndarray], target_fpr: float,
                 seed: int) -> ThresholdTable:
    """The new table: new per-class and global thresholds; classes not in `scores` keep their previous entry."""
    new = build_table(scores, target_fpr, SOURCE, seed=seed)
    kept = {name: entry for name, entry in (previous.classes if previous else {}).items() if name not in new.classes}
    return replace(new, classes=dict(sorted({**kept, **new.classes}.items())))


def write_version(bundle: ModelBundle, table: ThresholdTable, output: Path, data: str) -> Path:
    """A new checkpoint folder: the bundle's weights, the config it was trained with (its data.* still describe
    its training data), its metadata with the new table and the calibration data."""
    from dinomaly.checkpoint import save

    metadata = {**bundle.metadata, METADATA_KEY: table.to_dict(),
                "calibrated_from": {"model": bundle.source, "version": bundle.version, "data": data,
                                    "categories": list(bundle.config.data.categories),
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    model = build_model(bundle.config.model, bundle.state_dict, "cpu")
    return save(output, model, bundle.saved_config or bundle.config, metadata=json_safe(metadata))


def register(job: CalibrationJob, table: ThresholdTable, output: Path) -> str:
    """A new registry version of the model the job read, from `output`, tagged like the old one plus the table."""
    from dinomaly.distributed.tracking import register_checkpoint, resolve_tracking_uri

    tracking = replace(job.registry, tracking_uri=resolve_tracking_uri(job.registry),
                       registered_model_name=job.bundle.name)
    config = replace(job.bundle.config, tracking=tracking)
    tags: dict[str, Any] = {**job.bundle.tags, METADATA_KEY: json.dumps(json_safe(table.to_dict())),
                            "calibrated_from": f"{job.bundle.name}/{job.bundle.version}"}
    _, version = register_checkpoint(config, f"calibrate-{job.bundle.name}-{time.strftime('%Y%m%dT%H%M%S')}",
                                     output, tags)
    return version


def run(job: CalibrationJob, output: str | Path) -> dict[str, Any]:
    """Start or join Ray (and stop a Ray it started), score the normal images, write the new version, print
    the table. Returns {table, unreadable, output, version}."""
    import ray

    from dinomaly.distributed.cluster import ensure_ray

    output = Path(output)
    bundle, config = job.bundle, job.bundle.config
    previous = stored_table(bundle.metadata, bundle.tags)
    started = ensure_ray()
    try:
        scores, unreadable = score_normals(ray.put(bundle), config, job.rows)
    finally:
        if started:
            ray.shutdown()
    if unreadable:
        logger.warning("%d unreadable images left out: %s", len(unreadable), unreadable[:3])
    table = recalibrated(previous, scores, job.target_fpr, config.train.seed)
    write_version(bundle, table, output, job.data)
    version = register(job, table, output) if job.registry is not None and job.registry.enabled else None
    print(format_threshold_table(table, previous))
    trained = f", {job.skipped_trained} images this model was trained on" if job.skipped_trained else ""
    print(f"{sum(map(len, scores.values()))} normal images scored ({len(unreadable)} unreadable, "
          f"{job.skipped_defective} defective rows{trained} left out); new model version in {output}"
          + (f", registered as {bundle.name} version {version}" if version else ""))
    return {"table": table, "unreadable": unreadable, "output": output, "version": version}
