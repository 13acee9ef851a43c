"""Python handle on cluster/local/multinode.sh: a head + worker Ray nodes, moto S3 and MLflow on this machine.

Used by tests/test_multinode.py and benchmarks/multinode_throughput.py. Everything that talks to the
cluster runs through `multinode.sh exec` (inside the head's network namespace, where the
cluster's addresses live), so the test process itself needs no route to them. Needs root and `ip netns`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "cluster" / "local" / "multinode.sh"

# The tiny training run the tests and the benchmark submit: demo encoder, 56 px, data and checkpoints in S3.
TINY_TRAIN_SETTINGS = [
    "model.image_size=56", "model.crop_size=56", "train.warmup_steps=1", "train.data_source=local",
    "train.cpus_per_worker=1", "tracking.heatmap_images=1",
]


def netns_available() -> bool:
    """Root and a working `ip netns`: each Ray node can get its own network namespace and address."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    return subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0


class LocalCluster:
    """One multinode.sh cluster; `up()` / `down()` bracket its life, every process is stopped by PID."""

    def __init__(self, workers: int = 1, cpus_per_node: int = 1) -> None:
        # a short state dir: Ray's unix socket paths below it must stay under 107 characters
        self.state_dir = Path(tempfile.mkdtemp(prefix="dnm", dir="/tmp"))
        self.env = dict(os.environ, DNM_MN_DIR=str(self.state_dir), DNM_MN_PREFIX=f"dnm{os.getpid()}",
                        DNM_MN_WORKERS=str(workers), DNM_MN_CPUS=str(cpus_per_node))
        self.settings: dict[str, str] = {}

    def run(self, *args: str, timeout_s: float = 300, check: bool = True,
            stdin: str | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run([str(SCRIPT), *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                                timeout=timeout_s, input=stdin)
        if check and result.returncode:
            raise RuntimeError(f"multinode.sh {' '.join(args[:3])} failed ({result.returncode}):\n"
                               f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def up(self) -> None:
        self.run("up", timeout_s=400)
        lines = (self.state_dir / "env").read_text().splitlines()
        self.settings = dict(line.split("=", 1) for line in lines if "=" in line)

    def down(self) -> None:
        """Stop everything (by PID, namespaces removed), then delete the state dir and its logs."""
        self.run("down", timeout_s=180, check=False)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def python(self, code: str, *args: str, timeout_s: float = 300) -> str:
        """Run Python code inside the head's namespace with the cluster's env; returns its stdout."""
        result = self.run("exec", str(Path(os.environ.get("DNM_PYTHON", REPO / ".venv/bin/python"))), "-",
                          *args, stdin=textwrap.dedent(code), timeout_s=timeout_s + 30)
        return result.stdout

    def python_json(self, code: str, *args: str, timeout_s: float = 300):
        """Like python(), for code whose last stdout line is JSON."""
        return json.loads(self.python(code, *args, timeout_s=timeout_s).strip().splitlines()[-1])

    def upload(self, local_dir: Path, prefix: str) -> str:
        """Copy a local folder into the cluster's bucket; returns its s3:// URI."""
        self.python("""
            import boto3, pathlib, sys
            root, bucket, prefix = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
            client = boto3.client("s3")
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")
        """, str(local_dir), self.settings["BUCKET"], prefix)
        return f"s3://{self.settings['BUCKET']}/{prefix}"

    def submit(self, submission_id: str, entrypoint: list[str]) -> None:
        """`ray job submit --no-wait` of the repository (working_dir) with the cluster's runtime_env."""
        self.run("submit", "--no-wait", "--submission-id", submission_id, "--", *entrypoint, timeout_s=180)

    def wait_job(self, submission_id: str, timeout_s: float = 600) -> str:
        """Poll until the job ends; returns SUCCEEDED, FAILED or STOPPED (or raises TimeoutError)."""
        return self.python_json("""
            import json, os, sys, time
            from ray.job_submission import JobSubmissionClient
            client = JobSubmissionClient(os.environ["DNM_DASHBOARD_URL"])
            deadline = time.monotonic() + float(sys.argv[2])
            while (status := str(client.get_job_status(sys.argv[1]).value)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job {sys.argv[1]} still {status} after {sys.argv[2]} s")
                time.sleep(1.0)
            print(json.dumps(status))
        """, submission_id, str(timeout_s), timeout_s=timeout_s)

    def job_logs(self, submission_id: str) -> str:
        return self.python("""
            import os, sys
            from ray.job_submission import JobSubmissionClient
            print(JobSubmissionClient(os.environ["DNM_DASHBOARD_URL"]).get_job_logs(sys.argv[1]))
        """, submission_id)

    def train_workers(self, submission_id: str) -> list[dict]:
        """The Ray Train worker actors of one job, alive or dead: node (its node_<name> resource), pid, state."""
        return self.python_json("""
            import json, os, sys
            from ray.job_submission import JobSubmissionClient
            from ray.util.state import list_actors, list_nodes
            address = os.environ["RAY_ADDRESS"]
            job_id = JobSubmissionClient(os.environ["DNM_DASHBOARD_URL"]).get_job_info(sys.argv[1]).job_id
            nodes = {n.node_id: n for n in list_nodes(address=address, detail=True, limit=1000)}
            def name(node_id):
                node = nodes.get(node_id)
                return next((k[5:] for k in (node.resources_total if node else {}) if k.startswith("node_")), None)
            actors = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                                 limit=1000)
            print(json.dumps([dict(node=name(a.node_id), node_id=a.node_id, node_ip=getattr(nodes.get(a.node_id),
                                   "node_ip", None), pid=a.pid, state=a.state)
                              for a in actors if a.job_id == job_id]))
        """, submission_id)

    def wait_for_registered_checkpoint(self, name: str, step: int, timeout_s: float = 300) -> None:
        """Poll until Ray Train's checkpoint snapshot of run `name` lists the checkpoint of `step`: a worker
        killed before that takes the checkpoint with it, and the run restores from an earlier one."""
        found = self.python_json("""
            import boto3, json, sys, time
            client, bucket, key, wanted = boto3.client("s3"), sys.argv[1], sys.argv[2], sys.argv[3]
            deadline = time.monotonic() + float(sys.argv[4])
            while True:
                try:
                    found = wanted in client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
                except client.exceptions.NoSuchKey:
                    found = False
                if found or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            print(json.dumps(found))
        """, self.settings["BUCKET"], f"checkpoints/{name}/checkpoint_manager_snapshot.json",
            f"checkpoint_{step:07d}", str(timeout_s), timeout_s=timeout_s)
        if not found:
            raise TimeoutError(f"checkpoint_{step:07d} of {name} was not registered within {timeout_s} s")

    def bucket_keys(self, prefix: str) -> list[str]:
        return self.python_json("""
            import boto3, json, sys
            pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=sys.argv[1], Prefix=sys.argv[2])
            print(json.dumps([o["Key"] for page in pages for o in page.get("Contents", [])]))
        """, self.settings["BUCKET"], prefix)

    def node_pids(self, node: str) -> list[int]:
        return [int(p) for p in self.run("node-pids", node).stdout.split()]

    def kill_node(self, node: str) -> list[int]:
        """SIGKILL every process of a worker node (by PID); returns the PIDs."""
        pids = self.node_pids(node)
        self.run("kill-node", node)
        return pids

    def start_node(self, node: str) -> None:
        self.run("start-node", node, timeout_s=300)
