"""A training run whose loss, gradient norm or weights go NaN/inf stops at its next stop on every rank and fails
with one line and exit 2: nothing evaluated, checkpointed or registered after it, the MLflow run FAILED.

The decision is tested without Ray (the core loop, the training hooks, two ranks that disagree); one
in-process `pipelines/train.py` run on the session's Ray cluster checks the whole path with a huge train.lr.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import reference_model_config

from dinomaly.config import Config, TrackingConfig, TrainConfig
from dinomaly.loop import TrainingDiverged, divergence, seed_everything, train_steps
from dinomaly.model.dinomaly import Dinomaly

REPO = Path(__file__).resolve().parent.parent
HUGE_LR = 1e30  # finite, so the config takes it; the tiny model's loss is NaN from step 3 (warm-up 2, lr 0 at step 1)


def tiny(lr: float = HUGE_LR, **train) -> tuple[Config, Dinomaly, list[torch.Tensor]]:
    seed_everything(0)
    config = Config(name="diverging", model=reference_model_config(image_size=28, crop_size=28),
                    train=TrainConfig(**{**dict(total_steps=10, warmup_steps=2, batch_size=4, lr=lr), **train}),
                    tracking=TrackingConfig(enabled=False))
    batches = [torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    return config, Dinomaly(config.model, load_encoder_weights=False), batches


def record(step: int, loss: float, grad_norm: float = 1.0) -> dict:
    return {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": 1e-3, "p": 0.0}


def test_divergence_names_the_first_non_finite_step_else_non_finite_weights():
    finite = [record(1, 0.9), record(2, 0.8)]
    assert divergence(finite, [torch.ones(3)]) is None
    assert divergence([*finite, record(3, math.nan), record(4, 0.5, math.inf)])["step"] == 3
    assert divergence([*finite, record(3, 0.7, math.inf)])["grad_norm"] == math.inf
    found = divergence(finite, [torch.ones(3), torch.tensor([1.0, math.nan])])
    assert found["step"] == 2 and found["weights_finite"] is False
    assert divergence([], [torch.tensor([math.nan])]) is None  # no step taken: nothing to judge


def test_the_core_loop_raises_at_the_first_non_finite_step_unless_the_caller_decides():
    config, model, batches = tiny()
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 3 \(loss nan, gradient norm nan\); "
                                               r"lower train\.lr or raise train\.warmup_steps$"):
        train_steps(model, batches, config)
    config, model, batches = tiny()
    records, state = train_steps(model, batches[:4], config, check_finite=False)  # the Ray worker decides at stops
    assert state.step == 4 and [math.isnan(r["loss"]) for r in records] == [False, False, True, True]


def test_the_core_loop_raises_when_an_update_leaves_the_weights_non_finite():
    config, model, batches = tiny(lr=1e-3)
    object.__setattr__(config.train, "lr", math.nan)  # past the config's own check: any cause of a NaN update
    with pytest.raises(TrainingDiverged, match=r"at step 1 \(loss [\d.]+, gradient norm [\d.]+, weights not finite\)"):
        train_steps(model, batches[:1], config)


def worker_run(config: Config, model: Dinomaly, world: int = 1):
    from dinomaly.distributed.train.skeleton import Start, WorkerRun
    from dinomaly.loop import TrainState

    state = TrainState.create(model, config)
    return WorkerRun(config, 0, world, torch.device("cpu"), Start(model), model, model, state, end=10)


def test_training_hooks_stop_a_diverged_run_before_evaluating_reporting_or_registering(monkeypatch):
    from dinomaly.distributed.train.skeleton import Chunk, WorkerRun
    from dinomaly.distributed.train.worker import TrainingHooks, TrainJob

    config, model, batches = tiny()
    run = worker_run(config, model)
    records, run.state = train_steps(model, batches[:4], config, run.state, check_finite=False)
    reported = []
    monkeypatch.setattr(WorkerRun, "report", lambda self, metrics, **kwargs: reported.append(metrics))
    hooks = TrainingHooks(TrainJob(config=config, source=None, test_table=object()), started=0.0)
    hooks.at_stop(run, Chunk(records, seconds=1.0, data_wait_s=0.0))
    assert run.stopped and reported == [] and hooks.log.rows == [] and hooks.log.model_version is None
    assert hooks.log.diverged.startswith("training diverged at step 3 (loss nan")
    log = hooks.finish(run)  # rank 0's return value: the driver fails the run from it
    assert log.diverged == hooks.log.diverged


def test_ranks_that_see_different_losses_agree_on_the_divergence(monkeypatch):
    """Rank 1's last step is NaN, rank 0's are finite: both must stop, with the same finding. all_gather_object
    is played by hand (what every rank receives), so no process group is needed."""
    from dinomaly.distributed.train import skeleton

    records = [[record(1, 0.9), record(2, 0.8)], [record(1, 0.9), record(2, math.nan)]]
    sent = [divergence(r) for r in records]

    def all_gather_object(out: list, mine) -> None:
        assert mine in sent
        out[:] = sent

    monkeypatch.setattr(skeleton.dist, "all_gather_object", all_gather_object)
    model = SimpleNamespace(trainable_parameters=lambda: [torch.ones(3)])  # what the check reads of a run
    found = [skeleton.agreed_divergence(SimpleNamespace(model=model, rank=rank, world=2),
                                        skeleton.Chunk(records[rank], seconds=1.0, data_wait_s=0.0))
             for rank in range(2)]
    assert found[0] is not None and found[0] == found[1] and found[0]["step"] == 2


# --------------------------------------------------------------------------- the whole path on Ray


def test_a_diverging_training_run_fails_with_one_line_and_registers_nothing(ray_session, demo_root, mlflow_uri,
                                                                           tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    spec = importlib.util.spec_from_file_location("train_cli_divergence", REPO / "pipelines" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    sets = {"model.image_size": 28, "model.crop_size": 28, "model.encoder_kwargs": "{embed_dim: 32, num_heads: 2}",
            "data.categories": "[nut]", "train.data_source": "local", "train.batch_size": 4, "train.lr": HUGE_LR,
            "train.total_steps": 40, "train.warmup_steps": 2, "train.log_every": 2, "train.checkpoint_every": 2,
            "train.max_failures": 3, "tracking.tracking_uri": mlflow_uri, "tracking.registered_model_name": "diverging"}
    argv = ["--config", "demo", "--data", str(demo_root), "--output", str(out), "--workers", "1",
            *itertools.chain.from_iterable(("--set", f"{k}={v}") for k, v in sets.items())]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: training diverged at step 3 (loss nan, gradient norm nan); lower train.lr or raise "
        "train.warmup_steps and train again under a new --name; nothing was registered and no final checkpoint or "
        "metrics.json written"]
    assert "Traceback" not in err
    assert not (out / "checkpoint").exists() and not (out / "metrics.json").exists()
    ray_run = out / "demo"  # Ray's run folder: the finite step 2 checkpointed, nothing from the diverged stop on
    assert sorted(p.name for p in ray_run.glob("checkpoint_0*")) == ["checkpoint_0000002"]
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert client.search_model_versions("name='diverging'") == []
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
