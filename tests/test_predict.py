"""pipelines/predict.py: bulk scoring to Parquet, one row per image (unreadable ones flagged), resumable,
local and s3:// (moto server) inputs and outputs. main() runs in-process on the session's Ray cluster; the
crash test runs the script in its own process group, with its own Ray, and SIGKILLs the whole group."""

from __future__ import annotations

import io
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

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dinomaly.config import load_config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "pipelines"))
import predict as predict_cli  # noqa: E402

TINY = ["model.encoder=vit_small_patch14_reg4_dinov2", "model.encoder_weights=none",
        "model.encoder_kwargs={embed_dim: 32, num_heads: 2, depth: 10}", "model.image_size=64", "model.crop_size=56",
        "eval.batch_size=4"]


@pytest.fixture(scope="module")
def model_and_images(tmp_path_factory):
    """A tiny checkpoint whose metadata carries a threshold, 6 demo images of mixed sizes, 1 corrupt, 1 non-image."""
    from dinomaly import Dinomaly
    from dinomaly.checkpoint import save
    from dinomaly.data.demo import generate_demo_dataset

    base = tmp_path_factory.mktemp("predict")
    demo = generate_demo_dataset(base / "demo", classes=["nut"], train_per_class=1, test_good_per_class=3,
                                 test_defect_per_class=3, size=64)
    images = base / "images"
    for i, path in enumerate(sorted((demo / "nut" / "test").rglob("*.png"))):
        target = images / ("sub" if i % 2 else "") / f"img{i}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        size = 64 if i % 3 else 96  # peak locations are in original pixels, whatever the size
        Image.open(path).resize((size, size)).save(target)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (images / "notes.txt").write_text("not an image: never listed")
    config = load_config(None, TINY)
    torch.manual_seed(0)
    model = Dinomaly(config.model)
    from dinomaly.inference import Predictor

    scores = expected_scores(Predictor(model, config.eval), sorted(images.rglob("img*.png")))
    threshold = float(np.median(list(scores.values())))  # some images anomalous, some not
    checkpoint = save(base / "checkpoint", model, config, metadata={"thresholds": {"image_f1_optimal": threshold}})
    return checkpoint, images, threshold


def expected_scores(predictor, paths) -> dict[str, float]:
    from dinomaly.data.transforms import decode_image, normalize, resize_crop_image

    pixels = np.stack([resize_crop_image(decode_image(p.read_bytes()), 64, 56) for p in paths])
    return dict(zip(map(str, paths), predictor.predict(normalize(pixels)).scores.tolist()))


def read_results(output: str) -> list[dict]:
    from dinomaly.data.storage import filesystem_for

    fs, path = filesystem_for(f"{output}/results")
    return pq.read_table(path, filesystem=fs).to_pylist()


