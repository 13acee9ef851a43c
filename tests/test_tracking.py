"""MLflow tracking (real sqlite store), thresholds and the class split of evaluation.

No Ray here: the worker-side logger is exercised directly; tests/test_training.py checks a whole run.
"""

import math

import pytest
from PIL import Image

from dinomaly.config import Config, TrackingConfig, apply_overrides
from dinomaly.distributed.tracking import (
    RUN_NAME_TAG,
    NullRunLogger,
    RunLogger,
    close_run,
    default_artifact_location,
    open_run,
    resolve_tracking_uri,
    run_logger,
)
from dinomaly.distributed.train.evaluation import assign_classes
from dinomaly.thresholds import f1_optimal_threshold, normal_quantile_threshold


def test_tracking_uri_is_absolute_and_env_or_config_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(TrackingConfig(), cwd=tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///sub/x.db")
    assert resolve_tracking_uri(TrackingConfig(), cwd=tmp_path) == f"sqlite:///{tmp_path / 'sub' / 'x.db'}"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="http://127.0.0.1:5000")) == "http://127.0.0.1:5000"
    with pytest.raises(ValueError, match="no scheme"):
        resolve_tracking_uri(TrackingConfig(tracking_uri="mlruns"))
    assert default_artifact_location(f"sqlite:///{tmp_path}/m.db") == (tmp_path / "mlartifacts").as_uri()
    assert default_artifact_location("http://127.0.0.1:5000") is None


def tracked_config(uri: str) -> Config:
    return apply_overrides(Config(), {"name": "r1", "tracking.tracking_uri": uri, "tracking.experiment_name": "exp",
                                      "tracking.registered_model_name": "dino-test"})


def test_open_run_logs_params_and_reopens_an_unfinished_run(mlflow_uri):
    from mlflow import MlflowClient

    config = tracked_config(mlflow_uri)
    run_id = open_run(config, "r1")
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.data.params["train.batch_size"] == "16" and run.data.params["model.encoder"] == config.model.encoder
    assert run.data.params["git_commit"]
    assert run.data.tags[RUN_NAME_TAG] == "r1"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location == default_artifact_location(mlflow_uri)  # not inside a Ray session dir
    assert open_run(config, "r1") == run_id  # resumed Ray run: same MLflow run
    close_run(mlflow_uri, run_id, status="KILLED")  # stopped early: a resume continues it
    assert open_run(config, "r1") == run_id
    close_run(mlflow_uri, run_id)
    assert client.get_run(run_id).info.status == "FINISHED"
    newest = open_run(config, "r1")
    assert newest != run_id  # a finished run is never appended to
    assert open_run(config, "r1") == newest  # unfinished: re-opened
    assert open_run(config, "r1", reopen=False) not in (run_id, newest)  # the Ray run starts afresh: a new one


def test_run_logger_writes_metrics_artifacts_and_registers_the_checkpoint(mlflow_uri, tmp_path):
    from mlflow import MlflowClient

    config = tracked_config(mlflow_uri)
    run_id = open_run(config, "r1")
    assert isinstance(run_logger(config, run_id, rank=1), NullRunLogger)
    assert not isinstance(run_logger(config, run_id, rank=1), RunLogger)
    disabled = apply_overrides(config, {"tracking.enabled": False})
    assert not isinstance(run_logger(disabled, run_id, rank=0), RunLogger)
    tracker = run_logger(config, run_id, rank=0)
    tracker.log_steps([{"step": 5, "loss": 0.5, "lr": 1e-3}, {"step": 10, "loss": 0.25, "lr": 2e-3}])
    tracker.log_evaluation(10, {"nut": {"image_auroc": 0.75}, "mean": {"image_auroc": 0.8}})
    checkpoint = tmp_path / "ck"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    rows = [{"class": "nut", **{k: 0.5 for k in METRICS}}, {"class": "mean", **{k: 0.5 for k in METRICS}}]
    version = tracker.log_final(config, rows, Image.new("RGB", (8, 8)), checkpoint, {"threshold_image_f1_optimal": 0.3})
    client = MlflowClient(mlflow_uri)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(5, 0.5), (10, 0.25)]
    assert client.get_run(run_id).data.metrics["test/mean/image_auroc"] == 0.8
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "per_class.csv", "per_class.md",
                                                               "heatmaps.png", "checkpoint"}
    assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == ["checkpoint/model.safetensors"]
    registered = client.get_model_version("dino-test", version)
    assert registered.run_id == run_id and registered.source.endswith("/checkpoint")
    assert registered.tags["threshold_image_f1_optimal"] == "0.3"


