"""Where outputs go, as printed and as refused: Ray's run folder on an object store keeps its scheme in the
end-of-run summary, and commands that write with local file APIs refuse an s3:// --output up front (no Ray,
no model: these fail in the entry point's checks)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from dinomaly.config import load_config

REPO = Path(__file__).resolve().parent.parent


def _pipeline(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_output_cli", REPO / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("path", "root", "expected"), [
    ("walk/runs/s3run/checkpoint_0000040", "s3://walk/runs", "s3://walk/runs/s3run/checkpoint_0000040"),
    ("walk/runs/s3run/checkpoint_0000040", "s3a://walk/runs", "s3://walk/runs/s3run/checkpoint_0000040"),
    ("bkt/sweeps/a/checkpoint_0000001", "gs://bkt/sweeps", "gs://bkt/sweeps/a/checkpoint_0000001"),
    ("s3://walk/runs/x/checkpoint_0000001", "s3://walk/runs", "s3://walk/runs/x/checkpoint_0000001"),
    ("/abs/runs/demo/checkpoint_0000040", "runs", "/abs/runs/demo/checkpoint_0000040"),
    (None, "s3://walk/runs", None),
])
def test_storage_uri_puts_back_the_object_store_scheme(path, root, expected):
    from dinomaly.distributed.train.progress import storage_uri

    assert storage_uri(path, root) == expected


def test_summary_prints_ray_run_folder_on_s3_with_its_scheme():
    """Ray reports an S3 checkpoint as bucket/key; the summary must not print it as a relative local path."""
    from dinomaly.distributed.train.progress import summary_lines
    from dinomaly.distributed.train.result import TrainResult

    config = load_config(None, ["output_root=s3://walk/runs", "name=s3run"])
    result = TrainResult(config=config, final_step=40, rows=[], thresholds=None,
                         checkpoint_uri="walk/runs/s3run/checkpoint_0000040", mlflow_run_id=None, model_version=None,
                         data_errors=None, output_dir=None)
    text = "\n".join(summary_lines(result))
    assert "(Ray's run folder: s3://walk/runs/s3run/checkpoint_0000040)" in text
    assert "checkpoint:       s3://walk/runs/s3run/checkpoint_0000040 " in text
    assert " walk/runs" not in text


def test_metrics_json_names_s3_checkpoints_with_their_scheme():
    """metrics.json's checkpoint_uri (the best one under train.keep_best, the last one beside it) is a full URI."""
    from types import SimpleNamespace

    from dinomaly.distributed.train.result import TrainResult

    config = load_config(None, ["output_root=s3://walk/runs", "name=s3run"])
    rows = [{"class": "mean", "image_auroc": 0.9}]
    log = SimpleNamespace(step_waits=[], train_s=0.0, best={
        "step": 20, "score": 0.9, "path": "walk/runs/s3run/best_checkpoint", "model_version": None,
        "rows": rows, "thresholds": None})
    result = TrainResult(config=config, final_step=40, rows=rows, thresholds=None,
                         checkpoint_uri="s3://walk/runs/s3run/checkpoint_0000040", mlflow_run_id=None,
                         model_version=None, data_errors=None, output_dir=None, log=log)
    record = result.metrics_record().to_dict()
    assert record["checkpoint_uri"] == "s3://walk/runs/s3run/best_checkpoint"
    assert record["last_checkpoint_uri"] == "s3://walk/runs/s3run/checkpoint_0000040"


@pytest.mark.parametrize(("name", "args"), [
    ("calibrate", ["--model", "unused", "--data", "unused"]),
    ("export", ["--model", "unused", "--format", "onnx"]),
    ("tune", []),
    ("train", []),
])
def test_local_only_outputs_refuse_s3_before_any_work(name, args, tmp_path, monkeypatch, capsys):
    """pathlib would turn s3://bucket/x into a local folder s3:/bucket/x; these commands refuse it instead."""
    monkeypatch.chdir(tmp_path)
    rc = _pipeline(name).main([*args, "--output", "s3://bucket/out"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "--output s3://bucket/out" in err and "local folder" in err
    assert list(tmp_path.iterdir()) == []  # no s3: folder