def test_local_one_row_per_image_resume_and_overwrite(model_and_images, ray_session, tmp_path):
    checkpoint, images, threshold = model_and_images
    from dinomaly.inference import Predictor

    wanted = expected_scores(Predictor.from_checkpoint(checkpoint), sorted(images.rglob("img*.png")))
    folder = tmp_path / "in"
    shutil.copytree(images, folder)
    late = next(folder.rglob("img5.png"))
    late.rename(tmp_path / "img5.png")  # arrives later
    output = tmp_path / "out"
    assert predict_cli.main(["--model", str(checkpoint), "--data", str(folder), "--output", str(output),
                             "--heatmaps", "--set", "eval.actors=2"]) == 0
    rows = {r["uri"]: r for r in read_results(str(output))}
    assert set(rows) == {str(p) for p in folder.rglob("*.png")}  # 5 images + broken.png, notes.txt not listed
    broken = rows.pop(str(folder / "broken.png"))
    assert "CorruptImageError" in broken["error"] and broken["score"] is None and broken["is_anomalous"] is None
    for uri, row in rows.items():
        assert row["error"] is None
        assert row["score"] == pytest.approx(wanted[uri.replace(str(folder), str(images))], abs=1e-6)
        assert row["is_anomalous"] == (row["score"] >= np.float32(threshold))
        assert row["threshold"] == pytest.approx(threshold) and row["class"] == "global"  # a folder: no class
        assert row["normalised_score"] == pytest.approx(row["score"] / threshold, rel=1e-5)
        side = Image.open(uri).size[0]
        assert (row["height"], row["width"]) == (side, side)
        assert 0 <= row["peak_row"] < side and 0 <= row["peak_col"] < side
        assert 0 <= row["peak_row_map"] < 256 and 0 <= row["peak_col_map"] < 256
        assert Image.open(io.BytesIO(Path(row["heatmap_uri"]).read_bytes())).size == (56, 56)
    first = json.loads((output / "summary.json").read_text())
    assert (first["scored"], first["errors"], first["skipped"]) == (5, 1, 0)
    assert sorted(p.name for p in output.iterdir()) == ["heatmaps", "results", "run.json", "summary.json"]

    # re-run after a new image arrived: only that one is scored
    (tmp_path / "img5.png").rename(late)
    assert predict_cli.main(["--model", str(checkpoint), "--data", str(folder), "--output", str(output),
                             "--heatmaps"]) == 0
    second = json.loads((output / "summary.json").read_text())
    assert (second["scored"], second["errors"], second["skipped"], second["total_rows"]) == (1, 0, 6, 7)
    uris = [r["uri"] for r in read_results(str(output))]
    assert len(uris) == len(set(uris)) == 7

    # another threshold is another run: refused without --overwrite, replaced with it
    assert predict_cli.main(["--model", str(checkpoint), "--data", str(folder), "--output", str(output),
                             "--threshold", "1e9"]) == 2
    assert predict_cli.main(["--model", str(checkpoint), "--data", str(folder), "--output", str(output),
                             "--threshold", "1e9", "--overwrite"]) == 0
    rows = read_results(str(output))
    assert len(rows) == 7 and not any(r["is_anomalous"] for r in rows)
    assert not (output / "heatmaps").exists()


def test_manifest_input_scores_each_row_with_its_class_threshold(model_and_images, ray_session, tmp_path):
    """A manifest's category column picks each row's threshold from the model's per-class table; a class the
    table lacks is decided by the global threshold, and every row says which was used."""
    import pyarrow as pa

    from dinomaly.calibration import METADATA_KEY, ClassThreshold, ThresholdTable
    from dinomaly.checkpoint import load, save

    checkpoint, images, threshold = model_and_images
    loaded = load(checkpoint)
    table = ThresholdTable(ClassThreshold(threshold, "calibration"), {"nut": ClassThreshold(1e6, "calibration")})
    calibrated = save(tmp_path / "calibrated", loaded.model, loaded.config,
                      metadata={**loaded.metadata, METADATA_KEY: table.to_dict()})
    paths = sorted(str(p) for p in images.rglob("*.png"))
    classes = ["nut" if i % 2 else "screw" for i in range(len(paths))]
    pq.write_table(pa.table({"image_uri": paths + paths[:1], "category": classes + classes[:1]}),
                   tmp_path / "list.parquet")  # a duplicate
    assert predict_cli.main(["--model", str(calibrated), "--data", str(tmp_path / "list.parquet"),
                             "--output", str(tmp_path / "out")]) == 0
    rows = read_results(str(tmp_path / "out"))
    assert sorted(r["uri"] for r in rows) == paths
    for row in rows:
        named = classes[paths.index(row["uri"])]
        assert row["class"] == ("nut" if named == "nut" else "global")
        assert row["threshold"] == pytest.approx(1e6 if named == "nut" else threshold)
        if row["error"] is None:
            assert row["normalised_score"] == pytest.approx(row["score"] / row["threshold"], rel=1e-5)
            assert row["is_anomalous"] == (row["normalised_score"] >= 1)
    assert not any(r["is_anomalous"] for r in rows if r["class"] == "nut")
    assert any(r["is_anomalous"] for r in rows if r["class"] == "global")


