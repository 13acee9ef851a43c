"""Ray Data batch inference shared by `pipelines/evaluate.py` and `pipelines/predict.py`.

    rows (uri [, mask_uri, label, category])            one Arrow block per `rows_per_block` rows
      --read_rows (tasks)-->  uint8 crop, original size, 256 mask, error   (dinomaly.data.reader keeping
                                                                             errors: a bad file is an error row)
      --ModelScorer (actor pool, CPU or GPU)-->  score, final map, peak location [, heatmap PNG]
      --> the driver (streamed: metrics per class, or Parquet parts)

The model travels once through the object store as a state dict and is rebuilt in every actor, so the
same code scores a local checkpoint, a registry version or official weights on any node. Scoring is
`dinomaly.inference.Predictor` (no second implementation); every input row gives exactly one output row.
"""

from __future__ import annotations

import hashlib
import logging
import math
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dinomaly.calibration import ThresholdTable
from dinomaly.checkpoint import load, load_official
from dinomaly.config import (
    Config,
    DinomalyConfig,
    apply_overrides,
    from_dict,
    load_config,
    parse_override,
    to_dict,
)
from dinomaly.data.reader import RowError, RowReader
from dinomaly.data.storage import StorageOptions, filesystem_for, split_uri
from dinomaly.data.transforms import mask_to_tensor
from dinomaly.export.predictor import OnnxPredictor, exported_files, is_exported
from dinomaly.heatmap import class_scales, peak_location, png_bytes
from dinomaly.inference import Predictor, resize_masks
from dinomaly.serving_api import class_thresholds, resolve_thresholds

logger = logging.getLogger(__name__)

OFFICIAL_SUFFIXES = (".pth", ".pt", ".safetensors")


# --------------------------------------------------------------------------- the model


@dataclass
class ModelBundle:
    """A model ready to ship to actors: its config, weights, and what the registry/metadata say about it."""

    config: Config
    state_dict: dict[str, torch.Tensor]
    source: str
    name: str = ""
    version: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    exported: dict[str, bytes] = field(default_factory=dict)  # an exported model's files (then no state_dict)
    saved_config: Config | None = None  # the config the model was trained with (None: official weights)

    def thresholds(self) -> ThresholdTable | None:
        """The model's thresholds as the service finds them (per-class table, else the single threshold;
        serve.threshold replaces the global one), or None when it carries none (e.g. official weights)."""
        serve = self.config.serve
        try:
            return resolve_thresholds(serve.threshold, serve.threshold_method, self.metadata, self.tags)
        except ValueError:
            return None


def decision_columns(scores: np.ndarray, classes: list[str | None], table: ThresholdTable | None,
                     ok: np.ndarray) -> dict[str, pa.Array]:
    """The readable verdict of each row: class used, threshold, is_anomalous, normalised score (score /
    threshold, 1.0 = the boundary). Null where the row was not scored (~ok) or the model has no threshold."""
    count = len(scores)
    if table is None:
        nulls = np.ones(count, bool)
        return {"class": pa.nulls(count, pa.string()), "threshold": pa.nulls(count, pa.float32()),
                "is_anomalous": pa.array(np.zeros(count, bool), mask=nulls),
                "normalised_score": pa.nulls(count, pa.float32())}
    used, values = class_thresholds(table, classes)
    return {"class": pa.array(used, pa.string()), "threshold": pa.array(values, pa.float32()),
            "is_anomalous": pa.array(scores >= values, pa.bool_(), mask=~ok),
            "normalised_score": pa.array(scores / values, pa.float32(), mask=~ok)}


def _as_config(saved: Config | DinomalyConfig) -> Config:
    return saved if isinstance(saved, Config) else Config(model=saved)


