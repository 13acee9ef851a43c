"""The scoring service: HTTP answers equal the core's Predictor, bad input gets 4xx JSON, auth, registry.

Serve runs in-process on the session's Ray cluster (fixtures_serving.py); two serve.run calls in all:
the tiny model from a checkpoint directory at '/', and the same model from the MLflow registry by
alias with bearer auth at '/secure'.
"""

from __future__ import annotations

import base64
import io
import math
import shutil

import numpy as np
import pytest
import requests
from fixtures_serving import encode, wait_ready
from PIL import Image

from dinomaly.config import Config, ServeConfig, apply_overrides
from dinomaly.serving_api import RequestError, check_bearer, read_auth_token, resolve_threshold

TOKEN = "s3cret-token-for-tests"
REGISTERED = "tiny-registry"


def post_image(url: str, data: bytes, **kwargs) -> requests.Response:
    return requests.post(f"{url}v1/predict", data=data, timeout=60, **kwargs)


# --------------------------------------------------------------------------- without Ray


def test_threshold_resolution_order():
    metadata = {"thresholds": {"image_f1_optimal": 0.2, "image_normal_quantile": 0.3, "normal_quantile": 0.99}}
    assert resolve_threshold(None, "image_f1_optimal", metadata) == (0.2, "metadata thresholds image_f1_optimal")
    assert resolve_threshold(None, "image_normal_quantile", metadata)[0] == 0.3
    tags = {"threshold_image_f1_optimal": "0.25", "mean_image_auroc": "0.9"}  # as training tags versions
    assert resolve_threshold(None, "image_f1_optimal", metadata, tags) == (
        0.25, "registry tag threshold_image_f1_optimal")
    assert resolve_threshold(None, "image_f1_optimal", {}, {"thresholds.image_f1_optimal": "0.1"})[0] == 0.1
    assert resolve_threshold(0.5, "image_f1_optimal", metadata, tags) == (0.5, "serve.threshold")
    with pytest.raises(ValueError, match="serve.threshold"):
        resolve_threshold(None, "image_f1_optimal", {"step": 3})
    with pytest.raises(ValueError, match="not a number"):
        resolve_threshold(None, "image_f1_optimal", {"image_f1_optimal": "high"})


def test_auth_token_sources(tmp_path):
    assert read_auth_token(ServeConfig(), environ={}) is None
    assert read_auth_token(ServeConfig(auth_token_env="TOK"), environ={"TOK": " abc\n"}) == "abc"
    with pytest.raises(ValueError, match="TOK"):
        read_auth_token(ServeConfig(auth_token_env="TOK"), environ={})
    with pytest.raises(FileNotFoundError):
        read_auth_token(ServeConfig(auth_token_file=str(tmp_path / "missing")), environ={})
    check_bearer(None, None)
    check_bearer("Bearer abc", "abc")
    for header in (None, "Bearer abd", "Basic abc", "abc"):
        with pytest.raises(RequestError) as err:
            check_bearer(header, "abc")
        assert err.value.status == 401


def test_serve_config_validation():
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        ServeConfig(max_batch_size=16, max_ongoing_requests=8)
    with pytest.raises(ValueError, match="max_replicas"):
        ServeConfig(num_replicas=3, max_replicas=2)
    assert ServeConfig().host == "127.0.0.1"
    assert apply_overrides(Config(), ["serve.threshold=0.3"]).serve.threshold == 0.3


def test_deployment_options_follow_the_serve_config():
    from dinomaly.distributed.serve.app import deployment_options

    fixed = deployment_options(apply_overrides(Config(), {"serve.num_replicas": 2, "serve.num_gpus": 1.0}))
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    scaled = deployment_options(apply_overrides(Config(), {"serve.max_replicas": 4, "serve.max_batch_size": 16}))
    assert "num_replicas" not in scaled and scaled["max_ongoing_requests"] == 32
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 4,
                                            "target_ongoing_requests": 16}


