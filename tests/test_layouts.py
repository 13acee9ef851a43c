"""Layout readers on generated trees in each exact layout: counts, labels, masks, classes, views, errors."""

import shutil
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from fixtures_data import make_folder, write_image, write_mask

from dinomaly.data.layouts import pair_masks, parse_realiad_name, read_layout
from dinomaly.data.paths import read_bytes
from dinomaly.data.transforms import decode_mask, preprocess_mask


def stem(uri):
    return Path(uri).stem.removesuffix("_mask")


def counts(records):
    return Counter((r.category, r.split, r.label) for r in records)


def test_mvtec_counts_labels_and_masks_paired_by_name(mvtec_root):
    records = read_layout(str(mvtec_root), "mvtec")
    assert [r.category for r in records] == ["bottle"] * 8 + ["carpet"] * 8
    assert counts(records)[("bottle", "train", 0)] == 3
    assert counts(records)[("bottle", "test", 0)] == 2
    assert counts(records)[("bottle", "test", 1)] == 3
    for r in records:
        assert Path(r.image_uri).is_file() and r.size_bytes == Path(r.image_uri).stat().st_size
        assert (r.mask_uri is not None) == (r.label == 1)
        if r.label:
            assert Path(r.mask_uri).parent.name == r.defect and stem(r.mask_uri) == stem(r.image_uri)
            assert "/ground_truth/" in r.mask_uri
        else:
            assert r.defect == "good"
    assert {r.defect for r in records if r.label} == {"broken", "scratch"}


def test_a_folder_without_train_or_test_is_left_out_with_a_warning(mvtec_root, caplog):
    (mvtec_root / "half_copied").mkdir()
    with caplog.at_level("WARNING"):
        records = read_layout(str(mvtec_root), "mvtec")
    assert "half_copied" not in {r.category for r in records}
    assert "left out 1 folder(s)" in caplog.text and "half_copied" in caplog.text
    (mvtec_root / "half_copied").rmdir()


def test_mpdd_and_auto_detection_read_the_same_records(mvtec_root):
    assert read_layout(str(mvtec_root), "mpdd") == read_layout(str(mvtec_root), "auto")


def test_pairing_is_by_name_where_sort_order_would_mispair(tmp_path):
    images = [str(tmp_path / "a.png"), str(tmp_path / "a_b.png")]
    masks = [str(tmp_path / "gt" / "a_b_mask.png"), str(tmp_path / "gt" / "a_mask.png")]
    assert sorted(masks)[0].endswith("a_b_mask.png")  # sorting would pair a.png with a_b_mask.png
    pairs = pair_masks(images, masks, "here")
    assert pairs == {images[0]: masks[1], images[1]: masks[0]}
    assert pair_masks(images[:1], [str(tmp_path / "a.png")], "here") == {images[0]: str(tmp_path / "a.png")}


def test_missing_or_extra_mask_is_an_error_naming_the_files(mvtec_root):
    (mvtec_root / "carpet" / "ground_truth" / "broken" / "001_mask.png").unlink()
    with pytest.raises(ValueError, match=r"without a mask: 001\.png") as info:
        read_layout(str(mvtec_root), "mvtec")
    assert "carpet" in str(info.value) and "test/broken" in str(info.value)
    write_mask(mvtec_root / "carpet" / "ground_truth" / "broken" / "007_mask.png")
    with pytest.raises(ValueError, match=r"mask\(s\) without an image: 007_mask\.png"):
        read_layout(str(mvtec_root), "mvtec", ["carpet"])


def test_unknown_category_empty_class_and_missing_root(mvtec_root, tmp_path):
    with pytest.raises(ValueError, match=r"\['hazelnut'\] not found.*\['bottle', 'carpet'\]"):
        read_layout(str(mvtec_root), "mvtec", ["bottle", "hazelnut"])
    assert {r.category for r in read_layout(str(mvtec_root), "mvtec", ["carpet"])} == {"carpet"}
    shutil.rmtree(mvtec_root / "bottle" / "train" / "good")
    (mvtec_root / "bottle" / "train" / "good").mkdir()
    with pytest.raises(ValueError, match="class 'bottle' has no training images"):
        read_layout(str(mvtec_root), "mvtec")
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        read_layout(str(missing), "auto")
    not_a_manifest = tmp_path / "m.csv"  # a manifest written under another name is not "missing"
    not_a_manifest.write_text("")
    with pytest.raises(ValueError, match="is a file but neither a dataset folder nor a manifest"):
        read_layout(str(not_a_manifest), "auto")