METRICS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")


def test_f1_optimal_threshold_by_hand():
    # sorted: 0.9(1) 0.8(1) 0.4(0) 0.35(1) 0.2(0) 0.1(0); cut at 0.35: P = 3/4, R = 1 -> F1 = 6/7 (best)
    labels, scores = [0, 0, 1, 1, 0, 1], [0.1, 0.4, 0.35, 0.8, 0.2, 0.9]
    threshold, f1 = f1_optimal_threshold(labels, scores)
    assert threshold == 0.35 and f1 == pytest.approx(6 / 7)
    # tied scores are cut together: {0.5 (1), 0.5 (0)} can only be taken both or neither
    assert f1_optimal_threshold([1, 0, 0], [0.5, 0.5, 0.1]) == (0.5, pytest.approx(2 / 3))
    assert all(math.isnan(v) for v in f1_optimal_threshold([0, 0], [0.1, 0.2]))


def test_normal_quantile_threshold_uses_normal_images_only():
    assert normal_quantile_threshold([0, 1, 0, 0, 1], [0.1, 9.0, 0.4, 0.2, 8.0], 0.5) == pytest.approx(0.2)
    assert normal_quantile_threshold([0, 0], [0.1, 0.3], 1.0) == pytest.approx(0.3)
    assert math.isnan(normal_quantile_threshold([1], [0.5]))
    with pytest.raises(ValueError, match="quantile"):
        normal_quantile_threshold([0], [0.5], 0.0)


def test_assign_classes_balances_images_over_ranks():
    shares = assign_classes({"a": 10, "b": 9, "c": 5, "d": 4}, 2)
    assert sorted(sum(shares, [])) == ["a", "b", "c", "d"]
    assert shares == [["a", "d"], ["b", "c"]]  # 14 vs 14 images
    assert assign_classes({"a": 3}, 2) == [["a"], []]


def score_rows(value: float) -> list[dict]:
    return [{"class": "nut", **dict.fromkeys(METRICS, value)}, {"class": "mean", **dict.fromkeys(METRICS, value)}]


