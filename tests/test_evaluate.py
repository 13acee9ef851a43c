"""pipelines/evaluate.py: Ray Data scoring + per-class streamed metrics equal the core on the same maps
(the subprocess run of the script: test_evaluate_cli.py; data, checkpoint and core metrics: fixtures_evaluate.py).

Real parts at toy size: a random-init tiny DINOv2-reg encoder saved with dinomaly.checkpoint.save, generated
MVTec-layout demo data (64 px, one test image corrupted), the session's local Ray cluster, a sqlite MLflow.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dinomaly.config import apply_overrides, load_config
from dinomaly.metrics import METRIC_NAMES, compute_metrics

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "pipelines"))
import evaluate as evaluate_cli  # noqa: E402
from fixtures_evaluate import CLASSES, core_metrics  # noqa: E402


@pytest.fixture(scope="module")
def exact_run(setup, ray_session, tmp_path_factory):
    root, checkpoint, _, _ = setup
    output = tmp_path_factory.mktemp("exact") / "out"
    rc = evaluate_cli.main(["--model", str(checkpoint), "--data", str(root), "--output", str(output),
                            "--heatmaps", "1", "--set", "eval.actors=2"])
    assert rc == 0
    return output, json.loads((output / "metrics.json").read_text())


def test_metrics_equal_core_compute_metrics(setup, exact_run):
    from dinomaly.inference import Predictor

    root, checkpoint, config, corrupt = setup
    output, info = exact_run
    expected = core_metrics(root, Predictor.from_checkpoint(checkpoint), config)
    assert info["job"] == "evaluate" and list(info["classes"]) == CLASSES  # dinomaly.results layout
    for name in CLASSES:
        for key in METRIC_NAMES:
            assert info["classes"][name][key] == pytest.approx(expected[name][key], abs=1e-6), (name, key)
    for key in METRIC_NAMES:  # dataset number = unweighted mean over classes (issue #12)
        assert info["mean"][key] == pytest.approx(np.mean([expected[c][key] for c in CLASSES]), abs=1e-6)
    # the corrupt image is reported, not dropped, and left out of the metrics
    assert [u["uri"] for u in info["unreadable"]] == [str(corrupt)]
    scores = pq.read_table(output / "scores.parquet").to_pylist()
    assert len(scores) == info["images"] == 12
    bad = [row for row in scores if row["error"]]
    assert len(bad) == 1 and bad[0]["uri"] == str(corrupt) and math.isnan(bad[0]["score"])
    csv_lines = (output / "per_class.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in csv_lines] == ["class", *CLASSES, "mean"]
    assert (output / "per_class.md").read_text().startswith("| class |")


def test_heatmaps_of_highest_scored_normal_and_defective_images(setup, exact_run):
    output, _ = exact_run
    scores = pq.read_table(output / "scores.parquet").to_pylist()
    for name in CLASSES:
        files = sorted(p.name for p in (output / "heatmaps" / name).iterdir())
        assert "grid.png" in files and len(files) == 3
        for kind, label in (("normal", 0), ("defect", 1)):
            rows = [r for r in scores if r["category"] == name and r["label"] == label and not r["error"]]
            top = max(rows, key=lambda r: r["score"])
            assert any(f.startswith(f"{kind}_0_{Path(top['uri']).stem}-") for f in files), (name, kind, files)


def test_s3_output_gets_every_file_and_no_local_folder(setup, exact_run, ray_session, moto_s3, tmp_path,
                                                       monkeypatch):
    """--output s3://bucket/prefix/: metrics.json, per_class.*, scores.parquet and heatmaps/ land in the bucket
    with the local run's numbers, nothing is left half-written or probing there, and no local folder 's3:'
    appears (pathlib would have made one)."""
    root, checkpoint, _, _ = setup
    _, local = exact_run
    monkeypatch.chdir(tmp_path)
    rc = evaluate_cli.main(["--model", str(checkpoint), "--data", str(root), "--output", moto_s3.uri("eval-out") + "/",
                            "--heatmaps", "1"])
    assert rc == 0
    client = moto_s3.client()
    listed = client.list_objects_v2(Bucket=moto_s3.bucket, Prefix="eval-out/").get("Contents", [])
    keys = {item["Key"].removeprefix("eval-out/") for item in listed}
    assert not [key for key in keys if key.endswith("/")], "empty folder-marker objects"
    heatmaps = {k for k in keys if k.startswith("heatmaps/")}
    assert keys - heatmaps == {"metrics.json", "per_class.txt", "per_class.csv", "per_class.md", "scores.parquet"}
    for name in CLASSES:
        assert f"heatmaps/{name}/grid.png" in heatmaps and sum(k.startswith(f"heatmaps/{name}/") for k in heatmaps) == 3

    def read(key: str) -> bytes:
        return client.get_object(Bucket=moto_s3.bucket, Key=f"eval-out/{key}")["Body"].read()

    info = json.loads(read("metrics.json"))
    for name in CLASSES:
        for key in METRIC_NAMES:
            assert info["classes"][name][key] == pytest.approx(local["classes"][name][key], abs=1e-9), (name, key)
    assert pq.read_table(pa.BufferReader(read("scores.parquet"))).num_rows == info["images"] == 12
    assert read("per_class.csv").decode().splitlines()[0].startswith("class,")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_fails_before_any_ray_work(setup, moto_s3, tmp_path, monkeypatch, capsys):
    """A missing bucket or a local --output under a file: exit 2 with the fix named, before the job runs."""
    from dinomaly.distributed.batch import evaluate

    def no_run(*args, **kwargs):
        raise AssertionError("the evaluation ran although its output cannot be written")

    monkeypatch.setattr(evaluate, "run", no_run)
    root, checkpoint, _, _ = setup
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for output, expected in (("s3://missing-bucket/eval", "bucket s3://missing-bucket"),
                             (str(blocker / "out"), "is not a writable folder")):
        rc = evaluate_cli.main(["--model", str(checkpoint), "--data", str(root), "--output", output])
        err = capsys.readouterr().err
        assert rc == 2 and expected in err, err


def test_gpu_asked_of_a_local_ray_without_gpus_fails_before_any_ray_work(setup, monkeypatch, capsys):
    import ray._private.utils
    import torch

    from dinomaly.distributed.batch import evaluate

    def no_run(*args, **kwargs):
        raise AssertionError("the evaluation ran although no GPU is there")

    monkeypatch.setattr(evaluate, "run", no_run)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray._private.utils, "read_ray_address", lambda *a, **k: None)  # no running Ray to join
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    root, checkpoint, _, _ = setup
    assert evaluate_cli.main(["--model", str(checkpoint), "--data", str(root), "--gpu"]) == 2
    err = capsys.readouterr().err
    assert "eval.gpus_per_actor (--gpu) asks for 1 GPU(s) but this machine has 0; drop --gpu" in err, err


def test_the_write_probe_leaves_a_prefix_as_it_found_it(moto_s3):
    """check_output_writable's probe object goes, and in a new prefix so does the empty marker pyarrow writes when it
    deletes it; files already under the prefix stay (beside that marker: pyarrow cannot delete it alone)."""
    from dinomaly.config import Config
    from dinomaly.data.storage import check_output_writable as check_output

    client, bucket = moto_s3.client(), moto_s3.bucket

    def keys(prefix: str) -> list[str]:
        return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))

    check_output(moto_s3.uri("probe/fresh"), Config().data)
    assert keys("probe/") == []
    client.put_object(Bucket=bucket, Key="probe/kept/old.json", Body=b"{}")
    check_output(moto_s3.uri("probe/kept"), Config().data)
    assert set(keys("probe/")) - {"probe/kept/"} == {"probe/kept/old.json"}


def test_class_streams_equal_all_in_memory_and_free_each_class():
    """Batches that interleave classes in uneven sizes: each class is computed once complete and then freed;
    'exact' equals compute_metrics on the whole class, 'streaming' is within 1e-5 (image metrics exact)."""
    from dinomaly.distributed.batch.evaluate import ClassStreams

    rng = np.random.default_rng(0)
    count, size = 24, 32
    labels = np.array([0, 1] * (count // 2))
    masks = np.zeros((count, size, size), bool)
    for i in np.flatnonzero(labels):
        r, c = rng.integers(0, size - 8, 2)
        masks[i, r:r + rng.integers(2, 8), c:c + rng.integers(2, 8)] = True
    maps = (rng.random((count, size, size)) + masks * rng.random()).astype(np.float32)
    scores = maps.reshape(count, -1).max(1)
    categories = np.array(["a"] * 10 + ["b"] * 14, dtype=object)
    order = np.r_[0:6, 10:16, 6:10, 16:24]  # a, b, a (a completes here), b
    config = load_config(None)
    for mode, tolerance in (("exact", 1e-12), ("streaming", 1e-5)):
        streams = ClassStreams({"a": 10, "b": 14}, apply_overrides(config, {"eval.pixel_metrics": mode}), 0)
        for start, stop in ((0, 6), (6, 12), (12, 16), (16, 24)):
            pick = order[start:stop]
            streams.add({"category": categories[pick], "label": labels[pick], "score": scores[pick],
                         "mask": masks[pick], "map": maps[pick], "uri": pick.astype(str).astype(object),
                         "error": np.full(len(pick), "", dtype=object)})
            if stop == 16:
                assert "a" in streams.results and "a" not in streams.open and "b" in streams.open
        results = streams.finish()
        assert not streams.open
        for name, rows in (("a", slice(0, 10)), ("b", slice(10, 24))):
            expected = compute_metrics(labels[rows], scores[rows], masks[rows], maps[rows])
            for key in METRIC_NAMES:
                exact_here = mode == "exact" or key.startswith("image")
                assert results[name][key] == pytest.approx(expected[key], abs=1e-12 if exact_here else tolerance)


def test_streaming_pixel_metrics_match_exact_and_log_to_mlflow(setup, exact_run, ray_session, mlflow_uri,
                                                                 tmp_path):
    """models:/ registry version, eval.pixel_metrics=streaming, --mlflow: metrics within 1e-5 of the exact run,
    image metrics identical, and the run holds test/<class>/<metric> and the output files."""
    from mlflow import MlflowClient

    from dinomaly.distributed.tracking import RunLogger, open_run

    root, checkpoint, config, _ = setup
    _, exact = exact_run
    tracking = {"tracking.tracking_uri": mlflow_uri, "tracking.experiment_name": "evaluate-test"}
    registered = apply_overrides(config, tracking)
    version = RunLogger(mlflow_uri, open_run(registered, "register"), "tiny-eval").log_final(
        registered, rows=[], heatmaps=None, checkpoint_dir=checkpoint, tags={})
    MlflowClient(mlflow_uri).set_registered_model_alias("tiny-eval", "champion", version)
    output = tmp_path / "out"
    (output / "heatmaps" / "nut").mkdir(parents=True)
    for stale in (output / ".scores.parquet.tmp", output / "heatmaps" / "nut" / ".grid.png.tmp"):
        stale.write_bytes(b"PAR1 half a file")  # what a killed run leaves behind
    rc = evaluate_cli.main(["--model", "models:/tiny-eval@champion", "--data", str(root), "--output", str(output),
                            "--mlflow", "--set", "eval.pixel_metrics=streaming",
                            *[f"--set={k}={v}" for k, v in tracking.items()]])
    assert rc == 0
    info = json.loads((output / "metrics.json").read_text())
    assert info["model"]["source"] == "models:/tiny-eval@champion" and info["settings"]["pixel_metrics"] == "streaming"
    for name in CLASSES:
        for key in METRIC_NAMES:
            tolerance = 0 if key.startswith("image") else 1e-5
            assert info["classes"][name][key] == pytest.approx(exact["classes"][name][key], abs=tolerance)
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("evaluate-test").experiment_id],
                              filter_string="attributes.run_name LIKE 'evaluate-%'")
    assert len(runs) == 1
    assert runs[0].data.metrics["test/mean/image_auroc"] == pytest.approx(info["mean"]["image_auroc"])
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"metrics.json", "per_class.csv", "per_class.md", "scores.parquet"} <= artifacts
    assert not list(output.rglob(".*.tmp")) and not any(a.startswith(".") for a in artifacts)


def test_outputs_are_replaced_whole_or_not_at_all(tmp_path):
    """A writer that dies halfway (as under SIGKILL) leaves the previous file as it was, never half of the new."""
    from dinomaly.results import replace_atomically

    target = tmp_path / "metrics.json"
    target.write_text('{"old": 1}')

    def dies_halfway(path: Path) -> None:
        path.write_text('{"ne')
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        replace_atomically(target, dies_halfway)
    assert json.loads(target.read_text()) == {"old": 1}
    replace_atomically(target, lambda path: path.write_text('{"new": 2}'))
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"] and json.loads(target.read_text()) == {"new": 2}


def test_official_weights_need_a_config(reference_dir, capsys):
    rc = evaluate_cli.main(["--model", str(reference_dir / "official_checkpoint.pth"), "--data", "unused"])
    assert rc == 2 and "--config" in capsys.readouterr().err
