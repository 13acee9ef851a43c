"""What train.py and tune.py find on the driver before any Ray work: relative paths made absolute for the
workers (which run in other folders), weight sources that are really weights, a model that builds, an MLflow
store that opens, a writable feature cache, safe run names, and --resume of a finished run.

Nothing here starts Ray: the entry points run with their Ray step (launch.run / sweep.run / _train_one)
replaced by a recorder, as in test_cli.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from test_cli import load_pipeline

from dinomaly.config import load_config
from dinomaly.config.paths import absolute_path, with_absolute_paths

STEPS = ["--steps", "8", "--set", "train.warmup_steps=1"]


@pytest.fixture
def entry(monkeypatch, tmp_path):
    """train.py and tune.py in tmp_path with their Ray step replaced: calls records what each run would get."""
    from dinomaly.distributed.train import run as launch
    from dinomaly.distributed.tune import sweep

    calls = []
    monkeypatch.setattr(launch, "run", lambda config, init_from="", output=None: calls.append((config, init_from)))
    monkeypatch.setattr(sweep, "run", lambda config, resume=False, output_dir=None: calls.append((config, None)))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return calls


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------- absolute paths


def test_local_paths_become_absolute_and_uris_and_words_stay(tmp_path):
    config = load_config("demo", {"output_root": "runs", "tune.cache_root": "~/cache", "data.root": "m/d.parquet",
                                  "model.encoder_weights": "w/enc.pth"})
    done = with_absolute_paths(config, cwd=tmp_path)
    assert done.output_root == str(tmp_path / "runs") and done.data.root == str(tmp_path / "m" / "d.parquet")
    assert done.model.encoder_weights == str(tmp_path / "w" / "enc.pth")
    assert done.tune.cache_root == os.path.expanduser("~/cache")
    assert with_absolute_paths(done, cwd="/elsewhere") == done  # already absolute: unchanged
    for kept in ("hub", "none"):
        assert with_absolute_paths(load_config("demo", {"model.encoder_weights": kept})).model.encoder_weights == kept
    uris = with_absolute_paths(load_config("demo", {"output_root": "s3://b/runs", "data.root": "s3://b/m.parquet"}))
    assert (uris.output_root, uris.data.root, uris.tune.cache_root) == ("s3://b/runs", "s3://b/m.parquet", "")
    assert absolute_path("", tmp_path) == "" and absolute_path("demo_run/checkpoint", "/w") == "/w/demo_run/checkpoint"


def test_tune_gives_the_sweep_absolute_paths_so_trials_find_the_feature_cache(entry, demo_root, tmp_path):
    from dinomaly.distributed.tune.sweep import cache_root

    assert load_pipeline("tune").main(["--data", str(demo_root), "--name", "swdef", "--num-samples", "1",
                                       *STEPS[2:], "--set", "train.total_steps=8"]) == 0
    config, _ = entry[-1]
    assert config.output_root == str(tmp_path / "runs")
    assert cache_root(config) == str(tmp_path / "runs" / "feature_cache")  # where run_sweep builds and trials read
    assert load_pipeline("tune").main(["--data", str(demo_root), "--name", "swout", "--output", "sweeps/mvtec",
                                       *STEPS[2:], "--set", "train.total_steps=8"]) == 0
    assert cache_root(entry[-1][0]) == str(tmp_path / "sweeps" / "mvtec" / "feature_cache")


def test_train_hands_the_workers_absolute_paths_and_init_from(monkeypatch, tmp_path):
    from dinomaly.distributed.train import run as launch

    seen = {}
    monkeypatch.setattr(launch, "_train_one", lambda config, **kw: seen.update(config=config, **kw))
    monkeypatch.chdir(tmp_path)
    config = load_config("demo", {"data.root": "m/demo.parquet", "model.encoder_weights": "enc.pth"})
    launch.train(config, init_from="demo_run/checkpoint")
    assert seen["init_from"] == str(tmp_path / "demo_run" / "checkpoint")
    assert seen["config"].output_root == str(tmp_path / "runs")
    assert seen["config"].data.root == str(tmp_path / "m" / "demo.parquet")
    assert seen["config"].model.encoder_weights == str(tmp_path / "enc.pth")


# --------------------------------------------------------------------------- weight sources


def write_checkpoint_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "config.json").write_text("{}")
    return folder


def test_init_from_must_be_weights(entry, demo_root, tmp_path, capsys):
    train = load_pipeline("train")
    base = ["--data", str(demo_root), "--name", "initrel", *STEPS]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "demo.parquet").write_bytes(b"PAR1")
    assert train.main([*base, "--init-from", "m/demo.parquet"]) == 2
    assert "--init-from m/demo.parquet is not a weights file" in one_line_error(capsys)
    write_checkpoint_folder(tmp_path / "demo_run" / "checkpoint")
    assert train.main([*base, "--init-from", "demo_run"]) == 2
    assert "did you mean demo_run/checkpoint?" in one_line_error(capsys)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    assert train.main([*base, "--init-from", "junk.pth"]) == 2
    assert "junk.pth is not a weights file torch.load" in one_line_error(capsys)
    assert entry == []
    assert train.main([*base, "--init-from", "demo_run/checkpoint"]) == 0  # relative: train() makes it absolute
    torch.save({"decoder.0.w": torch.zeros(2)}, tmp_path / "official.pth")
    assert train.main([*base, "--name", "initpth", "--init-from", "official.pth"]) == 0
    assert len(entry) == 2


@pytest.mark.parametrize("setting, says", [
    ("model.encoder=nosuch_encoder", "model.encoder='nosuch_encoder' is not a timm model name"),
    ("model.encoder=vit_small_patch14_reg4_dinov3", "close matches: ['vit_small_patch14_reg4_dinov2'"),
    ("model.encoder_weights=/nonexist.pth", "model.encoder_weights='/nonexist.pth' is neither 'hub', 'none' nor"),
    ("model.encoder_weights=hubb", "did you mean 'hub'?"),
    ("model.encoder_weights=m/demo.parquet", "model.encoder_weights m/demo.parquet is not a weights file"),
    ("model.target_layers=[2,3,4,5,6,7,8,40]", "uses block 40 but 'vit_small_patch14_reg4_dinov2' has 12 blocks"),
    ("tracking.tracking_uri=bogus://x", "tracking.tracking_uri='bogus://x' is not a store MLflow can open"),
])
def test_mistakes_a_worker_would_find_are_one_line_and_exit_2_before_ray(setting, says, entry, demo_root,
                                                                        tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "demo.parquet").write_bytes(b"PAR1")
    for pipeline, name in (("train", "--name"), ("tune", "--name")):
        assert load_pipeline(pipeline).main(["--data", str(demo_root), name, "bad", *STEPS[2:],
                                             "--set", "train.total_steps=8", "--set", setting]) == 2
        assert says in one_line_error(capsys), pipeline
    assert entry == []


def test_a_file_as_the_feature_cache_is_refused_before_the_sweep(entry, demo_root, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    argv = ["--data", str(demo_root), "--name", "cachefile", *STEPS[2:], "--set", "train.total_steps=8"]
    assert load_pipeline("tune").main([*argv, "--set", "tune.cache_root=afile"]) == 2
    err = one_line_error(capsys)
    assert "cannot write the feature cache under" in err and "tune.cache_root" in err
    assert entry == []
    assert load_pipeline("tune").main([*argv, "--set", "tune.cache_root=afile", "--set",
                                       "tune.feature_cache=false"]) == 0  # no cache, nothing to write there


# --------------------------------------------------------------------------- names and --resume


@pytest.mark.parametrize("name", ["../../etc", "a/b", "", ".hidden", "sp ace"])
def test_a_run_name_is_one_safe_folder_name(name, entry, demo_root, capsys):
    with pytest.raises(ValueError, match="must be one folder name"):
        load_config("demo", {"name": name})
    assert load_pipeline("train").main(["--data", str(demo_root), *STEPS, "--set", f"name={name}"]) == 2
    assert "letters, digits" in one_line_error(capsys)
    assert entry == []


def test_resume_refuses_init_from_and_says_when_the_run_already_finished(entry, demo_root, tmp_path, capsys):
    train = load_pipeline("train")
    run_folder = tmp_path / "runs" / "demo"
    run_folder.mkdir(parents=True)
    record = {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_0000008", "metrics": {"step": 8}}}
    (run_folder / "checkpoint_manager_snapshot.json").write_text(json.dumps(record))
    write_checkpoint_folder(tmp_path / "demo_run" / "checkpoint")
    base = ["--data", str(demo_root), "--name", "demo", "--resume", "--set", "train.warmup_steps=1"]
    assert train.main([*base, "--steps", "5", "--init-from", "demo_run/checkpoint"]) == 2
    assert "drop one of them" in one_line_error(capsys)
    assert train.main([*base, "--steps", "5"]) == 0
    assert "run 'demo' already finished at step 8" in capsys.readouterr().out
    assert entry == []
    assert train.main([*base, "--steps", "12"]) == 0  # more steps than it reached: it resumes
    assert len(entry) == 1
