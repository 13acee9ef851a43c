"""Per-class thresholds at a target false-positive rate from normal images only (dinomaly.calibration), the
held-back training images they come from, and pipelines/calibrate.py recalibrating a trained model."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from dinomaly.calibration import (
    METADATA_KEY,
    ClassThreshold,
    ThresholdTable,
    bootstrap_interval,
    build_table,
    decision_report,
    holdout_indices,
    labelled_summary,
    stored_table,
    threshold_at_fpr,
)

# --------------------------------------------------------------------------- the threshold rule, by hand

HUNDRED = np.arange(1.0, 101.0)  # scores 1, 2, ..., 100


@pytest.mark.parametrize(("scores", "target", "just_above", "flagged"), [
    (HUNDRED, 0.01, 99.0, 1),  # 1 false alarm allowed: the cut sits just above the 2nd highest, only 100 >= it
    (HUNDRED, 0.05, 95.0, 5),  # 5 allowed: just above the 6th highest (95); 96..100 flagged
    (HUNDRED, 0.0, 100.0, 0),  # none allowed: just above the maximum
    (HUNDRED[:10], 0.01, 10.0, 0),  # 10 images at 1 %: floor(0.1) = 0 allowed
    (np.array([100.0] * 3 + list(range(1, 98))), 0.02, 100.0, 0),  # 3 tied at the top: at most 2 allowed
    (HUNDRED, 0.29, 71.0, 29),  # 0.29 * 100 is 28.999999999999996 in floats: still 29 allowed
])
def test_threshold_is_the_lowest_cut_with_at_most_target_fpr_of_normals_at_or_above_it(scores, target, just_above,
                                                                                      flagged):
    threshold = threshold_at_fpr(scores, target)
    assert threshold == np.nextafter(just_above, np.inf)
    assert int((scores >= threshold).sum()) == flagged <= math.floor(target * scores.size + 1e-9)
    assert int((scores >= just_above).sum()) > math.floor(target * scores.size + 1e-9)  # one step lower: too many


def test_threshold_rule_holds_on_random_scores():
    rng = np.random.default_rng(3)
    for n, target in [(8, 0.01), (57, 0.1), (1000, 0.005), (1000, 0.25)]:
        scores = rng.gamma(2.0, 0.01, n)
        threshold = threshold_at_fpr(scores, target)
        allowed = math.floor(target * n + 1e-9)
        assert (scores >= threshold).sum() <= allowed
        assert (scores >= np.max(scores[scores < threshold])).sum() > allowed  # the next score down is too low


def test_bad_input_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="target_fpr=1.5 must be in"):
        threshold_at_fpr(HUNDRED, 1.5)
    with pytest.raises(ValueError, match="at least one finite normal score"):
        threshold_at_fpr([], 0.01)
    with pytest.raises(ValueError, match="1 not finite"):
        threshold_at_fpr([1.0, float("nan")], 0.01)
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        ClassThreshold(threshold=0.0, source="manual")


def test_bootstrap_interval_by_hand_and_seeded():
    # scores {1, 2}, nothing allowed above: a resample's cut is just above its maximum, which is 1 with
    # probability 1/4 and 2 with 3/4, so the 2.5 % and 97.5 % points are (just above) 1 and 2
    low, high = bootstrap_interval([1.0, 2.0], 0.0, samples=2000, seed=5)
    assert (low, high) == (np.nextafter(1.0, np.inf), np.nextafter(2.0, np.inf))
    assert bootstrap_interval([4.0] * 9, 0.01) == (np.nextafter(4.0, np.inf),) * 2  # no spread, no width
    scores = np.random.default_rng(0).gamma(2.0, 0.01, 200)
    first = bootstrap_interval(scores, 0.05, seed=1)
    assert first == bootstrap_interval(scores, 0.05, seed=1) != bootstrap_interval(scores, 0.05, seed=2)
    assert first[0] < threshold_at_fpr(scores, 0.05) < first[1]


def test_table_sources_per_class_and_pooled_global():
    own = {"a": HUNDRED, "b": HUNDRED[:20] / 10}
    table = build_table(own, 0.01, "calibration", seed=0, fallback_scores={"b": [9.0], "c": [0.5, 0.7], "d": []})
    assert table.global_threshold.threshold == threshold_at_fpr(np.concatenate(list(own.values())), 0.01)
    assert table.global_threshold.n_images == 120 and table.global_threshold.source == "calibration"
    assert {n: (e.source, e.n_images) for n, e in table.classes.items()} == {
        "a": ("calibration", 100), "b": ("calibration", 20), "c": ("test-normals", 2), "d": ("pooled", 120)}
    assert table.classes["b"].threshold == np.nextafter(2.0, np.inf)  # its own scores win over the fallback
    assert table.classes["d"].threshold == table.global_threshold.threshold
    only_fallback = build_table({"a": []}, 0.01, "calibration", fallback_scores={"a": [1.0, 3.0]})
    assert only_fallback.global_threshold.source == "test-normals"
    with pytest.raises(ValueError, match="no normal scores"):
        build_table({"a": []}, 0.01, "calibration")


def test_decision_report_by_hand():
    table = ThresholdTable(ClassThreshold(0.5, "calibration", 0.01, (0.4, 0.6), 40),
                           {"a": ClassThreshold(0.5, "calibration", 0.01, (0.4, 0.6), 20),
                            "b": ClassThreshold(0.25, "test-normals", 0.01, None, 2)})
    labels = {"a": [0, 0, 0, 0, 1, 1], "b": [0, 1, 1, 1]}
    scores = {"a": [0.1, 0.2, 0.3, 0.6, 0.4, 0.9], "b": [0.2, 0.3, 0.1, 0.8]}
    report = decision_report(table, labels, scores)
    # a: one of 4 normals (0.6) at or above 0.5, one of 2 defects (0.9); its F1-optimal cut 0.4 catches both
    # defects with that same false alarm (precision 2/3, recall 1, F1 0.8)
    assert report["a"]["test_fpr"] == 0.25 and report["a"]["test_recall"] == 0.5
    assert report["a"]["test_tuned"] == {"threshold": 0.4, "f1": pytest.approx(0.8), "fpr": 0.25, "recall": 1.0}
    assert report["b"]["test_fpr"] == 0.0 and report["b"]["test_recall"] == pytest.approx(2 / 3)
    assert report["b"]["source"] == "test-normals" and report["a"]["interval"] == [0.4, 0.6]
    assert report["global"]["test_fpr"] == 0.2 and report["global"]["test_images"] == 10


def test_summary_of_a_test_split_without_held_back_images_uses_its_normals_marked_as_such():
    labels, scores = {"a": np.array([0, 0, 1])}, {"a": np.array([0.1, 0.2, 0.9])}
    summary = labelled_summary(labels, scores, 0.01)
    assert summary["calibration"]["classes"]["a"]["source"] == "test-normals"
    assert summary["decisions"]["a"]["threshold"] == np.nextafter(0.2, np.inf)
    assert labelled_summary({"a": np.array([1])}, {"a": np.array([0.5])}, 0.01) == {}  # no normal image at all


def test_table_round_trips_through_json_and_the_registry_tag_wins_over_metadata():
    table = build_table({"a": HUNDRED}, 0.01, "calibration")
    as_json = json.loads(json.dumps(table.to_dict()))
    assert ThresholdTable.from_dict(as_json) == table
    other = build_table({"a": HUNDRED * 2}, 0.01, "calibrate.py")
    assert stored_table({METADATA_KEY: as_json}) == table
    assert stored_table({METADATA_KEY: as_json}, {METADATA_KEY: json.dumps(other.to_dict())}) == other
    assert stored_table({}, {}) is None
    with pytest.raises(ValueError, match="not JSON"):
        stored_table({}, {METADATA_KEY: "{broken"})


# --------------------------------------------------------------------------- the held-back training images


def test_holdout_per_class_share_minimum_small_classes_and_seed():
    categories = ["big"] * 100 + ["mid"] * 40 + ["small"] * 15 + ["test_only"] * 5
    labels = [0] * 155 + [1] * 5  # anomalous rows are never held back
    keep, held, small = holdout_indices(categories, labels, 0.1, 8, seed=1)
    held_by_class = {c: int(sum(categories[i] == c for i in held)) for c in ("big", "mid", "small", "test_only")}
    assert held_by_class == {"big": 10, "mid": 8, "small": 0, "test_only": 0}  # 10 %; at least 8; 15 < 2 x 8
    assert small == {"small": 15, "test_only": 0}
    assert sorted([*keep, *held]) == list(range(160)) and not set(keep) & set(held)
    again = holdout_indices(categories, labels, 0.1, 8, seed=1)
    assert np.array_equal(again[1], held) and not np.array_equal(holdout_indices(categories, labels, 0.1, 8, 2)[1],
                                                                 held)
    # a class's draw does not depend on the other classes in the manifest
    alone = holdout_indices(categories[100:140], labels[100:140], 0.1, 8, seed=1)[1] + 100
    assert np.array_equal(alone, held[[categories[i] == "mid" for i in held]])
    assert holdout_indices(categories, labels, 0.0, 8, seed=1)[1].size == 0  # share 0: train on everything
    with pytest.raises(ValueError, match="must be in"):
        holdout_indices(categories, labels, 0.6)


def manifest_rows(counts: dict[str, int]) -> pa.Table:
    names = [c for c, n in counts.items() for _ in range(n)]
    return pa.table({"image_uri": [f"/d/{c}/{i:03d}.png" for i, c in enumerate(names)], "category": names,
                     "label": pa.array([0] * len(names), pa.int8()), "split": ["train"] * len(names)})


def test_training_holds_back_rows_it_never_trains_on(tiny_model_config):
    from dinomaly.config import Config, TrainConfig
    from dinomaly.distributed.train.run import hold_back

    rows = manifest_rows({"nut": 40, "pill": 12})
    config = Config(model=tiny_model_config, train=TrainConfig(batch_size=8))
    train_rows, held = hold_back(rows, config)
    held_uris, train_uris = set(held.column("image_uri").to_pylist()), set(train_rows.column("image_uri").to_pylist())
    assert held.column("category").to_pylist() == ["nut"] * 8 and not held_uris & train_uris
    assert train_rows.num_rows == 44  # pill (12 < 16) keeps all
    zero = Config(model=tiny_model_config, train=TrainConfig(batch_size=8, calibration_share=0.0))
    assert hold_back(rows, zero)[0].num_rows == 52 and hold_back(rows, zero)[1].num_rows == 0
    with pytest.raises(ValueError, match="fewer than train.batch_size=48"):
        hold_back(rows, Config(model=tiny_model_config, train=TrainConfig(batch_size=48)))


# --------------------------------------------------------------------------- pipelines/calibrate.py

TINY = ["model.encoder=vit_small_patch14_reg4_dinov2", "model.encoder_weights=none",
        "model.encoder_kwargs={embed_dim: 32, num_heads: 2, depth: 10}", "model.image_size=64", "model.crop_size=56",
        "eval.batch_size=4", "data.layout=mvtec"]


def calibrate_cli():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "pipelines" / "calibrate.py"
    spec = importlib.util.spec_from_file_location("calibrate_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny random-init checkpoint whose stored table knows 'nut' and 'wood', and demo images of nut and pill
    (8 train + 2 test normal images each, 1 defective)."""
    import torch

    from dinomaly import Dinomaly
    from dinomaly.checkpoint import save
    from dinomaly.config import load_config
    from dinomaly.data.demo import generate_demo_dataset

    base = tmp_path_factory.mktemp("calibrate")
    root = generate_demo_dataset(base / "demo", classes=["nut", "pill"], train_per_class=8, test_good_per_class=2,
                                 test_defect_per_class=1, size=64)
    config = load_config(None, TINY)
    torch.manual_seed(0)
    old = build_table({"nut": [0.5] * 8, "wood": [0.7] * 8}, 0.01, "calibration")
    checkpoint = save(base / "checkpoint", Dinomaly(config.model), config, metadata={METADATA_KEY: old.to_dict(),
                                                                                     "step": 7})
    return root, checkpoint, config, old


