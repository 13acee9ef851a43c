"""Training across Ray nodes on one machine: cluster/local/multinode.sh, `ray job submit`, S3, MLflow server.

The cluster is real: a head and a worker Ray node, each in its own network namespace with its own
address (so the tests need root and `ip netns`), moto's S3 server and an `mlflow server` in the head's
namespace. Each node offers 1 CPU and each DDP worker takes 1, so the two workers of a run land on
different nodes and every all-reduce crosses the node boundary. Node loss is a SIGKILL of every process
of the worker node, by PID.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from multinode_cluster import SCRIPT, TINY_TRAIN_SETTINGS, LocalCluster, netns_available

from dinomaly.distributed.train.run import STATUS_DIR_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900),
              pytest.mark.skipif(not netns_available(), reason="needs root and a working `ip netns`: each Ray "
                                 "node gets its own network namespace (cluster/local/multinode.sh)")]

JOB_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head + one worker node, S3 bucket with a one-class demo dataset, MLflow server; all stopped after."""
    from dinomaly.data.demo import generate_demo_dataset

    if not SCRIPT.exists():
        pytest.fail(f"{SCRIPT} is missing")
    local = LocalCluster(workers=1, cpus_per_node=1)
    try:
        local.up()
        data = generate_demo_dataset(tmp_path_factory.mktemp("demo"), classes=["nut"], train_per_class=16,
                                     test_good_per_class=2, test_defect_per_class=2, size=64)
        local.data_uri = local.upload(data, "data/demo")
        yield local
    finally:
        local.down()


def train_command(cluster: LocalCluster, name: str, steps: int, max_failures: int, status: Path) -> list[str]:
    bucket = cluster.settings["BUCKET"]
    settings = [*TINY_TRAIN_SETTINGS, "train.checkpoint_every=10", "train.log_every=10",
                f"train.max_failures={max_failures}"]
    # the workers' status folder (pids, steps, hold requests): one disk serves every node of this cluster
    return ["env", f"{STATUS_DIR_ENV}={status}", "python", "pipelines/train.py", "--config", "demo",
            "--data", cluster.data_uri, "--workers", "2", "--steps", str(steps), "--batch-size", "4",
            "--storage-path", f"s3://{bucket}/checkpoints", "--name", name,
            "--output", str(cluster.state_dir / "out" / name),
            *[arg for setting in settings for arg in ("--set", setting)]]


def kill_worker_node_at(cluster: LocalCluster, name: str, status: Path, step: int) -> list[dict]:
    """Both ranks hold once they have reported `step`; when both hold and Ray Train has registered that step's
    checkpoint, SIGKILL every process of node w1, then let the rank on the head go on (into a dead peer)."""
    holds = [status / f"hold-rank{rank}-step{step}" for rank in (0, 1)]
    for hold in holds:
        hold.touch()
    held = [hold.with_name(f"{hold.name}.held") for hold in holds]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not all(path.exists() for path in held):
        assert time.monotonic() < deadline, f"the ranks of {name} never both held at step {step}"
        time.sleep(0.2)
    try:
        cluster.wait_for_registered_checkpoint(name, step, timeout_s=JOB_TIMEOUT_S)
        workers = cluster.train_workers(name)
        assert {w["node"] for w in workers if w["state"] == "ALIVE"} == {"head", "w1"}, workers
        assert cluster.kill_node("w1"), "node w1 had no processes to kill"
        assert cluster.node_pids("w1") == []
    finally:
        for path in held:
            path.unlink(missing_ok=True)
    return workers


def mlflow_run(cluster: LocalCluster, name: str) -> dict:
    """The MLflow run of this name, read back from the server with MlflowClient."""
    return cluster.python_json("""
        import json, os, sys
        from mlflow import MlflowClient
        client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
        experiment = client.get_experiment_by_name("dinomaly-demo")
        runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{sys.argv[1]}'")
        run = runs[0]
        print(json.dumps(dict(status=run.info.status, metrics=sorted(run.data.metrics),
                              loss_steps=sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")),
                              artifact_uri=run.info.artifact_uri, run_id=run.info.run_id,
                              artifacts=[f.path for f in client.list_artifacts(run.info.run_id)])))
    """, name)


def test_ddp_across_nodes_survives_losing_a_node(cluster):
    """Both nodes host a DDP worker; the worker node is killed mid-run and replaced; the run restores from
    its latest S3 checkpoint (train.max_failures) and finishes; checkpoints in S3, metrics in MLflow."""
    name, steps = "restore", 30
    status = cluster.state_dir / "status"
    status.mkdir()
    cluster.submit(name, train_command(cluster, name, steps, max_failures=2, status=status))
    before = kill_worker_node_at(cluster, name, status, step=10)
    cluster.start_node("w1")  # the replacement node (a restarted pod, a new cloud instance)

    status = cluster.wait_job(name, timeout_s=JOB_TIMEOUT_S)
    assert status == "SUCCEEDED", cluster.job_logs(name)[-5000:]
    outputs = json.loads((cluster.state_dir / "out" / name / "metrics.json").read_text())
    assert outputs["step"] == steps
    assert set(outputs["mean"]) >= {"image_auroc", "pixel_auroc", "pixel_aupro"}

    workers = cluster.train_workers(name)
    assert len(workers) >= 4, f"expected a second worker group after the node loss: {workers}"
    assert {w["node"] for w in workers} == {"head", "w1"}
    restored = [w for w in workers if w["pid"] not in {b["pid"] for b in before}]
    assert {w["node"] for w in restored} == {"head", "w1"}, "the restored group did not span both nodes"
    assert {w["node_ip"] for w in workers} == {cluster.settings["HEAD_IP"], cluster.settings["NET"] + ".2"}

    keys = cluster.bucket_keys(f"checkpoints/{name}/")
    assert f"checkpoints/{name}/checkpoint_{steps:07d}/model.safetensors" in keys, keys

    run = mlflow_run(cluster, name)
    assert run["status"] == "FINISHED"
    # losses logged at steps 1, 10, then 11 (the first after the restore), 20, 30: restored from step 10
    assert run["loss_steps"] == [1, 10, 11, 20, 30], run["loss_steps"]
    assert {"loss", "lr", "test/mean/image_auroc"} <= set(run["metrics"])
    assert run["artifacts"], "the run logged no artifacts"
    artifact_keys = cluster.bucket_keys("mlartifacts/")
    assert any(run["run_id"] in key for key in artifact_keys), "MLflow artifacts did not land in the bucket"
