"""pipelines/predict.py: bulk scoring to Parquet, one row per image (unreadable ones flagged), resumable,
local and s3:// (moto server) inputs and outputs. main() runs in-process on the session's Ray cluster; the
crash test (a SIGKILL mid-write) is in test_predict_crash.py. The model and images: fixtures_predict.py."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "pipelines"))
import predict as predict_cli  # noqa: E402
from fixtures_predict import expected_scores  # noqa: E402


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
                             "--threshold", "2"]) == 2
    assert predict_cli.main(["--model", str(checkpoint), "--data", str(folder), "--output", str(output),
                             "--threshold", "2", "--overwrite"]) == 0
    rows = read_results(str(output))
    assert len(rows) == 7 and not any(r["is_anomalous"] for r in rows)
    assert not (output / "heatmaps").exists()


@pytest.fixture
def calibrated(model_and_images, tmp_path):
    """The predict model with a per-class table (nut: a threshold no image reaches) and a manifest of the images
    whose odd rows are 'nut', even rows 'screw', plus a duplicate row; (checkpoint, manifest, paths, classes)."""
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
    return calibrated, str(tmp_path / "list.parquet"), paths, classes


def test_manifest_input_scores_each_row_with_its_class_threshold(calibrated, model_and_images, ray_session,
                                                                  tmp_path, capsys):
    """A manifest's category column picks each row's threshold from the model's per-class table; a class the
    table lacks is decided by the global threshold, and every row says which was used. A --threshold the user
    typed decides every row instead, and --set data.categories scores only those classes' rows."""
    checkpoint, manifest, paths, classes = calibrated
    threshold = model_and_images[2]
    assert predict_cli.main(["--model", str(checkpoint), "--data", manifest, "--output", str(tmp_path / "out")]) == 0
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

    capsys.readouterr()
    assert predict_cli.main(["--model", str(checkpoint), "--data", manifest, "--output", str(tmp_path / "typed"),
                             "--threshold", str(threshold), "--set", "data.categories=[nut]"]) == 0
    assert f"global threshold {threshold:.6g} (--threshold), 0 class thresholds" in capsys.readouterr().out
    rows = read_results(str(tmp_path / "typed"))
    assert sorted(r["uri"] for r in rows) == [p for p, c in zip(paths, classes) if c == "nut"]
    assert {r["class"] for r in rows} == {"global"}
    assert all(r["threshold"] == pytest.approx(threshold) for r in rows)
    scored = [r for r in rows if r["error"] is None]
    assert all(r["is_anomalous"] == (r["score"] >= np.float32(threshold)) for r in scored)
    assert any(r["is_anomalous"] for r in scored)  # the nut table's 1e6 would have called none anomalous


def test_typed_threshold_replaces_the_class_table(calibrated, model_and_images):
    """Checked before any Ray work: --threshold becomes the only threshold, named as the user's."""
    from dinomaly.distributed.batch import predict

    checkpoint, manifest, paths, _ = calibrated
    own = predict.prepare(str(checkpoint), manifest, None, [], None, 100)
    assert set(own.thresholds.classes) == {"nut"} and own.thresholds.global_threshold.source == "calibration"
    typed = predict.prepare(str(checkpoint), manifest, None, [], 0.25, 100)
    assert typed.thresholds.classes == {}
    assert (typed.thresholds.global_threshold.threshold, typed.thresholds.global_threshold.source) == (0.25, "--threshold")
    assert typed.inputs == own.inputs == paths and typed.classes == own.classes


@pytest.mark.parametrize("value", ["0", "-1", "inf", "2.5"])
def test_threshold_must_be_a_possible_score(capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        predict_cli.build_parser().parse_args(["--model", "m", "--data", "d", "--output", "o", "--threshold", value])
    assert exit_info.value.code == 2 and f"--threshold: {value} must be in (0, 2]" in capsys.readouterr().err
    assert predict_cli.build_parser().parse_args(["--model", "m", "--data", "d", "--output", "o",
                                                  "--threshold", "2"]).threshold == 2


def test_categories_select_manifest_rows(calibrated, model_and_images):
    from dinomaly.distributed.batch import predict

    checkpoint, manifest, paths, classes = calibrated
    job = predict.prepare(str(checkpoint), manifest, None, ["data.categories=[screw]", "eval.actors=1"], None, 100)
    screws = [p for p, c in zip(paths, classes) if c == "screw"]
    assert job.inputs == screws and job.classes == dict.fromkeys(screws, "screw")
    both = predict.prepare(str(checkpoint), manifest, None, ["data.categories=[nut, screw]"], None, 100)
    assert both.inputs == paths
    everything = predict.prepare(str(checkpoint), manifest, None, ["data.categories=[]"], None, 100)
    assert everything.inputs == paths
    with pytest.raises(ValueError, match=r"data.categories \['bolt'\] are not in .*its classes: \['nut', 'screw'\]"):
        predict.prepare(str(checkpoint), manifest, None, ["data.categories=[nut, bolt]"], None, 100)
    folder = str(model_and_images[1])  # a folder has no classes to select from
    with pytest.raises(ValueError, match="none: no category column"):
        predict.prepare(str(checkpoint), folder, None, ["data.categories=[nut]"], None, 100)


def test_a_missing_or_imageless_folder_is_named(model_and_images, tmp_path):
    from dinomaly.distributed.batch import predict

    checkpoint = str(model_and_images[0])
    with pytest.raises(FileNotFoundError, match="nowhere does not exist or holds no files"):
        predict.prepare(checkpoint, str(tmp_path / "nowhere"), None, [], None, 100)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=r"no image files under .*notes \(1 files, none with an image ext"):
        predict.prepare(checkpoint, str(tmp_path / "notes"), None, [], None, 100)


