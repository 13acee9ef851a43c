"""The manifest: one Parquet row per image, the single input of every training and evaluation path.

Built once from a layout (dinomaly.data.layouts) on the driver, so structural errors surface before
any cluster work, then read by Ray Data (distributed) or ManifestDataset (local loop, evaluation).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dinomaly.config import DataConfig
from dinomaly.data.layouts import ImageRecord, read_layout
from dinomaly.data.paths import resolve_root

logger = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("mask_uri", pa.string(), nullable=True),  # null: normal image, or no ground truth
        pa.field("label", pa.int8(), nullable=False),  # 1 = anomalous
        pa.field("category", pa.string(), nullable=False),
        pa.field("defect", pa.string(), nullable=False),  # 'good' for normal images
        pa.field("split", pa.string(), nullable=False),  # 'train' | 'test'
        pa.field("sample_id", pa.string(), nullable=True),  # Real-IAD S####
        pa.field("view", pa.string(), nullable=True),  # Real-IAD camera C1..C5
        pa.field("size_bytes", pa.int64(), nullable=False),
    ],
    metadata={"dinomaly_manifest": "1"},
)
SPLITS = ("train", "test")
# A packed manifest (dinomaly.data.pack) adds where each row's bytes are: a shard file and the row inside it.
PACKED_FIELDS = [pa.field("shard_uri", pa.string(), nullable=False), pa.field("shard_row", pa.int32(), nullable=False)]
PACKED_SCHEMA = pa.schema(list(MANIFEST_SCHEMA) + PACKED_FIELDS, metadata=MANIFEST_SCHEMA.metadata)
PACKED_LAYOUT_KEY = b"dinomaly_packed"  # Parquet metadata: the shard layout as JSON


def is_packed(table: pa.Table) -> bool:
    """True for the rows of a packed manifest: their image bytes live in Parquet shards, not at image_uri."""
    return "shard_uri" in table.column_names


def build_manifest(records: Iterable[ImageRecord]) -> pa.Table:
    """ImageRecords -> a validated manifest table (MANIFEST_SCHEMA), in the records' order."""
    columns: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
    for record in records:
        for name in MANIFEST_SCHEMA.names:
            columns[name].append(getattr(record, name))
    table = pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA)
    validate_manifest(table)
    return table


def validate_manifest(table: pa.Table) -> None:
    """Raise ValueError on rows no reader should ever produce (bad label/split, duplicate images)."""
    missing = [n for n in MANIFEST_SCHEMA.names if n not in table.column_names]
    if missing:
        raise ValueError(f"manifest lacks columns {missing}; rebuild it with pipelines/prepare_data.py")
    if table.num_rows == 0:
        raise ValueError("manifest is empty: no images were found")
    labels = set(table.column("label").to_pylist())
    if not labels <= {0, 1}:
        raise ValueError(f"manifest labels must be 0 or 1, found {sorted(labels)}")
    splits = set(table.column("split").to_pylist())
    if not splits <= set(SPLITS):
        raise ValueError(f"manifest splits must be {SPLITS}, found {sorted(splits)}")
    if pc.count_distinct(table.column("image_uri")).as_py() != table.num_rows:
        seen = Counter(table.column("image_uri").to_pylist())
        dupes = sorted(u for u, n in seen.items() if n > 1)[:5]
        raise ValueError(f"manifest lists the same image twice: {dupes}")


def _filesystem(uri: str, data: DataConfig, filesystem: pafs.FileSystem | None) -> pafs.FileSystem | None:
    """The given filesystem, else the one the DataConfig's S3 settings give for a URI (None = local)."""
    if filesystem is not None or "://" not in uri or uri.startswith("file://"):
        return filesystem
    return resolve_root(uri, data_config=data).fs


def records_from_config(data: DataConfig, filesystem: pafs.FileSystem | None = None) -> list[ImageRecord]:
    """Read the layout that `data` (DataConfig) describes (endpoint and region from it for s3://)."""
    return read_layout(data.root, data.layout, data.categories, _filesystem(data.root, data, filesystem),
                       realiad_json_variant=data.realiad_json_variant, visa_split_csv=data.visa_split_csv,
                       folder_test_fraction=data.folder_test_fraction)


def load_manifest(data: DataConfig, filesystem: pafs.FileSystem | None = None) -> pa.Table:
    """The manifest for a DataConfig: read a .parquet root, or build it from the layout on the fly.

    `data.categories` filters the rows (an unknown category is an error naming the classes found).
    """
    if not data.root:
        raise ValueError("data.root is empty; set it to a dataset folder, an s3:// prefix or a .parquet manifest")
    if data.layout == "manifest" and not data.root.endswith(".parquet"):
        source = resolve_root(data.root, filesystem, data)
        if source.fs.get_file_info(source.base).type == pafs.FileType.Directory:
            # a model trained from a manifest keeps layout=manifest in its config; given a dataset folder to
            # evaluate or calibrate on, read that folder's own layout
            data = dataclasses.replace(data, layout="auto")
    if data.layout == "manifest" or data.root.endswith(".parquet"):
        return select(read_manifest(data.root, filesystem, data), categories=data.categories)
    return build_manifest(records_from_config(data, filesystem))


