"""Demo data and a tiny checkpoint for the evaluate tests (test_evaluate.py, test_evaluate_cli.py), and the
core's own metrics on them."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_curve

from dinomaly.config import apply_overrides, load_config
from dinomaly.metrics import compute_metrics

CLASSES = ["nut", "pill"]
TINY = ["model.encoder=vit_small_patch14_reg4_dinov2", "model.encoder_weights=none",
        "model.encoder_kwargs={embed_dim: 32, num_heads: 2, depth: 10}", "model.image_size=64", "model.crop_size=56",
        "eval.batch_size=4", "data.layout=mvtec"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Demo data (2 classes x 3 good + 3 defective test images, one good image corrupted) and a tiny checkpoint."""
    from dinomaly import Dinomaly
    from dinomaly.checkpoint import save
    from dinomaly.data.demo import generate_demo_dataset

    base = tmp_path_factory.mktemp("evaluate")
    root = generate_demo_dataset(base / "demo", classes=CLASSES, train_per_class=1, test_good_per_class=3,
                                 test_defect_per_class=3, size=64)
    corrupt = sorted((root / "pill" / "test" / "good").glob("*.png"))[0]
    corrupt.write_bytes(corrupt.read_bytes()[:100])  # truncated PNG
    config = load_config(None, TINY)
    torch.manual_seed(0)
    checkpoint = save(base / "checkpoint", Dinomaly(config.model), config)
    return root, checkpoint, config, corrupt


def core_metrics(root: Path, predictor, config) -> dict[str, dict[str, float]]:
    """The seven metrics per class with the core alone: ManifestDataset -> Predictor -> resize_masks ->
    compute_metrics on all maps of the class at once (the reference's all-in-memory evaluation)."""
    from dinomaly.data.dataset import ManifestDataset, iterate_batches
    from dinomaly.data.manifest import load_manifest, select
    from dinomaly.inference import resize_masks

    table = select(load_manifest(apply_overrides(config, {"data.root": str(root)}).data), split="test")
    parts = defaultdict(lambda: defaultdict(list))
    for batch in iterate_batches(ManifestDataset(table, config.model), batch_size=4):
        result = predictor.predict(batch.images)
        masks = resize_masks(batch.masks, config.eval.resize)[:, 0].numpy()
        for i, name in enumerate(batch.categories):
            for key, value in (("labels", batch.labels[i].item()), ("scores", result.scores[i]),
                               ("masks", masks[i]), ("maps", result.maps[i])):
                parts[name][key].append(value)
    return {name: compute_metrics(np.array(p["labels"]), np.array(p["scores"]), np.stack(p["masks"]),
                                  np.stack(p["maps"])) for name, p in parts.items()}


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 over all thresholds, the reference's way (precision_recall_curve, its last point left out)."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    return float((2 * precision * recall / (precision + recall + 1e-7))[:-1].max())
