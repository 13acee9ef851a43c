"""A tiny served model for the Serve tests: checkpoint, test images, expected scores, one Serve app.

The app runs on the session's Ray cluster (`ray_session`), HTTP on a free 127.0.0.1 port. It lives for one
test module (test_serving.py, test_serving_browser.py): Serve is shut down after the module, so its replicas'
CPUs are free again for the Train and Tune runs of later modules.
Expected scores come from `Predictor` on the same images through the evaluation transforms.
"""

from __future__ import annotations

import io
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

SERVE_LIMITS = {"serve.max_image_bytes": 300_000, "serve.max_image_pixels": 1_000_000, "serve.max_batch_images": 4,
                "serve.max_batch_size": 4, "serve.max_ongoing_requests": 16, "serve.batch_wait_timeout_s": 0.05,
                "serve.num_cpus": 0.5}
FORMATS = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "TIFF": "tif"}


@dataclass
class ServedModel:
    """The checkpoint, images (name -> encoded bytes) and what Predictor says about them."""

    checkpoint: Path
    config: object  # dinomaly.config.Config of the checkpoint (serve section = test limits)
    images: dict[str, bytes]
    expected_scores: dict[str, float]
    threshold: float
    image_dir: Path
    url: str = ""
    apps: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def encode(array: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format)
    return buffer.getvalue()


def expected_scores(checkpoint: Path, images: dict[str, bytes]) -> dict[str, float]:
    """Scores by the core alone: decode_image -> resize_crop_image -> normalize -> Predictor, one at a time."""
    from dinomaly.data.transforms import decode_image, normalize, resize_crop_image
    from dinomaly.inference import Predictor

    predictor = Predictor.from_checkpoint(checkpoint)
    model_config = predictor.model.config
    out = {}
    for name, data in images.items():
        crop = resize_crop_image(decode_image(data), model_config.image_size, model_config.crop_size)
        out[name] = float(predictor.predict(normalize(crop[None])).scores[0])
    return out


def wait_ready(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}readyz", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url}readyz did not answer 200 within {timeout_s} s")


@pytest.fixture(scope="session")
def served_model(tmp_path_factory) -> ServedModel:
    """A random tiny Dinomaly saved with an F1-optimal threshold between its scores of four test images."""
    import torch
    from conftest import reference_model_config

    from dinomaly import Dinomaly
    from dinomaly.checkpoint import save
    from dinomaly.config import Config, apply_overrides

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("serving")
    config = apply_overrides(Config(name="tiny-serve", model=reference_model_config(image_size=98, crop_size=84)),
                             SERVE_LIMITS)
    model = Dinomaly(config.model)
    checkpoint = save(root / "checkpoint", model, config)
    rng = np.random.default_rng(0)
    images, image_dir = {}, root / "images"
    image_dir.mkdir()
    for i, (image_format, suffix) in enumerate(FORMATS.items()):
        array = rng.integers(0, 256, size=(90 + 7 * i, 110 - 5 * i, 3), dtype=np.uint8)
        array[20:40, 30:60] = 255 * (i % 2)  # a flat patch, different per image
        name = f"img{i}.{suffix}"
        images[name] = encode(array, image_format)
        (image_dir / name).write_bytes(images[name])
    scores = expected_scores(checkpoint, images)
    threshold = float(np.median(list(scores.values())))
    metadata = {"step": 7, "thresholds": {"image_f1_optimal": threshold, "image_normal_quantile": threshold * 2,
                                          "normal_quantile": 0.99}}
    save(checkpoint, model, config, metadata=metadata)  # the same weights, now with the threshold
    return ServedModel(checkpoint=checkpoint, config=config, images=images, expected_scores=scores,
                       threshold=threshold, image_dir=image_dir)


@pytest.fixture(scope="module")
def serve_app(ray_session, served_model) -> ServedModel:
    """Serve running on a free loopback port with the tiny model at route '/' (no auth, serve.direct_ingress on);
    shut down after the module."""
    from ray import serve

    from dinomaly.config import apply_overrides
    from dinomaly.distributed.serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # with serve.direct_ingress: the replica also answers on its own port (test_serving checks it)
    config = apply_overrides(served_model.config, {"serve.direct_ingress": True})
    serve.run(build_app(str(served_model.checkpoint), config), name="tiny", route_prefix="/")
    served_model.url = f"http://127.0.0.1:{port}/"
    served_model.apps.append("tiny")
    wait_ready(served_model.url)
    try:
        yield served_model
    finally:
        served_model.apps.clear()
        serve.shutdown()  # deletes every app, the proxies and the controller
