"""The model against the official code's vectors, its architecture figures, and its input/weight errors."""

import logging
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, reference_model_config
from safetensors.torch import save_file

from dinomaly import Dinomaly, DinomalyConfig
from dinomaly.checkpoint import load_official
from dinomaly.config import REFERENCE_TARGET_LAYERS
from dinomaly.model.encoder import interpolate_patch_pos_embed


def assert_matches_reference(got, ref, rel_max=1e-5, rtol=1e-5, atol=0.0):
    """|got - ref| <= atol + rel_max * max|ref| + rtol * |ref| (reference README, 'Tolerances')."""
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol + rel_max * ref.abs().max().item())


@pytest.fixture
def fresh_reference_model(official_state_dict):
    """A reference model this test may mutate (train mode, backward)."""
    return load_official(official_state_dict, reference_model_config())


# --------------------------------------------------------------------------- parity with the official code


@pytest.mark.parametrize("size", [84, 70])
def test_features_match_reference(reference_model, vectors, size):
    enc, dec = reference_model(vectors[f"fwd{size}/images"])
    assert len(enc) == len(dec) == 2
    for g in range(2):
        batch = vectors[f"fwd{size}/images"].shape[0]
        assert enc[g].shape == dec[g].shape == (batch, 32, size // 14, size // 14)
        assert_matches_reference(enc[g], vectors[f"fwd{size}/en.{g}"])
        assert_matches_reference(dec[g], vectors[f"fwd{size}/de.{g}"])


@pytest.mark.parametrize("size", [84, 70])
def test_anomaly_map_matches_reference(reference_model, vectors, size):
    maps = reference_model.anomaly_map(vectors[f"fwd{size}/images"])
    assert maps.shape == vectors[f"fwd{size}/amap_raw"].shape
    assert not maps.requires_grad
    assert_matches_reference(maps, vectors[f"fwd{size}/amap_raw"])


def test_position_table_untouched_at_native_grid():
    """DINOv2 skips the interpolation at its own grid; elsewhere the +0.1 offset changes the values."""
    table = torch.randn(1, 37 * 37, 8)
    assert interpolate_patch_pos_embed(table, (37, 37), (37, 37)) is table
    ours = interpolate_patch_pos_embed(table, (37, 37), (6, 6))
    by_size = torch.nn.functional.interpolate(table.reshape(1, 37, 37, 8).permute(0, 3, 1, 2), size=(6, 6),
                                              mode="bicubic").permute(0, 2, 3, 1).reshape(1, 36, 8)
    assert ours.shape == (1, 36, 8) and not torch.allclose(ours, by_size, atol=1e-3)


@pytest.mark.parametrize("encoder", ["vit_small_patch14_reg4_dinov2", "vit_small_patch14_dinov2"])
def test_native_size_tokens_equal_plain_timm(encoder):
    """At the table's own size our position step is timm's: prefix layout with and without registers."""
    from timm.models.vision_transformer import VisionTransformer

    config = reference_model_config(encoder=encoder, encoder_kwargs={"embed_dim": 32, "num_heads": 2,
                                                                     "img_size": 56, "depth": 3},
                                    target_layers=[0, 1, 2], decoder_depth=3, fuse_groups=[[0, 1, 2]])
    model = Dinomaly(config).eval()
    images = torch.randn(2, 3, 56, 56)
    ours = model.encoder(images)
    vit = model.encoder.vit
    vit.__class__ = VisionTransformer
    plain = vit.forward_intermediates(images, indices=[0, 1, 2], output_fmt="NLC", intermediates_only=True,
                                      return_prefix_tokens=True)
    prefix = 5 if "reg4" in encoder else 1
    assert model.encoder.num_prefix_tokens == prefix
    for got, (patches, prefix_tokens) in zip(ours, plain):
        assert got.shape == (2, prefix + 16, 32)
        torch.testing.assert_close(got, torch.cat((prefix_tokens, patches), dim=1), rtol=0, atol=0)


# --------------------------------------------------------------------------- architecture


def test_parameter_names_and_order_match_reference(fresh_reference_model, official_state_dict):
    official = [k for k in official_state_dict if not k.startswith("encoder.")]
    ours = [name for name, _ in fresh_reference_model.named_parameters() if not name.startswith("encoder.")]
    assert ours == official
    trainable = fresh_reference_model.trainable_parameters()
    named = dict(fresh_reference_model.named_parameters())
    assert [id(p) for p in trainable] == [id(named[n]) for n in official]
    assert sum(p.numel() for p in trainable) == 109_984


def test_init_and_layer_settings():
    model = Dinomaly(reference_model_config(bottleneck_dropout=0.3, attention_eps=1e-6))
    assert [m.p for m in model.bottleneck.modules() if isinstance(m, torch.nn.Dropout)] == [0.3] * 3
    for name, module in [*model.bottleneck.named_modules(), *model.decoder.named_modules()]:
        if isinstance(module, torch.nn.Linear):
            assert module.weight.abs().max() <= 0.03, name
            assert 0.007 < module.weight.std() < 0.011, name
            assert torch.count_nonzero(module.bias) == 0, name
        elif isinstance(module, torch.nn.LayerNorm):
            assert module.eps == 1e-8
            assert torch.all(module.weight == 1) and torch.count_nonzero(module.bias) == 0
    assert all(block.attn.eps == 1e-6 for block in model.decoder)
    assert [type(m).__name__ for m in model.decoder[0].modules()].count("LayerScale") == 0


@pytest.mark.parametrize("size,encoder,dim,heads,trainable", [
    ("small", "vit_small_patch14_reg4_dinov2", 384, 6, 15_377_280),
    ("base", "vit_base_patch14_reg4_dinov2", 768, 12, 61_425_408),
    pytest.param("large", "vit_large_patch14_reg4_dinov2", 1024, 16, 109_163_520,
                 marks=pytest.mark.slow),  # 300M parameters to initialise
])
def test_real_sizes(size, encoder, dim, heads, trainable):
    """Random-weight S/B/L at 28 px (2x2 patches): spec trainable counts, widths and group shapes."""
    config = DinomalyConfig(encoder=encoder, encoder_weights="none", image_size=28, crop_size=28,
                            target_layers=REFERENCE_TARGET_LAYERS[size])
    model = Dinomaly(config).eval()
    encoder = model.encoder
    assert (encoder.embed_dim, encoder.num_heads, encoder.num_prefix_tokens) == (dim, heads, 5)
    assert sum(p.numel() for p in model.trainable_parameters()) == trainable
    ran = []
    for i, block in enumerate(model.encoder.vit.blocks):
        block.register_forward_hook(lambda *_, i=i: ran.append(i))
    enc, dec = model(torch.randn(1, 3, 28, 28))
    assert ran == list(range(config.target_layers[-1] + 1))  # blocks after the last target layer never run
    assert [e.shape for e in enc] == [d.shape for d in dec] == [(1, dim, 2, 2)] * 2
    assert model.anomaly_map(torch.randn(1, 3, 28, 28)).shape == (1, 1, 28, 28)


# --------------------------------------------------------------------------- frozen encoder, training mode


def test_encoder_frozen_and_always_eval(fresh_reference_model, vectors):
    model = fresh_reference_model.train()
    assert model.bottleneck.training and model.decoder.training
    assert not any(m.training for m in model.encoder.modules())
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.trainable_parameters())
    images = vectors["fwd84/images"]
    torch.manual_seed(0)
    enc_a, dec_a = model(images)
    enc_b, dec_b = model(images)
    assert all(torch.equal(a, b) for a, b in zip(enc_a, enc_b))  # encoder unaffected by train mode
    assert not torch.equal(dec_a[0], dec_b[0])  # the noisy bottleneck is active
    assert not any(e.requires_grad for e in enc_a)
    sum(d.sum() for d in dec_a).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.trainable_parameters())
    model.eval()
    assert_matches_reference(model(images)[1][0], vectors["fwd84/de.0"])


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_with_a_fix(reference_model):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        reference_model(torch.randn(1, 4, 84, 84))
    with pytest.raises(ValueError, match="square"):
        reference_model(torch.randn(1, 3, 84, 70))
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        reference_model(torch.randn(1, 3, 85, 85))
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        reference_model_config(crop_size=85, image_size=96)


