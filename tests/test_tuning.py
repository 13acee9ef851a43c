"""Ray Tune sweeps end to end on the session's local Ray, with a real sqlite MLflow store.

Each trial is a real Ray Train run (1 worker) of the demo preset's tiny model on the demo data at 56 px,
4 steps, evaluated twice; one costs ~15-20 s on 2 cores, so each module fixture runs one sweep and
several tests read it. Three sweeps run: a 4-trial grid (a good, a diverging, a good and a bad learning
rate: ASHA, failure handling, ranking, MLflow, registry), a 2-trial sweep interrupted by a signal and
resumed, and an all-failing sweep through pipelines/tune.py (its trials fail before any Train run starts).
"""

import csv
import json
import os
import shutil
import signal
import threading
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import REPO
from ray import tune

from dinomaly.calibration import stored_table
from dinomaly.config import load_config
from dinomaly.distributed.train.run import prepare_config
from dinomaly.distributed.tune.space import SearchSpace, check_search_space
from dinomaly.distributed.tune.sweep import holdout_split, run_sweep
from dinomaly.distributed.tune.trial import evaluation_steps
from dinomaly.results import validate_metrics

slow = pytest.mark.slow
REGISTERED = "tune-test"
# grid order = start order; with 2 trials at a time the bad lr (last) starts only after a good one finished
LR_GRID = "grid({lr: 0.002}, {lr: 10.0, warmup_steps: 0}, {lr: 0.004}, {lr: 0.5})"
GROUPINGS = "choice([[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 1], [2, 3], [4, 5], [6, 7]])"


def test_search_space_is_checked_on_the_driver_with_the_fix_named():
    """Before any Ray work: unknown keys, values invalid alone, malformed specs; linked keys as one mapping."""
    def check(space, **overrides):
        check_search_space(load_config("demo", {"tune.search_space": space, **overrides}))

    with pytest.raises(ValueError, match="did you mean 'model.bottleneck_dropout'"):
        check({"model.dropout": "uniform(0.0, 0.6)"})
    with pytest.raises(ValueError, match="put linked keys in one mapping"):
        check({"model.decoder_depth": "choice(4, 8)"})
    with pytest.raises(ValueError, match="uniform takes two numbers"):
        check({"model.bottleneck_dropout": "uniform(0.3)"})
    with pytest.raises(ValueError, match="unknown or malformed search kind"):
        check({"train.lr": "logrange(1e-4, 1e-2)"})
    with pytest.raises(ValueError, match="choose from"):
        check({"train.lr": "loguniform(1e-4, 1e-2)"}, **{"tune.metrics": ["image_auc"]})
    linked = "choice({decoder_depth: 4, target_layers: [6, 7, 8, 9], fuse_groups: [[0, 1], [2, 3]]}, {})"
    check({"model": linked, "train.lr": "loguniform(1e-4, 1e-2)", "model.fuse_groups": "choice([[0, 1, 2, 3, 4, 5, 6, 7]])"})
    check(load_config("demo").tune.search_space)  # the default space


def test_the_config_keeps_the_space_as_data_and_the_tune_package_checks_it():
    """A malformed spec loads (the core never parses it); the sweep's check refuses it before any Ray work."""
    config = load_config("demo", {"tune.search_space": {"train.lr": "uniform(0.3)"}})
    with pytest.raises(ValueError, match=r"tune.search_space\['train.lr'\]='uniform\(0.3\)': uniform takes two"):
        check_search_space(config)
    with pytest.raises(ValueError, match="tune.search_space is empty"):
        load_config("demo", {"tune.search_space": {}})


def test_the_parsed_space_gives_tune_domains_and_the_grid_size():
    space = SearchSpace.parse({"train.lr": "loguniform(1e-4, 1e-2)", "model.fuse_groups": GROUPINGS, "name": "x"},
                              algorithm="grid")
    domains = space.to_tune()
    assert domains["name"] == "x" and (domains["train.lr"].lower, domains["train.lr"].upper) == (1e-4, 1e-2)
    assert domains["model.fuse_groups"] == {"grid_search": ["[[0, 1, 2, 3], [4, 5, 6, 7]]",
                                                            "[[0, 1], [2, 3], [4, 5], [6, 7]]"]}
    assert space.grid_size() == 2 and SearchSpace.parse({"model.fuse_groups": GROUPINGS}).grid_size() == 1


