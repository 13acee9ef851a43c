"""The typed config: presets load, overrides apply, bad values fail early with a message that says the fix."""

import pytest

from dinomaly.config import (
    CONFIG_DIR,
    Config,
    DinomalyConfig,
    apply_overrides,
    flatten,
    from_dict,
    help_text,
    load_config,
)

PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_presets_exist():
    assert {"demo", "mvtec_uni", "visa_uni", "realiad_uni", "mpdd_sep"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads(name):
    config = load_config(name)
    assert isinstance(config, Config)
    assert config.model.crop_size % 14 == 0


def test_presets_carry_reference_values():
    """guojiajeremy/Dinomaly dinomaly_*.py scripts @c5c76d0: per-script iterations, dropout and eps."""
    mvtec, realiad, mpdd = load_config("mvtec_uni"), load_config("realiad_uni"), load_config("mpdd_sep")
    assert (mvtec.train.total_steps, mvtec.model.bottleneck_dropout, mvtec.train.eps) == (10_000, 0.2, 1e-10)
    assert (realiad.train.total_steps, realiad.model.bottleneck_dropout) == (50_000, 0.4)
    assert (mpdd.train.setting, mpdd.train.total_steps, mpdd.train.eps) == ("separate", 5000, 1e-8)
    assert mvtec.model.target_layers == [2, 3, 4, 5, 6, 7, 8, 9]
    assert mvtec.model.fuse_groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert (mvtec.model.image_size, mvtec.model.crop_size, mvtec.train.batch_size) == (448, 392, 16)


def test_overrides_parse_yaml_values():
    config = load_config("demo", ["train.lr=1e-3", "model.fuse_groups=[[0,1,2,3,4,5,6,7]]", "data.strict=true"])
    assert config.train.lr == 1e-3
    assert config.model.fuse_groups == [[0, 1, 2, 3, 4, 5, 6, 7]]
    assert config.data.strict is True
    assert apply_overrides(config, {"train.total_steps": 70}).train.total_steps == 70


def test_unknown_key_names_closest_match():
    with pytest.raises(ValueError, match=r"train\.lrr.*did you mean 'train\.lr'"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ValueError, match="unknown config key 'modle'"):
        from_dict(Config, {"modle": {}})
    with pytest.raises(ValueError, match=r"train\.learning_rate.*did you mean 'train\.lr'"):  # by its initials
        load_config(None, ["train.learning_rate=1e-3"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.crop_size=100", "not a multiple of the patch size 14; use 98 or 112"),
        ("model.fuse_groups=[[0,1],[2,9]]", r"fuse_groups\[1\] uses layer 9 but target_layers has 8 entries"),
        ("model.fuse_groups=[[0,1],[1,2]]", "uses a layer twice"),
        ("model.target_layers=[3,2]", "strictly increasing"),
        ("model.bottleneck_dropout=1.5", r"must be in \[0, 1\)"),
        ("train.batch_size=6", None),  # fine alone
        ("train.precision=fp16", r"not one of \['fp32', 'bf16'\]"),
        ("train.total_steps=abc", "must be an integer"),
        ("eval.blur_kernel=4", "positive odd number"),
        ("serve.threshold=5", r"must be in \(0, 2\] or null"),
        ("serve.threshold=0", r"must be in \(0, 2\] or null"),
    ],
)
def test_bad_values_raise_with_fix(override, message):
    if message is None:
        load_config("demo", [override])
        return
    with pytest.raises(ValueError, match=message):
        load_config("demo", [override])


def test_batch_must_split_across_workers():
    with pytest.raises(ValueError, match="not divisible by train.num_workers=4"):
        load_config("demo", ["train.batch_size=6", "train.num_workers=4"])


def test_missing_preset_lists_presets():
    with pytest.raises(FileNotFoundError, match="mvtec_uni"):
        load_config("no_such_preset")


def test_flatten_and_help_cover_every_field():
    flat = flatten(load_config("demo"))
    assert flat["model.encoder"] == "vit_small_patch14_reg4_dinov2"
    assert flat["train.total_steps"] == 300
    text = help_text()
    for key in flat:
        assert key in text


def test_decoder_depth_must_match_layers():
    with pytest.raises(ValueError, match="decoder_depth=4 differs"):
        DinomalyConfig(decoder_depth=4)


def test_cluster_start_timeout_is_checked_and_listed_in_help():
    """cluster.start_timeout_s: seconds (default 600), 0 = wait forever, negative refused; in every --help."""
    assert load_config("demo").cluster.start_timeout_s == 600.0
    assert load_config("demo", ["cluster.start_timeout_s=0"]).cluster.start_timeout_s == 0.0
    with pytest.raises(ValueError, match=r"cluster.start_timeout_s=-1.0 must be a number >= 0 .*0 = wait forever"):
        load_config("demo", ["cluster.start_timeout_s=-1"])
    with pytest.raises(ValueError, match="must be a number"):
        load_config("demo", ["cluster.start_timeout_s=soon"])
    text = help_text()
    assert "cluster.start_timeout_s = 600.0" in text and "0 = wait forever" in text
