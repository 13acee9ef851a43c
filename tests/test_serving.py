"""The scoring service: HTTP answers equal the core's Predictor, bad input gets 4xx JSON, auth, registry.

Serve runs in-process on the session's Ray cluster (fixtures_serving.py); two serve.run calls in all:
the tiny model from a checkpoint directory at '/', and the same model from the MLflow registry by
alias with bearer auth at '/secure' on two replicas.
"""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
import socket
import threading
import time

import numpy as np
import pytest
import requests
from fixtures_serving import encode, wait_ready
from PIL import Image

from dinomaly.calibration import ClassThreshold, ThresholdTable
from dinomaly.config import Config, ServeConfig, apply_overrides
from dinomaly.serving_api import (
    RequestError,
    apply_threshold_update,
    check_bearer,
    check_threshold_update,
    class_thresholds,
    decide,
    read_auth_token,
    resolve_threshold,
    resolve_thresholds,
)

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


TABLE = ThresholdTable(ClassThreshold(0.4, "calibration", 0.01),
                       {"bottle": ClassThreshold(0.2, "calibration", 0.01, (0.18, 0.22), 30),
                        "screw": ClassThreshold(0.8, "test-normals", 0.01)})


def test_per_class_table_comes_first_and_old_models_fall_back():
    legacy = {"thresholds": {"image_f1_optimal": 0.2}}
    old = resolve_thresholds(None, "image_f1_optimal", legacy)
    assert old.classes == {} and old.global_threshold == ClassThreshold(0.2, "metadata thresholds image_f1_optimal")
    with_table = {**legacy, "calibration": TABLE.to_dict()}
    assert resolve_thresholds(None, "image_f1_optimal", with_table) == TABLE
    tag = {"calibration": json.dumps(ThresholdTable(ClassThreshold(0.5, "calibrate.py")).to_dict())}
    assert resolve_thresholds(None, "image_f1_optimal", with_table, tag).global_threshold.threshold == 0.5
    overridden = resolve_thresholds(0.3, "image_f1_optimal", with_table)
    assert overridden.global_threshold == ClassThreshold(0.3, "serve.threshold") and overridden.classes == TABLE.classes
    with pytest.raises(ValueError, match="serve.threshold"):
        resolve_thresholds(None, "image_f1_optimal", {"calibration": "{not json"})
    with pytest.raises(ValueError, match="> 0"):
        resolve_thresholds(None, "image_f1_optimal", {"thresholds": {"image_f1_optimal": 0.0}})


def test_decisions_name_class_threshold_and_normalised_score():
    assert decide(TABLE, 0.3, "bottle") == {"score": 0.3, "class": "bottle", "threshold": 0.2,
                                            "threshold_source": "calibration", "is_anomalous": True,
                                            "normalised_score": pytest.approx(1.5)}
    unnamed = decide(TABLE, 0.3, None)
    assert unnamed["class"] == "global" and unnamed["is_anomalous"] is False
    assert unnamed["normalised_score"] == pytest.approx(0.75)
    assert decide(TABLE, 0.8, "screw")["is_anomalous"] is True  # score == threshold is anomalous
    with pytest.raises(ValueError, match="bottle"):
        decide(TABLE, 0.3, "cable")
    used, values = class_thresholds(TABLE, ["screw", None, "cable", "bottle"])
    assert used == ["screw", "global", "global", "bottle"] and values.tolist() == [0.8, 0.4, 0.4, 0.2]


@pytest.mark.parametrize("body", [{"global": float("nan")}, {"global": float("inf")}, {"global": 0},
                                  {"global": -0.1}, {"global": "0.3"}, {"global": True},
                                  {"classes": {"cable": 0.3}}, {"classes": [0.3]}, {"classes": {"bottle": None}},
                                  {"threshold": 0.3}, {}, [0.3], 0.3, None])
def test_bad_threshold_updates_are_refused(body):
    with pytest.raises(RequestError) as err:
        check_threshold_update(body, TABLE)
    assert err.value.status == 422