def test_sampled_values_become_config_overrides():
    space = {"model": "choice({decoder_depth: 4, target_layers: [6, 7, 8, 9]})", "model.fuse_groups": "grid([[0], [1]])",
             "train.lr": "loguniform(1e-4, 1e-2)"}
    params = {"model": json.dumps({"decoder_depth": 4, "target_layers": [6, 7, 8, 9]}),
              "model.fuse_groups": json.dumps([[0], [1]]), "train.lr": 0.001}
    assert SearchSpace.parse(space).decode(params) == {"model.decoder_depth": 4, "model.target_layers": [6, 7, 8, 9],
                                                       "model.fuse_groups": [[0], [1]], "train.lr": 0.001}
    assert evaluation_steps(10, 4) == [2, 5, 8, 10] and evaluation_steps(3, 4) == [1, 2, 3]


def test_holdout_split_keeps_evenly_spaced_normals_of_every_class_out_of_training():
    uris = [f"/d/{c}/train/good/{i:03d}.png" for c in ("a", "b") for i in range(10)]
    rows = pa.table({"image_uri": uris, "category": [u.split("/")[2] for u in uris]})
    train, held = holdout_split(rows, 0.2)
    assert held.column("image_uri").to_pylist() == ["/d/a/train/good/002.png", "/d/a/train/good/007.png",
                                                     "/d/b/train/good/002.png", "/d/b/train/good/007.png"]
    assert train.num_rows == 16 and not set(train.column("image_uri").to_pylist()) & set(held.column("image_uri").to_pylist())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, mlflow_template):
    """A folder with a private copy of the migrated MLflow template."""
    folder = tmp_path_factory.mktemp("tune")
    shutil.copyfile(mlflow_template, folder / "mlflow.db")
    return folder


def sweep_config(workspace, demo_root, name, space, **overrides):
    values = {"name": name, "output_root": str(workspace / "runs"), "data.root": str(demo_root),
              "model.image_size": 64, "model.crop_size": 56, "train.batch_size": 4, "train.total_steps": 4,
              "train.warmup_steps": 1, "train.hard_mining_ramp_steps": 4, "train.log_every": 1,
              "tune.evaluations": 2, "tune.grace_period": 1, "tune.max_concurrent_trials": 2, "tune.num_samples": 1,
              "tune.search_space": space, "tracking.tracking_uri": f"sqlite:///{workspace / 'mlflow.db'}",
              "tracking.registered_model_name": REGISTERED, "tracking.heatmap_images": 0}
    values.update(overrides)
    return prepare_config(load_config("demo", values))


@pytest.fixture(scope="module")
def grid_sweep(ray_session, workspace, demo_root):
    config = sweep_config(workspace, demo_root, "grid", {"train": LR_GRID, "model.fuse_groups": GROUPINGS})
    return config, run_sweep(config)


def rows_by_lr(outcome):
    return {json.loads(row["config/train"])["lr"]: row for row in outcome.rows}