def test_pipeline_refuses_a_model_it_cannot_load(tmp_path, served_model, capsys):
    """pipelines/serve.py exits non-zero with the reason before starting anything (no crash loop)."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("serve_pipeline", REPO / "pipelines" / "serve.py")
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    assert pipeline.main(["--model", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err
    from dinomaly.checkpoint import load, save

    loaded = load(served_model.checkpoint)
    save(tmp_path / "no-threshold", loaded.model, loaded.config)  # metadata without thresholds
    assert pipeline.main(["--model", str(tmp_path / "no-threshold")]) == 2
    assert "serve.threshold" in capsys.readouterr().err
    with pytest.raises(ValueError, match="serve.threshold"):  # the `serve run` builder checks the same way
        pipeline.app({"model": str(tmp_path / "no-threshold")})
    built = pipeline.app({"model": str(tmp_path / "no-threshold"), "serve.threshold": "0.25"})
    assert type(built).__name__ == "Application"


@pytest.mark.slow
def test_model_from_an_s3_prefix(moto_s3, served_model):
    """s3:// checkpoints are copied to a temporary folder (moto's S3 server) and removed by cleanup()."""
    from dinomaly.distributed.models import resolve_model

    uri = moto_s3.upload(served_model.checkpoint, "models/tiny")
    resolved = resolve_model(uri, served_model.config)
    try:
        assert resolved.source == uri and resolved.directory.is_dir()
        for name in ("model.safetensors", "config.json", "metadata.json"):
            assert (resolved.directory / name).read_bytes() == (served_model.checkpoint / name).read_bytes()
    finally:
        resolved.cleanup()
    assert not resolved.directory.exists()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        resolve_model(moto_s3.uri("models/missing"), served_model.config)


# --------------------------------------------------------------------------- over HTTP


@pytest.mark.slow
def test_predictions_equal_predictor(serve_app):
    for name, data in serve_app.images.items():
        response = post_image(serve_app.url, data)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["score"] == pytest.approx(serve_app.expected_scores[name], abs=1e-6)
        assert body["threshold"] == pytest.approx(serve_app.threshold)
        assert body["is_anomalous"] == (serve_app.expected_scores[name] >= serve_app.threshold)
        assert body["model"] == {"name": "tiny-serve", "version": "7"}
        assert body["elapsed_ms"] > 0 and "heatmap_png_base64" not in body
    verdicts = {post_image(serve_app.url, d).json()["is_anomalous"] for d in serve_app.images.values()}
    assert verdicts == {True, False}  # the median threshold splits the four images


@pytest.mark.slow
def test_multipart_equals_raw_body_and_heatmap_is_a_png(serve_app):
    name, data = next(iter(serve_app.images.items()))
    response = requests.post(f"{serve_app.url}v1/predict", params={"heatmap": "true"},
                             files={"file": (name, data, "application/octet-stream")}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["score"] == pytest.approx(serve_app.expected_scores[name], abs=1e-6)
    heatmap = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png_base64"])))
    assert heatmap.format == "PNG" and heatmap.size == (serve_app.config.eval.resize,) * 2


@pytest.mark.slow
def test_batch_equals_single_calls(serve_app):
    files = [("files", (name, data)) for name, data in serve_app.images.items()]
    response = requests.post(f"{serve_app.url}v1/predict/batch", files=files, timeout=60)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["filename"] for p in predictions] == list(serve_app.images)
    for prediction, (name, data) in zip(predictions, serve_app.images.items()):
        single = post_image(serve_app.url, data).json()
        assert prediction["score"] == pytest.approx(single["score"], abs=1e-6)
        assert prediction["score"] == pytest.approx(serve_app.expected_scores[name], abs=1e-6)
        assert prediction["is_anomalous"] == single["is_anomalous"]


@pytest.mark.slow
def test_model_info_health_docs_and_page(serve_app):
    info = requests.get(f"{serve_app.url}v1/model", timeout=30).json()
    assert info["threshold"] == pytest.approx(serve_app.threshold)
    assert info["threshold_source"] == "metadata thresholds image_f1_optimal"
    assert info["source"] == str(serve_app.checkpoint) and info["auth"] is False
    assert info["input"] == {"image_size": 98, "crop_size": 84, "heatmap_size": 256,
                             "formats": ["BMP", "JPEG", "PNG", "TIFF"]}
    assert info["config"]["model"]["encoder_kwargs"] == {"embed_dim": 32, "num_heads": 2}
    assert requests.get(f"{serve_app.url}healthz", timeout=30).json() == {"status": "ok"}
    assert requests.get(f"{serve_app.url}readyz", timeout=30).json()["status"] == "ready"
    assert "/v1/predict" in requests.get(f"{serve_app.url}openapi.json", timeout=30).json()["paths"]
    assert "swagger" in requests.get(f"{serve_app.url}docs", timeout=30).text.lower()
    page = requests.get(serve_app.url, timeout=30)
    assert page.status_code == 200 and 'id="file"' in page.text


def _bomb() -> bytes:
    """A 2000 x 2000 PNG: a few KB on the wire, 4 M pixels decoded (limit in the test app: 1 M)."""
    return encode(np.zeros((2000, 2000, 3), np.uint8), "PNG")


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="GIF")
    return buffer.getvalue()


