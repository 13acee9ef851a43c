"""The encoder-feature cache: training from cached features is exactly training from images."""

import json

import pytest
import torch

from dinomaly.config import load_config
from dinomaly.data.manifest import load_manifest, select
from dinomaly.distributed.train.batches import ManifestBatches
from dinomaly.features import FeatureBatches, FeatureCache, FeatureInput, build_feature_cache, cache_uri
from dinomaly.loop import seed_everything, train_steps
from dinomaly.model.dinomaly import Dinomaly

STEPS = 6


def tiny_config(demo_root, **overrides):
    """Demo preset at 64 -> 56 px, batch 4, dropout on (the cache must not change the dropout stream)."""
    values = {"data.root": str(demo_root), "model.image_size": 64, "model.crop_size": 56,
              "model.bottleneck_dropout": 0.3, "train.batch_size": 4, "train.total_steps": 50,
              "train.warmup_steps": 2, "train.hard_mining_ramp_steps": 4, "train.seed": 3}
    values.update(overrides)
    return load_config("demo", values)


def train_rows(config):
    return select(load_manifest(config.data), split="train")


def loss_curve(config, batches, wrap):
    seed_everything(config.train.seed)
    model = Dinomaly(config.model)
    records, _ = train_steps(wrap(model), batches, config)
    return [r["loss"] for r in records], [r["grad_norm"] for r in records], model


def test_cached_features_give_the_same_loss_curve(demo_root, tmp_path):
    """Steps over a shuffled epoch boundary (18 images, batch 4): identical losses, gradients and weights."""
    torch.set_num_threads(1)
    config = tiny_config(demo_root)
    rows = train_rows(config)
    uri = build_feature_cache(rows, config, str(tmp_path / "cache"), batch_size=5)
    images = ManifestBatches(rows, config).iterate(0, 1, 0)
    cached = FeatureBatches(uri, rows.column("image_uri").to_pylist(), config).iterate(0, 1, 0)
    losses_a, grads_a, model_a = loss_curve(config, (next(images) for _ in range(STEPS)), lambda m: m)
    losses_b, grads_b, model_b = loss_curve(config, (next(cached) for _ in range(STEPS)), FeatureInput)
    assert losses_a == losses_b and grads_a == grads_b
    assert len(set(losses_a)) == STEPS  # a real curve, not a constant
    for a, b in zip(model_a.trainable_parameters(), model_b.trainable_parameters()):
        assert torch.equal(a, b)


def test_cache_is_built_once_and_keyed_by_encoder_and_transform(demo_root, tmp_path):
    config = tiny_config(demo_root)
    rows = train_rows(config)
    root = str(tmp_path / "cache")
    uri = build_feature_cache(rows, config, root)
    meta = json.loads((tmp_path / "cache" / uri.rsplit("/", 1)[1] / "meta.json").read_text())
    assert meta["count"] == rows.num_rows and meta["shape"] == [8, 5 + 16, 48]  # 8 layers, 4 registers+cls+4x4
    stamp = (tmp_path / "cache" / uri.rsplit("/", 1)[1] / "features.arrow").stat().st_mtime_ns
    assert build_feature_cache(rows, config, root) == uri  # reused, not recomputed
    assert (tmp_path / "cache" / uri.rsplit("/", 1)[1] / "features.arrow").stat().st_mtime_ns == stamp
    other = tiny_config(demo_root, **{"model.crop_size": 42})
    assert cache_uri(root, rows, other) != uri
    assert cache_uri(root, rows.slice(1), config) != uri  # other images, other cache
    cache = FeatureCache.open(uri)
    seed_everything(config.train.seed)  # random encoder weights: those a run seeded the same way builds
    encoder = Dinomaly(config.model).encoder
    first_batch = next(ManifestBatches(rows, tiny_config(demo_root, **{"data.shuffle": False})).iterate(0, 1, 0))
    with torch.no_grad():
        first = torch.stack(encoder(first_batch[:1]), dim=1)
    assert torch.equal(cache.features([0]), first)


def test_cache_refuses_images_it_does_not_hold(demo_root, tmp_path):
    config = tiny_config(demo_root)
    rows = train_rows(config)
    uri = build_feature_cache(rows.slice(0, 6), config, str(tmp_path / "cache"))
    batches = FeatureBatches(uri, rows.column("image_uri").to_pylist(), config)
    with pytest.raises(ValueError, match="not in the feature cache"):
        next(batches.iterate(0, 1, 0))
    with pytest.raises(FileNotFoundError, match="no complete feature cache"):
        FeatureCache.open(str(tmp_path / "nowhere"))