def test_target_layer_beyond_depth():
    config = reference_model_config(target_layers=[2, 3, 4, 5, 6, 7, 8, 12])
    with pytest.raises(ValueError, match=r"uses block 12 .* has 12 blocks \(0-11\)"):
        Dinomaly(config)


def test_unknown_encoder_name():
    with pytest.raises(ValueError, match="not a timm model name"):
        Dinomaly(reference_model_config(encoder="vit_base_patch14_reg4_dinov3_typo"))


# --------------------------------------------------------------------------- encoder weights


def test_encoder_weights_from_dinov2_pth(tmp_path, official_state_dict, reference_model, vectors):
    """A Meta-layout DINOv2 .pth (cls_token, pos_embed (1,1370,D), register_tokens, mask_token) loads."""
    path = tmp_path / "dinov2_tiny_reg4.pth"
    prefix = "encoder."
    torch.save({k[len(prefix):]: v for k, v in official_state_dict.items() if k.startswith(prefix)}, path)
    model = Dinomaly(reference_model_config(encoder_weights=str(path))).eval()
    images = vectors["fwd84/images"]
    for ours, ref in zip(model.encoder(images), reference_model.encoder(images)):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    enc, _ = model(images)
    for g in range(2):
        assert_matches_reference(enc[g], vectors[f"fwd84/en.{g}"])