@pytest.mark.parametrize("body", [{"global": 1.7e308}, {"global": 2.000001}, {"classes": {"bottle": 3}},
                                  {"global": 0.3, "classes": {"screw": 1e9}}])
def test_thresholds_above_the_score_range_are_refused(body):
    """Scores are cosine distances in [0, 2]: a higher threshold would silently flag nothing."""
    with pytest.raises(RequestError, match=r"must be <= 2: anomaly scores are cosine distances") as err:
        check_threshold_update(body, TABLE)
    assert err.value.status == 422
    assert check_threshold_update({"global": 2, "classes": {"bottle": 2.0}}, TABLE) == {
        "global": 2.0, "classes": {"bottle": 2.0}}  # the top of the range itself is allowed


def test_threshold_update_replaces_only_named_entries():
    update = check_threshold_update({"classes": {"bottle": 0.25}}, TABLE)
    changed = apply_threshold_update(TABLE, update)
    assert changed.classes["bottle"] == ClassThreshold(0.25, "manual")
    assert changed.classes["screw"] == TABLE.classes["screw"] and changed.global_threshold == TABLE.global_threshold
    assert apply_threshold_update(TABLE, {"global": 1.0}).global_threshold == ClassThreshold(1.0, "manual")


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


def load_serve_pipeline():
    """pipelines/serve.py as a module (pipelines/ is not a package)."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("serve_pipeline", REPO / "pipelines" / "serve.py")
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    return pipeline


def test_pipeline_refuses_a_port_in_use_before_any_ray(monkeypatch, tmp_path, capsys):
    """A second serve.py on its own local Ray would share the port with the first (Serve's proxy binds with
    SO_REUSEPORT): it must stop with one line, exit 2, before the model is read or Ray/Serve starts."""
    pipeline = load_serve_pipeline()
    started = []
    monkeypatch.setattr(pipeline.serving, "serve_until_stopped", lambda *a: started.append(a) or 0)
    monkeypatch.setattr(pipeline, "starts_local_ray", lambda: True)
    with socket.socket() as held:  # as the first serve.py's proxy holds it
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert pipeline.main(["--model", str(tmp_path / "nowhere"), "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert f"error: cannot serve {tmp_path / 'nowhere'}: 127.0.0.1:{port} is in use (another " in err
        assert "stop it or pass --port" in err and len(err.strip().splitlines()) == 1 and not started
        monkeypatch.setattr(pipeline, "starts_local_ray", lambda: False)  # joining a cluster: its Serve owns it
        assert pipeline.main(["--model", str(tmp_path / "nowhere"), "--port", str(port)]) == 2
        assert "does not exist" in capsys.readouterr().err and not started
    pipeline.check_port_free("127.0.0.1", port)  # closed again: free, and the check itself holds nothing
    pipeline.check_port_free("127.0.0.1", port)


def test_joining_a_cluster_skips_the_port_check(monkeypatch):
    pipeline = load_serve_pipeline()
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert pipeline.starts_local_ray() is False
    with pytest.raises(ValueError, match=r"cannot listen on 192.0.2.1:8000 \(.*\); pass another --host"):
        pipeline.check_port_free("192.0.2.1", 8000)  # not an address of this machine (TEST-NET-1)


def test_pipeline_help_says_what_model_accepts(capsys):
    with pytest.raises(SystemExit):
        load_serve_pipeline().main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for accepted in ("checkpoint folder", "s3:// prefix", "models:/<name>/<version>", "models:/<name>@<alias>",
                     "model.onnx", "model.xml", "not official .pth"):
        assert accepted in text


def test_pipeline_refuses_a_model_it_cannot_load(tmp_path, served_model, capsys, monkeypatch):
    """pipelines/serve.py exits non-zero with the reason before starting anything (no crash loop)."""
    pipeline = load_serve_pipeline()
    monkeypatch.setattr(pipeline, "starts_local_ray", lambda: False)  # whether port 8000 is free is not the point
    assert pipeline.main(["--model", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    from dinomaly.checkpoint import load, save

    loaded = load(served_model.checkpoint)
    save(tmp_path / "no-threshold", loaded.model, loaded.config)  # metadata without thresholds
    assert pipeline.main(["--model", str(tmp_path / "no-threshold")]) == 2
    assert "serve.threshold" in capsys.readouterr().err
    with pytest.raises(ValueError, match="serve.threshold"):  # the `serve run` builder checks the same way
        pipeline.app({"model": str(tmp_path / "no-threshold")})
    built = pipeline.app({"model": str(tmp_path / "no-threshold"), "serve.threshold": "0.25"})
    assert type(built).__name__ == "Application"



def test_a_big_jpeg_is_decoded_as_predict_reads_it(served_model):
    """data.fast_decode reaches the service: a JPEG far larger than the model's input decodes at a reduced DCT
    scale, as predict.py's reader does, so a served input equals predict's; off, it is the full decode."""
    from dinomaly.data.reader import RowReader
    from dinomaly.data.transforms import decode_image, resize_crop_image
    from dinomaly.serving_api import ScoringService

    rng = np.random.default_rng(3)
    ramp = np.linspace(0, 200, 960, dtype=np.float32)  # within the test limits: 1e6 pixels, 300 kB
    photo = (ramp[None, :, None] + rng.normal(0, 8, (960, 960, 3))).clip(0, 255).astype(np.uint8)
    data = encode(photo, "JPEG")
    model = served_model.config.model
    full = resize_crop_image(decode_image(data), model.image_size, model.crop_size)
    reader = RowReader(model.image_size, model.crop_size, fast_decode=True)
    read_by_predict = reader.decode("big.jpg", data).image
    served = {fast: ScoringService.from_checkpoint(served_model.checkpoint, served_model.config.serve,
                                                   fast_decode=fast).prepare(data, "big.jpg")
              for fast in (True, False)}
    assert np.array_equal(served[True], read_by_predict) and np.array_equal(served[False], full)
    assert not np.array_equal(served[True], served[False])  # the check can fail: DCT scaling changed pixels

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
        assert body["class"] == "global" and body["threshold_source"] == "metadata thresholds image_f1_optimal"
        assert body["normalised_score"] == pytest.approx(body["score"] / serve_app.threshold)
        assert body["model"] == {"name": "tiny-serve", "version": "7"}
        assert body["elapsed_ms"] > 0 and "heatmap_png_base64" not in body
    verdicts = {post_image(serve_app.url, d).json()["is_anomalous"] for d in serve_app.images.values()}
    assert verdicts == {True, False}  # the median threshold splits the four images


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* has them) of the sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            address, hex_port = line.split()[1].rsplit(":", 1)
            if line.split()[3] == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


@pytest.mark.slow
def test_the_replica_answers_on_its_own_loopback_port_as_through_the_proxy(serve_app):
    """serve.direct_ingress: GET /v1/model names the replica's own URL; it answers predictions and bad input as
    the proxy does, and listens on 127.0.0.1 only."""
    import re

    direct = requests.get(f"{serve_app.url}v1/model", timeout=60).json()["replica"]["direct_url"]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", direct), direct
    port = int(direct.rsplit(":", 1)[1].rstrip("/"))
    assert port != int(serve_app.url.rsplit(":", 1)[1].rstrip("/"))
    assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, nothing on other interfaces
    for name, data in serve_app.images.items():
        proxied, direct_answer = post_image(serve_app.url, data).json(), post_image(direct, data).json()
        assert direct_answer["score"] == pytest.approx(serve_app.expected_scores[name], abs=1e-6)
        assert {k: v for k, v in direct_answer.items() if k != "elapsed_ms"} == {
            k: v for k, v in proxied.items() if k != "elapsed_ms"}
    for data, status in ((b"hello, this is text and not an image" * 4, 400), (b"\x89PNG" + bytes(400_000), 413)):
        proxied, refused = post_image(serve_app.url, data), post_image(direct, data)
        assert refused.status_code == proxied.status_code == status and refused.json() == proxied.json()


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
    aliased 'champion', served from models:/tiny-registry@champion with a bearer token from a file, on two
    replicas (a run-time threshold change must reach both)."""
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
        "tracking.registered_model_name": REGISTERED, "serve.auth_token_file": str(token_file),
        "serve.num_replicas": 2})
    run_id = open_run(config, "serve-test")
    registry_threshold = min(serve_app.expected_scores.values()) / 2  # every image anomalous
    calibration = ThresholdTable(ClassThreshold(registry_threshold, "calibration"), {
        "low": ClassThreshold(registry_threshold, "calibration", 0.01, n_images=8),
        "high": ClassThreshold(max(serve_app.expected_scores.values()) * 2, "calibration", 0.01, n_images=8)})
    version = RunLogger(config.tracking.tracking_uri, run_id, REGISTERED).log_final(
        config, rows=[], heatmaps=None, checkpoint_dir=serve_app.checkpoint,
        tags={"threshold_image_f1_optimal": registry_threshold * 3, "normal_quantile": 0.99,
              "calibration": json.dumps(calibration.to_dict())})
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
    assert info["threshold_source"] == "calibration"  # the per-class table wins over the single threshold tag
    assert not math.isnan(info["threshold"])


