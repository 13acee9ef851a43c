"""Checked export (pipelines/export.py, dinomaly.export): ONNX and OpenVINO artefacts that score as PyTorch does,
carry their thresholds and preprocessing, are refused when they do not match, and serve through predict.py and
serve.py. The tiny random model of fixtures_serving; one ONNX export is shared by the module."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dinomaly.calibration import ClassThreshold, ThresholdTable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "pipelines"))
import export as export_cli  # noqa: E402

TABLE = ThresholdTable(ClassThreshold(0.5, "calibration", 0.01, (0.4, 0.6), 20),
                       {"nut": ClassThreshold(0.45, "calibration", 0.01, (0.4, 0.5), 10)})


@pytest.fixture(scope="module")
def trained(served_model, tmp_path_factory):
    """The served tiny model after 20 training steps on generated images, saved with a per-class table in its
    metadata; (checkpoint, expected score by image name)."""
    from fixtures_serving import expected_scores

    from dinomaly.checkpoint import load, save
    from dinomaly.config import apply_overrides
    from dinomaly.data.transforms import normalize
    from dinomaly.export import generated_images
    from dinomaly.loop import train_steps

    loaded = load(served_model.checkpoint)
    config = apply_overrides(loaded.config, {"train.total_steps": 20, "train.warmup_steps": 2, "train.lr": 5e-3})
    torch.manual_seed(0)
    images = normalize(generated_images(40, config.model.crop_size, seed=3))
    train_steps(loaded.model, torch.split(images, 2), config)
    metadata = {**loaded.metadata, "calibration": TABLE.to_dict()}
    checkpoint = save(tmp_path_factory.mktemp("trained") / "checkpoint", loaded.model.eval(), config, metadata=metadata)
    return checkpoint, expected_scores(checkpoint, served_model.images)


def _expected(served_model) -> dict[str, np.ndarray]:
    """The served images as model input (uint8 crops) by name."""
    from dinomaly.data.transforms import decode_image, resize_crop_image

    model = served_model.config.model
    return {name: resize_crop_image(decode_image(data), model.image_size, model.crop_size)
            for name, data in served_model.images.items()}


@pytest.fixture(scope="module")
def onnx_export(trained, tmp_path_factory):
    checkpoint, _ = trained
    output = tmp_path_factory.mktemp("export") / "exported" / "onnx"  # its parent folder is created too
    code = export_cli.main(["--model", str(checkpoint), "--format", "onnx", "--output", str(output), "--images", "8"])
    assert code == 0
    return checkpoint, output / "model.onnx"


def test_onnx_export_writes_one_checked_file_with_metadata(onnx_export, served_model):
    from dinomaly.export import read_metadata

    checkpoint, path = onnx_export
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]
    assert [p.name for p in path.parent.parent.iterdir()] == ["onnx"]  # staging removed
    meta = read_metadata(path)
    assert ThresholdTable.from_dict(meta["metadata"]["calibration"]) == TABLE
    assert meta["metadata"]["thresholds"]["image_f1_optimal"] == pytest.approx(served_model.threshold)
    pre = meta["preprocessing"]
    assert (pre["image_size"], pre["crop_size"], pre["resize"]) == (98, 84, 256)
    assert meta["config"]["model"]["crop_size"] == 84 and meta["config"]["eval"]["max_ratio"] == 0.01
    agreement = meta["agreement"]
    assert agreement["images"] == 8 and agreement["score_rel"] <= 1e-4 and agreement["map_abs"] <= 1e-3


def test_onnx_predictor_scores_as_torch(onnx_export, trained, served_model):
    from dinomaly.export import OnnxPredictor
    from dinomaly.inference import Predictor

    _, path = onnx_export
    crops = _expected(served_model)
    pixels = np.stack(list(crops.values()))
    predictor = OnnxPredictor(path, threads=2)
    result = predictor.predict_pixels(pixels)
    reference = Predictor.from_checkpoint(trained[0]).predict_pixels(pixels)
    expected = np.array([trained[1][name] for name in crops])
    untrained = np.array([served_model.expected_scores[name] for name in crops])
    assert np.abs(expected - untrained).max() > 1e-3  # the training moved the scores: a trained model is checked
    np.testing.assert_allclose(result.scores, expected, rtol=1e-4)
    np.testing.assert_allclose(result.maps, reference.maps, atol=1e-3)
    assert result.maps.shape == (len(pixels), 256, 256)
    with pytest.raises(ValueError, match="uint8"):
        predictor.predict(pixels.astype(np.float32))


def test_openvino_export_agrees_and_round_trips_metadata(trained, tmp_path):
    from dinomaly.checkpoint import load
    from dinomaly.export import OnnxPredictor, export_checked, generated_images, read_metadata

    loaded = load(trained[0])
    metadata = loaded.metadata
    pixels = generated_images(4, 84)
    path, agreement = export_checked(loaded.model, loaded.config, "openvino", tmp_path / "ov", pixels,
                                     metadata=metadata, model_info={"name": "tiny"})
    assert agreement.ok and sorted(p.name for p in path.parent.iterdir()) == ["model.bin", "model.xml"]
    meta = read_metadata(path)
    assert ThresholdTable.from_dict(meta["metadata"]["calibration"]) == TABLE
    assert meta["model"]["name"] == "tiny" and meta["preprocessing"]["crop_size"] == 84
    scores = OnnxPredictor(path).predict_pixels(pixels).scores
    np.testing.assert_allclose(scores, loaded_scores(loaded, pixels), rtol=1e-4)


def loaded_scores(loaded, pixels):
    from dinomaly.inference import Predictor

    return Predictor(loaded.model, loaded.config.eval).predict_pixels(pixels).scores


def test_export_refused_when_a_weight_changes_after_tracing(trained, tmp_path, monkeypatch, capsys):
    """The graph is traced, then one decoder weight moves (scores move ~8 %): PyTorch and the file now differ, so
    nothing is written. (The random model barely reacts to most weights; this bias shifts every decoded token.)"""
    from dinomaly.export import checked

    traced = checked.trace_onnx

    def trace_then_perturb(model, eval_config, path):
        out = traced(model, eval_config, path)
        with torch.no_grad():
            model.decoder[-1].mlp.fc2.bias.add_(0.1)
        return out

    monkeypatch.setattr(checked, "trace_onnx", trace_then_perturb)
    output = tmp_path / "new" / "refused"
    code = export_cli.main(["--model", str(trained[0]), "--format", "onnx", "--output", str(output), "--images", "4"])
    err = capsys.readouterr()
    assert code == 2
    assert list(tmp_path.iterdir()) == []  # no artefact, no staging, and the parent it created is gone again
    assert "export refused" in err.err and "worst score error" in err.err and "DISAGREE" in err.out


def test_export_refuses_a_non_empty_output(served_model, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    code = export_cli.main(["--model", str(served_model.checkpoint), "--format", "onnx", "--output", str(tmp_path)])
    assert code == 2 and "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_export_refuses_an_output_under_a_file(served_model, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    output = tmp_path / "file" / "sub" / "out"
    code = export_cli.main(["--model", str(served_model.checkpoint), "--format", "onnx", "--output", str(output)])
    assert code == 2 and f"lies under {tmp_path / 'file'}, which is a file" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_predict_pipeline_scores_with_the_onnx_model(onnx_export, trained, served_model, ray_session, tmp_path):
    import predict as predict_cli
    import pyarrow.parquet as pq

    _, path = onnx_export
    code = predict_cli.main(["--model", str(path), "--data", str(served_model.image_dir), "--output",
                             str(tmp_path / "scored")])
    assert code == 0
    rows = pq.read_table(tmp_path / "scored" / "results").to_pylist()
    assert len(rows) == len(served_model.images)
    for row in rows:
        expected = trained[1][Path(row["uri"]).name]
        assert row["error"] is None and row["score"] == pytest.approx(expected, rel=1e-4)


@pytest.fixture(scope="module")
def onnx_served(ray_session, onnx_export, served_model):
    """Serve on a free port with the exported model at route '/'; shut down after the module."""
    from fixtures_serving import free_port, wait_ready
    from ray import serve

    from dinomaly.distributed.serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(str(onnx_export[1]), served_model.config), name="onnx", route_prefix="/")
        url = f"http://127.0.0.1:{port}/"
        wait_ready(url)
        yield url
    finally:
        serve.shutdown()


def test_serve_scores_with_the_onnx_model(onnx_served, trained, served_model):
    import requests

    for name, data in served_model.images.items():
        answer = requests.post(f"{onnx_served}v1/predict", data=data, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["score"] == pytest.approx(trained[1][name], rel=1e-4)
    model = requests.get(f"{onnx_served}v1/model", timeout=30).json()
    assert model["source"].endswith("model.onnx")


@pytest.mark.parametrize(("size_in", "size_out"), [(16, 224), (224, 256), (392, 256), (7, 7), (5, 1)])
@pytest.mark.parametrize("align_corners", [True, False])
def test_bilinear_matrix_is_torch_interpolate(size_in, size_out, align_corners):
    import torch.nn.functional as F

    from dinomaly.export.graph import bilinear_matrix

    image = torch.rand(1, 1, size_in, 3, dtype=torch.float64)
    expected = F.interpolate(image, size=(size_out, 3), mode="bilinear", align_corners=align_corners)[0, 0]
    got = torch.from_numpy(bilinear_matrix(size_in, size_out, align_corners)) @ image[0, 0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("crop", "patch", "resize", "kernel", "sigma", "ratio"),
                         [(224, 14, 256, 5, 4.0, 0.01), (84, 14, 256, 5, 4.0, 0.01), (98, 14, 60, 7, 1.5, 0.05),
                          (64, 16, 32, 3, 0.8, 1.0)])
def test_exported_post_processing_equals_the_reference_steps(crop, patch, resize, kernel, sigma, ratio):
    """The graph's one-matrix-per-axis post-processing gives the maps and scores of anomaly_map_from_features ->
    postprocess -> image_scores (resize to crop, resize, zero-padded blur, top-k mean) in float32."""
    from dinomaly.config import EvalConfig
    from dinomaly.export.graph import scores_and_maps, smoothing_matrix
    from dinomaly.inference import anomaly_map_from_features, image_scores, postprocess

    torch.manual_seed(0)
    grid = crop // patch
    encoded = [torch.randn(3, 32, grid, grid) for _ in range(2)]
    decoded = [e + 0.7 * torch.randn_like(e) for e in encoded]
    config = EvalConfig(resize=resize, blur_kernel=kernel, blur_sigma=sigma, max_ratio=ratio)
    final = postprocess(anomaly_map_from_features(encoded, decoded, crop), size=resize, blur_kernel=kernel,
                        blur_sigma=sigma)
    expected_scores = image_scores(final, ratio)
    top_k = max(1, int(resize * resize * ratio))
    scores, maps = scores_and_maps(encoded, decoded, smoothing_matrix(grid, crop, config), top_k)
    torch.testing.assert_close(maps, final[:, 0], rtol=0, atol=2e-6)
    torch.testing.assert_close(scores, expected_scores, rtol=2e-6, atol=0)
