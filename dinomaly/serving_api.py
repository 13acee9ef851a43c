"""The Ray-free half of the scoring service: request validation, image limits, thresholds, heatmaps, auth.

`dinomaly.distributed.serve.app` puts this behind Ray Serve (HTTP, batching, replicas); everything that
decides what a request means or what a response says lives here, so it is tested without a cluster.
The image path is exactly the evaluation's: `decode_image` -> `resize_crop_image` -> `normalize` ->
`Predictor.predict` (no second implementation of the transforms or the scoring).
"""

from __future__ import annotations

import base64
import hmac
import io
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image

from dinomaly.calibration import ClassThreshold, ThresholdTable, stored_table
from dinomaly.config import MAX_SCORE, Config, DinomalyConfig, ServeConfig, to_dict
from dinomaly.data.transforms import (
    CorruptImageError,
    ImageTooLargeError,
    decode_image,
    resize_crop_image,
)
from dinomaly.heatmap import colour_scale, png_bytes
from dinomaly.inference import Predictor

logger = logging.getLogger(__name__)

# PIL format name -> the media type a client may send it as.
SUPPORTED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "BMP": "image/bmp", "TIFF": "image/tiff"}
# Raw-body content types accepted besides the image types: "" = the client sent none, and
# application/x-www-form-urlencoded is what `curl --data-binary @img.png` sends unless told otherwise.
RAW_CONTENT_TYPES = {"", "application/octet-stream", "application/x-www-form-urlencoded", *SUPPORTED_FORMATS.values(),
                     "image/jpg", "image/x-ms-bmp"}


class RequestError(ValueError):
    """A request the service refuses; `status` is the HTTP status (4xx) and the message goes to the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- images


def decode_request_image(data: bytes, serve_config: ServeConfig, name: str = "image",
                         draft_px: int | None = None) -> Image.Image:
    """Validate and decode one uploaded image -> PIL RGB, or raise RequestError (400, 413 or 415).

    Order matters: the byte limit is checked before PIL sees anything, the format from the header only,
    and the pixel limit before the pixels are decoded (decompression bombs never allocate).
    draft_px: fast decoding of big JPEGs for a model of that image size (data.fast_decode), None = full.
    """
    if not data:
        raise RequestError(400, f"{name} is empty (0 bytes); send the bytes of a PNG, JPEG, BMP or TIFF file")
    if len(data) > serve_config.max_image_bytes:
        raise RequestError(413, f"{name} has {len(data)} bytes, more than serve.max_image_bytes="
                                f"{serve_config.max_image_bytes}; send a smaller image")
    try:
        with Image.open(io.BytesIO(data)) as probe:  # header only
            image_format = probe.format
    except Image.DecompressionBombError as err:
        raise RequestError(413, f"{name} refused as a decompression bomb: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise RequestError(400, f"{name} is not a readable image ({type(err).__name__}); "
                                "send a PNG, JPEG, BMP or TIFF file") from err
    if image_format not in SUPPORTED_FORMATS:
        raise RequestError(415, f"{name} is {image_format}, which is not accepted; send PNG, JPEG, BMP or TIFF")
    try:
        return decode_image(data, uri=name, max_pixels=serve_config.max_image_pixels, draft_px=draft_px)
    except ImageTooLargeError as err:
        raise RequestError(413, f"{err} (serve.max_image_pixels)") from err
    except CorruptImageError as err:
        raise RequestError(400, str(err)) from err


def model_input(image: Image.Image, model_config: DinomalyConfig) -> np.ndarray:
    """PIL RGB -> uint8 [crop, crop, 3]: the evaluation's resize and centre crop."""
    return resize_crop_image(image, model_config.image_size, model_config.crop_size)


# --------------------------------------------------------------------------- thresholds


def _as_threshold(value: Any, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}={value!r} is not a number; fix the metadata or set serve.threshold") from err
    if not math.isfinite(number):
        raise ValueError(f"{where}={value!r} is not finite; fix the metadata or set serve.threshold")
    return number


def _find_method(table: Mapping[str, Any], method: str) -> str | None:
    """The key of `method` in a flat table: 'image_f1_optimal', 'threshold_image_f1_optimal' (what training
    tags registry versions with), 'thresholds.image_f1_optimal' or 'thresholds/image_f1_optimal'."""
    for key in table:
        if key.replace("/", ".").rsplit(".", 1)[-1] in (method, f"threshold_{method}"):
            return key
    return None