def _post_as(url: str, data: bytes, auth: dict, class_name: str | None = None, **params) -> requests.Response:
    params = {**params, **({"class": class_name} if class_name else {})}
    return requests.post(f"{url}v1/predict", data=data, headers=auth, params=params, timeout=60)


@pytest.mark.slow
def test_requests_name_their_class(registry_app, serve_app):
    """?class= picks that class's calibrated threshold; without it the global one decides and says so."""
    url, _, registry_threshold = registry_app
    auth = {"Authorization": f"Bearer {TOKEN}"}
    name, data = next(iter(serve_app.images.items()))
    score = serve_app.expected_scores[name]
    high = max(serve_app.expected_scores.values()) * 2
    low_body, high_body, unnamed = (_post_as(url, data, auth, c).json() for c in ("low", "high", None))
    assert (low_body["class"], low_body["is_anomalous"], low_body["threshold"]) == ("low", True,
                                                                                     pytest.approx(registry_threshold))
    assert (high_body["class"], high_body["is_anomalous"]) == ("high", False)
    assert high_body["normalised_score"] == pytest.approx(score / high) and high_body["normalised_score"] < 1
    assert unnamed["class"] == "global" and unnamed["threshold_source"] == "calibration"
    unknown = _post_as(url, data, auth, "cable")
    assert unknown.status_code == 400 and "high" in unknown.json()["error"] and "low" in unknown.json()["error"]
    heat = [_post_as(url, data, auth, c, heatmap="true").json()["heatmap_png_base64"] for c in ("low", "high")]
    assert heat[0] != heat[1]  # the colour scale follows the class threshold
    info = requests.get(f"{url}v1/model", headers=auth, timeout=30).json()["thresholds"]
    assert info["classes"]["high"]["threshold"] == pytest.approx(high) and info["global"]["source"] == "calibration"