def load_bundle(model: str, preset: str | None = None, overrides: list[str] | None = None) -> ModelBundle:
    """`--model` -> ModelBundle: a checkpoint dir / s3:// prefix / models:/name@alias, or official weights.

    Official weights (.pth/.pt/.safetensors of the reference's ViTill) need `preset` for the architecture
    (e.g. mvtec_uni: ViT-B, 448 -> 392). For a checkpoint the model section always comes from the checkpoint
    (a `model.*` override that differs is refused: `refuse_model_changes`); the other sections come from
    `preset` when given, else from the checkpoint; `overrides` go on top.
    """
    overrides = list(overrides or [])
    if is_exported(model):
        return _exported_bundle(model, preset, overrides)
    if Path(model).suffix.lower() in OFFICIAL_SUFFIXES:
        if not preset:
            raise ValueError(f"{model} looks like official Dinomaly weights; pass --config with the preset that "
                             "describes their architecture (e.g. --config mvtec_uni for the released ViT-B "
                             "448->392 weights)")
        if not Path(model).is_file():
            raise FileNotFoundError(f"official weights {model} not found; download them (README) or fix the path")
        config = load_config(preset, overrides)
        weights = load_official(model, config.model).eval().state_dict()
        return ModelBundle(config=config, state_dict=weights, source=str(model), name=Path(model).stem,
                           version="official")
    from dinomaly.distributed.models import resolve_model

    # tracking.* and data.* here say where registries and buckets are; model.* are checked against the model's
    base = load_config(preset, [o for o in overrides if not _is_model_key(o)])
    resolved = resolve_model(model, base)
    try:
        loaded = load(resolved.directory)
    finally:
        resolved.cleanup()
    saved = _as_config(loaded.config)
    refuse_model_changes(saved, overrides)
    config = replace(base if preset else saved, model=saved.model)
    config = apply_overrides(config, overrides) if overrides else config
    return ModelBundle(config=config, state_dict=loaded.model.state_dict(), source=resolved.source,
                       name=resolved.name or saved.name, version=resolved.version or "local",
                       metadata=loaded.metadata, tags=resolved.tags, saved_config=saved)


def _exported_bundle(model: str, preset: str | None, overrides: list[str]) -> ModelBundle:
    """pipelines/export.py's model.onnx / model.xml: config and metadata from the file, which ships whole."""
    from dinomaly.export import read_metadata

    values = read_metadata(model)
    saved = from_dict(Config, values["config"])
    refuse_model_changes(saved, overrides)
    config = replace(load_config(preset, [o for o in overrides if not _is_model_key(o)]) if preset else saved,
                     model=saved.model)
    config = apply_overrides(config, overrides) if overrides else config
    info = values.get("model", {})
    return ModelBundle(config=config, state_dict={}, source=str(model), name=info.get("name") or saved.name,
                       version=info.get("version") or "exported", metadata=values.get("metadata", {}),
                       tags=info.get("tags", {}), exported=exported_files(model), saved_config=saved)


_UNSET = object()


def _is_model_key(override: str) -> bool:
    return override.split("=", 1)[0].strip().startswith("model.")


def refuse_model_changes(trained: Config | DinomalyConfig | dict[str, Any], overrides: list[str]) -> None:
    """ValueError for a `model.KEY=VALUE` override that differs from the trained model's value (one equal to it
    is harmless). Its weights were trained at that size and architecture: a changed one would score something
    else while its calibrated thresholds still decided. trained: its Config, model section, or either as a dict."""
    values = to_dict(trained) if not isinstance(trained, dict) else trained
    values = values.get("model", values) if isinstance(values.get("model"), dict) else values
    for text in overrides:
        if not _is_model_key(text):
            continue
        key, value = parse_override(text)
        node: Any = values
        for part in key.split(".")[1:]:
            node = node.get(part, _UNSET) if isinstance(node, dict) else _UNSET
        if node != value:
            shown = "(unset)" if node is _UNSET else node
            raise ValueError(f"{text.strip()} differs from the trained model's {shown}: a trained model's model.* "
                             "settings are fixed; eval.* keys change how it is scored")


def build_model(model_config: DinomalyConfig, state_dict: dict[str, torch.Tensor], device: str):
    """The model from a bundle's state dict, strictly, in eval mode on `device`."""
    from dinomaly.model.dinomaly import Dinomaly

    model = Dinomaly(model_config, load_encoder_weights=False)
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval()


# --------------------------------------------------------------------------- reading