def test_s3_input_and_output_resume(model_and_images, ray_session, moto_s3):
    checkpoint, images, threshold = model_and_images
    source = moto_s3.upload(images, "predict-in")
    output = moto_s3.uri("predict-out")
    args = ["--model", str(checkpoint), "--data", source, "--output", output, "--heatmaps"]
    assert predict_cli.main(args) == 0
    rows = read_results(output)
    assert len(rows) == 7 and {r["uri"] for r in rows} == {f"{source}/{p.relative_to(images).as_posix()}"
                                                           for p in images.rglob("*.png")}
    assert sum(r["error"] is not None for r in rows) == 1
    client = moto_s3.client()
    for row in rows:
        if row["error"] is None:
            key = row["heatmap_uri"].removeprefix(f"s3://{moto_s3.bucket}/")
            png = client.get_object(Bucket=moto_s3.bucket, Key=key)["Body"].read()
            assert png.startswith(b"\x89PNG")
    assert predict_cli.main(args) == 0  # everything already there
    summary = json.loads(client.get_object(Bucket=moto_s3.bucket, Key="predict-out/summary.json")["Body"].read())
    assert (summary["skipped"], summary["scored"], summary["total_rows"]) == (7, 0, 7)
    assert summary["anomaly_rate"] == pytest.approx(
        sum(bool(r["is_anomalous"]) for r in rows) / 6)


def test_unknown_folder_content_needs_overwrite(model_and_images, ray_session, tmp_path, capsys):
    checkpoint, images, _ = model_and_images
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.csv").write_text("someone else's file")
    assert predict_cli.main(["--model", str(checkpoint), "--data", str(images),
                             "--output", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "precious.csv").exists()


# --------------------------------------------------------------------------- killed mid-write

# Runs pipelines/predict.py with pyarrow.parquet.write_table wrapped: the first PASSING part writes go through,
# the next one writes half of its Parquet bytes where the pipeline put it, names that file in MARKER and waits
# to be killed. So the SIGKILL lands mid-write every time, whatever the machine's speed.
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
        with own_group([sys.executable, "-c", HOLD_MID_WRITE, str(marker), str(passing), script, *args], env,
                       log) as held:
            deadline = time.monotonic() + 300
            while not marker.exists() and held.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert marker.exists(), f"the run never reached part {passing + 1} (rc {held.poll()}):\n{tail(log)}"
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


def test_decisions_per_row_class_with_nulls_for_unscored_rows():
    """evaluate's scores.parquet and predict's rows get the same decision columns (no Ray needed)."""
    import pyarrow as pa

    from dinomaly.calibration import ClassThreshold, ThresholdTable
    from dinomaly.distributed.batch.scoring import add_decisions

    table = ThresholdTable(ClassThreshold(0.5, "calibration"), {"nut": ClassThreshold(0.2, "calibration")})
    rows = pa.table({"uri": ["a", "b", "c", "d"], "category": ["nut", "screw", "nut", "nut"],
                     "score": np.array([0.3, 0.3, np.nan, 0.1], np.float32), "error": ["", "", "unreadable", ""]})
    decided = add_decisions(rows, table).to_pydict()
    assert decided["class"] == ["nut", "global", "nut", "nut"]
    assert decided["threshold"] == pytest.approx([0.2, 0.5, 0.2, 0.2])
    assert decided["is_anomalous"] == [True, False, None, False]
    assert decided["normalised_score"][:2] == pytest.approx([1.5, 0.6]) and decided["normalised_score"][2] is None
    without = add_decisions(rows, None).to_pydict()  # official weights: no threshold, no verdict
    assert without["class"] == [None] * 4 and without["is_anomalous"] == [None] * 4
