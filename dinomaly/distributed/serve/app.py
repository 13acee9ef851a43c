"""Ray Serve scoring service: a FastAPI ingress around `ScoringService`, with dynamic batching.

    model URI --resolve_model--> local checkpoint dir --ScoringService--> Predictor (the core's scoring)
    HTTP image --create_api (validation, limits, auth)--> @serve.batch --> one forward per batch

`build_app(model_uri, config)` is what `pipelines/serve.py`, `serve run pipelines.serve:app` and
`serve deploy cluster/serve_config.yaml` all deploy. Routes: POST /v1/predict, POST /v1/predict/batch,
GET /v1/model, GET /healthz, GET /readyz, the page at /, OpenAPI at /docs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from dinomaly.config import Config
from dinomaly.distributed.cluster import ensure_ray
from dinomaly.distributed.models import ResolvedModel, resolve_model
from dinomaly.distributed.resources import ResourcesUnavailable, check_resources, serve_request
from dinomaly.serving_api import (
    RAW_CONTENT_TYPES,
    SUPPORTED_FORMATS,
    ModelInfo,
    RequestError,
    ScoringService,
    check_bearer,
)

logger = logging.getLogger(__name__)

ScoreFn = Callable[[np.ndarray], Awaitable[tuple[float, np.ndarray]]]
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # headers and boundaries around each uploaded file
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_IMAGE_BODY = {"requestBody": {"required": True, "content": {
    **{media: _BINARY for media in SUPPORTED_FORMATS.values()}, "application/octet-stream": _BINARY,
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": _BINARY["schema"]}}}}}}
_BATCH_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "properties": {"files": {"type": "array", "items": _BINARY["schema"]}}}}}}}


class ModelRef(BaseModel):
    name: str
    version: str


class ImagePrediction(BaseModel):
    """One image's answer; the field descriptions appear in the API docs at /docs."""

    score: float = Field(description="image anomaly score: mean of the top 1 % of the blurred anomaly map")
    is_anomalous: bool = Field(description="score >= threshold")
    threshold: float = Field(description="the image-score threshold of the verdict")
    model: ModelRef = Field(description="the model that scored the image")
    heatmap_png_base64: str | None = Field(default=None, description="with ?heatmap=true: the anomaly map over "
                                           "the image as a base64 PNG, coloured on the threshold-tied scale")
    filename: str | None = Field(default=None, description="the uploaded file's name (batch requests)")


class Prediction(ImagePrediction):
    elapsed_ms: float


class BatchPrediction(BaseModel):
    predictions: list[ImagePrediction]
    elapsed_ms: float


# --------------------------------------------------------------------------- request bodies


async def _read_limited(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it passes `limit` bytes; nothing larger is buffered."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_images(request: Request, max_images: int, max_image_bytes: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of each image in a raw-body or multipart request; 413/415/400 as RequestError."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "multipart/form-data" and media_type not in RAW_CONTENT_TYPES:
        raise RequestError(415, f"content type {media_type!r} is not accepted; send the image as the raw body "
                                f"({', '.join(SUPPORTED_FORMATS.values())}) or as multipart/form-data")
    body = await _read_limited(request, max_images * (max_image_bytes + MULTIPART_OVERHEAD_BYTES))
    if media_type != "multipart/form-data":
        return [("image", body)]

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_images + 1, max_fields=100)
    except (MultiPartException, HTTPException) as err:
        message = getattr(err, "message", None) or err.detail
        if message.startswith("Too many files"):  # starlette stops parsing at max_files
            raise RequestError(413, f"more than {max_images} images in one request; split it") from err
        raise RequestError(400, f"malformed multipart body: {message}") from err
    try:
        uploads = [(key, value) for key, value in form.multi_items() if isinstance(value, UploadFile)]
        if not uploads:
            raise RequestError(400, "the multipart body has no file part; send the image as a file field")
        if len(uploads) > max_images:
            hint = ("send one image to /v1/predict, several to /v1/predict/batch" if max_images == 1 else
                    f"the limit is serve.max_batch_images={max_images}; split the batch")
            raise RequestError(413, f"{len(uploads)} or more images in one request; {hint}")
        return [(value.filename or key, await value.read()) for key, value in uploads]
    finally:
        await form.close()


# --------------------------------------------------------------------------- the FastAPI app


