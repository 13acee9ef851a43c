"""`python pipelines/evaluate.py` as a user runs it, in its own process with its own Ray (no session cluster,
so this module runs beside the cluster modules): the official-format checkpoint, scored and measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from fixtures_evaluate import CLASSES, core_metrics, f1_max
from sklearn.metrics import average_precision_score, roc_auc_score

from dinomaly.config import load_config
from dinomaly.metrics import METRIC_NAMES
from dinomaly.results import validate_metrics

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # pipelines/evaluate.py starts its own Ray
def test_official_checkpoint_end_to_end_cli(setup, reference_dir, reference_model, tmp_path):
    """The one subprocess run: `python pipelines/evaluate.py` on the official-format tiny checkpoint with its own
    preset; its scores equal the reference model (load_official) scored in this process."""
    from dinomaly.data.storage import read_bytes
    from dinomaly.data.transforms import decode_image, normalize, resize_crop_image
    from dinomaly.inference import Predictor

    root = setup[0]
    preset = tmp_path / "reference.yaml"
    preset.write_text(
        "model:\n  encoder: vit_small_patch14_reg4_dinov2\n  encoder_weights: none\n"
        "  encoder_kwargs: {embed_dim: 32, num_heads: 2}\n  image_size: 84\n  crop_size: 84\n"
        "eval:\n  batch_size: 4\n")
    output = tmp_path / "out"
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "pipelines" / "evaluate.py"), "--model",
                           str(reference_dir / "official_checkpoint.pth"), "--config", str(preset), "--data", str(root),
                           "--output", str(output)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mean" in done.stdout and "P-AUPRO" in done.stdout
    info = json.loads((output / "metrics.json").read_text())
    assert info["model"]["version"] == "official" and list(info["classes"]) == CLASSES
    validate_metrics(info)  # the one metrics.json schema of train, tune trials and evaluate
    assert info["schema_version"] == 1 and info["job"] == "evaluate"
    rows = [r for r in pq.read_table(output / "scores.parquet").to_pylist() if not r["error"]]
    assert len(rows) == 11
    pixels = np.stack([resize_crop_image(decode_image(read_bytes(r["uri"])), 84, 84) for r in rows])
    predictor = Predictor(reference_model, load_config(str(preset)).eval)
    np.testing.assert_allclose([r["score"] for r in rows], predictor.predict(normalize(pixels)).scores,
                               rtol=1e-5, atol=1e-6)

    # image metrics recomputed with scikit-learn from scores.parquet and the labels the demo layout gives
    # (test/good is normal), not the pipeline's label column; pixel metrics from the core on the same model
    pixel = core_metrics(root, predictor, load_config(str(preset)))
    for name in CLASSES:
        mine = [r for r in rows if r["category"] == name]
        labels = np.array([int(Path(r["uri"]).parent.name != "good") for r in mine])
        assert [r["label"] for r in mine] == labels.tolist()
        scores = np.array([r["score"] for r in mine], dtype=np.float64)
        expected = {"image_auroc": roc_auc_score(labels, scores), "image_ap": average_precision_score(labels, scores),
                    "image_f1_max": f1_max(labels, scores)}
        expected.update({k: v for k, v in pixel[name].items() if k.startswith("pixel")})
        assert set(expected) == set(METRIC_NAMES)
        for key, value in expected.items():
            assert info["classes"][name][key] == pytest.approx(value, abs=1e-6), (name, key)