def read_rows(batch: dict[str, np.ndarray], reader: RowReader, map_size: int, with_masks: bool
              ) -> dict[str, np.ndarray]:
    """Ray Data UDF: rows with `uri` (+ `mask_uri`, `label` when with_masks) -> pixels or an error.

    Adds image uint8 [B, crop, crop, 3], height/width (original size; 0 on error), error ('' = read fine),
    and, with_masks, mask bool [B, S, S] at the map size S: the reference's resize/crop, then a nearest resize
    and > 0 (a normal image's mask is all False, as the reference). `reader` keeps errors: never raises.
    """
    count, crop = len(batch["uri"]), reader.crop_size
    mask_uris = [(batch["mask_uri"][i] or None) if with_masks and int(batch["label"][i]) == 1 else None
                 for i in range(count)]
    packed = list(zip(batch["shard_uri"], batch["shard_row"])) if "shard_uri" in batch else None
    read = reader.read_many([(str(uri), mask_uri) for uri, mask_uri in zip(batch["uri"], mask_uris)], packed)
    images = np.zeros((count, crop, crop, 3), dtype=np.uint8)
    heights, widths = np.zeros(count, np.int32), np.zeros(count, np.int32)
    errors = np.full(count, "", dtype=object)
    masks = np.zeros((count, map_size, map_size), dtype=bool) if with_masks else None
    for i, row in enumerate(read):
        if isinstance(row, RowError):
            errors[i] = row.reason
            continue
        images[i], heights[i], widths[i] = row.image, row.height, row.width
        if masks is not None and row.mask is not None:
            masks[i] = resize_masks(mask_to_tensor(row.mask)[None], map_size)[0, 0].numpy()
    out = {**batch, "image": images, "height": heights, "width": widths, "error": errors}
    if masks is not None:
        out["mask"] = masks
    return out


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class ScoreSpec:
    """What ModelScorer returns besides the score: maps, heatmap PNGs (written under heatmap_uri)."""

    keep_maps: bool
    storage: StorageOptions = field(default_factory=StorageOptions)  # resolved on the driver
    heatmap_uri: str = ""  # '' = no heatmaps; else a folder / s3:// prefix for <stem>-<hash>.png
    heatmap_thresholds: ThresholdTable | None = None  # colour scale per row's class (dinomaly.heatmap.colour_scale)
    staging_dir: str = ""  # local folder where a PNG is written before its rename into heatmap_uri; '' = in place


def heatmap_name(uri: str) -> str:
    """A stable, collision-free file name for the heatmap of `uri`: <stem>-<10 hex of sha1(uri)>.png."""
    stem = PurePosixPath(str(uri)).stem[:80] or "image"
    return f"{stem}-{hashlib.sha1(str(uri).encode()).hexdigest()[:10]}.png"