def _error(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _add_error_handlers(api: FastAPI) -> None:
    """Every failure is JSON {"error": ...}: 4xx for the client's mistakes, 500 without a traceback."""

    async def request_error(_: Request, err: RequestError) -> JSONResponse:
        return _error(err.status, str(err))

    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail))

    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        return _error(422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()))

    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=err)
        return _error(500, f"internal error ({type(err).__name__}); see the replica log")

    api.add_exception_handler(RequestError, request_error)
    api.add_exception_handler(HTTPException, http_error)
    api.add_exception_handler(RequestValidationError, validation_error)
    api.add_exception_handler(Exception, internal_error)


def create_api(service: ScoringService, score: ScoreFn) -> FastAPI:
    """The HTTP API over a loaded `service`; `score(model_input)` is the (batched) model call."""
    api = FastAPI(title="dinomaly", version="1", description="Dinomaly anomaly scoring: POST an image, get a "
                  "score, a verdict and optionally a heatmap (PNG, jet colours, threshold = mid-scale).")
    _add_error_handlers(api)
    limits = service.serve_config

    async def predict_one(name: str, data: bytes, heatmap: bool) -> dict[str, Any]:
        model_input = await asyncio.to_thread(service.prepare, data, name)
        value, anomaly_map = await score(model_input)
        return await asyncio.to_thread(service.prediction, value, anomaly_map, heatmap)

    @api.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((resources.files("dinomaly") / "web" / "index.html").read_text())

    @api.get("/healthz", summary="Liveness: the replica answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="Readiness: the model is loaded and warmed up")
    async def readyz() -> dict[str, Any]:
        return {"status": "ready", "model": {"name": service.info.name, "version": service.info.version}}

    @api.get("/v1/model", summary="The served model: config, metrics, threshold, weights source, limits")
    async def model(request: Request) -> dict[str, Any]:
        check_bearer(request.headers.get("authorization"), service.token)
        info = service.info
        return {"name": info.name, "version": info.version, "source": info.source, "threshold": info.threshold,
                "threshold_source": info.threshold_source, "metrics": info.metrics, "config": info.config,
                "input": {"image_size": service.model_config.image_size, "crop_size": service.model_config.crop_size,
                          "heatmap_size": service.predictor.eval_config.resize, "formats": sorted(SUPPORTED_FORMATS)},
                "limits": {"max_image_bytes": limits.max_image_bytes, "max_image_pixels": limits.max_image_pixels,
                           "max_batch_images": limits.max_batch_images},
                "auth": service.token is not None}

    @api.post("/v1/predict", response_model=Prediction, response_model_exclude_none=True,
              summary="Score one image (raw body or multipart)", openapi_extra=_IMAGE_BODY)
    async def predict(request: Request, heatmap: bool = False) -> dict[str, Any]:
        start = time.perf_counter()
        check_bearer(request.headers.get("authorization"), service.token)
        [(name, data)] = await _read_images(request, 1, limits.max_image_bytes)
        out = await predict_one(name, data, heatmap)
        return {**out, "elapsed_ms": (time.perf_counter() - start) * 1e3}

    @api.post("/v1/predict/batch", response_model=BatchPrediction, response_model_exclude_none=True,
              summary="Score several images (multipart, one file part each)", openapi_extra=_BATCH_BODY)
    async def predict_batch(request: Request, heatmap: bool = False) -> dict[str, Any]:
        start = time.perf_counter()
        check_bearer(request.headers.get("authorization"), service.token)
        images = await _read_images(request, limits.max_batch_images, limits.max_image_bytes)
        # validate every image before scoring any, so a bad one costs no model time
        inputs = [await asyncio.to_thread(service.prepare, data, name) for name, data in images]
        scored = await asyncio.gather(*(score(x) for x in inputs))
        predictions = [{**service.prediction(value, anomaly_map, heatmap), "filename": name}
                       for (name, _), (value, anomaly_map) in zip(images, scored)]
        return {"predictions": predictions, "elapsed_ms": (time.perf_counter() - start) * 1e3}

    return api


# --------------------------------------------------------------------------- the Serve deployment


@serve.deployment(logging_config={"enable_access_log": False})
@serve.ingress()
class DinomalyScorer:
    """One replica: resolves and loads the model once, then scores batches of requests.

    user_config (serve deploy / reconfigure) may set max_batch_size and batch_wait_timeout_s live.
    """

    def __init__(self, model_uri: str, config: Config):
        torch.set_num_threads(max(1, math.ceil(config.serve.num_cpus)))
        self._model: ResolvedModel = resolve_model(model_uri, config)  # keeps a downloaded copy alive
        self.service = ScoringService.from_checkpoint(
            self._model.directory, config.serve, name=self._model.name, version=self._model.version,
            source=self._model.source, tags=self._model.tags, metrics=self._model.metrics)
        self.reconfigure({"max_batch_size": config.serve.max_batch_size,
                          "batch_wait_timeout_s": config.serve.batch_wait_timeout_s})
        info = self.service.info
        logger.info("serving %s version %s from %s, threshold %.6g (%s)", info.name, info.version, info.source,
                    info.threshold, info.threshold_source)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        if "max_batch_size" in user_config:
            self._score_batch.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self._score_batch.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _score_batch(self, inputs: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
        # in a thread, so the replica keeps decoding the next requests while the model runs
        return await asyncio.to_thread(self.service.score, inputs)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.service, self._score_batch)


def deployment_options(config: Config) -> dict[str, Any]:
    """Replicas (fixed or autoscaled), resources and concurrency from `config.serve`."""
    s = config.serve
    options: dict[str, Any] = {"max_ongoing_requests": s.max_ongoing_requests,
                               "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus}}
    if s.max_replicas > s.num_replicas:
        options["autoscaling_config"] = {"min_replicas": s.num_replicas, "initial_replicas": s.num_replicas,
                                         "max_replicas": s.max_replicas, "target_ongoing_requests": s.max_batch_size}
    else:
        options["num_replicas"] = s.num_replicas
    return options


def build_app(model_uri: str, config: Config) -> Application:
    """The Serve application scoring with `model_uri` (checkpoint dir, s3:// dir or models:/...)."""
    return DinomalyScorer.options(**deployment_options(config)).bind(model_uri, config)


def check_model(model_uri: str, config: Config) -> ModelInfo:
    """Load the model as a replica would, on the driver, so a bad model fails before any Serve start-up.

    Raises ValueError / FileNotFoundError naming the problem (missing files, no threshold, bad token setup).
    """
    resolved = resolve_model(model_uri, config)
    try:
        return ScoringService.from_checkpoint(resolved.directory, config.serve, name=resolved.name,
                                              version=resolved.version, source=resolved.source,
                                              tags=resolved.tags, metrics=resolved.metrics).info
    finally:
        resolved.cleanup()


APP_NAME = "dinomaly"


def start(model_uri: str, config: Config) -> str:
    """Deploy on the running (or a new local) Ray cluster; returns the app URL once it serves.

    HTTP binds config.serve.host:port (127.0.0.1 unless configured). serve.run blocks until every replica
    has loaded the model; a replica that cannot load fails the call instead of restarting forever. Before
    that, the replicas' CPUs/GPUs must be free within cluster.start_timeout_s, else ResourcesUnavailable
    names what holds them (Serve itself would wait for them without end).
    """
    ensure_ray(log_to_driver=False)  # RAY_ADDRESS, when set, attaches to that cluster instead
    if APP_NAME not in serve.status().applications:  # a redeploy replaces the app's own replicas: no check
        check_resources(serve_request(config, APP_NAME), config.cluster.start_timeout_s)
    s = config.serve
    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(build_app(model_uri, config), name=APP_NAME, route_prefix=s.route_prefix)
    return f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}/"


def stop() -> None:
    """Remove the app and shut Serve down (the Ray cluster itself is left to whoever started it)."""
    serve.delete(APP_NAME)
    serve.shutdown()


def serve_until_stopped(model_uri: str, config: Config, info: ModelInfo) -> int:
    """The serve job as the entry point runs it: deploy, print the URL, serve until Ctrl-C or SIGTERM."""
    import signal
    import sys

    try:
        url = start(model_uri, config)
    except RuntimeError as err:  # a replica failed to start (e.g. out of memory); Serve gave up
        if isinstance(err, ResourcesUnavailable):
            raise
        print(f"error: the deployment failed: {err}", file=sys.stderr)
        return 1
    print(f"ready: {url}  model {info.name} version {info.version}, threshold {info.threshold:.6g} "
          f"({info.threshold_source}); API docs at {url}docs; Ctrl-C stops", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        stop()
    return 0
