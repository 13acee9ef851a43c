"""The scoring service's HTTP routes, as a plain FastAPI app over a loaded `ScoringService`.

`create_api(service, score, publish)` is the whole API: `dinomaly.distributed.serve.app` supplies the batched
model call (`score`) and the way a threshold update reaches every replica (`publish`; left out, an update
reaches this service only), and serves it with Ray Serve.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse

from dinomaly.distributed.serve.http import (
    BATCH_BODY,
    CLASS,
    IMAGE_BODY,
    BatchPrediction,
    Prediction,
    add_error_handlers,
    read_images,
    read_limited,
)
from dinomaly.serving_api import (
    SUPPORTED_FORMATS,
    RequestError,
    ScoringService,
    check_bearer,
    check_threshold_update,
    merge_threshold_updates,
)

# Ray's direct-ingress port range: a replica's own HTTP server listens on one of these
DIRECT_PORTS = (int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "30000")),
                int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", "31000")))

ScoreFn = Callable[[np.ndarray], Awaitable[tuple[float, np.ndarray]]]
PublishFn = Callable[[dict[str, Any], Request], Awaitable[None]]  # a checked threshold update -> every replica


async def _apply_locally(service: ScoringService, update: dict[str, Any], _: Request) -> None:
    service.set_threshold_update(update)


def create_api(service: ScoringService, score: ScoreFn, publish: PublishFn | None = None) -> FastAPI:
    """The HTTP API over a loaded `service`; `score(model_input)` is the (batched) model call, `publish`
    puts a checked threshold update in force everywhere (default: this service only)."""
    api = FastAPI(title="dinomaly", version="1", description="Dinomaly anomaly scoring: POST an image, get a "
                  "score, a verdict and optionally a heatmap (PNG, jet colours, threshold = mid-scale).")
    add_error_handlers(api)
    limits = service.serve_config
    replica = {"X-Replica-Pid": str(os.getpid())}  # which replica answered: its pid in GET /v1/model

    def replica_info() -> dict[str, Any]:  # direct_url: read when asked (the replica's server starts after __init__)
        direct = direct_url(limits.host, limits.route_prefix) if limits.direct_ingress else None
        return {"pid": os.getpid(), "loaded_at": service.loaded_at, "direct_url": direct}

    async def predict_one(name: str, data: bytes, heatmap: bool, class_name: str | None) -> dict[str, Any]:
        model_input = await asyncio.to_thread(service.prepare, data, name)
        value, anomaly_map = await score(model_input)
        if not heatmap:  # microseconds: not worth a thread hop
            return service.prediction(value, anomaly_map, False, class_name)
        return await asyncio.to_thread(service.prediction, value, anomaly_map, True, class_name)

    @api.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((resources.files("dinomaly") / "web" / "index.html").read_text())

    @api.get("/healthz", summary="Liveness: the replica answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="Readiness: the model is loaded and warmed up")
    async def readyz() -> dict[str, Any]:
        return {"status": "ready", "model": {"name": service.info.name, "version": service.info.version}}

    @api.get("/v1/model", summary="The served model: config, metrics, thresholds in force, weights source, limits")
    async def model(request: Request) -> dict[str, Any]:
        check_bearer(request.headers.get("authorization"), service.token)
        info, in_force = service.info, service.thresholds.global_threshold
        return {"name": info.name, "version": info.version, "source": info.source, "threshold": in_force.threshold,
                "threshold_source": in_force.source, "thresholds": service.thresholds_view(),
                "metrics": info.metrics, "config": info.config, "replica": replica_info(),
                "input": {"image_size": service.model_config.image_size, "crop_size": service.model_config.crop_size,
                          "heatmap_size": service.predictor.eval_config.resize, "formats": sorted(SUPPORTED_FORMATS)},
                "limits": {"max_image_bytes": limits.max_image_bytes, "max_image_pixels": limits.max_image_pixels,
                           "max_batch_images": limits.max_batch_images},
                "auth": service.token is not None}

    @api.post("/v1/predict", response_model=Prediction, response_model_exclude_none=True,
              summary="Score one image (raw body or multipart)", openapi_extra=IMAGE_BODY)
    async def predict(request: Request, response: Response, heatmap: bool = False, class_name: str | None = CLASS
                      ) -> dict[str, Any]:
        start = time.perf_counter()
        response.headers.update(replica)
        check_bearer(request.headers.get("authorization"), service.token)
        service.check_class(class_name)
        [(name, data)] = await read_images(request, 1, limits.max_image_bytes)
        out = await predict_one(name, data, heatmap, class_name)
        return {**out, "elapsed_ms": (time.perf_counter() - start) * 1e3}

    @api.post("/v1/predict/batch", response_model=BatchPrediction, response_model_exclude_none=True,
              summary="Score several images (multipart, one file part each)", openapi_extra=BATCH_BODY)
    async def predict_batch(request: Request, response: Response, heatmap: bool = False,
                            class_name: str | None = CLASS) -> dict[str, Any]:
        start = time.perf_counter()
        response.headers.update(replica)
        check_bearer(request.headers.get("authorization"), service.token)
        service.check_class(class_name)
        images = await read_images(request, limits.max_batch_images, limits.max_image_bytes)
        # validate every image before scoring any, so a bad one costs no model time
        inputs = [await asyncio.to_thread(service.prepare, data, name) for name, data in images]
        scored = await asyncio.gather(*(score(x) for x in inputs))
        predictions = [{**service.prediction(value, anomaly_map, heatmap, class_name), "filename": name}
                       for (name, _), (value, anomaly_map) in zip(images, scored)]
        return {"predictions": predictions, "elapsed_ms": (time.perf_counter() - start) * 1e3}

    @api.put("/v1/thresholds", summary="Change thresholds at run time (every replica, no weight reload)")
    async def put_thresholds(request: Request) -> dict[str, Any]:
        """Body: {"global": t, "classes": {name: t}}, either part optional, 0 < t <= 2 (scores lie in [0, 2]);
        entries not named keep their value. Answers the thresholds now in force."""
        check_bearer(request.headers.get("authorization"), service.token)
        try:
            body = json.loads(await read_limited(request, 1024 * 1024) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(400, f"the body is not JSON ({err}); send e.g. {{\"global\": 0.3}}") from err
        update = merge_threshold_updates(service.threshold_update,
                                         check_threshold_update(body, service.info.thresholds))
        await (publish or functools.partial(_apply_locally, service))(update, request)
        return service.thresholds_view()

    @api.delete("/v1/thresholds", summary="Undo run-time threshold changes: the model's own thresholds again")
    async def reset_thresholds(request: Request) -> dict[str, Any]:
        check_bearer(request.headers.get("authorization"), service.token)
        await (publish or functools.partial(_apply_locally, service))({}, request)
        return service.thresholds_view()

    return api


def direct_url(host: str, route_prefix: str) -> str | None:
    """This replica's own HTTP URL under serve.direct_ingress (the port this process listens on in Ray's
    direct-ingress range, read from /proc), or None while it has none."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ():  # Linux only
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed while listing (the listing's own fd, for one)
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:  # sl local_address rem_address st ... inode
            fields = line.split()
            port = int(fields[1].rsplit(":", 1)[1], 16)
            if fields[3] == "0A" and fields[9] in inodes and DIRECT_PORTS[0] <= port <= DIRECT_PORTS[1]:  # LISTEN
                return f"http://{host}:{port}{route_prefix.rstrip('/')}/"
    return None
