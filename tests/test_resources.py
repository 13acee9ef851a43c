"""Bounded waits for cluster resources (cluster.start_timeout_s), with the holders named.

Against the session's 4-CPU cluster: a request larger than the cluster fails at once; one blocked by an
actor holding CPUs waits, says so, and fails after a few seconds naming that actor, then succeeds once it
is gone; the same for a real training run, for Ray Train's own (now bounded) start-up retries, for a Serve
app as the holder, and for a Tune trial, which is ranked failed with the reason while the sweep finishes.
Every test releases what it holds (actors killed, Serve shut down) in `finally`.
"""

import json
import os

import pytest
import torch
from conftest import reference_model_config
from fixtures_ray import _free_port

from dinomaly.config import Config, TrackingConfig, TrainConfig, load_config
from dinomaly.distributed import holders as holders_module
from dinomaly.distributed import resources
from dinomaly.distributed.holders import holders
from dinomaly.distributed.resources import (
    Request,
    ResourcesUnavailable,
    bound_train_start,
    check_resources,
    train_request,
)


def cpu_request(workers: int, cpus: float = 1.0, gpus: float = 0.0) -> Request:
    config = load_config("demo", {"name": "probe", "train.num_workers": workers, "train.batch_size": 8 * workers})
    per_worker = {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}
    return train_request(config, per_worker)


# --------------------------------------------------------------------------- without Ray


def test_a_request_says_what_it_needs_in_numbers():
    assert cpu_request(2).needs() == "train run 'probe' needs 2 workers x 1 CPU (2 CPU)"
    assert cpu_request(1, 0.5, 1.0).needs() == "train run 'probe' needs 1 worker x (0.5 CPU, 1 GPU) (0.5 CPU, 1 GPU)"
    config = load_config("demo", {"eval.actors": 2, "eval.gpus_per_actor": 1.0})
    batch = resources.batch_request(config, "evaluate")
    assert batch.needs() == "evaluate needs 2 model actors x (1 CPU, 1 GPU) + 1 CPU reading images (3 CPU, 2 GPU)"
    serve = resources.serve_request(load_config("demo", {"serve.num_replicas": 3, "serve.num_cpus": 0.5}), "app")
    assert serve.needs() == "Serve app 'app' needs 3 replicas x 0.5 CPU (1.5 CPU)"
    assert serve.placeable() == [{"CPU": 0.5}] * 3  # the zero GPU amount is not sent to Ray


def test_ray_train_start_up_retries_are_bounded_by_the_timeout(monkeypatch):
    """Per-attempt wait (Ray Train's env variable) x (retries + 1) stays within cluster.start_timeout_s."""
    monkeypatch.delenv(resources.TRAIN_START_TIMEOUT_ENV, raising=False)
    monkeypatch.setattr(resources, "_train_timeout_set", None)
    assert bound_train_start(600) == 2 and os.environ[resources.TRAIN_START_TIMEOUT_ENV] == "200"
    assert bound_train_start(3) == 2 and os.environ[resources.TRAIN_START_TIMEOUT_ENV] == "1"  # ours: replaced
    assert bound_train_start(0) == -1 and resources.TRAIN_START_TIMEOUT_ENV not in os.environ  # forever: Ray's
    monkeypatch.setenv(resources.TRAIN_START_TIMEOUT_ENV, "60")  # the user's own per-attempt wait is kept
    assert bound_train_start(600) == 9 and os.environ[resources.TRAIN_START_TIMEOUT_ENV] == "60"
    assert bound_train_start(30) == 0


def test_naming_the_holders_never_raises(monkeypatch):
    def broken():
        raise RuntimeError("state store down")

    monkeypatch.setattr(holders_module, "_with_state_api", broken)
    monkeypatch.setattr(holders_module, "_without_state_api", broken)
    monkeypatch.setattr("ray.is_initialized", lambda: True)
    assert holders() == ["(holders unknown: RuntimeError: state store down)"]


# --------------------------------------------------------------------------- the session cluster


@pytest.fixture
def hold_cpus(ray_session):
    """hold_cpus(n): an actor that keeps n CPUs until killed (all are killed after the test)."""
    import ray

    @ray.remote
    class Holder:
        def ready(self) -> bool:
            return True

    held = []

    def hold(cpus: float):
        actor = Holder.options(num_cpus=cpus).remote()
        ray.get(actor.ready.remote())
        held.append(actor)
        return actor

    try:
        yield hold
    finally:
        for actor in held:
            ray.kill(actor)


