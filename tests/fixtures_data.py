"""Tiny datasets written in each exact on-disk layout (MVTec AD, VisA raw and 1cls, Real-IAD, folders).

Every image is a small PNG/JPEG whose pixels encode its own name, so a test can tell which file a
record or tensor came from. Masks are 0/255 (raw VisA masks use 0/1, as the release does).
"""

from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

IMAGE_PX = 24


def pixels_for(name: str, size: int = IMAGE_PX) -> np.ndarray:
    """A deterministic RGB image derived from `name` (different names -> different pixels)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def write_image(path: Path, name: str | None = None, size: int = IMAGE_PX) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels_for(name or path.name, size))
    image.save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    return path


def write_mask(path: Path, value: int = 255, size: int = IMAGE_PX) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: size // 2, size // 3: size // 2 + 2] = value
    Image.fromarray(mask).save(path, format="PNG")
    return path


def make_mvtec(root: Path, classes=("bottle", "carpet")) -> Path:
    """<cls>/train/good x3, test/good x2, test/broken x2 and test/scratch x1 with *_mask.png, + clutter."""
    for cls in classes:
        for i in range(3):
            write_image(root / cls / "train" / "good" / f"{i:03d}.png", f"{cls}-train-{i}")
        for i in range(2):
            write_image(root / cls / "test" / "good" / f"{i:03d}.png", f"{cls}-good-{i}")
        for defect, count in (("broken", 2), ("scratch", 1)):
            for i in range(count):
                write_image(root / cls / "test" / defect / f"{i:03d}.png", f"{cls}-{defect}-{i}")
                write_mask(root / cls / "ground_truth" / defect / f"{i:03d}_mask.png")
    (root / "license.txt").write_text("clutter that readers must ignore")
    (root / classes[0] / "test" / "good" / ".DS_Store").write_bytes(b"\0")
    return root


def make_visa_raw(root: Path, classes=("candle", "pcb1")) -> Path:
    """<cls>/Data/Images/{Normal,Anomaly}/*.JPG, Data/Masks/Anomaly/*.png (0/1) + split_csv/1cls.csv."""
    rows = []
    for cls in classes:
        for i in range(4):
            rel = f"{cls}/Data/Images/Normal/{i:04d}.JPG"
            write_image(root / rel, f"{cls}-normal-{i}")
            rows.append([cls, "train" if i < 3 else "test", "normal", rel, ""])
        for i in range(2):
            rel, mask = f"{cls}/Data/Images/Anomaly/{i:03d}.JPG", f"{cls}/Data/Masks/Anomaly/{i:03d}.png"
            write_image(root / rel, f"{cls}-anomaly-{i}")
            write_mask(root / mask, value=1)
            rows.append([cls, "test", "anomaly", rel, mask])
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return root


def prepare_visa_1cls(raw: Path, out: Path) -> Path:
    """What the reference's prepare_visa.py --split-type 1cls writes (copy images, binarise masks)."""
    with open(raw / "split_csv" / "1cls.csv") as handle:
        for row in csv.DictReader(handle):
            label = "good" if row["label"] == "normal" else "bad"
            target = out / row["object"] / row["split"] / label / Path(row["image"]).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((raw / row["image"]).read_bytes())
            if row["split"] == "test" and label == "bad":
                mask = np.array(Image.open(raw / row["mask"]))
                mask[mask != 0] = 255
                mask_path = out / row["object"] / "ground_truth" / label / Path(row["mask"]).name
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(mask_path)
    return out


def _realiad_item(cls: str, sample: int, view: int, defect: str | None) -> dict:
    folder = f"NG/{defect}" if defect else "OK"
    kind = f"NG_{defect}" if defect else "OK"
    stem = f"{cls}_{sample:04d}_{kind}_C{view}_2023092209{sample:02d}{view:02d}"
    return {"category": cls, "anomaly_class": defect or "OK",
            "image_path": f"{folder}/S{sample:04d}/{stem}.jpg",
            "mask_path": f"{folder}/S{sample:04d}/{stem}.png" if defect else None}


def make_realiad(root: Path, classes=("audiojack", "toy")) -> Path:
    """realiad_1024/<cls>/{OK,NG/<defect>}/S####/*_C1..C5_*.jpg (+ .png masks) and three JSON variants.

    Per class: samples 1-2 OK (train), sample 3 OK (test), sample 4 NG 'AK' (test), 5 views each.
    """
    for cls in classes:
        items = {s: [_realiad_item(cls, s, v, "AK" if s == 4 else None) for v in range(1, 6)] for s in (1, 2, 3, 4)}
        for item in (i for group in items.values() for i in group):
            write_image(root / "realiad_1024" / cls / item["image_path"], item["image_path"])
            if item["mask_path"]:
                write_mask(root / "realiad_1024" / cls / item["mask_path"])
        meta = {"prefix": "", "normal_class": "OK", "pre_transform": None}
        variants = {
            "realiad_jsons": {"train": items[1] + items[2], "test": items[3] + items[4]},
            "realiad_jsons_sv": {"train": items[1][:1] + items[2][:1], "test": items[3][:1] + items[4][:1]},
            "realiad_jsons_fuiad_0.4": {"train": items[1] + items[4], "test": items[3] + items[2]},
        }
        for variant, splits in variants.items():
            path = root / "realiad_jsons" / variant / f"{cls}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"meta": meta, **splits}))
    return root


def make_folder(root: Path, with_masks: bool = True) -> Path:
    """widget: good x5, defect/dent x2 (+ masks/dent/*_mask.png); gadget: good x3 only."""
    for i in range(5):
        write_image(root / "widget" / "good" / f"g{i}.png", f"widget-good-{i}")
    for i in range(2):
        write_image(root / "widget" / "defect" / "dent" / f"d{i}.png", f"widget-dent-{i}")
        if with_masks:
            write_mask(root / "widget" / "masks" / "dent" / f"d{i}_mask.png")
    for i in range(3):
        write_image(root / "gadget" / "good" / f"{i}.jpg", f"gadget-good-{i}")
    return root


@pytest.fixture
def mvtec_root(tmp_path) -> Path:
    return make_mvtec(tmp_path / "mvtec")


@pytest.fixture
def visa_raw_root(tmp_path) -> Path:
    return make_visa_raw(tmp_path / "VisA")


@pytest.fixture
def visa_1cls_root(visa_raw_root, tmp_path) -> Path:
    return prepare_visa_1cls(visa_raw_root, tmp_path / "VisA_pytorch" / "1cls")


@pytest.fixture
def realiad_root(tmp_path) -> Path:
    return make_realiad(tmp_path / "Real-IAD")


@pytest.fixture
def folder_root(tmp_path) -> Path:
    return make_folder(tmp_path / "custom")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The generated demo dataset (all classes) at a small size: 6 train, 3 good + 3 defective test, 64 px."""
    from dinomaly.data.demo import generate_demo_dataset

    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "demo_data", train_per_class=6,
                                 test_good_per_class=3, test_defect_per_class=3, size=64)
