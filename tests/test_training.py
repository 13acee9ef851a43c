"""Ray Train end to end on a real local cluster: reference trajectory, DDP equivalence, resume, worker loss, MLflow.

Every fit costs 10-20 s on 2 cores, so each module fixture runs one fit and several tests read it.
The models are the reference's tiny ViT (width 32) at 84 px (trajectory) or 28 px (generated data).
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import check_trajectory, reference_model_config
from safetensors.torch import load

from dinomaly.calibration import ThresholdTable
from dinomaly.config import Config, DataConfig, EvalConfig, TrackingConfig, TrainConfig
from dinomaly.distributed.train.run import train
from dinomaly.results import validate_metrics

pytestmark = pytest.mark.slow
TRAJECTORY_STEPS = (1, 5, 10, 20, 30)
KILL_AT_STEP = 10  # a checkpoint step of tracked_run (checkpoint_every=10)


def trajectory_config(root: Path, name: str, workers: int, checkpoint_every: int = 5) -> Config:
    """The reference loop of trajectory.pt (60-step schedule, 5 warm-up, batch 4, dropout 0) on Ray."""
    train_config = TrainConfig(total_steps=60, warmup_steps=5, batch_size=4, num_workers=workers, log_every=5,
                               checkpoint_every=checkpoint_every, keep_checkpoints=0, max_failures=0)
    return Config(name=name, output_root=str(root), model=reference_model_config(bottleneck_dropout=0.0),
                  train=train_config, tracking=TrackingConfig(enabled=False))


def checkpoint_params(root: Path | str, name: str, step: int) -> dict[str, torch.Tensor]:
    """Trainable tensors of the checkpoint a run reported at `step` (local folder or s3:// storage)."""
    from dinomaly.data.storage import filesystem_for

    filesystem, base = filesystem_for(str(root))
    with filesystem.open_input_file(f"{base}/{name}/checkpoint_{step:07d}/model.safetensors") as handle:
        weights = load(handle.read())
    return {k: v for k, v in weights.items() if k.startswith(("bottleneck.", "decoder."))}


# --------------------------------------------------------------------------- issue 9: trajectory through Ray Train


@pytest.fixture(scope="module")
def trajectory_runs(ray_session, moto_s3, reference_dir, trajectory, tmp_path_factory):
    """Three fits on the 30 stored batches, all started with init_from = official_checkpoint.pth: two workers
    (2 + 2 images per step) straight; one worker stopped after 10 steps, then resumed (that run keeps its
    checkpoints in S3: moto's server on 127.0.0.1). Each fit costs 10-20 s, so one worker straight through is
    not run again: the stopped and resumed run must follow the same reference trajectory step by step."""
    root = tmp_path_factory.mktemp("trajectory")
    bucket_root = moto_s3.uri(f"ray-{root.name}")
    batches = [b.float() for b in trajectory["images"]]
    official = str(reference_dir / "official_checkpoint.pth")
    runs = {"two": train(trajectory_config(root, "two", 2), init_from=official, batches=batches, stop_at_step=30)}
    interrupted = trajectory_config(bucket_root, "resumed", 1, checkpoint_every=1)
    runs["first_10"] = train(interrupted, init_from=official, batches=batches, stop_at_step=10)
    # same name and storage = resume; init_from is ignored once the run has a checkpoint
    runs["last_20"] = train(trajectory_config(bucket_root, "resumed", 1), init_from=official, batches=batches,
                            stop_at_step=30)
    return root, bucket_root, runs


def test_one_worker_follows_the_reference_trajectory_from_official_weights(trajectory_runs, trajectory):
    """Also the --init-from check: step 1 (lr 0, p 0) of a run started from the official .pth has the reference
    loss. Steps 1-10 come from the first fit, 11-30 from the resumed one: together, one run's 30 steps."""
    _, bucket_root, runs = trajectory_runs
    records = runs["first_10"].log.records + runs["last_20"].log.records
    assert records[0]["loss"] == pytest.approx(trajectory["loss"][0], abs=1e-6, rel=0)
    check_trajectory(records, {s: checkpoint_params(bucket_root, "resumed", s) for s in (5, 10, 20, 30)}, trajectory)
    assert runs["last_20"].final_step == 30


def test_two_workers_with_global_hard_mining_follow_the_reference_trajectory(trajectory_runs, trajectory):
    """Each worker holds 2 of the 4 images: global threshold + DDP mean + clip of the all-reduced gradient."""
    root, _, runs = trajectory_runs
    log = runs["two"].log
    check_trajectory(log.records, {s: checkpoint_params(root, "two", s) for s in (5, 10, 20, 30)}, trajectory)
    assert len(log.param_digests) == 2 and len(set(log.param_digests)) == 1  # ranks agree exactly


def test_interrupted_after_10_and_resumed_continues_where_it_stopped(trajectory_runs, trajectory):
    _, bucket_root, runs = trajectory_runs
    first, last = runs["first_10"].log, runs["last_20"].log
    assert runs["first_10"].checkpoint_uri.startswith(f"{bucket_root}/")  # checkpoints in S3, a full s3:// URI
    assert first.final_step == 10 and last.start_step == 10 and last.final_step == 30
    # no step lost or repeated; restored optimiser / schedule: steps 11-30 within the trajectory's tolerances
    check_trajectory(first.records, {s: checkpoint_params(bucket_root, "resumed", s) for s in (1, 5, 10)},
                     trajectory)
    check_trajectory(last.records, {s: checkpoint_params(bucket_root, "resumed", s) for s in (20, 30)},
                     trajectory, first_step=11)


# --------------------------------------------------------------------------- issue 4: equivalence on image data


def data_config(root: Path, demo_root: Path, name: str, workers: int, steps: int, **train) -> Config:
    """The tiny reference model at 28 px on the generated demo classes; no MLflow unless asked."""
    train_config = TrainConfig(**{**dict(total_steps=steps, warmup_steps=2, batch_size=8, num_workers=workers,
                                         log_every=2, checkpoint_every=steps, keep_checkpoints=0, max_failures=0,
                                         hard_mining_ramp_steps=10), **train})
    return Config(name=name, output_root=str(root), model=reference_model_config(image_size=28, crop_size=28),
                  data=DataConfig(root=str(demo_root), layout="mvtec"), train=train_config,
                  eval=EvalConfig(resize=32, batch_size=8), tracking=TrackingConfig(enabled=False))


def one_process_reference(config: Config, steps: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """What one worker with the whole batch of 8 computes: the same model init, data order and loop, no Ray
    (the 1-worker Ray path equals this loop exactly: see the trajectory tests above)."""
    import itertools

    from dinomaly.data.manifest import load_manifest, select
    from dinomaly.distributed.train.batches import ManifestBatches
    from dinomaly.distributed.train.run import prepare_config
    from dinomaly.loop import seed_everything, train_steps
    from dinomaly.model.dinomaly import Dinomaly

    config = prepare_config(config)
    seed_everything(config.train.seed)
    model = Dinomaly(config.model)
    batches = ManifestBatches(select(load_manifest(config.data), split="train"), config).iterate(0, 1, 0)
    records, _ = train_steps(model, itertools.islice(batches, steps), config)
    return records, {n: p.detach().clone() for n, p in model.named_parameters()
                     if n.startswith(("bottleneck.", "decoder."))}


def test_two_workers_of_4_equal_one_worker_of_8_in_deterministic_mode(ray_session, demo_root, tmp_path):
    """Same images per step (manifest order, each rank its half of the global 8): losses within 1e-6 and
    parameters after 6 steps within abs 5e-6 + 5e-7 * step (the trajectory bound: only the order of float
    sums differs)."""
    config = data_config(tmp_path, demo_root, "w2", 2, 6, deterministic=True)
    two = train(config)
    records, one = one_process_reference(config, 6)
    assert [r["loss"] for r in two.log.records] == pytest.approx([r["loss"] for r in records], abs=1e-6)
    distributed = checkpoint_params(tmp_path, "w2", 6)
    for name, value in one.items():
        torch.testing.assert_close(distributed[name], value, rtol=0, atol=5e-6 + 5e-7 * 6, msg=name)
    assert records[-1]["lr"] > 0 and records[-1]["loss"] < records[0]["loss"]  # the parameters did move


# --------------------------------------------------------------------------- worker loss, DDP, MLflow, outputs


@pytest.fixture(scope="module")
def tracked_run(ray_session, demo_root, mlflow_template, tmp_path_factory):
    """2 workers on Ray Data shards, MLflow on; rank 1 is SIGKILLed while it holds right after the step-10 checkpoint."""
    import shutil

    root = tmp_path_factory.mktemp("tracked")
    shutil.copyfile(mlflow_template, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    data = shutil.copytree(demo_root, root / "data")
    sorted((data / "nut" / "train" / "good").iterdir())[-1].write_bytes(b"")  # one unreadable training file
    config = data_config(root, data, "tracked", 2, 40, checkpoint_every=10, eval_every=20, log_every=5,
                         max_failures=1, keep_checkpoints=2, data_source="ray_data")
    config = Config(**{**vars(config), "tracking": TrackingConfig(tracking_uri=uri, experiment_name="t",
                                                                  registered_model_name="dino-t", heatmap_images=2)})
    status = root / "status"
    status.mkdir()
    (status / f"hold-rank1-step{KILL_AT_STEP}").touch()  # rank 1 waits there (training.TrainJob.status_dir)
    outcome, errors = {}, []

    def fit():
        try:
            outcome["run"] = train(config, output_dir=root / "out", status_dir=str(status))
        except BaseException as err:  # noqa: BLE001 - re-raised in the test thread
            errors.append(err)

    thread = threading.Thread(target=fit)
    thread.start()
    try:
        killed = kill_held_worker(status, 1, KILL_AT_STEP, root / "tracked" / "checkpoint_manager_snapshot.json",
                                  thread)
    finally:  # if the kill did not happen, let the worker go on rather than hold the run forever
        (status / f"hold-rank1-step{KILL_AT_STEP}.held").unlink(missing_ok=True)
    thread.join(timeout=600)
    if errors:
        raise errors[0]
    return config, outcome["run"], killed, json.loads((status / "rank1.json").read_text())


def kill_held_worker(status_dir: Path, rank: int, step: int, snapshot: Path, thread: threading.Thread,
                     timeout_s: float = 600) -> dict:
    """SIGKILL the worker of `rank` while it holds after reporting `step` (it has claimed the file
    hold-rank<r>-step<s>), once Ray has registered that step's checkpoint in the controller's snapshot: a
    worker that dies before the controller has collected its report takes that checkpoint with it. The
    worker waits until it is killed, and its DDP peer cannot pass the next step without it, so both
    conditions stay true once met and the kill lands at `step` however slowly the machine runs.
    Returns the status the worker was killed with."""
    held = status_dir / f"hold-rank{rank}-step{step}.held"
    checkpoint = f"checkpoint_{step:07d}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and thread.is_alive():
        if held.exists() and snapshot.exists() and checkpoint in snapshot.read_text():
            status = json.loads((status_dir / f"rank{rank}.json").read_text())
            os.kill(status["pid"], signal.SIGKILL)
            return status
        time.sleep(0.1)
    pytest.fail(f"the run ended (or {timeout_s} s passed) before rank {rank} held at step {step} with "
                f"{checkpoint} registered in {snapshot}")


def test_a_killed_worker_without_retries_fails_the_run_clearly(ray_session, trajectory, tmp_path):
    """train.max_failures=0: SIGKILL of rank 1 (held after step 1) ends the run with Ray Train's worker-group
    error naming the lost worker, and no output folder is written."""
    import ray.train

    config = trajectory_config(tmp_path, "no-retries", 2)  # max_failures=0
    status = tmp_path / "status"
    status.mkdir()
    (status / "hold-rank1-step1").touch()
    errors = []

    def fit():
        try:
            train(config, batches=[b.float() for b in trajectory["images"]], stop_at_step=30,
                  output_dir=tmp_path / "out", status_dir=str(status))
        except BaseException as err:  # noqa: BLE001 - checked in the test thread
            errors.append(err)

    thread = threading.Thread(target=fit)
    thread.start()
    held, deadline = status / "hold-rank1-step1.held", time.monotonic() + 300
    while not held.exists() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert held.exists(), "rank 1 never held after step 1"
        os.kill(json.loads((status / "rank1.json").read_text())["pid"], signal.SIGKILL)
    finally:
        held.unlink(missing_ok=True)
    thread.join(timeout=300)
    assert not thread.is_alive() and len(errors) == 1, errors
    assert isinstance(errors[0], ray.train.WorkerGroupError), repr(errors[0])
    # the killed rank is named; rank 0 may be too (its all-reduce with the dead peer breaks)
    assert 1 in errors[0].worker_failures and set(errors[0].worker_failures) <= {0, 1}
    assert "Training failed due to worker errors" in str(errors[0]) and "actor died unexpectedly" in str(errors[0])
    assert not (tmp_path / "out").exists()


def test_killed_worker_restores_from_the_last_checkpoint_and_finishes(tracked_run):
    config, run, killed, status_after = tracked_run
    assert killed["step"] == KILL_AT_STEP and status_after["pid"] != killed["pid"]  # a new process finished
    assert status_after["step"] == 40
    assert run.log.start_step == KILL_AT_STEP  # restored from the step-10 checkpoint, not from scratch
    assert run.final_step == 40
    assert [r["step"] for r in run.log.records] == list(range(KILL_AT_STEP + 1, 41))  # none lost or repeated


def test_ddp_ranks_hold_identical_parameters_and_loss_falls(tracked_run):
    config, run, _, _ = tracked_run
    from mlflow import MlflowClient

    assert len(run.log.param_digests) == 2 and len(set(run.log.param_digests)) == 1
    history = MlflowClient(config.tracking.tracking_uri).get_metric_history(run.mlflow_run_id, "loss")
    by_step = {m.step: m.value for m in history}  # a step logged twice (after the restart) keeps its last value
    assert min(by_step) == 1 and by_step[40] < 0.5 * by_step[1]


def test_mlflow_run_has_params_metrics_artifacts_and_a_registered_version(tracked_run):
    from mlflow import MlflowClient

    config, run, _, _ = tracked_run
    client = MlflowClient(config.tracking.tracking_uri)
    logged = client.get_run(run.mlflow_run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.params["train.num_workers"] == "2" and logged.data.params["model.crop_size"] == "28"
    assert "git_commit" in logged.data.params
    for key in ("loss", "lr", "p", "grad_norm", "images_per_s", "data_wait_fraction", "test/mean/image_auroc",
                "test/nut/pixel_aupro", "test/weave/image_f1_max"):
        assert key in logged.data.metrics, key
    assert {m.step for m in client.get_metric_history(run.mlflow_run_id, "test/mean/pixel_auroc")} == {20, 40}
    artifacts = {a.path for a in client.list_artifacts(run.mlflow_run_id)}
    assert {"config.yaml", "per_class.csv", "per_class.md", "heatmaps.png", "checkpoint"} <= artifacts
    version = client.get_model_version("dino-t", run.model_version)
    assert version.run_id == run.mlflow_run_id and version.source.endswith("/checkpoint")
    assert float(version.tags["threshold_image_f1_optimal"]) == run.thresholds["image_f1_optimal"]
    assert json.loads(version.tags["calibration"]) == run.thresholds["calibration"]  # the per-class table
    assert "threshold_image_normal_quantile" in version.tags and "mean_image_auroc" in version.tags


def test_unreadable_training_file_is_counted_in_summary_metrics_json_and_mlflow(tracked_run):
    from mlflow import MlflowClient

    config, run, _, _ = tracked_run
    errors = run.data_errors
    assert errors["data_errors"] == 1 and errors["error_files"][0][0].endswith(".png")
    assert json.loads((run.output_dir / "metrics.json").read_text())["data_errors"]["data_errors"] == 1
    assert MlflowClient(config.tracking.tracking_uri).get_run(run.mlflow_run_id).data.metrics["data_errors"] == 1


def test_outputs_hold_checkpoint_config_and_metrics_with_thresholds(tracked_run):
    from dinomaly.checkpoint import load
    from dinomaly.metrics import METRIC_NAMES

    config, run, _, _ = tracked_run
    out = run.output_dir
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["job"] == "train" and set(metrics["classes"]) == {"nut", "pill", "weave", "wood"}
    assert all(set(m) == set(METRIC_NAMES) for m in [*metrics["classes"].values(), metrics["mean"]])
    thresholds = metrics["thresholds"]
    assert thresholds["normal_quantile"] == 0.99 and set(thresholds["per_class"]) == {"nut", "pill", "weave", "wood"}
    assert metrics["step"] == 40 and metrics["mlflow_run_id"] == run.mlflow_run_id
    validate_metrics(metrics)  # the one metrics.json schema (dinomaly/metrics.schema.json)
    assert metrics["schema_version"] == 1 and metrics["describes"] == "last"
    loaded = load(out / "checkpoint")
    assert loaded.metadata["step"] == 40 and loaded.metadata["thresholds"] == thresholds
    # 6 training images a class are too few to hold any back: thresholds at the target FPR from the test
    # split's normals, marked so, and checked against the test split beside the test-tuned F1-optimal ones
    table = ThresholdTable.from_dict(loaded.metadata["calibration"])
    assert table.to_dict() == thresholds["calibration"] and set(table.classes) == {"nut", "pill", "weave", "wood"}
    assert {e.source for e in table.classes.values()} == {"test-normals"} and thresholds["target_fpr"] == 0.01
    for name, row in thresholds["decisions"].items():
        assert row["test_fpr"] == 0.0 and row["test_images"] == (6 if name != "global" else 24)
        assert row["test_tuned"]["threshold"] == (thresholds["per_class"][name]["image_f1_optimal"]
                                                  if name != "global" else thresholds["image_f1_optimal"])
    assert loaded.train_state["step"] == 40
    assert (out / "config.yaml").exists()


def test_separate_setting_trains_one_model_per_class_in_parallel_runs(ray_session, demo_root, tmp_path):
    base = data_config(tmp_path, demo_root, "sep", 1, 3, setting="separate", batch_size=4, calibration_share=0.2,
                       calibration_min_images=2)  # 2 of each class's 6 training images held back
    config = Config(**{**vars(base), "data": DataConfig(root=str(demo_root), layout="mvtec",
                                                        categories=["nut", "weave"])})
    outcome = train(config, output_dir=tmp_path / "out")
    assert sorted(c.name for c in outcome.children) == ["sep-nut", "sep-weave"]
    from dinomaly.checkpoint import load

    for name in ("nut", "weave"):
        loaded = load(tmp_path / "out" / name / "checkpoint")
        assert loaded.config.data.categories == [name] and loaded.metadata["step"] == 3
        assert set(loaded.metadata["metrics"]) == {name, "mean"}  # evaluated on its own class only
        held = ThresholdTable.from_dict(loaded.metadata["calibration"]).classes[name]
        assert (held.source, held.n_images, held.target_fpr) == ("calibration", 2, 0.01)
        assert held.interval[0] <= held.threshold <= held.interval[1]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["setting"] == "separate" and set(metrics["classes"]) == {"nut", "weave"}
    validate_metrics(metrics)
    assert set(metrics["mean"]) == set(outcome.mean) and outcome.mean