@pytest.mark.slow
@pytest.mark.parametrize("workers, gpus, why", [
    (8, 0.0, "which never fits: the cluster has 4 CPU in all"),
    (1, 1.0, "which never fits: the cluster has 0 GPU in all"),
])
def test_a_request_larger_than_the_cluster_fails_at_once(ray_session, workers, gpus, why):
    notes = []
    with pytest.raises(ResourcesUnavailable) as caught:
        check_resources(cpu_request(workers, gpus=gpus), timeout_s=600, on_progress=notes.append)
    assert caught.value.never_fits and why in str(caught.value)
    assert "lower --workers" in str(caught.value)
    assert notes == []  # it did not wait


@pytest.mark.slow
def test_a_blocked_request_waits_names_the_holder_and_fits_once_it_is_gone(ray_session, hold_cpus):
    import ray

    holder = hold_cpus(3)
    notes = []
    with pytest.raises(ResourcesUnavailable) as caught:
        check_resources(cpu_request(2), timeout_s=2, on_progress=notes.append)
    message = str(caught.value)
    assert not caught.value.never_fits
    assert message.startswith("train run 'probe' needs 2 workers x 1 CPU (2 CPU); the cluster has 4 CPU, 1 free; "
                              "held by: actor Holder (3 CPU)")
    assert "still not free after 2 s (cluster.start_timeout_s)" in message
    assert len(notes) == 1 and notes[0].startswith("waiting for resources: train run 'probe' needs 2 workers")
    assert "actor Holder (3 CPU)" in notes[0]
    # without the State API only unnamed numbers are left, and it says so
    fallback = holders_module._without_state_api()
    assert fallback[-1].startswith("actors or tasks whose names are unavailable") and fallback[-1].endswith("(3 CPU)")
    ray.kill(holder)
    check_resources(cpu_request(2), timeout_s=60, on_progress=notes.append)  # freed asynchronously: a short wait
    probes = [g for g in ray.util.placement_group_table().values()
              if (g.get("name") or "").startswith(holders_module.PROBE_PREFIX) and g["state"] != "REMOVED"]
    assert probes == []  # the reservation that waited is given back


@pytest.mark.slow
def test_a_serve_app_holding_the_cpus_is_named_with_its_replicas(ray_session):
    from ray import serve

    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 1.5})
    class Tiny:
        def __call__(self, request) -> str:
            return "ok"

    try:
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
        serve.run(Tiny.bind(), name="tiny", route_prefix="/tiny")
        with pytest.raises(ResourcesUnavailable) as caught:
            check_resources(cpu_request(2), timeout_s=1, on_progress=lambda note: None)
        assert "the cluster has 4 CPU, 1 free; held by: Serve app 'tiny' (2 replicas, 3 CPU)" in str(caught.value)
        assert "Serve app 'tiny' (2 replicas)" in holders_module._without_state_api()
    finally:
        serve.shutdown()


def tiny_run(root, name: str, timeout_s: float) -> Config:
    """One worker, the reference's tiny model at 28 px, 2 steps on fixed batches, no MLflow."""
    config = Config(name=name, output_root=str(root), model=reference_model_config(image_size=28, crop_size=28),
                    train=TrainConfig(total_steps=2, warmup_steps=0, batch_size=2, num_workers=1, log_every=1,
                                      checkpoint_every=0, keep_checkpoints=0, max_failures=0),
                    tracking=TrackingConfig(enabled=False))
    config.cluster.start_timeout_s = timeout_s
    return config


TINY_BATCHES = [torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(2)]


@pytest.mark.slow
def test_a_training_run_fails_within_the_bound_naming_the_holder_then_runs(ray_session, hold_cpus, tmp_path):
    import ray

    from dinomaly.distributed.train.run import train

    holder = hold_cpus(3.5)  # 0.5 CPU free: the run's 1 CPU fits the cluster, not now
    with pytest.raises(ResourcesUnavailable) as caught:
        train(tiny_run(tmp_path, "blocked", 3), batches=TINY_BATCHES)
    message = str(caught.value)
    assert message.startswith("train run 'blocked' needs 1 worker x 1 CPU (1 CPU); the cluster has 4 CPU, 0.5 free; "
                              "held by: actor Holder (3.5 CPU)")
    assert "still not free after 3 s" in message and "lower --workers" in message
    ray.kill(holder)
    outcome = train(tiny_run(tmp_path, "freed", 60), batches=TINY_BATCHES)
    assert outcome.final_step == 2


@pytest.mark.slow
def test_ray_trains_own_start_up_wait_is_bounded(ray_session, hold_cpus, tmp_path, monkeypatch):
    """Resources taken after the check (simulated: no check): Train's retries end within the bound, and the
    error is ours, with the numbers and the holder, not an endless 'worker group startup timed out'."""
    import ray.train

    from dinomaly.distributed.train import run as launch

    monkeypatch.setattr(launch, "check_resources", lambda *args, **kwargs: None)
    monkeypatch.delenv(resources.TRAIN_START_TIMEOUT_ENV, raising=False)
    hold_cpus(3.5)
    with pytest.raises(ResourcesUnavailable) as caught:
        launch.train(tiny_run(tmp_path, "late-loss", 3), batches=TINY_BATCHES)
    assert isinstance(caught.value.__cause__, ray.train.TrainingFailedError)
    message = str(caught.value)
    assert "Ray Train could not place its workers within 3 s (cluster.start_timeout_s)" in message
    assert "held by: actor Holder (3.5 CPU)" in message