BAD_REQUESTS = {
    "empty body": (400, "v1/predict", dict(data=b"")),
    "not an image": (400, "v1/predict", dict(data=b"hello, this is text and not an image" * 4)),
    "truncated image": (400, "v1/predict", dict(data="TRUNCATED")),
    "unsupported format": (415, "v1/predict", dict(data=_gif())),
    "over the byte limit": (413, "v1/predict", dict(data=b"\x89PNG" + bytes(400_000))),
    "decompression bomb": (413, "v1/predict", dict(data=_bomb())),
    "wrong content type": (415, "v1/predict", dict(data=b"{}", headers={"Content-Type": "application/json"})),
    "malformed multipart": (400, "v1/predict", dict(data=b"--xyz\r\nnonsense without headers",
                                                  headers={"Content-Type": "multipart/form-data; boundary=xyz"})),
    "multipart without a file": (400, "v1/predict", dict(files={"note": (None, "no image here")})),
    "too many images": (413, "v1/predict/batch", dict(files="MANY")),
    "far too many images": (413, "v1/predict/batch", dict(files="MANY")),
    "bad query value": (422, "v1/predict?heatmap=perhaps", dict(data="GOOD")),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_4xx_json_and_service_keeps_serving(serve_app, case):
    status, path, kwargs = BAD_REQUESTS[case]
    good_name, good = next(iter(serve_app.images.items()))
    if kwargs.get("data") == "TRUNCATED":
        kwargs = dict(data=good[: len(good) // 2])
    elif kwargs.get("data") == "GOOD":
        kwargs = dict(data=good)
    elif kwargs.get("files") == "MANY":  # 5 = one over the limit (counted), 9 = stopped by the parser
        kwargs = dict(files=[("files", (f"{i}.png", good)) for i in range(5 + 4 * (case == "far too many"))])
    response = requests.post(f"{serve_app.url}{path}", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert isinstance(response.json()["error"], str) and response.json()["error"]
    after = post_image(serve_app.url, good)
    assert after.status_code == 200
    assert after.json()["score"] == pytest.approx(serve_app.expected_scores[good_name], abs=1e-6)


# --------------------------------------------------------------------------- registry + auth


@pytest.fixture(scope="module")
def registry_app(serve_app, mlflow_template, tmp_path_factory):
    """The same checkpoint registered in a fresh sqlite MLflow store (the training code's own calls),
    aliased 'champion', served from models:/tiny-registry@champion with a bearer token from a file."""
    from mlflow import MlflowClient
    from ray import serve

    from dinomaly.distributed.serve.app import build_app
    from dinomaly.distributed.tracking import RunLogger, open_run

    root = tmp_path_factory.mktemp("registry")
    shutil.copyfile(mlflow_template, root / "mlflow.db")
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    config = apply_overrides(serve_app.config, {
        "tracking.tracking_uri": f"sqlite:///{root}/mlflow.db", "tracking.experiment_name": "serve-test",
        "tracking.registered_model_name": REGISTERED, "serve.auth_token_file": str(token_file)})
    run_id = open_run(config, "serve-test")
    registry_threshold = min(serve_app.expected_scores.values()) / 2  # every image anomalous
    version = RunLogger(config.tracking.tracking_uri, run_id, REGISTERED).log_final(
        config, rows=[], heatmaps=None, checkpoint_dir=serve_app.checkpoint,
        tags={"threshold_image_f1_optimal": registry_threshold, "normal_quantile": 0.99})
    MlflowClient(config.tracking.tracking_uri).set_registered_model_alias(REGISTERED, "champion", version)
    serve.run(build_app(f"models:/{REGISTERED}@champion", config), name="secure", route_prefix="/secure")
    try:
        url = f"{serve_app.url}secure/"
        wait_ready(url)
        yield url, version, registry_threshold
    finally:
        serve.delete("secure")


@pytest.mark.slow
def test_registry_alias_with_auth(registry_app, serve_app):
    url, version, registry_threshold = registry_app
    name, data = next(iter(serve_app.images.items()))
    assert post_image(url, data).status_code == 401
    assert post_image(url, data, headers={"Authorization": "Bearer wrong"}).status_code == 401
    denied = requests.get(f"{url}v1/model", timeout=30)
    assert denied.status_code == 401 and "error" in denied.json()
    assert requests.get(f"{url}healthz", timeout=30).status_code == 200  # probes need no token
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = post_image(url, data, headers=auth)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": REGISTERED, "version": str(version)}
    assert body["score"] == pytest.approx(serve_app.expected_scores[name], abs=1e-6)
    assert body["threshold"] == pytest.approx(registry_threshold) and body["is_anomalous"] is True
    info = requests.get(f"{url}v1/model", headers=auth, timeout=30).json()
    assert info["source"] == f"models:/{REGISTERED}@champion" and info["auth"] is True
    assert info["threshold_source"] == "registry tag threshold_image_f1_optimal"
    assert not math.isnan(info["threshold"])
