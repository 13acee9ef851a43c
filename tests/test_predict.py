"""pipelines/predict.py: bulk scoring to Parquet, one row per image (unreadable ones flagged), resumable,
local and s3:// (moto server) inputs and outputs. main() runs in-process on the session's Ray cluster."""

from __future__ import annotations

import io
import json
import shutil
import sys
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
    assert predict_cli.main(["--model", str(checkpoint), "--input", str(folder), "--output", str(output),
                             "--heatmaps", "--set", "eval.actors=2"]) == 0
    rows = {r["uri"]: r for r in read_results(str(output))}
    assert set(rows) == {str(p) for p in folder.rglob("*.png")}  # 5 images + broken.png, notes.txt not listed
    broken = rows.pop(str(folder / "broken.png"))
    assert "CorruptImageError" in broken["error"] and broken["score"] is None and broken["is_anomalous"] is None
    for uri, row in rows.items():
        assert row["error"] is None
        assert row["score"] == pytest.approx(wanted[uri.replace(str(folder), str(images))], abs=1e-6)
        assert row["is_anomalous"] == (row["score"] >= np.float32(threshold))
        assert row["threshold"] == pytest.approx(threshold)
        side = Image.open(uri).size[0]
        assert (row["height"], row["width"]) == (side, side)
        assert 0 <= row["peak_row"] < side and 0 <= row["peak_col"] < side
        assert 0 <= row["peak_row_map"] < 256 and 0 <= row["peak_col_map"] < 256
        assert Image.open(io.BytesIO(Path(row["heatmap_uri"]).read_bytes())).size == (56, 56)
    first = json.loads((output / "summary.json").read_text())
    assert (first["scored"], first["errors"], first["skipped"]) == (5, 1, 0)

    # re-run after a new image arrived: only that one is scored
    (tmp_path / "img5.png").rename(late)
    assert predict_cli.main(["--model", str(checkpoint), "--input", str(folder), "--output", str(output),
                             "--heatmaps"]) == 0
    second = json.loads((output / "summary.json").read_text())
    assert (second["scored"], second["errors"], second["skipped"], second["total_rows"]) == (1, 0, 6, 7)
    uris = [r["uri"] for r in read_results(str(output))]
    assert len(uris) == len(set(uris)) == 7

    # another threshold is another run: refused without --overwrite, replaced with it
    assert predict_cli.main(["--model", str(checkpoint), "--input", str(folder), "--output", str(output),
                             "--threshold", "1e9"]) == 2
    assert predict_cli.main(["--model", str(checkpoint), "--input", str(folder), "--output", str(output),
                             "--threshold", "1e9", "--overwrite"]) == 0
    rows = read_results(str(output))
    assert len(rows) == 7 and not any(r["is_anomalous"] for r in rows)
    assert not (output / "heatmaps").exists()


def test_manifest_input_scores_each_row(model_and_images, ray_session, tmp_path):
    import pyarrow as pa

    checkpoint, images, _ = model_and_images
    paths = sorted(str(p) for p in images.rglob("*.png"))
    pq.write_table(pa.table({"image_uri": paths + paths[:1]}), tmp_path / "list.parquet")  # a duplicate
    assert predict_cli.main(["--model", str(checkpoint), "--input", str(tmp_path / "list.parquet"),
                             "--output", str(tmp_path / "out")]) == 0
    assert sorted(r["uri"] for r in read_results(str(tmp_path / "out"))) == paths


def test_s3_input_and_output_resume(model_and_images, ray_session, moto_s3):
    checkpoint, images, threshold = model_and_images
    source = moto_s3.upload(images, "predict-in")
    output = moto_s3.uri("predict-out")
    args = ["--model", str(checkpoint), "--input", source, "--output", output, "--heatmaps"]
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
    assert predict_cli.main(["--model", str(checkpoint), "--input", str(images),
                             "--output", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "precious.csv").exists()
