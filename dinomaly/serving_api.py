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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dinomaly.config import Config, DinomalyConfig, ServeConfig, to_dict
from dinomaly.data.transforms import (
    CorruptImageError,
    ImageTooLargeError,
    decode_image,
    normalize,
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


def decode_request_image(data: bytes, serve_config: ServeConfig, name: str = "image") -> Image.Image:
    """Validate and decode one uploaded image -> PIL RGB, or raise RequestError (400, 413 or 415).

    Order matters: the byte limit is checked before PIL sees anything, the format from the header only,
    and the pixel limit before the pixels are decoded (decompression bombs never allocate).
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
        return decode_image(data, uri=name, max_pixels=serve_config.max_image_pixels)
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
    """What `GET /v1/model` shows and every prediction names."""

    name: str
    version: str
    source: str  # where the weights came from: a directory, s3:// URI or models:/ URI
    threshold: float
    threshold_source: str
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


class ScoringService:
    """A loaded model plus its threshold and limits: bytes in, prediction dicts out.

    `score` is the one batched call (a list of model inputs -> one forward); HTTP and batching live in
    dinomaly.distributed.serve.app.
    """

    def __init__(self, predictor: Predictor, model_config: DinomalyConfig, serve_config: ServeConfig,
                 info: ModelInfo, token: str | None = None):
        self.predictor = predictor
        self.model_config = model_config
        self.serve_config = serve_config
        self.info = info
        self.token = token

    @classmethod
    def from_checkpoint(cls, directory: str | Path, serve_config: ServeConfig, *, name: str = "",
                        version: str = "", source: str = "", tags: Mapping[str, str] | None = None,
                        metrics: Mapping[str, Any] | None = None) -> ScoringService:
        """Load a `dinomaly.checkpoint.save` directory; the threshold comes from `resolve_threshold`."""
        from dinomaly.checkpoint import load  # keeps `import dinomaly.serving_api` light

        device = "cuda" if serve_config.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        loaded = load(directory, device=device)
        config = loaded.config
        model_config = config.model if isinstance(config, Config) else config
        eval_config = config.eval if isinstance(config, Config) else Config().eval
        threshold, threshold_source = resolve_threshold(serve_config.threshold, serve_config.threshold_method,
                                                         loaded.metadata, tags)
        info = ModelInfo(
            name=name or (config.name if isinstance(config, Config) else Path(directory).name),
            version=version or str(loaded.metadata.get("version", loaded.metadata.get("step", "local"))),
            source=source or str(directory), threshold=threshold, threshold_source=threshold_source,
            config=to_dict(config), metrics=dict(metrics or loaded.metadata.get("metrics", {})))
        token = read_auth_token(serve_config)
        service = cls(Predictor(loaded.model, eval_config, device=device), model_config, serve_config, info, token)
        service.score([np.zeros((model_config.crop_size, model_config.crop_size, 3), np.uint8)])  # warm-up
        return service

    def prepare(self, data: bytes, name: str = "image") -> np.ndarray:
        """Request bytes -> uint8 model input [crop, crop, 3], or RequestError."""
        return model_input(decode_request_image(data, self.serve_config, name), self.model_config)

    def score(self, inputs: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
        """One forward over a batch of model inputs -> (image score, final map [resize, resize]) each."""
        result = self.predictor.predict(normalize(np.stack(inputs)))
        return [(float(s), m) for s, m in zip(result.scores, result.maps)]

    def prediction(self, score: float, anomaly_map: np.ndarray, with_heatmap: bool) -> dict[str, Any]:
        """The JSON body of one prediction (without elapsed_ms, which the HTTP layer adds)."""
        out: dict[str, Any] = {
            "score": score,
            "is_anomalous": bool(score >= self.info.threshold),  # as the F1 search: positive = score >= t
            "threshold": self.info.threshold,
            "model": {"name": self.info.name, "version": self.info.version},
        }
        if with_heatmap:
            png = png_bytes(anomaly_map, colour_scale(self.info.threshold))  # fixed scale: 2 x threshold
            out["heatmap_png_base64"] = base64.b64encode(png).decode()
        return out
