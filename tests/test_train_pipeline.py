"""pipelines/train.py: options, early failures with clear messages, and a real `ray job submit` run.

The error cases run main() in-process with Ray start-up replaced by a failure, which proves that each
one stops on the driver before any Ray work; one case also runs as a subprocess (exit code, no traceback).
"""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def load_pipeline():
    spec = importlib.util.spec_from_file_location("train_pipeline", REPO / "pipelines" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pipeline():
    return load_pipeline()


def test_help_explains_every_option_and_the_config_keys(pipeline, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--config", "--set", "--data", "--categories", "--setting", "--encoder", "--encoder-weights",
                 "--steps", "--batch-size", "--workers", "--gpu", "--storage-path", "--experiment", "--output",
                 "--resume", "--init-from", "--deterministic", "--name"):
        assert flag in text, flag
    for key in ("train.total_steps", "train.max_failures", "train.keep_checkpoints", "tracking.registered_model_name"):
        assert key in text, key


def test_flags_map_to_config_keys_and_deterministic_mode_resolves(pipeline):
    from dinomaly.distributed.train.run import prepare_config

    args = pipeline.build_parser().parse_args([
        "--config", "demo", "--data", "s3://bucket/m.parquet", "--categories", "nut, pill", "--setting", "separate",
        "--encoder", "vit_small_patch14_reg4_dinov2", "--encoder-weights", "none", "--steps", "70",
        "--batch-size", "4", "--workers", "2", "--gpu", "--storage-path", "s3://bucket/runs", "--experiment", "exp",
        "--deterministic", "--name", "n1", "--set", "train.lr=0.01", "--set", "train.max_failures=5"])
    config = prepare_config(pipeline.config_from_args(args))
    assert (config.data.root, config.data.categories, config.train.setting) == ("s3://bucket/m.parquet",
                                                                                ["nut", "pill"], "separate")
    assert (config.train.total_steps, config.train.batch_size, config.train.num_workers) == (70, 4, 2)
    assert config.train.use_gpu and config.train.precision == "bf16"
    assert config.output_root == "s3://bucket/runs" and config.name == "n1"
    assert config.tracking.experiment_name == "exp" and config.train.lr == 0.01 and config.train.max_failures == 5
    assert (config.data.shuffle, config.model.bottleneck_dropout, config.train.data_source) == (False, 0.0, "local")
    assert config.tracking.tracking_uri.startswith("sqlite:////")  # absolute: Ray workers run elsewhere
    assert pipeline.config_from_args(pipeline.build_parser().parse_args([])).train.num_workers == 1  # demo preset


def bad_cases(tmp: Path, demo_root: Path) -> list[tuple[list[str], str]]:
    cpus = os.cpu_count() or 1
    data = ["--data", str(demo_root), "--storage-path", str(tmp / "runs")]
    (tmp / "runs" / "taken").mkdir(parents=True)
    (tmp / "runs" / "taken" / "checkpoint_manager_snapshot.json").write_text("{}")
    (tmp / "a-file").write_text("not a folder")
    return [
        (["--set", "train.totl_steps=5"], "unknown config key 'train.totl_steps'; did you mean 'train.total_steps'"),
        ([*data, "--batch-size", "6", "--workers", "4"], "not divisible by train.num_workers=4"),
        ([*data, "--workers", str(2 * cpus), "--batch-size", str(2 * cpus)], f"more than the {cpus} CPUs"),
        (["--data", str(demo_root), "--storage-path", str(tmp / "a-file" / "runs")], "cannot write checkpoints"),
        (["--data", str(tmp / "missing"), "--storage-path", str(tmp / "runs")], "does not exist"),
        ([*data, "--init-from", str(tmp / "none.pth")], "--init-from"),
        ([*data, "--resume", "--name", "never-ran"], "nothing to resume"),
        ([*data, "--name", "taken"], "pass --resume to continue it"),
    ]


def test_bad_configurations_fail_on_the_driver_before_ray_starts(pipeline, demo_root, tmp_path, monkeypatch,
                                                                  capsys):
    from dinomaly.distributed.train import run as launch

    def no_ray():
        pytest.fail("Ray was started for a configuration that should have been refused")

    monkeypatch.setattr(launch, "ensure_ray", no_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    for argv, message in bad_cases(tmp_path, demo_root):
        assert pipeline.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, (argv, err)


def test_ctrl_c_during_fit_exits_130_and_says_how_to_resume(monkeypatch, capsys):
    """Ray Train's SIGINT handler ends fit() with SystemExit (seen with a real Ctrl-C); the run turns it into
    exit 130 and a line naming the run's checkpoints. A fake trainer raises what Ray's handler raises."""
    from dinomaly.config import load_config
    from dinomaly.distributed.train import run as launch

    class AbortedTrainer:
        def fit(self):
            raise SystemExit(1)

    with pytest.raises(launch.TrainingInterrupted):
        launch._fit_with_progress(AbortedTrainer(), None, None)

    def train(config, **kwargs):
        launch._fit_with_progress(AbortedTrainer(), None, None)

    monkeypatch.setattr(launch, "ensure_ray", lambda: True)
    monkeypatch.setattr(launch, "train", train)
    with pytest.raises(SystemExit) as exit_info:
        launch.run(load_config("demo", {"output_root": "s3://bucket/runs/"}))
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted: the run's checkpoints are in s3://bucket/runs/demo;" in err and "--resume" in err


def test_cli_exits_non_zero_with_one_line_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "pipelines" / "train.py"), "--set", "train.nope=1"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "error: unknown config key 'train.nope'" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- ray job submit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_under(marker: str) -> set[int]:
    """PIDs whose command line names `marker` (our head's temp dir), plus all their descendants."""
    parents: dict[int, int] = {}
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if marker in cmdline:
            found.add(int(entry.name))
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return found - {os.getpid()}


def stop_cluster(marker: str, timeout_s: float = 10) -> None:
    """Stop only the cluster we started: SIGTERM its processes by PID, SIGKILL what is left (never `ray stop`)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_under(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        while processes_under(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not processes_under(marker):
            return


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head` on loopback with its own temp dir and ports; stopped by PID afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="rayhead_", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dashboard = free_port(), free_port()
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    ray_cli = str(Path(sys.executable).parent / "ray")
    command = [ray_cli, "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={dashboard}", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--min-worker-port={20000 + gcs % 5000}", f"--max-worker-port={20000 + gcs % 5000 + 200}"]
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_runs_the_pipeline_to_completion(ray_head, demo_root, mlflow_uri, tmp_path):
    """Submitted with --working-dir, so the job runs in Ray's temporary package folder: its output, Ray's run
    folder (inside --output) and the MLflow run in the submitter's store all outlive the job."""
    from mlflow import MlflowClient

    address, env = ray_head
    out = tmp_path / "out"
    job = [sys.executable, "pipelines/train.py", "--config", "demo", "--data", str(demo_root), "--steps", "4",
           "--workers", "2", "--batch-size", "4", "--name", "job", "--output", str(out),
           "--set", "model.image_size=28", "--set", "model.crop_size=28",
           "--set", "model.encoder_kwargs={embed_dim: 32, num_heads: 2}", "--set", "train.warmup_steps=1",
           "--set", "train.data_source=local", "--set", "eval.resize=32"]
    runtime_env = {"excludes": ["tests/", "benchmarks/", "*.db"], "env_vars": {"MLFLOW_TRACKING_URI": mlflow_uri}}
    submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir",
              str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--", *job]
    result = subprocess.run(submit, env=dict(env, RAY_AUTH_MODE="token"), capture_output=True, text=True,
                            timeout=540)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "succeeded" in result.stdout.lower()
    assert "step 4/4" in result.stdout and "I-AUROC" in result.stdout  # live progress and the per-class table
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 4 and set(metrics["classes"]) == {"nut", "pill", "weave", "wood"} and metrics["mean"]
    assert (out / "checkpoint" / "model.safetensors").exists()
    assert (out / "job" / "checkpoint_manager_snapshot.json").exists()  # Ray's run folder, inside --output
    for record in (f"metrics.json:     {out / 'metrics.json'}", f"in {mlflow_uri}",
                   f"registered model: models:/dinomaly-demo/{metrics['model_version']}"):
        assert record in result.stdout, record  # the summary says where each record went
    run = MlflowClient(tracking_uri=mlflow_uri).get_run(metrics["mlflow_run_id"])  # the submitter's store
    assert run.info.status == "FINISHED" and run.info.run_name == "job"
    assert "test/mean/image_auroc" in run.data.metrics