def test_auto_detection_finds_every_layout(mvtec_root, visa_raw_root, visa_1cls_root, realiad_root, folder_root):
    from dinomaly.data.layouts import detect_layout
    from dinomaly.data.paths import resolve_root

    found = {name: detect_layout(resolve_root(str(root))) for name, root in [
        ("mvtec", mvtec_root), ("visa_raw", visa_raw_root), ("visa", visa_1cls_root),
        ("realiad", realiad_root), ("folder", folder_root)]}
    assert found == {"mvtec": "mvtec", "visa_raw": "visa_raw", "visa": "mvtec", "realiad": "realiad",
                     "folder": "folder"}


def test_auto_detection_errors_say_what_was_looked_for(tmp_path, mvtec_root):
    (tmp_path / "empty" / "something").mkdir(parents=True)
    with pytest.raises(ValueError, match="cannot detect.*realiad_1024.*train.*good.*set data.layout"):
        read_layout(str(tmp_path / "empty"), "auto")
    write_image(mvtec_root / "extra" / "good" / "x.png")  # a folder-layout class among MVTec classes
    with pytest.raises(ValueError, match=r"mixed \['folder', 'mvtec'\]"):
        read_layout(str(mvtec_root), "auto")
    (tmp_path / "VisA_pytorch" / "1cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="VisA_pytorch.*point at its 1cls folder"):
        read_layout(str(tmp_path / "VisA_pytorch"), "auto")


def test_visa_raw_follows_the_split_csv(visa_raw_root):
    records = read_layout(str(visa_raw_root), "visa_raw")
    assert counts(records) == Counter({("candle", "train", 0): 3, ("candle", "test", 0): 1,
                                       ("candle", "test", 1): 2, ("pcb1", "train", 0): 3,
                                       ("pcb1", "test", 0): 1, ("pcb1", "test", 1): 2})
    for r in records:
        assert r.defect == ("bad" if r.label else "good")
        assert (r.mask_uri is not None) == (r.label == 1)
        if r.label:
            assert "/Data/Masks/Anomaly/" in r.mask_uri and stem(r.mask_uri) == stem(r.image_uri)


def test_visa_raw_gives_the_same_masks_as_the_reference_prepared_1cls(visa_raw_root, visa_1cls_root):
    raw = read_layout(str(visa_raw_root), "visa_raw")
    prepared = read_layout(str(visa_1cls_root), "visa")
    key = lambda r: (r.category, r.split, r.label, Path(r.image_uri).name)  # noqa: E731
    assert sorted(map(key, raw)) == sorted(map(key, prepared))
    by_key = {key(r): r for r in prepared}
    for r in (r for r in raw if r.label):
        twin = by_key[key(r)]
        ours = preprocess_mask(decode_mask(read_bytes(r.mask_uri)), 64, 56)
        reference = preprocess_mask(decode_mask(read_bytes(twin.mask_uri)), 64, 56)
        assert torch.equal(ours, reference) and ours.max() == 1.0


def test_visa_raw_missing_csv_or_listed_file(visa_raw_root):
    (visa_raw_root / "candle" / "Data" / "Masks" / "Anomaly" / "001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing.*001\.png"):
        read_layout(str(visa_raw_root), "visa_raw", ["candle"])
    csv_path = visa_raw_root / "split_csv" / "1cls.csv"
    csv_path.write_text(csv_path.read_text().replace("pcb1/Data/Masks/Anomaly/000.png", ""))
    with pytest.raises(ValueError, match=r"anomalous test image pcb1/Data/Images/Anomaly/000\.JPG has no mask"):
        read_layout(str(visa_raw_root), "visa_raw", ["pcb1"])
    csv_path.unlink()
    with pytest.raises(FileNotFoundError, match="visa_split_csv"):
        read_layout(str(visa_raw_root), "visa_raw")


@pytest.mark.parametrize("variant,expected", [
    ("realiad_jsons", {("train", 0): 10, ("test", 0): 5, ("test", 1): 5}),
    ("realiad_jsons_sv", {("train", 0): 2, ("test", 0): 1, ("test", 1): 1}),
    ("realiad_jsons_fuiad_0.4", {("train", 0): 5, ("train", 1): 5, ("test", 0): 10}),
])
def test_realiad_variants_counts_samples_and_views(realiad_root, variant, expected):
    records = read_layout(str(realiad_root), "realiad", realiad_json_variant=variant)
    assert {r.category for r in records} == {"audiojack", "toy"}
    per_class = Counter((r.split, r.label) for r in records if r.category == "toy")
    assert per_class == Counter(expected)
    for r in records:
        assert r.sample_id in {"S0001", "S0002", "S0003", "S0004"} and r.view in {f"C{i}" for i in range(1, 6)}
        assert f"/realiad_1024/{r.category}/" in r.image_uri and Path(r.image_uri).is_file()
        assert r.defect == ("AK" if r.label else "good")
        if r.label:
            assert stem(r.mask_uri) == stem(r.image_uri) and Path(r.mask_uri).is_file()
    if variant == "realiad_jsons":
        views = Counter((r.sample_id, r.view) for r in records if r.category == "toy")
        assert len(views) == 20 and set(views.values()) == {1}  # 4 samples x 5 views, each once


def test_realiad_names_and_errors(realiad_root):
    assert parse_realiad_name("NG/AK/S0004/toy_0004_NG_AK_C3_20230922090403.jpg") == ("S0004", "C3")
    assert parse_realiad_name("toy_0012_OK_C5_2023.jpg") == ("S0012", "C5")
    with pytest.raises(FileNotFoundError, match="realiad_jsons_xyz.*realiad_jsons_sv"):
        read_layout(str(realiad_root), "realiad", realiad_json_variant="realiad_jsons_xyz")
    victim = next((realiad_root / "realiad_1024" / "toy" / "OK" / "S0001").iterdir())
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        read_layout(str(realiad_root), "realiad", ["toy"])


def test_folder_layout_with_masks_holdout_and_maskless(folder_root, tmp_path):
    records = read_layout(str(folder_root), "folder")
    assert counts(records) == Counter({("gadget", "train", 0): 3, ("widget", "train", 0): 4,
                                       ("widget", "test", 0): 1, ("widget", "test", 1): 2})
    assert all(stem(r.mask_uri) == stem(r.image_uri) for r in records if r.label)
    assert records == read_layout(str(folder_root), "auto")  # deterministic, auto-detected
    maskless = read_layout(str(make_folder(tmp_path / "nomasks", with_masks=False)), "folder")
    assert [r.mask_uri for r in maskless if r.label] == [None, None]
    held = read_layout(str(folder_root), "folder", folder_test_fraction=0.4)
    assert counts(held)[("widget", "test", 0)] == 2


def test_folder_layout_with_partial_masks_is_an_error(folder_root):
    (folder_root / "widget" / "masks" / "dent" / "d1_mask.png").unlink()
    with pytest.raises(ValueError, match=r"without a mask: d1\.png"):
        read_layout(str(folder_root), "folder")


def test_a_non_local_filesystem_gives_the_same_records(mvtec_root):
    """An fsspec in-memory filesystem stands in for object storage (moto S3 is tested with Ray Data)."""
    memory = fsspec.filesystem("memory")
    for path in mvtec_root.rglob("*"):
        if path.is_file():
            memory.pipe(f"/bucket/mvtec/{path.relative_to(mvtec_root).as_posix()}", path.read_bytes())
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(memory))
    remote = read_layout("/bucket/mvtec", "auto", filesystem=fs)
    local = read_layout(str(mvtec_root), "mvtec")
    assert [r.image_uri.split("/mvtec/")[1] for r in remote] == [r.image_uri.split("/mvtec/")[1] for r in local]
    assert all(r.image_uri.startswith("memory:///bucket/mvtec/") for r in remote)
    assert [r.size_bytes for r in remote] == [r.size_bytes for r in local]
    first = remote[-1]
    assert read_bytes(first.mask_uri, fs) == read_bytes(local[-1].mask_uri)
    assert np.array_equal(np.asarray(decode_mask(read_bytes(first.mask_uri, fs))),
                          np.asarray(decode_mask(read_bytes(local[-1].mask_uri))))
