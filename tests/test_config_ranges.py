"""Config values out of range, non-finite floats and broken YAML are refused before any work, in one line
that names the key (or the file / --set text), the value and what is valid. No Ray."""

import dataclasses
import math
import re
import typing

import pytest

from dinomaly.config import Config, apply_overrides, load_config
from dinomaly.distributed.entry import USER_ERROR, run_job
from dinomaly.distributed.tune.space import SearchSpace, check_search_space


def _float_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key whose type holds a float (float, float | None, list[float])."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(_float_keys(tp, f"{prefix}{f.name}."))
        elif float in (tp, *typing.get_args(tp)):
            keys.append(f"{prefix}{f.name}")
    return keys


FLOAT_KEYS = _float_keys()


def test_the_float_keys_are_found():
    assert {"train.lr", "train.betas", "serve.threshold", "eval.blur_sigma", "cluster.start_timeout_s"} <= set(FLOAT_KEYS)
    assert len(FLOAT_KEYS) >= 25


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_float_key_refuses_nan_and_inf(key, bad):
    """A nan passes every `x <= 0`-style range check, so it is refused on its own, for every float key."""
    value = [0.9, bad] if key == "train.betas" else bad
    with pytest.raises(ValueError, match=rf"^{key}=.*must be (a )?finite number"):
        apply_overrides(Config(), {key: value})


def test_yaml_nan_and_inf_in_an_override_are_refused():
    for text in ("train.lr=.nan", "train.lr=.inf", "train.lr=-.inf", "train.betas=[0.9, .nan]"):
        with pytest.raises(ValueError, match="must be (a )?finite number"):
            load_config("demo", [text])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.crop_size=0", r"model.crop_size=0 must be a positive multiple of the patch size 14"),
        ("model.crop_size=-14", r"model.crop_size=-14 must be a positive multiple"),
        ("model.image_size=-5", r"model.image_size=-5 must be at least 14"),
        ("model.attention_eps=-1", r"model.attention_eps=-1.0 must be >= 0"),
        ("data.loader_workers=-1", r"data.loader_workers=-1 must be >= 0"),
        ("data.decode_images_per_s=-2", r"data.decode_images_per_s=-2.0 must be >= 0"),
        ("train.lr=0", r"train.lr=0.0 must be > 0"),
        ("train.final_lr=-1e-4", r"train.final_lr=-0.0001 must be >= 0"),
        ("train.weight_decay=-1", r"train.weight_decay=-1.0 must be >= 0"),
        ("train.clip_grad_norm=-1", r"train.clip_grad_norm=-1.0 must be > 0"),
        ("train.clip_grad_norm=0", r"train.clip_grad_norm=0.0 must be > 0 \(clipping to 0 would zero every"),
        ("train.eps=-1", r"train.eps=-1.0 must be > 0"),
        ("train.eps=0", r"train.eps=0.0 must be > 0"),
        ("train.hard_mining_ramp_steps=-5", r"train.hard_mining_ramp_steps=-5 must be >= 0"),
        ("train.hard_mining_factor=-2", r"train.hard_mining_factor=-2.0 must be in \[0, 1\]"),
        ("train.hard_mining_factor=1.5", r"train.hard_mining_factor=1.5 must be in \[0, 1\]"),
        ("train.seed=-1", r"train.seed=-1 must be in \[0, 4294967295\]"),
        ("train.max_failures=-1", r"train.max_failures=-1 must be >= 0"),
        ("train.cpus_per_worker=-0.5", r"train.cpus_per_worker=-0.5 must be >= 0"),
        ("eval.blur_sigma=0", r"eval.blur_sigma=0.0 must be > 0"),
        ("eval.blur_sigma=-1", r"eval.blur_sigma=-1.0 must be > 0"),
        ("eval.resize=0", r"eval.resize=0 must be at least 1"),
        ("eval.actors=0", r"eval.actors=0 must be at least 1"),
        ("eval.gpus_per_actor=-1", r"eval.gpus_per_actor=-1.0 must be >= 0"),
        ("serve.max_replicas=-1", r"serve.max_replicas=-1 must be >= 0"),
        ("tune.seed=-3", r"tune.seed=-3 must be in \[0, 4294967295\]"),
    ],
)
def test_out_of_range_values_are_refused_naming_key_value_and_range(override, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        load_config("demo", [override])


def test_the_edges_of_each_range_are_accepted():
    config = load_config("demo", ["train.hard_mining_factor=0", "train.hard_mining_ramp_steps=0",
                                  "train.weight_decay=0", "train.final_lr=0", "train.seed=0", "train.log_every=0",
                                  "eval.blur_sigma=0.5", "model.attention_eps=0", "model.crop_size=14"])
    assert (config.train.hard_mining_factor, config.model.crop_size, config.eval.blur_sigma) == (0.0, 14, 0.5)
    assert load_config("demo", ["train.hard_mining_factor=1"]).train.hard_mining_factor == 1.0


def test_a_config_file_with_broken_yaml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  crop_size: 112\n image_size: 128\n")  # the last key is indented by one space
    with pytest.raises(ValueError, match=r"config file '.*bad.yaml' is not valid YAML at line 3, column 2: "):
        load_config(str(bad))
    bad.write_text("model:\n\tcrop_size: 112\n")  # a tab (the scanner's error)
    with pytest.raises(ValueError, match=r"bad.yaml' is not valid YAML at line 2, column 1: found character"):
        load_config(str(bad))


@pytest.mark.parametrize("text", ["data.categories=[nut", "train.betas=[0.9, 0.99"])
def test_a_broken_set_value_names_the_override(text):
    with pytest.raises(ValueError, match=f"^override {re.escape(repr(text))} is not valid YAML at line 1"):
        load_config("demo", [text])


def test_run_job_turns_broken_yaml_into_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 0.001\n total_steps: 5\n")
    code = run_job(lambda: load_config(str(bad)), lambda config: 0)
    err = capsys.readouterr().err
    assert code == USER_ERROR and err.count("\n") == 1 and "bad.yaml' is not valid YAML at line 3" in err


def test_a_plain_space_value_is_yaml_like_a_set_value():
    """--space gives text: '0.001' is the number 0.001 (as in --set and in a YAML config), 'bf16' stays text."""
    space = SearchSpace.parse({"train.lr": "0.001", "train.total_steps": "50", "train.precision": "bf16",
                               "train.eps": "1e-8", "model.fuse_groups": "[[0, 1, 2, 3, 4, 5, 6, 7]]"})
    assert [d.args[0] for d in space.dimensions] == [0.001, 50, "bf16", 1e-8, [[0, 1, 2, 3, 4, 5, 6, 7]]]
    assert all(d.kind == "constant" for d in space.dimensions)
    config = apply_overrides(load_config("demo"), {"tune.search_space": {"train.lr": "0.001", "train.total_steps": "50"}})
    assert check_search_space(config).decode({"train.lr": 0.001}) == {"train.lr": 0.001}
    with pytest.raises(ValueError, match=r"tune.search_space\['data.categories'\]='\[nut' is not valid YAML"):
        SearchSpace.parse({"data.categories": "[nut"})
    with pytest.raises(ValueError, match=r"the argument list is not valid YAML"):
        SearchSpace.parse({"train.lr": "choice(0.001, [1)"})
