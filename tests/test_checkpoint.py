"""Checkpoints: safetensors + JSON round trips, pickles refused, official ViTill weights imported strictly."""

import json

import pytest
import torch
from conftest import reference_model_config

from dinomaly import Dinomaly
from dinomaly.checkpoint import load, load_official, save
from dinomaly.config import Config, DinomalyConfig


def assert_same_tree(got, expected, where="train_state"):
    """Equal values AND equal types (int keys stay int, tuples stay tuples, tensors keep dtype and shape)."""
    assert type(got) is type(expected), where
    if isinstance(expected, torch.Tensor):
        assert got.dtype == expected.dtype and got.shape == expected.shape, where
        assert torch.equal(got, expected.cpu()), where
    elif isinstance(expected, dict):
        assert list(got) == list(expected), where
        for key in expected:
            assert type(next(k for k in got if k == key)) is type(key), where
            assert_same_tree(got[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_same_tree(a, b, f"{where}[{i}]")
    else:
        assert got == expected or (got != got and expected != expected), where  # NaN equals NaN here


def no_torch_load(*args, **kwargs):
    raise AssertionError("dinomaly.checkpoint.load must not call torch.load")


# --------------------------------------------------------------------------- save / load


def test_save_load_gives_identical_maps(tmp_path, reference_model, vectors, monkeypatch):
    config = Config(name="roundtrip", model=reference_model_config())
    save(tmp_path / "ckpt", reference_model, config, metadata={"step": 30, "metrics": {"image_auroc": 0.5}})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "metadata.json",
                                                                    "model.safetensors"]
    monkeypatch.setattr(torch, "load", no_torch_load)
    loaded = load(tmp_path / "ckpt")
    assert loaded.config == config and isinstance(loaded.config, Config)
    assert loaded.metadata == {"step": 30, "metrics": {"image_auroc": 0.5}}
    assert loaded.train_state is None
    assert not loaded.model.training
    expected, got = reference_model.state_dict(), loaded.model.state_dict()
    assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    for size in (84, 70):
        images = vectors[f"fwd{size}/images"]
        assert torch.equal(loaded.model.anomaly_map(images), reference_model.anomaly_map(images))


def test_config_json_is_a_loadable_preset(tmp_path, reference_model):
    from dinomaly.config import load_config

    config = Config(name="preset", model=reference_model_config())
    save(tmp_path, reference_model, config)
    assert load_config(str(tmp_path / "config.json")) == config


def test_model_config_alone_round_trips(tmp_path, reference_model):
    config = reference_model_config()
    save(tmp_path, reference_model, config)
    loaded = load(tmp_path)
    assert isinstance(loaded.config, DinomalyConfig) and loaded.config == config


def test_train_state_round_trips_exactly(tmp_path, official_state_dict, vectors):
    model = load_official(official_state_dict, reference_model_config())
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, amsgrad=True)
    enc, dec = model(vectors["fwd84/images"])
    sum((e - d).pow(2).mean() for e, d in zip(enc, dec)).backward()
    optimizer.step()
    shared = torch.arange(6.0)
    train_state = {
        "step": 7,
        "optimizer": optimizer.state_dict(),  # int keys, tuple betas, 0-dim step tensors, None, bools
        "rng": torch.get_rng_state(),  # uint8
        "nested": {0: [1.5, None, "x", (1, 2.0)], "inf": float("inf"), "nan": float("nan"), True: False},
        "views": [shared[:3], shared[3:], shared],  # share one storage
        "same_twice": [shared, shared],
        "empty": {}, "ints": torch.tensor([1, 2], dtype=torch.int64),
    }
    save(tmp_path, model, reference_model_config(), train_state=train_state)
    loaded = load(tmp_path)
    assert_same_tree(loaded.train_state, train_state)
    fresh = torch.optim.AdamW(loaded.model.trainable_parameters(), lr=1e-3, amsgrad=True)
    fresh.load_state_dict(loaded.train_state["optimizer"])
    assert fresh.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]


def test_resave_without_train_state_drops_the_old_one(tmp_path, reference_model):
    save(tmp_path, reference_model, reference_model_config(), train_state={"step": 1})
    save(tmp_path, reference_model, reference_model_config())
    assert load(tmp_path).train_state is None


def test_unsupported_train_state_value_is_named(tmp_path, reference_model):
    import numpy as np

    with pytest.raises(ValueError, match=r"train_state\['loop'\]\['rng'\] is a ndarray"):
        save(tmp_path, reference_model, reference_model_config(), train_state={"loop": {"rng": np.zeros(3)}})


def test_load_refuses_pickles(tmp_path, reference_model):
    torch.save(reference_model.state_dict(), tmp_path / "model.pth")
    with pytest.raises(ValueError, match="never unpickles"):
        load(tmp_path / "model.pth")
    ckpt = tmp_path / "ckpt"
    save(ckpt, reference_model, reference_model_config())
    (ckpt / "model.safetensors").write_bytes((tmp_path / "model.pth").read_bytes())  # a pickle in disguise
    with pytest.raises(ValueError, match="not a safetensors file"):
        load(ckpt)
    with pytest.raises(FileNotFoundError, match="model.safetensors and config.json"):
        load(tmp_path)