@pytest.mark.slow
@pytest.mark.parametrize("body", ['{"global": -1}', '{"global": "NaN"}', '{"classes": {"cable": 0.3}}', '[1]',
                                  'not json', '{"global": 1.7e308}'])
def test_bad_threshold_changes_get_4xx_and_change_nothing(registry_app, body):
    url, _, registry_threshold = registry_app
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.put(f"{url}v1/thresholds", data='{"global": 1.0}', timeout=30).status_code == 401
    response = requests.put(f"{url}v1/thresholds", data=body, headers=auth, timeout=30)
    assert 400 <= response.status_code < 500 and response.json()["error"]
    info = requests.get(f"{url}v1/model", headers=auth, timeout=30).json()
    assert info["threshold"] == pytest.approx(registry_threshold) and info["thresholds"]["changed_at_run_time"] == {}


def _replicas(url: str, auth: dict, count: int = 2) -> dict[int, float]:
    """pid -> load time of each replica behind `url`, from GET /v1/model until `count` distinct ones answered
    (Serve routes each request to one replica)."""
    seen: dict[int, float] = {}
    for _ in range(100):  # both replicas answer within a few tries; 100 bounds the loop
        replica = requests.get(f"{url}v1/model", headers=auth, timeout=30).json()["replica"]
        seen[replica["pid"]] = replica["loaded_at"]
        if len(seen) == count:
            break
    return seen