@pytest.mark.slow
def test_a_tune_trial_that_cannot_be_placed_in_time_fails_with_the_reason(ray_session, hold_cpus, tmp_path,
                                                                           demo_root):
    """Two trials: 1 CPU per worker fits beside the 1.5 held CPUs, 3.5 fits the cluster but not now. The second
    is ranked failed with the numbers and the holder; the first completes; run_sweep returns."""
    from dinomaly.distributed.train.run import prepare_config
    from dinomaly.distributed.tune.sweep import run_sweep

    values = {"name": "blocked-sweep", "output_root": str(tmp_path / "runs"), "data.root": str(demo_root),
              "model.image_size": 64, "model.crop_size": 56, "train.batch_size": 4, "train.total_steps": 2,
              "train.warmup_steps": 1, "train.hard_mining_ramp_steps": 2, "train.log_every": 1,
              "tune.evaluations": 1, "tune.grace_period": 1, "tune.scheduler": "fifo", "tune.num_samples": 1,
              "tune.max_concurrent_trials": 2, "tune.feature_cache": False, "tracking.enabled": False,
              "tune.search_space": {"train.cpus_per_worker": "grid(1.0, 3.5)"}, "cluster.start_timeout_s": 3}
    config = prepare_config(load_config("demo", values))
    hold_cpus(1.5)
    outcome = run_sweep(config, output_dir=tmp_path / "results")
    rows = {json.loads(row["config/train.cpus_per_worker"]): row for row in outcome.rows}
    assert rows[1.0]["status"] == "completed" and rows[3.5]["status"] == "failed"
    reason = rows[3.5]["error"]
    assert "needs 1 worker x 3.5 CPU (3.5 CPU); the cluster has 4 CPU" in reason
    assert "actor Holder (1.5 CPU)" in reason and "still not free after 3 s" in reason
    assert outcome.best["trial_id"] == rows[1.0]["trial_id"] and not outcome.interrupted


@pytest.mark.slow
def test_serving_refuses_replicas_that_cannot_be_placed_before_serve_starts(ray_session, hold_cpus):
    from ray import serve

    from dinomaly.distributed.serve import app as serving

    config = load_config("demo", {"serve.num_replicas": 8, "cluster.start_timeout_s": 600})
    with pytest.raises(ResourcesUnavailable, match=r"Serve app 'dinomaly' needs 8 replicas x 1 CPU \(8 CPU\), which "
                                                   "never fits: the cluster has 4 CPU in all; lower serve.num_replicas"):
        serving.start("never-loaded", config)
    hold_cpus(3.5)
    config = load_config("demo", {"serve.num_replicas": 1, "cluster.start_timeout_s": 1})
    with pytest.raises(ResourcesUnavailable, match=r"needs 1 replica x 1 CPU \(1 CPU\); the cluster has 4 CPU, 0.5 "
                                                   r"free; held by: actor Holder \(3.5 CPU\); still not free after 1 s"):
        serving.start("never-loaded", config)
    assert serve.status().applications == {}  # nothing was deployed


@pytest.mark.slow
@pytest.mark.parametrize("job", ["evaluate", "predict"])
def test_evaluate_and_predict_check_their_actor_pool_first(ray_session, monkeypatch, job):
    """Before any data is read: the pool (eval.actors x eval.cpus_per_actor) must fit, and Ray Data's own
    wait for the pool's actors is bounded by cluster.start_timeout_s."""
    from ray.data import DataContext

    from dinomaly.distributed.batch import evaluate as batch_evaluate
    from dinomaly.distributed.batch import predict as batch_predict

    monkeypatch.setattr(DataContext.get_current(), "wait_for_min_actors_s", -1)
    monkeypatch.setattr(resources, "_data_wait_set", None)
    config = load_config("demo", {"eval.actors": 8, "cluster.start_timeout_s": 90})
    with pytest.raises(ResourcesUnavailable, match=rf"^{job} needs 8 model actors x 1 CPU \(8 CPU\), which never "
                                                   "fits: the cluster has 4 CPU in all; lower eval.actors"):
        if job == "evaluate":
            batch_evaluate.evaluate(None, config, None)
        else:
            batch_predict.predict(None, None, config, [], "unused", threshold=0.5)
    assert DataContext.get_current().wait_for_min_actors_s == 90
