"""Anomaly maps, post-processing and image scores against the reference vectors; Predictor end to end."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from dinomaly.config import EvalConfig
from dinomaly.inference import (
    Predictor,
    anomaly_map_from_features,
    gaussian_kernel,
    image_scores,
    postprocess,
    resize_masks,
)
from dinomaly.metrics import METRIC_NAMES, compute_metrics, pro_thresholds

E2E_KEYS = dict(zip(METRIC_NAMES, ("auroc_sp", "ap_sp", "f1_sp", "auroc_px", "ap_px", "f1_px", "aupro_px")))


def assert_close(got, ref, rel_max=1e-5, rtol=1e-5):
    """The reference README's tolerance: |got - ref| <= rel_max * max|ref| + rtol * |ref|."""
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rel_max * ref.abs().max().item())


def test_gaussian_kernel_is_the_reference_kernel(vectors):
    kernel = gaussian_kernel(5, 4)
    torch.testing.assert_close(kernel, vectors["gaussian_kernel"], rtol=0, atol=1e-8)
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert gaussian_kernel(1, 4).item() == 1.0


@pytest.mark.parametrize("size", [84, 70])
def test_maps_from_features(vectors, size):
    key = f"fwd{size}"
    enc = [vectors[f"{key}/en.0"], vectors[f"{key}/en.1"]]
    dec = [vectors[f"{key}/de.0"], vectors[f"{key}/de.1"]]
    assert_close(anomaly_map_from_features(enc, dec, size), vectors[f"{key}/amap_raw"])
    feature_maps = torch.cat([anomaly_map_from_features([e], [d], e.shape[-1]) for e, d in zip(enc, dec)], dim=1)
    assert_close(feature_maps, vectors[f"{key}/amap_feat"])


@pytest.mark.parametrize("size", [84, 70])
def test_postprocess_and_scores(vectors, size):
    key = f"fwd{size}"
    final = postprocess(vectors[f"{key}/amap_raw"], size=256, blur_kernel=5, blur_sigma=4)
    assert final.shape == vectors[f"{key}/amap_256"].shape
    assert_close(final, vectors[f"{key}/amap_256"])
    assert_close(image_scores(final, max_ratio=0.01), vectors[f"{key}/image_scores"])


def test_resize_before_blur(vectors):
    """A 1x1 kernel is the identity: the resize alone (align_corners=False) matches the unblurred vector."""
    resized = postprocess(vectors["fwd84/amap_raw"][:1], size=256, blur_kernel=1)
    assert_close(resized, vectors["fwd84/amap_256_unblurred_img0"])


def test_blur_pads_with_zeros():
    """Zero padding darkens a constant map at the border (reflect padding would keep it constant)."""
    final = postprocess(torch.ones(1, 1, 16, 16), size=16)
    assert final[0, 0, 8, 8].item() == pytest.approx(1.0, abs=1e-6)
    corner = gaussian_kernel(5, 4)[0, 0, 2:, 2:].sum().item()
    assert final[0, 0, 0, 0].item() == pytest.approx(corner, abs=1e-6) and corner < 0.4


def test_image_score_is_top_one_percent_mean():
    maps = torch.zeros(2, 1, 10, 100)  # 1000 pixels: top 10
    maps[0, 0, 0, :20] = torch.arange(20.0)
    assert image_scores(maps).tolist() == pytest.approx([np.mean(np.arange(10, 20)), 0.0])


def test_resize_masks_nearest_not_nearest_exact():
    mask = torch.tensor([[[[1, 0], [0, 0]]]], dtype=torch.uint8)
    # 'nearest' takes source index floor(i * 2 / 3) = 0, 0, 1 ('nearest-exact' would give 0, 1, 1)
    expected = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    assert torch.equal(resize_masks(mask, 3)[0, 0], expected)
    soft = torch.stack([torch.full((2, 2), 0.2), torch.zeros(2, 2)]).unsqueeze(0)  # 2 channels, weak values
    out = resize_masks(soft, 4)
    assert out.shape == (1, 1, 4, 4) and out.dtype == torch.bool and out.all()


def test_inference_does_not_import_the_model():
    """Post-processing needs the model's anomaly map (dinomaly.model.anomaly_map), not the model and timm."""
    code = "import sys, dinomaly.inference; print('dinomaly.model.dinomaly' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr


@pytest.fixture(scope="module")
def e2e_prediction(vectors, reference_model):
    images = torch.cat([vectors["fwd84/images"], vectors["e2e/images_b"]])
    return Predictor(reference_model, EvalConfig(batch_size=3)).predict(images, return_raw=True)


def test_predictor_maps_and_scores(vectors, e2e_prediction):
    assert e2e_prediction.maps.shape == (6, 256, 256) and e2e_prediction.maps.dtype == np.float32
    assert e2e_prediction.raw_maps.shape == (6, 84, 84)
    assert_close(torch.from_numpy(e2e_prediction.maps[:3]), vectors["fwd84/amap_256"][:, 0])
    assert_close(torch.from_numpy(e2e_prediction.scores), vectors["e2e/image_scores"])


def test_end_to_end_metrics(vectors, e2e_prediction):
    """The official evaluation_batch: model maps -> resize + blur -> top-1% scores; masks nearest to 256."""
    masks = resize_masks(vectors["e2e/gt"], 256)[:, 0].numpy()
    got = compute_metrics(vectors["e2e/labels"].numpy(), e2e_prediction.scores, masks, e2e_prediction.maps)
    for key, ref_key in E2E_KEYS.items():
        tolerance = 2e-5 if key == "pixel_aupro" else 1e-5
        assert got[key] == pytest.approx(vectors[f"e2e/{ref_key}"], abs=tolerance), key
    assert len(pro_thresholds(e2e_prediction.maps.min(), e2e_prediction.maps.max())) == \
        vectors["e2e/pro_num_thresholds"]


def test_predictor_from_checkpoint(tmp_path, vectors, reference_model, e2e_prediction):
    from dinomaly.checkpoint import save
    from dinomaly.config import Config

    config = Config(model=reference_model.config, eval=EvalConfig(batch_size=2))
    save(tmp_path / "ckpt", reference_model, config)
    predictor = Predictor.from_checkpoint(tmp_path / "ckpt")
    assert predictor.eval_config.batch_size == 2
    result = predictor.predict(vectors["e2e/images_b"])
    np.testing.assert_allclose(result.scores, e2e_prediction.scores[3:], rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.maps, e2e_prediction.maps[3:], rtol=0, atol=1e-6)


def test_predictor_rejects_bad_images(reference_model):
    with pytest.raises(ValueError, match="B, 3, H, W"):
        Predictor(reference_model, EvalConfig()).predict(torch.zeros(3, 84, 84))