def test_encoder_weights_from_timm_safetensors(tmp_path, reference_model, vectors):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference_model.encoder.vit.state_dict().items()}, path)
    model = Dinomaly(reference_model_config(encoder_weights=str(path))).eval()
    enc, _ = model(vectors["fwd70/images"])
    for g in range(2):
        assert_matches_reference(enc[g], vectors[f"fwd70/en.{g}"])


def test_encoder_weights_file_errors(tmp_path, official_state_dict):
    with pytest.raises(FileNotFoundError, match="'hub', 'none'"):
        Dinomaly(reference_model_config(encoder_weights=str(tmp_path / "missing.pth")))
    encoder = {k[len("encoder."):]: v for k, v in official_state_dict.items() if k.startswith("encoder.")}
    del encoder["blocks.4.ls2.gamma"]
    encoder["pos_embed"] = encoder["pos_embed"][:, :785]
    torch.save(encoder, tmp_path / "broken.pth")
    expected = r"(?s)blocks\.4\.ls2\.gamma.*pos_embed: file \(1, 785, 32\) vs model \(1, 1370, 32\)"
    with pytest.raises(ValueError, match=expected):
        Dinomaly(reference_model_config(encoder_weights=str(tmp_path / "broken.pth")))
    torch.save({"weights": encoder, "extra": object()}, tmp_path / "pickle.pth")
    with pytest.raises(ValueError, match="refused"):
        Dinomaly(reference_model_config(encoder_weights=str(tmp_path / "pickle.pth")))


def test_random_encoder_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="dinomaly.model.encoder"):
        Dinomaly(reference_model_config(encoder_weights="none"))
    assert "RANDOM weights" in caplog.text


def test_hub_without_network_says_how_to_pass_a_file(tmp_path):
    """Offline (HF_HUB_OFFLINE=1, empty cache): one clear error naming model.encoder_weights=/path.

    Runs in a subprocess because huggingface_hub reads HF_HUB_OFFLINE and its cache path at import time.
    """
    script = ("from conftest import reference_model_config\nfrom dinomaly import Dinomaly\n"
              "try:\n    Dinomaly(reference_model_config(encoder_weights='hub'))\n"
              "except ValueError as err:\n    print('VALUE_ERROR', err)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_CACHE=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"),
               PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            timeout=300)
    assert "VALUE_ERROR" in result.stdout, result.stdout + result.stderr[-3000:]
    assert "model.encoder_weights=/path/to/file" in result.stdout
    assert "No network" in result.stdout
