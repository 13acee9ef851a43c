"""Dataset layouts on disk or in a bucket -> one ImageRecord per image (the rows of the manifest).

Readers: MVTec AD / MPDD / prepared VisA `1cls` (one layout), raw VisA with its split csv, Real-IAD
(`realiad_1024` + `realiad_jsons/<variant>/<cls>.json`), and a plain folder layout for custom data.
Every reader takes an optional pyarrow `filesystem`; `root` is then a path inside it (or a URI such as
s3://bucket/prefix, resolved through dinomaly.data.storage), so local folders and object storage go
through the same code. Each class is listed once, recursively (one paged LIST on S3, not a HEAD per file).

Differences from the reference loaders, on purpose: images and masks are paired by *name*
(`000.png` <-> `000_mask.png` or `000.png`), not by sorting two lists (reference quirk (g)); a
mismatch is a ValueError naming the files. Extensions are matched case-insensitively (the reference
test loader globs only *.png, *.JPG, *.bmp). Order is deterministic: classes sorted (or as given),
train before test, `good` before defect types, files by name.
Reference: dataset.py MVTecDataset.load_dataset, RealIADDataset.__init__; prepare_data/prepare_visa.py @c5c76d0
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Sequence

import pyarrow.fs as pafs

from dinomaly.data.paths import DataRoot, resolve_root
from dinomaly.data.records import (
    ImageRecord,
    file_stem,
    is_image,
    list_names,
    list_tree,
    mask_key,
    pair_masks,
    select_classes,
)

logger = logging.getLogger(__name__)

LAYOUTS = ("mvtec", "mpdd", "visa", "visa_raw", "realiad", "folder")
__all__ = ["LAYOUTS", "ImageRecord", "detect_layout", "pair_masks", "parse_realiad_name", "read_folder",
           "read_layout", "read_mvtec", "read_realiad", "read_visa_raw"]

# --------------------------------------------------------------------------- MVTec AD / MPDD / VisA 1cls


def _read_mvtec_class(data: DataRoot, cls: str) -> list[ImageRecord]:
    files = list_tree(data, cls)
    train, test, masks, ignored = [], {}, {}, set()
    for rel in sorted(files):
        parts = rel.split("/")
        if len(parts) != 3 or not is_image(parts[2]):
            continue
        top, sub, _ = parts
        if top == "train" and sub == "good":
            train.append(rel)
        elif top == "train":
            ignored.add(f"{cls}/train/{sub}")
        elif top == "test":
            test.setdefault(sub, []).append(rel)
        elif top == "ground_truth":
            masks.setdefault(sub, []).append(rel)
    for folder in sorted(ignored):
        logger.warning("ignoring %s: the MVTec layout trains on train/good only", data.uri_of(folder))
    if not train:
        raise ValueError(f"class '{cls}' has no training images in {data.uri_of(cls + '/train/good')}; "
                         "remove the class folder or add its good images")

    def record(rel: str, label: int, defect: str, split: str, mask: str | None = None) -> ImageRecord:
        return ImageRecord(image_uri=data.uri_of(f"{cls}/{rel}"), label=label, category=cls, defect=defect,
                           split=split, mask_uri=data.uri_of(f"{cls}/{mask}") if mask else None,
                           size_bytes=files[rel])

    records = [record(rel, 0, "good", "train") for rel in train]
    records += [record(rel, 0, "good", "test") for rel in test.pop("good", [])]
    for defect in sorted(test):
        pairs = pair_masks(test[defect], masks.get(defect, []),
                           f"class '{cls}', test/{defect} vs ground_truth/{defect} under {data.uri_of(cls)}")
        records += [record(rel, 1, defect, "test", pairs[rel]) for rel in test[defect]]
    return records


def read_mvtec(data: DataRoot, categories: Sequence[str] | None = None) -> list[ImageRecord]:
    """MVTec AD, MPDD and prepared VisA (`1cls`): <cls>/train/good, test/<defect>, ground_truth/<defect>."""
    found, other = [], []
    for d in data.subdirs(""):
        (found if {"train", "test"} & set(data.subdirs(d)) else other).append(d)
    if not found:
        raise ValueError(f"no <class>/train or <class>/test folders under {data.uri}; is this an MVTec-layout "
                         "root (for VisA_pytorch use its 1cls folder)?")
    if other:  # e.g. a class folder still being copied, or an unpacked archive's extra folder
        logger.warning("left out %d folder(s) of %s without train/ or test/: %s", len(other), data.uri,
                       ", ".join(sorted(other)[:10]))
    return [r for cls in select_classes(found, categories, data) for r in _read_mvtec_class(data, cls)]


# --------------------------------------------------------------------------- VisA (raw download)


def read_visa_raw(data: DataRoot, categories: Sequence[str] | None = None,
                  split_csv: str = "") -> list[ImageRecord]:
    """Raw VisA with a split csv (object,split,label,image,mask; paths relative to the VisA root).

    Rows become exactly what prepare_visa.py would copy: label 'normal' -> good (0), else 'bad' (1)
    with its mask (binarised on decode, see transforms.decode_mask).
    Reference: prepare_data/prepare_visa.py --split-type 1cls @c5c76d0
    """
    csv_root = resolve_root(split_csv) if split_csv else DataRoot(data.fs, data.path("split_csv/1cls.csv"),
                                                                      data.scheme)
    csv_uri = csv_root.uri
    try:
        with csv_root.fs.open_input_stream(csv_root.base) as stream:
            text = stream.read().decode("utf-8-sig")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"VisA split csv not found at {csv_uri}; it ships with VisA as "
                                "split_csv/1cls.csv, or set data.visa_split_csv") from err
    rows = list(csv.DictReader(io.StringIO(text)))
    need = {"object", "split", "label", "image", "mask"}
    if not rows or not need <= set(rows[0]):
        raise ValueError(f"{csv_uri} must have the columns {sorted(need)} (VisA split_csv format)")
    classes = select_classes(sorted({r["object"] for r in rows}), categories, data)
    records = []
    for cls in classes:
        files = {f"{cls}/{rel}": size for rel, size in list_tree(data, cls).items()}
        chosen = sorted((r for r in rows if r["object"] == cls), key=lambda r: (r["split"] != "train",
                        r["label"] != "normal", r["image"]))
        missing = [r["image"] for r in chosen if r["image"] not in files]
        missing += [r["mask"] for r in chosen if r["label"] != "normal" and r["mask"] and r["mask"] not in files]
        if missing:
            raise FileNotFoundError(f"{len(missing)} file(s) listed in {csv_uri} are missing under {data.uri}: "
                                    f"{list_names(missing)}")
        for r in chosen:
            label = int(r["label"] != "normal")
            mask = r["mask"] if label and r["mask"] else None
            if label and not mask and r["split"] == "test":
                raise ValueError(f"{csv_uri}: anomalous test image {r['image']} has no mask in the csv")
            if mask and mask_key(mask) != file_stem(r["image"]):
                raise ValueError(f"{csv_uri}: image {r['image']} is paired with mask {r['mask']} of another name")
            records.append(ImageRecord(image_uri=data.uri_of(r["image"]), label=label, category=cls,
                                       defect="bad" if label else "good", split=r["split"],
                                       mask_uri=data.uri_of(mask) if mask else None,
                                       size_bytes=files[r["image"]]))
    return records


# --------------------------------------------------------------------------- Real-IAD

_VIEW = re.compile(r"_(C\d+)(?=[_.]|$)")
_SAMPLE_DIR = re.compile(r"^S\d+$")
_SAMPLE_NAME = re.compile(r"_(\d+)_(?:OK|NG)_")


def parse_realiad_name(image_path: str) -> tuple[str | None, str | None]:
    """'OK/S0001/audiojack_0001_OK_C1_2023.jpg' -> ('S0001', 'C1'): sample id and camera view."""
    parts = image_path.split("/")
    sample = next((p for p in reversed(parts[:-1]) if _SAMPLE_DIR.match(p)), None)
    if sample is None and (m := _SAMPLE_NAME.search(parts[-1])):
        sample = f"S{m.group(1)}"
    view = _VIEW.search(parts[-1])
    return sample, view.group(1) if view else None


def _realiad_json_dir(data: DataRoot, variant: str) -> str:
    for rel in (f"realiad_jsons/{variant}", variant):
        if data.is_dir(rel):
            return rel
    available = data.subdirs("realiad_jsons") or []
    raise FileNotFoundError(f"Real-IAD split folder '{variant}' not found under {data.uri_of('realiad_jsons')}; "
                            f"available: {available}; set data.realiad_json_variant")


def _read_realiad_class(data: DataRoot, json_rel: str, cls: str) -> list[ImageRecord]:
    with data.fs.open_input_stream(data.path(json_rel)) as stream:
        spec = json.loads(stream.read())
    normal = spec.get("meta", {}).get("normal_class", "OK")
    files = list_tree(data, f"realiad_1024/{cls}")
    records, missing = [], []
    for split in ("train", "test"):
        for item in spec.get(split, []):
            label = int(item["anomaly_class"] != normal)
            image, mask = item["image_path"], item.get("mask_path") if label else None
            if label and not mask and split == "test":
                raise ValueError(f"{data.uri_of(json_rel)}: defective test image {image} has no mask_path")
            missing += [p for p in (image, mask) if p and p not in files]
            sample, view = parse_realiad_name(image)
            records.append(ImageRecord(
                image_uri=data.uri_of(f"realiad_1024/{cls}/{image}"), label=label, category=cls,
                defect=item["anomaly_class"] if label else "good", split=split,
                mask_uri=data.uri_of(f"realiad_1024/{cls}/{mask}") if mask else None,
                sample_id=sample, view=view, size_bytes=files.get(image, 0)))
    if missing:
        raise FileNotFoundError(f"{len(missing)} file(s) named in {data.uri_of(json_rel)} are missing under "
                                f"{data.uri_of('realiad_1024/' + cls)}: {list_names(missing)}")
    if not records:
        raise ValueError(f"class '{cls}' has no images in {data.uri_of(json_rel)}")
    return records


def read_realiad(data: DataRoot, categories: Sequence[str] | None = None,
                 variant: str = "realiad_jsons") -> list[ImageRecord]:
    """Real-IAD: every camera view C1..C5 of every sample S#### is an independent image (UIAD protocol).

    Works for the three JSON variants (multi-view `realiad_jsons`, single-view `realiad_jsons_sv`,
    fully-unsupervised `realiad_jsons_fuiad_*`, whose train split contains anomalous images: label 1
    with split 'train', trained on like the reference does).
    Reference: dataset.py RealIADDataset @c5c76d0
    """
    json_dir = _realiad_json_dir(data, variant)
    found = sorted(file_stem(n) for n in data.files(json_dir) if n.endswith(".json"))
    classes = select_classes(found, categories, data)
    return [r for cls in classes for r in _read_realiad_class(data, f"{json_dir}/{cls}.json", cls)]


# --------------------------------------------------------------------------- plain folders (custom data)


def _holdout(good: list[str], fraction: float) -> set[str]:
    """Evenly spaced good images (by name) held out for the test split: deterministic, no RNG."""
    count = min(len(good) - 1, max(1, round(fraction * len(good)))) if fraction > 0 else 0
    if count <= 0:
        return set()
    step = len(good) / count
    return {good[int(i * step + step / 2)] for i in range(count)}


def _read_folder_class(data: DataRoot, cls: str, test_fraction: float) -> list[ImageRecord]:
    files = list_tree(data, cls)
    good = sorted(r for r in files if r.startswith("good/") and r.count("/") == 1 and is_image(r))
    defects: dict[str, list[str]] = {}
    masks: dict[str, list[str]] = {}
    for rel in sorted(files):
        parts = rel.split("/")
        if not is_image(parts[-1]) or parts[0] not in ("defect", "masks") or len(parts) not in (2, 3):
            continue
        kind = parts[1] if len(parts) == 3 else "defect"
        (defects if parts[0] == "defect" else masks).setdefault(kind, []).append(rel)
    if not good:
        raise ValueError(f"class '{cls}' has no good images in {data.uri_of(cls + '/good')}; the folder layout "
                         "needs <class>/good/* (optional <class>/defect/<type>/*, <class>/masks/<type>/*)")
    held = _holdout(good, test_fraction) if defects else set()
    has_masks = any(r.startswith("masks/") for r in files)
    if defects and not has_masks:
        logger.info("class '%s' has no masks folder: pixel metrics will be skipped for it", cls)

    def record(rel: str, label: int, defect: str, split: str, mask: str | None = None) -> ImageRecord:
        return ImageRecord(image_uri=data.uri_of(f"{cls}/{rel}"), label=label, category=cls, defect=defect,
                           split=split, mask_uri=data.uri_of(f"{cls}/{mask}") if mask else None,
                           size_bytes=files[rel])

    records = [record(r, 0, "good", "train") for r in good if r not in held]
    records += [record(r, 0, "good", "test") for r in good if r in held]
    for kind in sorted(defects):
        pairs = (pair_masks(defects[kind], masks.get(kind, []), f"class '{cls}', defect/{kind} vs masks/{kind} "
                            f"under {data.uri_of(cls)}") if has_masks else {})
        records += [record(r, 1, kind, "test", pairs.get(r)) for r in defects[kind]]
    return records


def read_folder(data: DataRoot, categories: Sequence[str] | None = None,
                test_fraction: float = 0.2) -> list[ImageRecord]:
    """Custom data: <cls>/good/*, optional <cls>/defect/<type>/* and <cls>/masks/<type>/<stem>[_mask].png.

    Without any defect images every good image trains; with them, `test_fraction` of the good
    images (evenly spaced by name) is held out as normal test images. No masks folder = no pixel
    metrics for the class (mask_uri null on its defective rows); a masks folder must cover every
    defective image.
    """
    found = [d for d in data.subdirs("") if "good" in data.subdirs(d)]
    return [r for cls in select_classes(found, categories, data) for r in _read_folder_class(data, cls, test_fraction)]


# --------------------------------------------------------------------------- detection and entry point


def detect_layout(data: DataRoot, visa_split_csv: str = "") -> str:
    """Guess the layout from the folder names; a ValueError lists what was looked for and what was found."""
    top = data.subdirs("")
    if "realiad_1024" in top and "realiad_jsons" in top:
        return "realiad"
    kinds = set()
    for d in top:
        sub = set(data.subdirs(d))
        if "Data" in sub:
            kinds.add("visa_raw")
        elif {"train", "test"} & sub:
            kinds.add("mvtec")
        elif "good" in sub:
            kinds.add("folder")
    if kinds == {"visa_raw"} and not (visa_split_csv or "split_csv" in top):
        raise ValueError(f"{data.uri} looks like raw VisA (<cls>/Data/Images) but has no split_csv/1cls.csv; "
                         "set data.visa_split_csv or data.layout")
    if len(kinds) == 1:
        return kinds.pop()
    hint = " (for VisA_pytorch, point at its 1cls folder)" if "1cls" in top else ""
    raise ValueError(
        f"cannot detect the dataset layout of {data.uri}{hint}: looked for realiad_1024/ + realiad_jsons/ "
        "(realiad), <cls>/Data/Images + split_csv/ (visa_raw), <cls>/train|test (mvtec, mpdd, visa 1cls), "
        f"<cls>/good (folder); found {'mixed ' + str(sorted(kinds)) if kinds else 'none of these'} "
        f"among {sorted(top)[:10]}; set data.layout explicitly (one of {list(LAYOUTS)})")


def read_layout(root: str, layout: str = "auto", categories: Sequence[str] | None = None,
                filesystem: pafs.FileSystem | None = None, *, realiad_json_variant: str = "realiad_jsons",
                visa_split_csv: str = "", folder_test_fraction: float = 0.2) -> list[ImageRecord]:
    """Read a dataset `root` (local folder, s3:// URI, or a path inside `filesystem`) -> ImageRecords.

    Structural problems (missing root, unknown category, empty class, unpaired masks) raise here,
    before any cluster work, with the path and the fix.
    """
    data = resolve_root(root, filesystem)
    try:
        exists = data.is_dir("")
    except OSError as err:  # S3: no such bucket, access denied, bad endpoint or credentials
        raise FileNotFoundError(f"cannot list the dataset root {data.uri}: {err}; check the bucket name, the "
                                "endpoint (data.endpoint_url / AWS_ENDPOINT_URL) and the credentials") from err
    if not exists and data.fs.get_file_info(data.base).type == pafs.FileType.File:
        raise ValueError(f"--data {data.uri} is a file but neither a dataset folder nor a manifest (a manifest's "
                         "name ends in .parquet); point --data at the dataset root or at a .parquet manifest")
    if not exists:
        raise FileNotFoundError(f"dataset root {data.uri} does not exist (or is an empty bucket prefix); "
                                "check --data (data.root)")
    if layout == "auto":
        layout = detect_layout(data, visa_split_csv)
        logger.info("detected layout '%s' at %s", layout, data.uri)
    if layout in ("mvtec", "mpdd", "visa"):
        records = read_mvtec(data, categories)
    elif layout == "visa_raw":
        records = read_visa_raw(data, categories, visa_split_csv)
    elif layout == "realiad":
        records = read_realiad(data, categories, realiad_json_variant)
    elif layout == "folder":
        records = read_folder(data, categories, folder_test_fraction)
    else:
        raise ValueError(f"unknown layout '{layout}'; choose one of {['auto', *LAYOUTS]} "
                         "(a .parquet manifest is read with dinomaly.data.manifest.read_manifest)")
    logger.info("read %d images of %d classes from %s", len(records), len({r.category for r in records}), data.uri)
    return records
