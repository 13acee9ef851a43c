"""A tiny predict model and images, shared by tests/test_predict.py and tests/test_predict_crash.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dinomaly.config import load_config

TINY = ["model.encoder=vit_small_patch14_reg4_dinov2", "model.encoder_weights=none",
        "model.encoder_kwargs={embed_dim: 32, num_heads: 2, depth: 10}", "model.image_size=64", "model.crop_size=56",
        "eval.batch_size=4"]


@pytest.fixture(scope="module")
def model_and_images(tmp_path_factory):
    """A tiny checkpoint whose metadata carries a threshold, 6 demo images of mixed sizes, 1 corrupt, 1 non-image."""
    from dinomaly import Dinomaly
    from dinomaly.checkpoint import save
    from dinomaly.data.demo import generate_demo_dataset

    base = tmp_path_factory.mktemp("predict")
    demo = generate_demo_dataset(base / "demo", classes=["nut"], train_per_class=1, test_good_per_class=3,
                                 test_defect_per_class=3, size=64)
    images = base / "images"
    for i, path in enumerate(sorted((demo / "nut" / "test").rglob("*.png"))):
        target = images / ("sub" if i % 2 else "") / f"img{i}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        size = 64 if i % 3 else 96  # peak locations are in original pixels, whatever the size
        Image.open(path).resize((size, size)).save(target)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (images / "notes.txt").write_text("not an image: never listed")
    config = load_config(None, TINY)
    torch.manual_seed(0)
    model = Dinomaly(config.model)
    from dinomaly.inference import Predictor

    scores = expected_scores(Predictor(model, config.eval), sorted(images.rglob("img*.png")))
    threshold = float(np.median(list(scores.values())))  # some images anomalous, some not
    checkpoint = save(base / "checkpoint", model, config, metadata={"thresholds": {"image_f1_optimal": threshold}})
    return checkpoint, images, threshold


def expected_scores(predictor, paths) -> dict[str, float]:
    from dinomaly.data.transforms import decode_image, normalize, resize_crop_image

    pixels = np.stack([resize_crop_image(decode_image(p.read_bytes()), 64, 56) for p in paths])
    return dict(zip(map(str, paths), predictor.predict(normalize(pixels)).scores.tolist()))
