"""The HTTP surface of the scoring service: response schemas (the API docs at /docs), request bodies read
within their limits, and JSON errors. `dinomaly.distributed.serve.app` puts them behind Ray Serve."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from dinomaly.serving_api import RAW_CONTENT_TYPES, SUPPORTED_FORMATS, RequestError

logger = logging.getLogger(__name__)

MULTIPART_OVERHEAD_BYTES = 64 * 1024  # headers and boundaries around each uploaded file
BINARY = {"schema": {"type": "string", "format": "binary"}}
IMAGE_BODY = {"requestBody": {"required": True, "content": {
    **{media: BINARY for media in SUPPORTED_FORMATS.values()}, "application/octet-stream": BINARY,
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": BINARY["schema"]}}}}}}
CLASS = Query(None, alias="class", description="the part's class: its calibrated threshold decides; without "
               "it the global threshold decides and the answer says class 'global'")
BATCH_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "properties": {"files": {"type": "array", "items": BINARY["schema"]}}}}}}}


class ModelRef(BaseModel):
    name: str
    version: str


class ImagePrediction(BaseModel):
    """One image's answer; the field descriptions appear in the API docs at /docs."""

    score: float = Field(description="raw image anomaly score: mean of the top 1 % of the blurred anomaly map")
    class_name: str = Field(alias="class", description="the class whose threshold decided: ?class= as given, "
                            "or 'global' when the request named none")
    threshold: float = Field(description="the image-score threshold of that class")
    threshold_source: str = Field(description="where the threshold came from (calibration, serve.threshold, "
                                  "manual = changed at run time, ...)")
    is_anomalous: bool = Field(description="score >= threshold")
    normalised_score: float = Field(description="score / threshold: 1.0 is the decision boundary in every class")
    model: ModelRef = Field(description="the model that scored the image")
    heatmap_png_base64: str | None = Field(default=None, description="with ?heatmap=true: the anomaly map over "
                                           "the image as a base64 PNG, coloured from 0 (blue) to 2 x the class "
                                           "threshold (red): the threshold is mid-scale in every image")
    filename: str | None = Field(default=None, description="the uploaded file's name (batch requests)")


class Prediction(ImagePrediction):
    elapsed_ms: float


class BatchPrediction(BaseModel):
    predictions: list[ImagePrediction]
    elapsed_ms: float


# --------------------------------------------------------------------------- request bodies


async def read_limited(request: Request, limit: int) -> bytes:
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


async def read_images(request: Request, max_images: int, max_image_bytes: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of each image in a raw-body or multipart request; 413/415/400 as RequestError."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "multipart/form-data" and media_type not in RAW_CONTENT_TYPES:
        raise RequestError(415, f"content type {media_type!r} is not accepted; send the image as the raw body "
                                f"({', '.join(SUPPORTED_FORMATS.values())}) or as multipart/form-data")
    body = await read_limited(request, max_images * (max_image_bytes + MULTIPART_OVERHEAD_BYTES))
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


def error_response(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def add_error_handlers(api: FastAPI) -> None:
    """Every failure is JSON {"error": ...}: 4xx for the client's mistakes, 500 without a traceback."""

    async def request_error(_: Request, err: RequestError) -> JSONResponse:
        return error_response(err.status, str(err))

    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail))

    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()))

    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=err)
        return error_response(500, f"internal error ({type(err).__name__}); see the replica log")

    api.add_exception_handler(RequestError, request_error)
    api.add_exception_handler(HTTPException, http_error)
    api.add_exception_handler(RequestValidationError, validation_error)
    api.add_exception_handler(Exception, internal_error)