def test_an_output_that_is_a_file_fails_before_any_ray_work(model_and_images, tmp_path, monkeypatch, capsys):
    from dinomaly.distributed.batch import predict

    def no_run(*args, **kwargs):
        raise AssertionError("predict ran although its output cannot be written")

    monkeypatch.setattr(predict, "run", no_run)
    checkpoint, folder = str(model_and_images[0]), str(model_and_images[1])
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert predict_cli.main(["--model", checkpoint, "--data", folder, "--output", str(blocker)]) == 2
    assert "is not a writable folder; choose another --output" in capsys.readouterr().err


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


def test_packed_manifest_is_scored_from_its_shards_and_resumes(model_and_images, ray_session, tmp_path):
    """With the original files deleted, a packed manifest's images still score, each once, as the files did
    (the scores predict gives on files: test_local_one_row_per_image_resume_and_overwrite), and a run that
    lost a part file continues with only the missing rows."""
    from dinomaly.config import DataConfig
    from dinomaly.data.manifest import load_manifest, read_manifest
    from dinomaly.data.pack import pack_manifest, packed_layout
    from dinomaly.inference import Predictor

    checkpoint, images, _ = model_and_images
    demo = shutil.copytree(images.parent / "demo", tmp_path / "demo")  # 7 nut images (1 train), masks
    manifest = load_manifest(DataConfig(root=str(demo)))
    paths = [Path(uri) for uri in manifest.column("image_uri").to_pylist()]
    wanted = expected_scores(Predictor.from_checkpoint(checkpoint), paths)
    packed = pack_manifest(manifest, str(tmp_path / "packed.parquet"),
                           shard_bytes=sum(manifest.column("size_bytes").to_pylist()) // 2)
    assert len(packed_layout(read_manifest(packed))["shards"]) >= 2
    shutil.rmtree(demo)  # from here on only the shards hold the images
    output = tmp_path / "out"
    args = ["--model", str(checkpoint), "--data", packed, "--output", str(output), "--rows-per-file", "3",
            "--set", "data.fast_decode=false"]
    assert predict_cli.main(args) == 0
    rows = read_results(str(output))
    assert sorted(r["uri"] for r in rows) == sorted(wanted)  # each image once, keyed by its image_uri
    for row in rows:
        assert row["error"] is None and row["score"] == pytest.approx(wanted[row["uri"]], abs=1e-6)

    parts = sorted((output / "results").glob("part-*.parquet"))
    assert len(parts) >= 2
    lost = pq.read_table(parts[-1]).column("uri").to_pylist()
    parts[-1].unlink()  # as if the run had been killed before its last part was written
    assert predict_cli.main(args) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert (summary["skipped"], summary["scored"], summary["errors"]) == (len(wanted) - len(lost), len(lost), 0)
    resumed = {r["uri"]: r["score"] for r in read_results(str(output))}
    assert len(resumed) == summary["total_rows"] == len(wanted)
    assert resumed == pytest.approx(wanted, abs=1e-6)


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


@pytest.mark.parametrize("name", ["predict", "calibrate", "export"])
def test_help_examples_paste_and_output_is_marked_required(name, capsys):
    """Each example command in --help runs when pasted: a line continued on the next ends with a backslash."""
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(name).build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    lines = text.splitlines()
    examples = [i for i, line in enumerate(lines) if line.startswith("    python pipelines/")]
    assert examples
    for i in examples:
        while lines[i + 1].startswith("        "):  # a continuation line
            assert lines[i].endswith(" \\"), f"{lines[i]!r} lacks its trailing backslash"
            i += 1
    output_help = text[text.index("  --output DIR"):].split("\n  --", 1)[0]
    assert "required" in output_help