@pytest.mark.slow
def test_threshold_change_under_load(registry_app, serve_app):
    """Four clients post for ~3 s to two replicas while a PUT moves class 'high''s threshold below every
    score: no request fails, every request sent after the PUT answered uses the new value whichever replica
    answers it, both replicas answer after it, and neither reloads its weights (same pids, same load times)."""
    url, _, _ = registry_app
    auth = {"Authorization": f"Bearer {TOKEN}"}
    images = list(serve_app.images.values())
    new = min(serve_app.expected_scores.values()) / 4
    before = _replicas(url, auth)
    assert len(before) == 2, before
    old = requests.get(f"{url}v1/model", headers=auth, timeout=30).json()["thresholds"]["classes"]["high"]["threshold"]
    results, stop = [], threading.Event()

    def client(i: int) -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                response = _post_as(url, images[i % len(images)], auth, "high")
                body = response.json() if response.status_code == 200 else {}
                results.append((sent, response.status_code, body.get("threshold"), body.get("is_anomalous"),
                                response.headers.get("X-Replica-Pid")))
            except requests.RequestException as err:
                results.append((sent, repr(err), None, None, None))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        put_sent = time.monotonic()
        changed = requests.put(f"{url}v1/thresholds", json={"classes": {"high": new}}, headers=auth, timeout=60)
        put_done = time.monotonic()
        time.sleep(1.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    try:
        assert changed.status_code == 200, changed.text
        assert changed.json()["classes"]["high"] == {"threshold": new, "source": "manual", "target_fpr": None,
                                                     "interval": None, "n_images": 0}
        assert [r for r in results if r[1] != 200] == []
        early = [r for r in results if r[0] < put_sent]
        late = [r for r in results if r[0] > put_done]
        assert len(early) >= 4 and len(late) >= 4, (len(early), len(late))
        assert {(r[2], r[3]) for r in early} == {(old, False)}  # the floats travel through JSON unchanged
        assert {(r[2], r[3]) for r in late} == {(new, True)}
        assert {int(r[4]) for r in late} == set(before)  # both replicas answered with the new value
        after = _replicas(url, auth)
        assert after == before  # same processes, same load times: weights not reloaded
        for _ in range(2 * len(before)):  # either replica reports the change
            info = requests.get(f"{url}v1/model", headers=auth, timeout=30).json()
            assert info["thresholds"]["changed_at_run_time"] == {"classes": {"high": new}}
    finally:
        reset = requests.delete(f"{url}v1/thresholds", headers=auth, timeout=60)
        assert reset.status_code == 200 and reset.json()["classes"]["high"]["threshold"] == pytest.approx(old)


@pytest.mark.parametrize("stop_s,exits", [(0.0, []), (5.0, [0])])
def test_stopping_gives_up_when_ray_went_down_with_the_signal(monkeypatch, capsys, stop_s, exits):
    """A SIGTERM to the whole process group (timeout, systemd) stops Ray too, and Serve's shutdown would then
    wait a minute for the dead GCS: the wait is bounded. Serve itself is replaced by stand-ins here."""
    import os
    import signal
    import types

    from dinomaly.distributed.serve import app

    monkeypatch.setattr(app, "start", lambda *a: "http://127.0.0.1:1/")
    monkeypatch.setattr(app, "direct_urls", lambda config: [])
    monkeypatch.setattr(app, "STOP_WAIT_S", 0.3)
    monkeypatch.setattr(app, "stop", lambda: time.sleep(stop_s))
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    monkeypatch.setattr(signal, "pause", lambda: (_ for _ in ()).throw(SystemExit(0)))  # the signal arrives
    exited = []
    monkeypatch.setattr(os, "_exit", exited.append)
    info = types.SimpleNamespace(name="m", version="1", threshold=0.1, threshold_source="test")
    assert app.serve_until_stopped("m", Config(), info) == 0
    assert exited == exits
    assert ("did not stop within" in capsys.readouterr().err) == bool(exits)
