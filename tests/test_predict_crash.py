"""pipelines/predict.py killed mid-write: the script runs in its own process group, with its own Ray (no session
cluster, so this module runs beside the cluster modules), and the whole group is SIGKILLed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parent.parent


HOLD_MID_WRITE = """
import os, runpy, sys, time
import pyarrow as pa, pyarrow.parquet as pq
marker, passing, script = sys.argv[1], int(sys.argv[2]), sys.argv[3]
real, parts = pq.write_table, []

def write_table(table, where, *args, **kwargs):
    if "part-" not in os.path.basename(str(where)):
        return real(table, where, *args, **kwargs)
    parts.append(where)
    if len(parts) <= passing:
        return real(table, where, *args, **kwargs)
    sink = pa.BufferOutputStream()
    real(table, sink)
    data = sink.getvalue().to_pybytes()
    with kwargs["filesystem"].open_output_stream(str(where)) as stream:
        stream.write(data[: len(data) // 2])
    with open(marker + ".tmp", "w") as note:
        note.write(str(where))
    os.replace(marker + ".tmp", marker)
    time.sleep(3600)

pq.write_table = write_table
sys.argv = sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""


def group_members(leader: int) -> set[int]:
    """Live processes in the process group or session that `leader` started (zombies have already exited).
    The session counts: Ray's workers each move to a process group of their own, but stay in it."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _, group, session = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):
            continue
        if state != "Z" and leader in (int(group), int(session)):
            found.add(int(entry.name))
    return found


def kill_group(process: subprocess.Popen, wait_s: float = 30) -> set[int]:
    """SIGKILL, by id, the process group `process` leads (the script and the Ray it started) and every other
    process of its session (Ray's workers); returns what is still alive after `wait_s`."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=wait_s)
    deadline = time.monotonic() + wait_s
    while (left := group_members(process.pid)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return left


def naming(text: str) -> set[int]:
    """Processes whose command line contains `text` (Ray's GCS and raylet name their temp dir)."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.add(int(entry.name))
        except OSError:
            continue
    return found


@contextmanager
def own_group(command: list[str], env: dict[str, str], log: Path):
    """`command` as the leader of a new session and process group; the whole group is killed afterwards."""
    with log.open("ab") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield process
    finally:
        kill_group(process)  # whatever happened in the test, nothing of the run outlives it


RAY_START_TIMEOUT = "The current node timed out during startup"


@contextmanager
def held_at_marker(command: list[str], env: dict[str, str], log: Path, marker: Path):
    """own_group(command), once the run has written `marker`. Ray gives a starting node's raylet 30 s to
    register (hard-coded in ray/_private/node.py), which a 2-core machine running a parallel test's Ray can
    miss: a run that ended with exactly that error is started once more; any other ending fails the test."""
    for attempt in range(2):
        with own_group(command, env, log) as held:
            deadline = time.monotonic() + 300
            while not marker.exists() and held.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if marker.exists():
                yield held
                return
            if attempt == 0 and held.poll() is not None and RAY_START_TIMEOUT in tail(log):
                continue
            raise AssertionError(f"the run never reached its marker (rc {held.poll()}):\n{tail(log)}")


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]


@pytest.mark.slow
def test_killed_mid_write_leaves_readable_results_and_resumes(model_and_images, tmp_path):
    """SIGKILL of the whole process group while a part is half-written: <output>/results reads as the README
    says, nothing the run started survives, and re-running the same command completes each image exactly once."""
    checkpoint, images, _ = model_and_images
    folder = tmp_path / "in"
    for copy in range(3):
        for path in sorted(images.rglob("img*.png")):
            target = folder / f"c{copy}" / path.relative_to(images)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    shutil.copy(images / "broken.png", folder / "broken.png")  # an error row is a row like any other
    inputs = sorted(str(p) for p in folder.rglob("*.png"))
    output, marker, log = tmp_path / "out", tmp_path / "held", tmp_path / "predict.log"
    ray_tmp = tempfile.mkdtemp(prefix="raypred_", dir="/tmp")  # short: Ray's socket paths have a length limit
    # a Ray of its own: never the session's or a `ray start` cluster that happens to run on the machine
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_ADDRESS": "local",
           "RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    script = str(REPO / "pipelines" / "predict.py")
    args = ["--model", str(checkpoint), "--data", str(folder), "--output", str(output), "--rows-per-file", "2",
            "--set", "eval.batch_size=2"]
    passing = 2
    try:
        with held_at_marker([sys.executable, "-c", HOLD_MID_WRITE, str(marker), str(passing), script, *args], env,
                            log, marker) as held:
            half_written = Path(marker.read_text())
            assert half_written.exists()
            assert len(list((output / "results").glob("part-*.parquet"))) == passing
            ray_processes = naming(ray_tmp)  # its own Ray, inside the session that is killed
            assert ray_processes and ray_processes <= group_members(held.pid)
            left = kill_group(held)
            assert held.returncode == -signal.SIGKILL
            assert not left and not naming(ray_tmp), f"processes of the killed run survived: {sorted(left)}"

        table = pq.read_table(str(output / "results"))  # the README's read, right after the kill
        survived = table.column("uri").to_pylist()
        assert len(survived) == len(set(survived)) >= passing * 2 and set(survived) <= set(inputs)

        with own_group([sys.executable, script, *args], env, log) as resumed:
            assert resumed.wait(timeout=300) == 0, tail(log)
        uris = pq.read_table(str(output / "results")).column("uri").to_pylist()
        assert sorted(uris) == inputs  # every image exactly once: none lost, none scored twice
        summary = json.loads((output / "summary.json").read_text())
        assert (summary["skipped"], summary["total_rows"], summary["total_errors"]) == (len(survived), len(inputs), 1)
        assert not half_written.exists()  # the killed run's leftover is cleaned on resume
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