def resolve_threshold(override: float | None, method: str, metadata: Mapping[str, Any],
                      tags: Mapping[str, str] | None = None) -> tuple[float, str]:
    """(threshold, where it came from): serve.threshold, then registry version tags, then checkpoint metadata.

    `method` ('image_f1_optimal' or 'image_normal_quantile', the names training writes) is looked up as
    a registry tag ('threshold_<method>', as dinomaly.distributed.train.worker registers it, or bare), then in
    metadata["thresholds"] (what training saves) or at the top level of metadata; a plain 'threshold' tag
    or metadata key is the last resort. Raises ValueError when there
    is none: a verdict needs a threshold, so this is a start-up error.
    """
    if override is not None:
        return float(override), "serve.threshold"
    tags = tags or {}
    nested = metadata.get("thresholds")
    places = [("registry tag", tags), ("metadata thresholds", nested if isinstance(nested, Mapping) else {}),
              ("metadata", metadata)]
    for where, table in places:
        key = _find_method(table, method)
        if key is not None:
            return _as_threshold(table[key], f"{where} {key}"), f"{where} {key}"
    for where, table in (places[0], places[2]):
        if "threshold" in table:
            return _as_threshold(table["threshold"], f"{where} threshold"), f"{where} threshold"
    raise ValueError(f"the model carries no {method} threshold (registry tags: {sorted(tags) or 'none'}; "
                     f"metadata.json keys: {sorted(metadata) or 'none'}); evaluate during training so one is "
                     "written, pick another serve.threshold_method, or set serve.threshold (e.g. "
                     "--set serve.threshold=0.05)")


def resolve_thresholds(override: float | None, method: str, metadata: Mapping[str, Any],
                       tags: Mapping[str, str] | None = None) -> ThresholdTable:
    """The thresholds a model is served with: its per-class table (`stored_table`: registry tag, then checkpoint
    metadata) when it carries one, else today's single threshold (`resolve_threshold`) as the global one;
    serve.threshold replaces the global threshold only. Each entry's `source` says where it came from."""
    try:
        table = stored_table(metadata, tags)
        if table is None:
            value, source = resolve_threshold(override, method, metadata, tags)
            return ThresholdTable(ClassThreshold(value, source))
    except ValueError as err:
        raise ValueError(f"the model's thresholds: {err}; recalibrate the model or set serve.threshold (> 0)") from err
    if override is not None:
        table = replace(table, global_threshold=ClassThreshold(float(override), "serve.threshold"))
    return table


def _positive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise RequestError(422, f"{where}={value!r} must be a finite number > 0")
    if value > MAX_SCORE:
        raise RequestError(422, f"{where}={value!r} must be <= {MAX_SCORE:g}: anomaly scores are cosine distances, "
                                f"in [0, {MAX_SCORE:g}], so a higher threshold never flags anything")
    return float(value)


def check_threshold_update(update: Any, table: ThresholdTable) -> dict[str, Any]:
    """A threshold change {"global": t, "classes": {name: t}} (both optional), checked against `table`;
    returns it normalised to floats, or raises RequestError(422) naming the bad part."""
    if not isinstance(update, Mapping) or not update or set(update) - {"global", "classes"}:
        raise RequestError(422, f"thresholds must be an object with 'global' and/or 'classes', got {update!r}; "
                                'e.g. {"global": 0.3, "classes": {"bottle": 0.25}}')
    out: dict[str, Any] = {}
    if "global" in update:
        out["global"] = _positive(update["global"], "global")
    classes = update.get("classes", {})
    if not isinstance(classes, Mapping):
        raise RequestError(422, f"classes={classes!r} must be an object {{class: threshold}}")
    unknown = sorted(set(classes) - set(table.classes))
    if unknown:
        raise RequestError(422, f"unknown classes {unknown}; this model knows {sorted(table.classes) or 'none'}")
    if classes:
        out["classes"] = {name: _positive(value, f"classes.{name}") for name, value in classes.items()}
    return out