def select(table: pa.Table, split: str | None = None, categories: Sequence[str] | None = None) -> pa.Table:
    """Rows of one split and/or some categories, in manifest order."""
    if categories:
        found = sorted(set(table.column("category").to_pylist()))
        unknown = [c for c in categories if c not in found]
        if unknown:
            raise ValueError(f"categories {unknown} are not in the manifest; classes found: {found}")
        table = table.filter(pc.is_in(table.column("category"), pa.array(list(categories))))
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} must be one of {SPLITS}")
        table = table.filter(pc.equal(table.column("split"), split))
    return table


def write_manifest(table: pa.Table, uri: str, filesystem: pafs.FileSystem | None = None,
                   data_config: DataConfig | None = None) -> str:
    """Write `table` as Parquet to a local path or URI (parents created); returns the URI written.

    `data_config` supplies the S3 endpoint/region for URIs (else the AWS_* variables).
    """
    validate_manifest(table)
    target = resolve_root(uri, filesystem, data_config)
    if not target.scheme:
        os.makedirs(os.path.dirname(target.base) or ".", exist_ok=True)
    schema = PACKED_SCHEMA if is_packed(table) else MANIFEST_SCHEMA
    layout = (table.schema.metadata or {}).get(PACKED_LAYOUT_KEY)
    if layout is not None:
        schema = schema.with_metadata({**schema.metadata, PACKED_LAYOUT_KEY: layout})
    pq.write_table(table.select(schema.names).cast(schema), target.base, filesystem=target.fs)
    logger.info("wrote manifest of %d images to %s", table.num_rows, target.uri)
    return target.uri


def read_manifest(uri: str, filesystem: pafs.FileSystem | None = None,
                  data_config: DataConfig | None = None) -> pa.Table:
    """Read and validate a manifest (local path or URI) -> table with exactly MANIFEST_SCHEMA (PACKED_SCHEMA and
    the shard layout in its metadata for a packed manifest)."""
    source = resolve_root(uri, filesystem, data_config)
    if source.fs.get_file_info(source.base).type != pafs.FileType.File:
        raise FileNotFoundError(f"manifest {source.uri} not found; build it with "
                                "`python pipelines/prepare_data.py --data <dataset> --output <manifest.parquet>`")
    try:
        table = pq.read_table(source.base, filesystem=source.fs)
    except pa.ArrowInvalid as err:
        raise ValueError(f"{source.uri} is not a readable Parquet manifest ({err}); build it with "
                         "`python pipelines/prepare_data.py --data <dataset> --output <manifest.parquet>`") from err
    validate_manifest(table)
    if not is_packed(table):
        return table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    layout = (table.schema.metadata or {}).get(PACKED_LAYOUT_KEY, b"{}")
    schema = PACKED_SCHEMA.with_metadata({**PACKED_SCHEMA.metadata, PACKED_LAYOUT_KEY: layout})
    return table.select(schema.names).cast(schema)


def count_rows(table: pa.Table) -> list[dict]:
    """Per class: train images, normal/anomalous test images, masks, defect types (order of first sight)."""
    rows: dict[str, dict] = {}
    for split, label, mask, category, defect in zip(*(table.column(n).to_pylist() for n in
                                                      ("split", "label", "mask_uri", "category", "defect"))):
        row = rows.setdefault(category, dict(category=category, train=0, train_anomalous=0, test_good=0,
                                             test_anomalous=0, masks=0, defects=set()))
        if split == "train":
            row["train"] += 1
            row["train_anomalous"] += label
        else:
            row["test_good" if label == 0 else "test_anomalous"] += 1
            row["masks"] += mask is not None and label == 1
            if label:
                row["defects"].add(defect)
    return [dict(row, defects=len(row["defects"])) for row in rows.values()]


def format_counts(table: pa.Table) -> str:
    """A printable per-class table of counts with a total line."""
    rows = count_rows(table)
    keys = ["train", "train_anomalous", "test_good", "test_anomalous", "masks", "defects"]
    if not any(r["train_anomalous"] for r in rows):
        keys.remove("train_anomalous")  # only the fully-unsupervised Real-IAD splits have these
    total = {"category": "TOTAL", **{k: sum(r[k] for r in rows) for k in keys}}
    width = max(len("category"), *(len(r["category"]) for r in rows), len("TOTAL"))
    lines = [f"{'category':<{width}}  " + "  ".join(f"{k:>{max(len(k), 6)}}" for k in keys)]
    for row in [*rows, total]:
        lines.append(f"{row['category']:<{width}}  " + "  ".join(f"{row[k]:>{max(len(k), 6)}}" for k in keys))
    return "\n".join(lines)