def test_keep_best_keeps_the_best_evaluation_through_a_fall_and_a_restore(tmp_path, mlflow_uri):
    """train.keep_best without Ray: the evaluations score 0.6, 0.9, 0.7; the step-4 model stays the best
    checkpoint (also after a restore from a checkpoint's metadata), is registered with checkpoint=best, and
    metrics.json describes it, in the one schema."""
    import pyarrow.fs as pafs
    from conftest import reference_model_config
    from mlflow import MlflowClient

    from dinomaly.calibration import ClassThreshold, ThresholdTable, stored_table
    from dinomaly.checkpoint import load
    from dinomaly.distributed.train.best import METADATA_KEY, BestKeeper, best_version_tags, evaluation_score
    from dinomaly.distributed.train.result import TrainResult
    from dinomaly.distributed.train.worker import WorkerLog
    from dinomaly.model.dinomaly import Dinomaly
    from dinomaly.results import validate_metrics

    config = apply_overrides(tracked_config(mlflow_uri), {"train.keep_best": True})
    config = Config(**{**vars(config), "model": reference_model_config()})
    model = Dinomaly(config.model)
    assert evaluation_score(score_rows(0.5)[-1], ["image_auroc", "pixel_aupro"]) == 0.5
    assert math.isnan(evaluation_score({"image_auroc": float("nan")}, ["image_auroc"]))
    keeper = BestKeeper(["image_auroc", "pixel_aupro"], (pafs.LocalFileSystem(), str(tmp_path / "run")))
    def calibrated(value):  # an evaluation's thresholds with its per-class table (one class: nut at value)
        table = ThresholdTable(ClassThreshold(value, "calibration", 0.01), {"nut": ClassThreshold(value, "calibration")})
        return {"image_f1_optimal": value, "calibration": table.to_dict()}

    kept = [keeper.consider(step, score_rows(value), calibrated(value), model, config)
            for step, value in ((2, 0.6), (4, 0.9), (6, 0.7))]
    assert kept == [True, True, False] and (keeper.best.step, keeper.best.score) == (4, 0.9)
    saved = load(tmp_path / "run" / "best_checkpoint")
    assert saved.metadata["step"] == 4 and saved.metadata["metrics"]["mean"]["image_auroc"] == 0.9
    # the best checkpoint decides with its own evaluation's per-class table, as the last one does
    assert stored_table(saved.metadata).for_class("nut")[1].threshold == 0.9
    tags = best_version_tags(keeper.best, config.name)
    assert (tags["checkpoint"], tags["step"], tags["threshold_image_f1_optimal"]) == ("best", 4, 0.9)
    assert stored_table({}, tags).for_class("nut")[1].threshold == 0.9
    restored = BestKeeper(["image_auroc", "pixel_aupro"], (pafs.LocalFileSystem(), str(tmp_path / "run")))
    restored.restore({METADATA_KEY: keeper.best.to_dict()})
    assert not restored.consider(8, score_rows(0.8), None, model, config) and restored.best.step == 4

    tracker = run_logger(config, open_run(config, "r1"), rank=0)
    version = tracker.log_checkpoint(keeper.download(str(tmp_path / "down")), "best_checkpoint", tags)
    registered = MlflowClient(mlflow_uri).get_model_version("dino-test", version)
    assert registered.source.endswith("/best_checkpoint") and registered.tags["step"] == "4"
    assert stored_table({}, registered.tags).for_class("nut")[1].threshold == 0.9

    keeper.best.model_version = version
    log = WorkerLog(start_step=0, final_step=6, rows=score_rows(0.7), best=keeper.best.to_dict())
    result = TrainResult(config=config, final_step=6, rows=log.rows, thresholds={"image_f1_optimal": 0.7},
                         checkpoint_uri="/runs/r1/checkpoint_0000006", mlflow_run_id=None, model_version="1",
                         data_errors=None, output_dir=None, log=log)
    record = result.metrics_record().to_dict()
    validate_metrics(record)
    assert (record["describes"], record["step"], record["final_step"], record["mean"]["image_auroc"]) == (
        "best", 4, 6, 0.9)
    assert record["checkpoint_uri"] == str(tmp_path / "run" / "best_checkpoint") and record["model_version"] == version
    assert record["last_checkpoint_uri"] == "/runs/r1/checkpoint_0000006" and record["last_model_version"] == "1"


def test_a_sweep_winner_already_registered_is_found_not_registered_again(mlflow_uri):
    """tune.py --resume of a finished sweep ranks the same winner again: its version is reused."""
    from mlflow import MlflowClient

    from dinomaly.distributed.tune.tracking import _holds_alias, _registered_before

    client = MlflowClient(mlflow_uri)
    run_id = client.create_run(client.create_experiment("sweeps")).info.run_id
    best = {"trial_id": "t1", "best_step": 30}
    assert _registered_before(client, "swept", run_id, best) is None  # no such model yet
    client.create_registered_model("swept")
    version = client.create_model_version("swept", source="/x", run_id=run_id,
                                          tags={"trial_id": "t1", "step": "30"}).version
    assert _registered_before(client, "swept", run_id, best) == str(version)
    assert _registered_before(client, "swept", run_id, {**best, "best_step": 45}) is None
    assert _registered_before(client, "swept", run_id, {**best, "trial_id": "t2"}) is None
    assert not _holds_alias(client, "swept", "champion", str(version))
    client.set_registered_model_alias("swept", "champion", version)
    assert _holds_alias(client, "swept", "champion", str(version)) and not _holds_alias(client, "swept", "", "1")


def test_a_wrong_registry_name_lists_the_models_and_aliases_there(mlflow_uri):
    from mlflow import MlflowClient

    from dinomaly.config import load_config
    from dinomaly.distributed.models import resolve_model

    config = load_config("demo", {"tracking.tracking_uri": mlflow_uri})
    with pytest.raises(ValueError, match="it holds no registered models yet"):
        resolve_model("models:/dinomaly@champion", config)
    client = MlflowClient(mlflow_uri)
    client.create_registered_model("dinomaly-demo")
    version = client.create_model_version("dinomaly-demo", source="/x").version
    client.set_registered_model_alias("dinomaly-demo", "champion", version)
    client.create_registered_model("other")
    with pytest.raises(ValueError, match=r"it holds dinomaly-demo \(@champion\), other; see"):
        resolve_model("models:/dinomaly@champion", config)
