"""A trained model's model.* settings are fixed: every entry point that reads one (evaluate, predict, calibrate,
export, serve) refuses a `--set model.*` that differs, before Ray; predict's run.json records the preprocessing;
the shared model loader names a missing path and official weights it cannot serve. No Ray is started here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from fixtures_predict import TINY

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "pipelines"))

REFUSED = ("model.image_size=224 differs from the trained model's 64: a trained model's model.* settings are fixed; "
           "eval.* keys change how it is scored")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random checkpoint trained at 64 -> 56, with a threshold, and a few demo images beside it."""
    import torch

    from dinomaly import Dinomaly
    from dinomaly.checkpoint import save
    from dinomaly.config import load_config
    from dinomaly.data.demo import generate_demo_dataset

    base = tmp_path_factory.mktemp("settings")
    generate_demo_dataset(base / "demo", classes=["nut"], train_per_class=1, test_good_per_class=2,
                          test_defect_per_class=1, size=64)
    config = load_config(None, TINY)
    torch.manual_seed(0)
    return save(base / "checkpoint", Dinomaly(config.model), config, metadata={"thresholds": {"image_f1_optimal": 0.5}})


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setattr("dinomaly.distributed.cluster.ensure_ray", lambda *a, **k: pytest.fail("Ray started"))


def test_a_differing_model_setting_is_refused_and_an_equal_one_or_eval_key_is_not(checkpoint):
    from dinomaly.distributed.batch.scoring import load_bundle, refuse_model_changes

    with pytest.raises(ValueError) as err:  # alone: crop 392 of the defaults would not fit 224, still this message
        load_bundle(str(checkpoint), None, ["model.image_size=224"])
    assert str(err.value) == REFUSED
    with pytest.raises(ValueError, match="model.crop_size=112 differs from the trained model's 56"):
        load_bundle(str(checkpoint), None, ["model.image_size=64", "model.crop_size=112"])
    with pytest.raises(ValueError, match="model.encoder=vit_base_patch14_reg4_dinov2 differs from the trained "
                                         "model's vit_small_patch14_reg4_dinov2"):
        load_bundle(str(checkpoint), "demo", ["model.encoder=vit_base_patch14_reg4_dinov2"])
    with pytest.raises(ValueError, match="model.encoder_kwargs.depth=12 differs from the trained model's 10"):
        load_bundle(str(checkpoint), None, ["model.encoder_kwargs.depth=12"])
    bundle = load_bundle(str(checkpoint), None, ["model.image_size=64", "model.crop_size=56", "eval.resize=128"])
    assert (bundle.config.model.image_size, bundle.config.model.crop_size, bundle.config.eval.resize) == (64, 56, 128)
    # a serving check reads the model's config as a dict: its whole config, or an older checkpoint's model section
    info = json.loads((checkpoint / "config.json").read_text())
    for trained in (info, info["model"]):
        with pytest.raises(ValueError, match="differs from the trained model's 64"):
            refuse_model_changes(trained, ["serve.num_replicas=2", "model.image_size=224"])
        refuse_model_changes(trained, ["model.image_size=64"])


def test_evaluate_predict_export_and_calibrate_refuse_before_ray(checkpoint, tmp_path, capsys, no_ray):
    import calibrate as calibrate_cli
    import evaluate as evaluate_cli
    import export as export_cli
    import predict as predict_cli

    data = str(checkpoint.parent / "demo")
    for cli, args in [(evaluate_cli, ["--data", data]), (predict_cli, ["--data", data]),
                      (calibrate_cli, ["--data", data]), (export_cli, ["--format", "onnx"])]:
        rc = cli.main(["--model", str(checkpoint), "--output", str(tmp_path / cli.__name__), *args,
                       "--set", "model.image_size=224", "--set", "model.crop_size=224"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.count("\n") == 0 and REFUSED in err, (cli.__name__, err)


def test_serve_refuses_a_changed_model_setting(checkpoint, capsys, monkeypatch):
    import serve as serve_cli

    monkeypatch.setattr(serve_cli, "starts_local_ray", lambda: False)
    monkeypatch.setattr("dinomaly.distributed.serve.app.serve_until_stopped", lambda *a: pytest.fail("served"))
    rc = serve_cli.main(["--model", str(checkpoint), "--set", "model.image_size=224"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and REFUSED in err


def test_predict_resume_with_other_preprocessing_is_refused(checkpoint, tmp_path, monkeypatch):
    """run.json records image_size, crop_size and resize: rows of another preprocessing never join an output."""
    from dinomaly.distributed.batch.predict import RUN_FILE, predict
    from dinomaly.distributed.batch.scoring import load_bundle

    monkeypatch.setattr("dinomaly.distributed.resources.wait_for_batch_resources", lambda *a: None)
    output = tmp_path / "out"
    bundle = load_bundle(str(checkpoint))
    predict(None, bundle, bundle.config, [], str(output), 0.5)  # nothing to score: no actors needed
    recorded = json.loads((output / RUN_FILE).read_text())["preprocessing"]
    assert recorded == {"image_size": 64, "crop_size": 56, "resize": 256}
    predict(None, bundle, bundle.config, [], str(output), 0.5)  # the same run resumes
    other = load_bundle(str(checkpoint), None, ["eval.resize=128"])
    with pytest.raises(ValueError, match="holds results of another run .*'resize': 128"):
        predict(None, other, other.config, [], str(output), 0.5)


def test_model_loader_names_a_missing_path_and_official_weights(tmp_path):
    from dinomaly.config import Config
    from dinomaly.distributed.models import resolve_model

    with pytest.raises(FileNotFoundError, match="model 'nonexist' does not exist; fix the path"):
        resolve_model("nonexist", Config())
    weights = tmp_path / "dinomaly_vitb.pth"
    weights.write_bytes(b"not really")
    with pytest.raises(ValueError, match="looks like official Dinomaly weights, which carry no config or thresholds "
                                         "to serve with; fine-tune them into a checkpoint"):
        resolve_model(str(weights), Config())


def test_an_exported_model_refuses_a_changed_model_setting(checkpoint, monkeypatch):
    """An exported model.onnx carries its trained config in its metadata: the same rule, before its files load."""
    from dinomaly.checkpoint import load
    from dinomaly.config import to_dict
    from dinomaly.distributed.batch import scoring

    values = {"config": to_dict(load(checkpoint).config)}
    monkeypatch.setattr(scoring, "is_exported", lambda model: True)
    monkeypatch.setattr("dinomaly.export.read_metadata", lambda model: values)
    monkeypatch.setattr(scoring, "exported_files", lambda model: {})
    with pytest.raises(ValueError) as err:
        scoring.load_bundle("model.onnx", "demo", ["model.image_size=224", "model.crop_size=224"])
    assert str(err.value) == REFUSED
    assert scoring.load_bundle("model.onnx", None, ["model.crop_size=56"]).config.model.crop_size == 56


def test_serve_run_builder_refuses_a_changed_model_setting(checkpoint):
    import serve as serve_cli

    with pytest.raises(ValueError) as err:
        serve_cli.app({"model": str(checkpoint), "model.image_size": 224})
    assert str(err.value) == REFUSED