def merge_threshold_updates(current: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Two checked updates as one (the later wins per entry)."""
    merged: dict[str, Any] = {k: v for k, v in current.items() if k == "global"}
    if "global" in update:
        merged["global"] = update["global"]
    classes = {**current.get("classes", {}), **update.get("classes", {})}
    return {**merged, "classes": classes} if classes else merged


def apply_threshold_update(table: ThresholdTable, update: Mapping[str, Any]) -> ThresholdTable:
    """`table` with the entries of a checked update replaced (source 'manual')."""
    global_threshold = table.global_threshold
    if "global" in update:
        global_threshold = ClassThreshold(update["global"], "manual")
    classes = {**table.classes, **{k: ClassThreshold(v, "manual") for k, v in update.get("classes", {}).items()}}
    return ThresholdTable(global_threshold, classes)


def decide(table: ThresholdTable, score: float, class_name: str | None) -> dict[str, Any]:
    """The readable verdict of one score: class used, its threshold and source, verdict, normalised score."""
    used, entry = table.for_class(class_name)
    return {"score": score, "class": used, "threshold": entry.threshold, "threshold_source": entry.source,
            "is_anomalous": bool(score >= entry.threshold),  # as the F1 search: positive = score >= t
            "normalised_score": score / entry.threshold}


def class_thresholds(table: ThresholdTable, classes: Sequence[str | None]) -> tuple[list[str], np.ndarray]:
    """Bulk rows: (class used, threshold) per row. A class the table knows uses its own threshold; any other
    (none given, or a model without that class) uses the global one and says 'global'."""
    used = [c if c is not None and c in table.classes else "global" for c in classes]
    return used, np.array([table.for_class(None if c == "global" else c)[1].threshold for c in used], np.float64)


# --------------------------------------------------------------------------- auth


def read_auth_token(serve_config: ServeConfig, environ: Mapping[str, str] = os.environ) -> str | None:
    """The bearer token from serve.auth_token_env / serve.auth_token_file, or None (auth off).

    A configured but missing or empty source is a start-up error, never a silently open service.
    """
    tokens = []
    if serve_config.auth_token_env:
        value = environ.get(serve_config.auth_token_env, "").strip()
        if not value:
            raise ValueError(f"serve.auth_token_env={serve_config.auth_token_env!r} but that environment variable is "
                             "unset or empty where the replica runs; export it before starting Ray, or clear the key")
        tokens.append(value)
    if serve_config.auth_token_file:
        path = Path(serve_config.auth_token_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"serve.auth_token_file={str(path)!r} does not exist; create it or clear the key")
        value = path.read_text().strip()
        if not value:
            raise ValueError(f"serve.auth_token_file={str(path)!r} is empty; write the token into it")
        tokens.append(value)
    if len(set(tokens)) > 1:
        raise ValueError("serve.auth_token_env and serve.auth_token_file hold different tokens; set only one")
    return tokens[0] if tokens else None


def check_bearer(authorization: str | None, token: str | None) -> None:
    """Raise RequestError(401) unless auth is off or the header is 'Bearer <token>' (constant-time compare)."""
    if token is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise RequestError(401, "missing or wrong bearer token; send the header 'Authorization: Bearer <token>'")


# --------------------------------------------------------------------------- the service


@dataclass
class ModelInfo:
    """What `GET /v1/model` shows and every prediction names; `thresholds` are the model's own (as loaded)."""

    name: str
    version: str
    source: str  # where the weights came from: a directory, s3:// URI or models:/ URI
    thresholds: ThresholdTable
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def threshold(self) -> float:
        return self.thresholds.global_threshold.threshold

    @property
    def threshold_source(self) -> str:
        return self.thresholds.global_threshold.source


class ScoringService:
    """A loaded model plus its thresholds and limits: bytes in, prediction dicts out.

    `score` is the one batched call (a list of model inputs -> one forward); HTTP and batching live in
    dinomaly.distributed.serve.app. `thresholds` (those in force) is replaced whole by `set_threshold_update`,
    so a request in flight sees either the old or the new table, never a mix; the weights are untouched.
    """

    def __init__(self, predictor: Predictor, model_config: DinomalyConfig, serve_config: ServeConfig,
                 info: ModelInfo, token: str | None = None, fast_decode: bool = False):
        self.predictor = predictor
        self.model_config = model_config
        # data.fast_decode, as predict.py and evaluate.py read images: a served score equals theirs
        self.draft_px = model_config.image_size if fast_decode else None
        self.serve_config = serve_config
        self.info = info
        self.token = token
        self.thresholds = info.thresholds
        self.threshold_update: dict[str, Any] = {}  # what run-time changes replaced, over info.thresholds
        self.loaded_at = time.time()  # unchanged by threshold changes: the weights stay loaded

    @classmethod
    def from_checkpoint(cls, directory: str | Path, serve_config: ServeConfig, *, name: str = "",
                        version: str = "", source: str = "", tags: Mapping[str, str] | None = None,
                        metrics: Mapping[str, Any] | None = None, fast_decode: bool = False) -> ScoringService:
        """Load a `dinomaly.checkpoint.save` directory, or an exported model.onnx / model.xml (scored by its
        runtime, no torch); the thresholds come from `resolve_thresholds`. fast_decode: data.fast_decode."""
        from dinomaly.checkpoint import load  # keeps `import dinomaly.serving_api` light
        from dinomaly.export.predictor import OnnxPredictor, is_exported

        device = "cuda" if serve_config.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        if is_exported(directory):
            predictor = OnnxPredictor(directory, threads=max(1, math.ceil(serve_config.num_cpus)))
            loaded = SimpleNamespace(config=predictor.config, metadata=predictor.metadata)
        else:
            loaded = load(directory, device=device)
        config = loaded.config
        model_config = config.model if isinstance(config, Config) else config
        eval_config = config.eval if isinstance(config, Config) else Config().eval
        thresholds = resolve_thresholds(serve_config.threshold, serve_config.threshold_method, loaded.metadata, tags)
        info = ModelInfo(
            name=name or (config.name if isinstance(config, Config) else Path(directory).name),
            version=version or str(loaded.metadata.get("version", loaded.metadata.get("step", "local"))),
            source=source or str(directory), thresholds=thresholds,
            config=to_dict(config), metrics=dict(metrics or loaded.metadata.get("metrics", {})))
        token = read_auth_token(serve_config)
        if not is_exported(directory):
            predictor = Predictor(loaded.model, eval_config, device=device)
        service = cls(predictor, model_config, serve_config, info, token, fast_decode)
        service.score([np.zeros((model_config.crop_size, model_config.crop_size, 3), np.uint8)])  # warm-up
        return service

    def set_threshold_update(self, update: Any) -> None:
        """Put the model's own thresholds with `update` ({"global", "classes"}; {} = none) in force.
        RequestError(422) for a bad update, which then changes nothing."""
        checked = check_threshold_update(update, self.info.thresholds) if update else {}
        self.thresholds = apply_threshold_update(self.info.thresholds, checked)
        self.threshold_update = checked

    def check_class(self, class_name: str | None) -> None:
        """RequestError(400) naming the known classes unless `class_name` is None or known."""
        try:
            self.thresholds.for_class(class_name)
        except ValueError as err:
            raise RequestError(400, f"{err}; leave out ?class= to use the global threshold") from err

    def prepare(self, data: bytes, name: str = "image") -> np.ndarray:
        """Request bytes -> uint8 model input [crop, crop, 3], or RequestError."""
        return model_input(decode_request_image(data, self.serve_config, name, self.draft_px), self.model_config)

    def score(self, inputs: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
        """One forward over a batch of model inputs -> (image score, final map [resize, resize]) each."""
        result = self.predictor.predict_pixels(np.stack(inputs))
        return [(float(s), m) for s, m in zip(result.scores, result.maps)]

    def prediction(self, score: float, anomaly_map: np.ndarray, with_heatmap: bool,
                   class_name: str | None = None) -> dict[str, Any]:
        """The JSON body of one prediction (without elapsed_ms, which the HTTP layer adds)."""
        out = decide(self.thresholds, score, class_name)
        out["model"] = {"name": self.info.name, "version": self.info.version}
        if with_heatmap:  # fixed scale tied to the class threshold: 1.0 normalised = mid-ramp
            png = png_bytes(anomaly_map, colour_scale(out["threshold"]))
            out["heatmap_png_base64"] = base64.b64encode(png).decode()
        return out

    def thresholds_view(self) -> dict[str, Any]:
        """The thresholds in force, each with where it came from, for GET /v1/model."""
        return {**self.thresholds.to_dict(), "changed_at_run_time": self.threshold_update}