def core_normal_scores(root, checkpoint) -> dict[str, np.ndarray]:
    """Every label-0 image's score with the core alone (ManifestDataset -> Predictor), per class."""
    import pyarrow.compute as pc

    from dinomaly.checkpoint import load
    from dinomaly.config import apply_overrides
    from dinomaly.data.dataset import ManifestDataset, iterate_batches
    from dinomaly.data.manifest import load_manifest
    from dinomaly.inference import Predictor

    loaded = load(checkpoint)
    config = apply_overrides(loaded.config, {"data.root": str(root)})
    manifest = load_manifest(config.data)
    normal = manifest.filter(pc.equal(manifest.column("label"), 0))
    predictor, scores = Predictor(loaded.model, config.eval), {}
    for batch in iterate_batches(ManifestDataset(normal, config.model), batch_size=4):
        for name, score in zip(batch.categories, predictor.predict(batch.images).scores.tolist()):
            scores.setdefault(name, []).append(score)
    return {name: np.asarray(s) for name, s in scores.items()}


def test_calibrate_refuses_a_class_with_too_few_normal_images_before_ray(trained, tmp_path, capsys, monkeypatch):
    from dinomaly.data.demo import generate_demo_dataset

    _, checkpoint, _, _ = trained
    small = generate_demo_dataset(tmp_path / "small", classes=["nut"], train_per_class=5, test_good_per_class=2,
                                  test_defect_per_class=1, size=64)
    monkeypatch.setattr("dinomaly.distributed.cluster.ensure_ray", lambda: pytest.fail("Ray started"))
    rc = calibrate_cli().main(["--model", str(checkpoint), "--data", str(small), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "fewer than 8 normal images: {'nut': 7}" in err


def test_calibration_leaves_out_the_images_the_model_was_trained_on(trained, monkeypatch):
    """The train split of the model's own data, less the rows training held back, is left out, whatever the
    spelling of the folder (manifests hold absolute paths); the held-back rows and the test split's normals stay."""
    from dinomaly.config import apply_overrides
    from dinomaly.distributed.batch.calibrate import normal_rows, trained_uris

    root, _, config, _ = trained
    saved = apply_overrides(config, {"data.root": str(root), "train.calibration_share": 0.25,
                                     "train.calibration_min_images": 2})
    uris = trained_uris(saved)
    assert len(uris) == 12 and all("/train/good/" in uri for uri in uris)  # 8 a class, 2 held back
    monkeypatch.chdir(root.parent)
    rows, defective, skipped = normal_rows(apply_overrides(config, {"data.root": root.name}), 2, uris)
    assert (rows.num_rows, defective, skipped) == (8, 2, 12)
    assert not set(rows.column("uri").to_pylist()) & uris
    assert trained_uris(apply_overrides(saved, {"data.root": str(root / "gone")})) == set()
    assert trained_uris(None) == set()


def test_calibrate_on_the_training_images_says_why_a_class_is_short(trained, tmp_path, capsys, caplog, monkeypatch):
    from dinomaly import Dinomaly
    from dinomaly.checkpoint import save
    from dinomaly.config import apply_overrides

    root, _, config, _ = trained
    saved = apply_overrides(config, {"data.root": str(root), "train.calibration_share": 0.0})
    checkpoint = save(tmp_path / "checkpoint", Dinomaly(saved.model), saved)
    monkeypatch.setattr("dinomaly.distributed.cluster.ensure_ray", lambda: pytest.fail("Ray started"))
    rc = calibrate_cli().main(["--model", str(checkpoint), "--data", str(root), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "16 of the 20 normal images trained this model" in caplog.text
    assert "fewer than 8 normal images: {'nut': 2, 'pill': 2} (left out as training images of this model: " \
           "{'nut': 8, 'pill': 8})" in err


def test_calibrate_writes_a_new_version_with_thresholds_from_normal_images_only(trained, ray_session, mlflow_uri,
                                                                                tmp_path, capsys):
    """Registered model -> calibrate.py on new normal images -> a checkpoint folder with the same weights and
    the new table (classes the images do not cover keep theirs), and a new registry version tagged with it."""
    import torch
    from mlflow import MlflowClient

    from dinomaly.checkpoint import load
    from dinomaly.config import apply_overrides
    from dinomaly.distributed.tracking import register_checkpoint

    root, checkpoint, config, old = trained
    tracking = [f"tracking.tracking_uri={mlflow_uri}", "tracking.registered_model_name=tiny-cal"]
    register_checkpoint(apply_overrides(config, {"tracking.tracking_uri": mlflow_uri,
                                                 "tracking.registered_model_name": "tiny-cal"}),
                        "trained", checkpoint, {METADATA_KEY: json.dumps(old.to_dict()), "mean_image_auroc": "0.5"})
    output = tmp_path / "cam2"
    rc = calibrate_cli().main(["--model", "models:/tiny-cal/1", "--data", str(root), "--output", str(output),
                               "--target-fpr", "0.005", *[x for t in tracking for x in ("--set", t)]])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    new = load(output)
    table = ThresholdTable.from_dict(new.metadata[METADATA_KEY])
    expected = core_normal_scores(root, checkpoint)  # 10 normal images a class, the defective one left out
    for name in ("nut", "pill"):
        entry = table.classes[name]
        assert (entry.source, entry.n_images, entry.target_fpr) == ("calibrate.py", 10, 0.005)
        # floor(0.005 * 10) = 0 false alarms allowed: just above the class's highest normal score
        assert entry.threshold == pytest.approx(expected[name].max(), rel=1e-5)
        assert entry.threshold > expected[name].max() - 1e-6
    assert table.classes["wood"] == old.classes["wood"]  # not in the new images: kept
    assert table.global_threshold.n_images == 20 and table.global_threshold.source == "calibrate.py"
    assert new.metadata["step"] == 7 and new.metadata["calibrated_from"]["model"] == "models:/tiny-cal/1"
    before = load(checkpoint).model.state_dict()
    assert all(torch.equal(before[k], v) for k, v in new.model.state_dict().items())
    version = MlflowClient(mlflow_uri).get_model_version("tiny-cal", "2")
    assert json.loads(version.tags[METADATA_KEY]) == table.to_dict()
    assert version.tags["calibrated_from"] == "tiny-cal/1" and version.tags["mean_image_auroc"] == "0.5"
    assert "2 defective rows left out" in printed and "registered as tiny-cal version 2" in printed


def test_calibrated_model_keeps_its_trained_config_and_notes_the_calibration_data(trained, tmp_path):
    """The calibration data (--data, data.categories) go in calibrated_from only: config.json keeps the data.*
    the model was trained on, so a later evaluate or calibrate of it reads nothing from the calibration run."""
    from dinomaly.checkpoint import load
    from dinomaly.distributed.batch.calibrate import prepare, write_version

    root, checkpoint, config, old = trained
    job = prepare(str(checkpoint), str(root), None, ["data.categories=[nut]", "eval.batch_size=2"])
    write_version(job.bundle, old, tmp_path / "c3", str(root))
    new = load(tmp_path / "c3")
    assert new.config.data == config.data and new.config.eval == config.eval  # root '', all classes
    assert new.metadata["calibrated_from"]["data"] == str(root)
    assert new.metadata["calibrated_from"]["categories"] == ["nut"]


@pytest.mark.parametrize("where", ["model", "inside_model", "non_empty", "file"])
def test_calibrate_refuses_an_output_that_would_overwrite_before_ray(trained, tmp_path, capsys, monkeypatch, where):
    import shutil

    root, checkpoint, _, _ = trained
    model = shutil.copytree(checkpoint, tmp_path / "checkpoint")
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    output = {"model": model, "inside_model": model / "new", "non_empty": tmp_path / "c1",
              "file": tmp_path / "c1.parquet"}[where]
    (tmp_path / "c1").mkdir()
    (tmp_path / "c1" / "model.safetensors").write_text("a first result")
    (tmp_path / "c1.parquet").write_text("a manifest")
    expected = {"model": "is the --model folder or inside it; write the new version to another folder",
                "inside_model": "is the --model folder or inside it",
                "non_empty": "exists and is not an empty folder; choose a new folder or remove it",
                "file": "is a file; pass a folder for the new checkpoint"}[where]
    monkeypatch.setattr("dinomaly.distributed.cluster.ensure_ray", lambda: pytest.fail("Ray started"))
    rc = calibrate_cli().main(["--model", str(model), "--data", str(root), "--output", str(output)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and f"--output {output} {expected}" in err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert (tmp_path / "c1" / "model.safetensors").read_text() == "a first result"


def test_a_copy_of_the_training_images_elsewhere_is_named_in_a_warning(trained, tmp_path, caplog):
    """The same class/train/good/000.png under another root may be a copy of a training image, or a new image
    named alike: it is scored, and a warning counts such images."""
    import shutil

    from dinomaly.config import apply_overrides
    from dinomaly.distributed.batch.calibrate import normal_rows, trained_uris

    root, _, config, _ = trained
    saved = apply_overrides(config, {"data.root": str(root), "train.calibration_share": 0.25,
                                     "train.calibration_min_images": 2})
    uris = trained_uris(saved)
    copy = shutil.copytree(root, tmp_path / "copy")
    with caplog.at_level("WARNING"):
        rows, _, skipped = normal_rows(apply_overrides(config, {"data.root": str(copy)}), 2, uris, str(root))
    assert (rows.num_rows, skipped) == (20, 0)
    assert "12 of the 20 normal images sit at the same paths" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        normal_rows(apply_overrides(config, {"data.root": str(copy)}), 2, uris)  # no training root: no warning
    assert "same paths" not in caplog.text