class ModelScorer:
    """Ray Data actor: rebuilds the model once, then scores batches with Predictor (CUDA when it has a GPU)."""

    def __init__(self, bundle_ref: list, spec: ScoreSpec):
        import ray

        bundle: ModelBundle = ray.get(bundle_ref[0])
        cfg = bundle.config.eval
        torch.set_num_threads(max(1, math.ceil(cfg.cpus_per_actor)))
        device = "cuda" if cfg.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        if bundle.exported:  # its own runtime scores it; torch stays out of the loop
            self.predictor = OnnxPredictor.from_files(bundle.exported, threads=max(1, math.ceil(cfg.cpus_per_actor)))
        else:
            self.predictor = Predictor(build_model(bundle.config.model, bundle.state_dict, device), cfg, device=device)
        self.model_config, self.spec = bundle.config.model, spec
        if spec.heatmap_uri and not split_uri(spec.heatmap_uri)[0]:  # a local folder (object stores need none)
            Path(spec.heatmap_uri).mkdir(parents=True, exist_ok=True)
            if spec.staging_dir:
                Path(spec.staging_dir).mkdir(parents=True, exist_ok=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        count, size = len(ok), self.predictor.eval_config.resize
        scores = np.full(count, np.nan, dtype=np.float32)
        maps = np.zeros((count, size, size), dtype=np.float32)
        if ok.any():
            result = self.predictor.predict_pixels(batch["image"][ok])
            scores[ok], maps[ok] = result.scores, result.maps
        out = {k: v for k, v in batch.items() if k != "image"}
        out["score"] = scores
        out.update(self._locations(maps, ok, batch["height"], batch["width"]))
        out["heatmap_uri"] = self._heatmaps(batch, maps, ok)
        if self.spec.keep_maps:
            out["map"] = maps
        return out

    def _locations(self, maps, ok, heights, widths) -> dict[str, np.ndarray]:
        cfg = self.model_config
        rows = np.full((4, len(ok)), np.nan, dtype=np.float32)
        for i in np.flatnonzero(ok):
            rows[:, i] = peak_location(maps[i], self.predictor.eval_config.max_ratio, cfg.image_size, cfg.crop_size,
                                       int(heights[i]), int(widths[i]))
        return dict(zip(("peak_row", "peak_col", "peak_row_map", "peak_col_map"), rows))

    def _heatmaps(self, batch: dict[str, np.ndarray], maps: np.ndarray, ok: np.ndarray) -> np.ndarray:
        uris, images = batch["uri"], batch["image"]
        names = np.full(len(ok), "", dtype=object)
        if not self.spec.heatmap_uri:
            return names
        table, classes = self.spec.heatmap_thresholds, batch.get("category", [None] * len(ok))
        # each row on its class threshold's scale; without thresholds: this batch's max, never one image's own
        scales = class_scales(list(classes), table, maps[ok])
        for i in np.flatnonzero(ok):
            scale = scales[i]
            target = f"{self.spec.heatmap_uri.rstrip('/')}/{heatmap_name(uris[i])}"
            fs, path = filesystem_for(target, self.spec.storage)
            # a local PNG appears whole (written aside, then renamed); an object-store put is atomic anyway
            local = self.spec.staging_dir and not split_uri(target)[0]
            written = f"{self.spec.staging_dir}/{uuid.uuid4().hex[:8]}-{heatmap_name(uris[i])}" if local else path
            with fs.open_output_stream(written) as stream:
                stream.write(png_bytes(maps[i], scale, images[i]))
            if local:
                fs.move(written, path)
            names[i] = target
        return names


# --------------------------------------------------------------------------- the pipeline


def rows_dataset(table: pa.Table, rows_per_block: int):
    """A Ray Dataset over `table`, in order, cut into blocks so reading runs in parallel."""
    import ray

    step = max(1, rows_per_block)
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, max(table.num_rows, 1), step)])


def score_rows(table: pa.Table, bundle_ref, config: Config, score_spec: ScoreSpec, with_masks: bool,
               preserve_order: bool = False):
    """The lazy Ray Dataset scoring every row of `table` (columns: uri [, mask_uri, label, category]
    [, shard_uri, shard_row: a packed manifest's rows, read from their shards]).

    Output columns: the input ones, height, width, error, score (NaN on error), peak_row/peak_col (original
    image pixels), peak_row_map/peak_col_map (final-map pixels), heatmap_uri [, mask, map].
    """
    import ray

    cfg = config.eval
    reader = RowReader(config.model.image_size, config.model.crop_size, keep_errors=True,
                       max_pixels=config.data.max_image_pixels or None, storage=StorageOptions.resolve(config.data),
                       fast_decode=config.data.fast_decode)
    dataset = rows_dataset(table, cfg.batch_size)  # a block per batch: every actor gets work early
    if preserve_order:
        dataset.context.execution_options.preserve_order = True
    # CPU actors: the same resources make Ray Data fuse reading into the actors (no extra CPUs needed, no
    # object-store hop); GPU actors: reading runs in CPU tasks beside them, so the GPU never waits on decoding
    read_cpus = cfg.cpus_per_actor if cfg.gpus_per_actor == 0 else 1.0
    dataset = dataset.map_batches(read_rows, fn_kwargs={"reader": reader, "map_size": cfg.resize,
                                                        "with_masks": with_masks}, batch_size=cfg.batch_size,
                                  batch_format="numpy", zero_copy_batch=True, num_cpus=read_cpus)
    return dataset.map_batches(
        ModelScorer, fn_constructor_args=([bundle_ref], score_spec), batch_size=cfg.batch_size,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None)



def add_decisions(rows: pa.Table, table: ThresholdTable | None) -> pa.Table:
    """`rows` (score, category, error: '' = scored) with `decision_columns` appended, each row decided by
    its class's threshold (the global one for a class the table lacks)."""
    ok = pc.equal(rows.column("error"), "").to_numpy(zero_copy_only=False)
    scores = rows.column("score").to_numpy(zero_copy_only=False)
    for name, column in decision_columns(scores, rows.column("category").to_pylist(), table, ok).items():
        rows = rows.append_column(name, column)
    return rows