def test_load_rejects_weights_that_do_not_fit_the_config(tmp_path, reference_model):
    save(tmp_path, reference_model, reference_model_config())
    config = json.loads((tmp_path / "config.json").read_text())
    config["encoder_kwargs"]["embed_dim"] = 48
    config["encoder_kwargs"]["num_heads"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"wrong shape .*\n.*file \(1, 1, 32\) vs model \(1, 1, 48\)"):
        load(tmp_path)


# --------------------------------------------------------------------------- official weights


def test_official_checkpoint_layout(official_state_dict, reference_model):
    assert len(official_state_dict) == 276
    consumed = {k for k in official_state_dict if not k.startswith("encoder.")}
    assert consumed == {k for k in reference_model.state_dict() if not k.startswith("encoder.")}
    ls = reference_model.encoder.vit.blocks[3].ls1.gamma
    assert torch.equal(ls, official_state_dict["encoder.blocks.3.ls1.gamma"])  # not left at the 1e-8 init
    cls = official_state_dict["encoder.cls_token"] + official_state_dict["encoder.pos_embed"][:, :1]
    assert torch.equal(reference_model.encoder.vit.cls_token, cls)  # timm folds the class position into it


def test_load_official_from_path(reference_dir, reference_model, vectors):
    model = load_official(reference_dir / "official_checkpoint.pth", reference_model_config()).eval()
    images = vectors["fwd84/images"]
    assert torch.equal(model.anomaly_map(images), reference_model.anomaly_map(images))


def test_load_official_names_missing_unexpected_and_misshaped_keys(official_state_dict):
    broken = dict(official_state_dict)
    del broken["decoder.3.attn.qkv.weight"]
    del broken["encoder.register_tokens"]
    broken["encoder.blocks.0.attn.qkv.weight"] = torch.zeros(96, 31)
    broken["bottleneck.0.fc2.bias"] = torch.zeros(33)
    broken["decoder.8.norm1.weight"] = torch.ones(32)
    with pytest.raises(ValueError) as info:
        load_official(broken, reference_model_config())
    message = str(info.value)
    assert "2 missing, 1 unexpected, 2 wrongly shaped" in message
    for text in ["decoder.3.attn.qkv.weight (96, 32)", "encoder.register_tokens (1, 4, 32)",
                 "decoder.8.norm1.weight (32,)",
                 "encoder.blocks.0.attn.qkv.weight: file (96, 31) vs model (96, 32)",
                 "bottleneck.0.fc2.bias: file (33,) vs model (32,)"]:
        assert text in message


def test_load_official_with_the_wrong_config(official_state_dict):
    config = reference_model_config(encoder_kwargs={"embed_dim": 48, "num_heads": 3})
    with pytest.raises(ValueError, match="model.encoder_kwargs"):
        load_official(official_state_dict, config)


def test_load_official_refuses_pickled_objects(tmp_path, official_state_dict):
    torch.save({"state_dict": dict(official_state_dict), "args": object()}, tmp_path / "model.pth")
    with pytest.raises(ValueError, match="refused"):
        load_official(tmp_path / "model.pth", reference_model_config())


@pytest.mark.parametrize("content", [b"junk!", b"\x80\x02}q\x00(X", b"PK\x03\x04garbage"])
def test_load_official_names_a_corrupt_file(tmp_path, content):
    (tmp_path / "model.pth").write_bytes(content)
    with pytest.raises(ValueError, match=r"model\.pth is not a (readable weights file|plain tensor state dict)"):
        load_official(tmp_path / "model.pth", reference_model_config())


def test_load_official_never_downloads(official_state_dict):
    """encoder_weights='hub' in the config must not trigger a download: the file holds the encoder."""
    model = load_official(official_state_dict, reference_model_config(encoder_weights="hub"))
    assert isinstance(model, Dinomaly) and model.config.encoder_weights == "hub"


def test_a_run_folder_with_several_checkpoints_is_not_guessed(tmp_path, reference_model):
    """--model runs/<name> holds the final checkpoint and the periodic ones: which one is the user's to say."""
    from dinomaly.distributed.models import resolve_model

    for name in ("checkpoint", "checkpoint_0000200", "checkpoint_0000300"):
        save(tmp_path / "run" / name, reference_model, reference_model_config())
    (tmp_path / "run" / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds 3 checkpoints .*e\.g\. .*/run/checkpoint$"):
        resolve_model(str(tmp_path / "run"), Config())
    assert resolve_model(str(tmp_path / "run" / "checkpoint_0000200"), Config()).directory.name == "checkpoint_0000200"
    single = tmp_path / "single"
    save(single / "checkpoint_0000300", reference_model, reference_model_config())
    assert resolve_model(str(single), Config()).directory.name == "checkpoint_0000300"