@slow
def test_sweep_finishes_ranks_all_trials_and_reports_the_best(grid_sweep, workspace):
    config, outcome = grid_sweep
    assert len(outcome.rows) == 4 and not outcome.interrupted and outcome.objective == "labelled"
    by_lr = rows_by_lr(outcome)
    best = outcome.best
    assert best is outcome.rows[0] and json.loads(best["config/train"])["lr"] in (0.002, 0.004)
    assert best["status"] in ("completed", "early_stopped") and 0.0 <= best["objective"] <= 1.0
    assert best["objective"] == pytest.approx((best["mean_image_auroc"] + best["mean_pixel_aupro"]) / 2)
    assert json.loads(best["config/model.fuse_groups"]) in ([[0, 1, 2, 3], [4, 5, 6, 7]],
                                                           [[0, 1], [2, 3], [4, 5], [6, 7]])
    assert os.path.isfile(os.path.join(best["checkpoint"], "model.safetensors"))
    # the first good trial at a rung cannot be stopped there: one of them runs to the end
    assert "completed" in (by_lr[0.002]["status"], by_lr[0.004]["status"])
    # ranking files: the same rows, best first
    folder = workspace / "runs" / "grid"
    with open(folder / "tune_results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [r["trial_id"] for r in table] == [r["trial_id"] for r in outcome.rows]
    saved = json.loads((folder / "tune_results.json").read_text())
    assert saved["best"]["trial_id"] == best["trial_id"] and saved["counts"]["failed"] == 1
    # every evaluated trial's metrics.json (its best evaluation) in its trial folder, in the one schema
    for row in outcome.rows:
        path = folder / row["trial_id"] / "metrics.json"
        assert path.exists() == (row["status"] != "failed"), row["trial_id"]
        if path.exists():
            record = json.loads(path.read_text())
            validate_metrics(record)
            assert (record["objective"], record["step"], record["status"]) == (
                pytest.approx(row["objective"]), row["best_step"], row["status"])
            assert set(record["classes"]) == {"nut", "pill", "weave", "wood"} and record["thresholds"]


@slow
def test_asha_stops_the_bad_learning_rate_early(grid_sweep):
    _, outcome = grid_sweep
    bad, good = rows_by_lr(outcome)[0.5], rows_by_lr(outcome)[0.002]
    assert bad["status"] == "early_stopped" and bad["evaluations"] == 1 and bad["steps"] == 2
    assert bad["objective"] < good["objective"]


@slow
def test_a_diverging_trial_fails_with_its_reason_and_the_sweep_goes_on(grid_sweep):
    _, outcome = grid_sweep
    diverged = rows_by_lr(outcome)[10.0]
    assert diverged["status"] == "failed" and diverged["rank"] == 4
    assert "diverged at step 2" in diverged["error"] and "nan" in diverged["error"]
    assert sum(row["status"] != "failed" for row in outcome.rows) == 3


@slow
def test_mlflow_parent_run_child_runs_and_champion(grid_sweep, workspace):
    from mlflow import MlflowClient

    config, outcome = grid_sweep
    client = MlflowClient(config.tracking.tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.params["space.train"] == LR_GRID and parent.info.status == "FINISHED"
    assert parent.data.metrics["best_objective"] == pytest.approx(outcome.best["objective"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"tune_results.csv", "tune_results.json",
                                                                          "search_space.json"}
    experiment = parent.info.experiment_id
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4
    status = {run.data.tags["dinomaly.trial_id"]: run for run in children}
    for row in outcome.rows:
        run = status[row["trial_id"]]
        assert run.info.status == ("FAILED" if row["status"] == "failed" else "FINISHED")
        assert json.loads(run.data.params["train.lr"]) == json.loads(row["config/train"])["lr"]
        history = client.get_metric_history(run.info.run_id, "objective")
        # a trial ASHA stops may still log the evaluation it was computing when the stop arrived
        steps = sorted(m.step for m in history)
        assert steps[:row["evaluations"]] == [2, 4][:row["evaluations"]] and set(steps) <= {2, 4}
    failed = status[rows_by_lr(outcome)[10.0]["trial_id"]]
    assert "diverged" in failed.data.tags["tune.error"]
    champion = client.get_model_version_by_alias(REGISTERED, "champion")
    assert outcome.champion and str(champion.version) == outcome.registered_version
    assert champion.run_id == outcome.best["mlflow_run_id"]
    assert float(champion.tags["objective"]) == pytest.approx(outcome.best["objective"])
    # the champion is the winning trial's best evaluation (of those Tune received), not its last one
    evaluated = {m.step: m.value for m in client.get_metric_history(champion.run_id, "objective")
                 if m.step in [2, 4][:outcome.best["evaluations"]]}
    best_step = max(evaluated, key=lambda step: (evaluated[step], -step))
    assert float(champion.tags["objective"]) == pytest.approx(evaluated[best_step])
    assert champion.tags["step"] == str(best_step) == str(outcome.best["best_step"])
    folder = client.download_artifacts(champion.run_id, "checkpoint", str(workspace / "champion"))
    metadata = json.loads((Path(folder) / "metadata.json").read_text())
    assert metadata["step"] == best_step
    # the champion decides per class: the table of its evaluation, from the test split's normals (no trial
    # holds images back), in its checkpoint and on its version
    table = stored_table({}, champion.tags)
    assert table == stored_table(metadata) and set(table.classes) == {"nut", "pill", "weave", "wood"}
    assert {entry.source for entry in table.classes.values()} == {"test-normals"}


FIRED = threading.Event()  # module level: a callback restored by Tuner.restore must not fire again


class InterruptOnce(tune.Callback):
    """Sends this process SIGUSR1 (Tune treats it as Ctrl-C) once a trial finished while another is mid-way."""

    def __init__(self):
        self.finished, self.reported = set(), set()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.reported.add(trial.trial_id)
        self._maybe_interrupt()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished.add(trial.trial_id)
        self._maybe_interrupt()

    def _maybe_interrupt(self):
        if self.finished and self.reported - self.finished and not FIRED.is_set():
            FIRED.set()
            os.kill(os.getpid(), signal.SIGUSR1)


@slow
def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_session, workspace, demo_root):
    """Holdout-loss objective, one trial at a time: the interrupt comes at the second trial's first evaluation."""
    from mlflow import MlflowClient

    config = sweep_config(workspace, demo_root, "resumable", {"model.bottleneck_dropout": "grid(0.1, 0.3)"},
                          **{"tune.objective": "holdout_loss", "tune.scheduler": "fifo", "train.total_steps": 8,
                             "tune.max_concurrent_trials": 1, "tracking.registered_model_name": ""})
    first = run_sweep(config, callbacks=[InterruptOnce()])
    assert FIRED.is_set() and first.interrupted
    statuses = {row["trial_id"]: row["status"] for row in first.rows}
    assert sorted(statuses.values()) == ["completed", "interrupted"]
    done = next(t for t, s in statuses.items() if s == "completed")
    resumed = next(t for t in statuses if t != done)
    client = MlflowClient(config.tracking.tracking_uri)
    runs = {r.data.tags["dinomaly.trial_id"]: r.info.run_id
            for r in client.search_runs([client.get_experiment_by_name("dinomaly-demo").experiment_id],
                                        "tags.`dinomaly.sweep` = 'resumable' and tags.`dinomaly.role` = 'trial'")}
    before = [(m.step, m.timestamp) for m in client.get_metric_history(runs[done], "loss")]
    assert [step for step, _ in before] == list(range(1, 9))

    with pytest.raises(ValueError, match="pass --resume"):
        run_sweep(config)
    second = run_sweep(config, resume=True)
    assert not second.interrupted and {row["status"] for row in second.rows} == {"completed"}
    assert second.objective == "holdout_loss" and second.mode == "min" and second.best["holdout_loss"] > 0
    record = json.loads((workspace / "runs" / "resumable" / resumed / "metrics.json").read_text())
    validate_metrics(record)  # the interrupted trial's metrics.json is written once the resumed sweep ends
    assert (record["objective_kind"], record["classes"], record["steps_trained"]) == ("holdout_loss", {}, 8)
    after = [(m.step, m.timestamp) for m in client.get_metric_history(runs[done], "loss")]
    assert after == before  # the finished trial did not train again
    steps = [m.step for m in client.get_metric_history(runs[resumed], "loss")]
    assert steps == list(range(1, 9))  # continued from its step-4 checkpoint: no step trained twice
    assert client.get_run(runs[resumed]).info.status == "FINISHED"
    # the best checkpoint carries thresholds from the held-out normals (never trained on): calibration data
    metadata = json.loads((Path(second.best["checkpoint"]) / "metadata.json").read_text())
    table = stored_table(metadata)
    assert set(table.classes) == {"nut", "pill", "weave", "wood"}
    assert {entry.source for entry in table.classes.values()} == {"calibration"}


@slow
def test_a_sweep_where_every_trial_fails_ends_with_a_summary(ray_session, workspace, demo_root, capsys):
    """Through pipelines/tune.py: each value is valid alone, every combination fails in the trial (warm-up
    longer than the run), so the sweep ends with exit status 1 and the reasons, not a traceback."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tune_pipeline", REPO / "pipelines" / "tune.py")
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    args = ["--config", "demo", "--space", "train.total_steps=grid(2, 3)", "--space", "train.warmup_steps=grid(3)",
            "--num-samples", "1"]
    values = {"name": "all-fail", "output_root": str(workspace / "runs"), "data.root": str(demo_root),
              "model.image_size": 64, "model.crop_size": 56, "train.batch_size": 4, "train.total_steps": 4,
              "train.warmup_steps": 1, "tune.evaluations": 2, "tune.feature_cache": False,
              "tune.max_concurrent_trials": 2, "tracking.enabled": False}
    for key, value in values.items():
        args += ["--set", f"{key}={value}"]
    assert pipeline.main(args) == 1
    out = capsys.readouterr().out
    assert "no trial succeeded: 2 of 2 trials failed" in out
    assert f"Ray's run folder (trial checkpoints, sweep state for --resume): {workspace / 'runs' / 'all-fail'}" in out
    assert out.count("train.warmup_steps=3 must be in [0, train.total_steps=") >= 2
    with open(workspace / "runs" / "all-fail" / "tune_results.csv") as handle:
        assert [row["status"] for row in csv.DictReader(handle)] == ["failed", "failed"]


# --------------------------------------------------------------------------- reproducible sampling (no Ray run)


SEEDED_SPACE = {"train.lr": "loguniform(1e-4, 1e-2)", "model.bottleneck_dropout": "uniform(0.0, 0.6)",
                "model.fuse_groups": GROUPINGS}


def sampled_trials(algorithm: str, seed: int, count: int = 4) -> list[dict]:
    """The first `count` trials the sweep's own searcher proposes, driven directly (no trial runs)."""
    from dinomaly.distributed.tune.sweep import search_algorithm

    config = load_config("demo", {"tune.search_space": SEEDED_SPACE, "tune.search_algorithm": algorithm,
                                  "tune.seed": seed, "tune.num_samples": count})
    searcher = search_algorithm(config, 2)
    space = SearchSpace.from_config(config).to_tune()
    if algorithm == "optuna":
        searcher.set_search_properties("objective", "max", space)
        return [searcher.suggest(f"trial_{i}") for i in range(count)]
    searcher.add_configurations({"seeded": {"run": lambda _: None, "config": space, "num_samples": count}})
    trials = []
    for _ in range(count):  # one at a time: the generator holds back beyond max_concurrent live trials
        trial = searcher.next_trial()
        searcher.on_trial_complete(trial.trial_id)
        trials.append(trial.config)
    return trials


@pytest.mark.parametrize("algorithm", ["random", "grid", "optuna"])
def test_the_same_seed_samples_the_same_trials_in_the_same_order(algorithm):
    first, again, other = sampled_trials(algorithm, 0), sampled_trials(algorithm, 0), sampled_trials(algorithm, 1)
    assert len(first) == 4 and len({json.dumps(t, sort_keys=True) for t in first}) == 4
    assert first == again
    assert [t["train.lr"] for t in first] != [t["train.lr"] for t in other]


# --------------------------------------------------------------------------- the champion is the best evaluation


def reported(trial_id, evaluations, checkpoints):
    """A Tune Result as the ranking reads it: every report of the trial (objective, step, checkpoint)."""
    from types import SimpleNamespace

    import pandas as pd

    reports = [dict(objective=value, evaluation=i + 1, step=2 * (i + 1), mean_image_auroc=value,
                    mean_pixel_aupro=value, checkpoint_path=str(checkpoints[trial_id, 2 * (i + 1)]))
               for i, value in enumerate(evaluations)]
    return SimpleNamespace(path=f"/sweep/{trial_id}", metrics=reports[-1], metrics_dataframe=pd.DataFrame(reports),
                           config={"train.lr": 0.001}, error=None)


def test_the_registered_champion_is_the_best_evaluation_of_the_winning_trial(tmp_path, mlflow_uri):
    """Trial 'falls' scores 0.9 at step 2, then 0.7 at step 4: it wins on 0.9 (above 'rises', 0.6 -> 0.8, and
    the early-stopped 'stopped' at 0.85), and its step-2 checkpoint is registered with 0.9 and written to its
    metrics.json."""
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from dinomaly.checkpoint import save
    from dinomaly.distributed.tune.ranking import SweepOutcome, format_ranking, rank_trials
    from dinomaly.distributed.tune.sweep import write_trial_metrics
    from dinomaly.distributed.tune.tracking import finish_tracking, open_parent_run
    from dinomaly.distributed.tune.trial import ROLE_TAG, SWEEP_TAG, TRIAL_TAG
    from dinomaly.model.dinomaly import Dinomaly
    from dinomaly.results import validate_metrics

    config = load_config("demo", {"name": "falling", "output_root": str(tmp_path / "runs"),
                                  "tracking.tracking_uri": mlflow_uri, "tracking.registered_model_name": REGISTERED,
                                  "tune.evaluations": 2})
    model = Dinomaly(config.model)
    histories = {"falls": [0.9, 0.7], "rises": [0.6, 0.8], "stopped": [0.85]}
    checkpoints = {}
    for trial_id, values in histories.items():
        for i, value in enumerate(values):
            folder = checkpoints[trial_id, 2 * (i + 1)] = tmp_path / "train" / trial_id / f"checkpoint_{2 * (i + 1)}"
            by_class = {"nut": {"image_auroc": value}, "mean": {"image_auroc": value}}
            save(folder, model, config, metadata=dict(step=2 * (i + 1), metrics={"objective": value}, classes=by_class,
                                                      thresholds={"image_f1_optimal": value, "normal_quantile": 0.99}))
    results = [reported(trial_id, values, checkpoints) for trial_id, values in histories.items()]
    stored = {trial_id: SimpleNamespace(status="TERMINATED") for trial_id in histories}
    rows, interrupted = rank_trials(results, stored, evaluations=2, expected=3, mode="max")
    assert [(r["trial_id"], r["status"], r["objective"]) for r in rows] == [
        ("falls", "completed", 0.9), ("stopped", "early_stopped", 0.85), ("rises", "completed", 0.8)]
    falls = rows[0]
    assert (falls["best_step"], falls["steps"], falls["last_objective"]) == (2, 4, 0.7) and not interrupted
    assert falls["checkpoint"] == str(checkpoints["falls", 2])

    client = MlflowClient(mlflow_uri)
    parent = open_parent_run(config, "labelled")
    experiment = client.get_run(parent).info.experiment_id
    for trial_id in histories:
        client.create_run(experiment, tags={SWEEP_TAG: "falling", ROLE_TAG: "trial", TRIAL_TAG: trial_id,
                                            "mlflow.parentRunId": parent})
    outcome = SweepOutcome(rows=rows, objective="labelled", mode="max", experiment_path=str(tmp_path / "runs"),
                           parent_run_id=parent)
    finish_tracking(config, outcome)
    champion = client.get_model_version_by_alias(REGISTERED, "champion")
    assert outcome.champion and str(champion.version) == outcome.registered_version
    assert float(champion.tags["objective"]) == 0.9 and champion.tags["step"] == "2"
    assert champion.tags["trial_id"] == "falls" and float(champion.tags["mean_image_auroc"]) == 0.9
    registered = client.download_artifacts(champion.run_id, "checkpoint", str(tmp_path / "registered"))
    assert json.loads((tmp_path / "registered" / "checkpoint" / "metadata.json").read_text())["step"] == 2, registered

    written = write_trial_metrics(outcome, config, tmp_path / "out")
    assert len(written) == 3
    record = json.loads((tmp_path / "out" / "falls" / "metrics.json").read_text())
    validate_metrics(record)
    assert (record["job"], record["objective"], record["step"], record["steps_trained"]) == ("tune", 0.9, 2, 4)
    assert record["classes"] == {"nut": {"image_auroc": 0.9}} and record["mean"] == {"image_auroc": 0.9}
    assert record["describes"] == "best" and record["checkpoint_uri"] == str(checkpoints["falls", 2])
    table = format_ranking(outcome)
    assert "ranked by each trial's best evaluation" in table and table.splitlines()[1].split()[:6] == [
        "1", "falls", "completed", "0.9000", "2", "4"]


def test_a_taken_or_missing_sweep_is_refused_before_ray_starts(demo_root, tmp_path, monkeypatch, capsys):
    import importlib.util

    from dinomaly.distributed import cluster

    monkeypatch.setattr(cluster, "ensure_ray", lambda *a, **k: pytest.fail("Ray was started"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = importlib.util.spec_from_file_location("tune_pipeline_names", REPO / "pipelines" / "tune.py")
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    base = ["--config", "demo", "--data", str(demo_root), "--output", str(tmp_path / "sweeps"), "--name", "taken",
            "--set", "tracking.enabled=false"]
    assert pipeline.main([*base, "--resume"]) == 2
    assert "no sweep to resume at" in capsys.readouterr().err
    (tmp_path / "sweeps" / "taken").mkdir(parents=True)
    (tmp_path / "sweeps" / "taken" / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    assert pipeline.main(base) == 2
    assert "a sweep named 'taken' already exists" in capsys.readouterr().err
