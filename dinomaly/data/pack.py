"""Packed manifests: the images (and masks) of a manifest in Parquet shards of ~256 MB, beside a small index.

    pack_manifest(manifest, "s3://bucket/mvtec-packed")  ->  s3://bucket/mvtec-packed/manifest.parquet
        shards/train-00000.parquet ...   manifest columns + image_bytes (the file's original bytes) + mask_bytes
        manifest.parquet                 the manifest columns + shard_uri, shard_row; the shard layout (JSON) in
                                         its Parquet metadata under `dinomaly_packed`

One object per image is the slow way to use an object store (a round trip each); a shard is read in a few
large requests. Train shards interleave every (class, view) evenly, so any shard is a fair sample of the
training set and a stream of shards needs no global shuffle of bytes; test shards keep classes contiguous,
so evaluation finishes one class before the next. Images are never re-encoded: a packed row decodes to the
same pixels as the file it came from.

Packing verifies every row (the image decodes in full, the mask decodes and has its image's size); a bad
row is counted and listed in the layout, never packed (data.strict: the first one fails the pack).
Packing is resumable: the plan is a pure function of the manifest and shard_bytes, each shard is written
whole (a local file is renamed into place, an object-store upload appears on completion) with a fingerprint
of its rows, and a rerun keeps every shard whose fingerprint matches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections import Counter, OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dinomaly.config import DataConfig
from dinomaly.data.manifest import (
    MANIFEST_SCHEMA,
    PACKED_LAYOUT_KEY,
    SPLITS,
    is_packed,
    read_manifest,
    write_manifest,
)
from dinomaly.data.paths import DataRoot, read_bytes, resolve_root
from dinomaly.data.transforms import (
    DEFAULT_MAX_PIXELS,
    CorruptImageError,
    MaskSizeError,
    check_mask_size,
    decode_image,
    decode_mask,
)

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 256 * 1024**2
# A row group is the unit a reader fetches (one ranged request): about one decoded training block of rows,
# so a read task fetches whole groups and nothing it does not decode.
ROWS_PER_GROUP = 32
SHARD_SCHEMA = pa.schema(list(MANIFEST_SCHEMA) + [pa.field("image_bytes", pa.binary(), nullable=False),
                                                  pa.field("mask_bytes", pa.binary(), nullable=True)])
SHARD_KEY = b"dinomaly_shard"  # a shard's Parquet metadata: JSON {plan fingerprint, bad rows}
MAX_LISTED = 1000  # bad rows listed in the layout (the count is always exact)
FETCH_THREADS = 8
SHARD_NAME = re.compile(rf"({'|'.join(SPLITS)})-\d{{5,}}\.parquet")  # plan_shards' names
NO_VIEW = ""  # the layout's `views` key for rows without a camera view
_VERIFY_ERRORS = (CorruptImageError, MaskSizeError, OSError)


@dataclass(frozen=True)
class ShardPlan:
    """One shard to write: its file name, split, and the manifest rows it holds, in order."""

    name: str
    split: str
    rows: list[int]

    def fingerprint(self, uris: Sequence[str]) -> str:
        return hashlib.sha1("\n".join(uris[i] for i in self.rows).encode()).hexdigest()


# --------------------------------------------------------------------------- the plan


_SPREAD = (0.6180339887, 0.4142135624)  # irrational steps: offsets of (class, view) groups never line up


def _interleave(groups: dict[tuple, list[int]]) -> list[int]:
    """Rows of all groups spread evenly: a group's k-th of n rows goes to position (k + offset) / n, with the
    group's offset in [0, 1) from its class and view ranks, so that neighbours differ in class and in view."""
    ranks = [{value: i for i, value in enumerate(dict.fromkeys(key[d] for key in groups))} for d in range(2)]
    keyed = []
    for g, (key, rows) in enumerate(groups.items()):
        offset = sum(ranks[d][key[d]] * _SPREAD[d] for d in range(2)) % 1.0
        keyed.extend(((k + offset) / len(rows), g, row) for k, row in enumerate(rows))
    return [row for *_, row in sorted(keyed)]


def plan_shards(table: pa.Table, shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[ShardPlan]:
    """Cut a manifest into shards of about shard_bytes (by size_bytes), per split.

    Train: every (category, view) spread evenly over all shards; test: classes contiguous, views interleaved.
    """
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes={shard_bytes} must be positive (default {DEFAULT_SHARD_BYTES})")
    columns = {n: table.column(n).to_pylist() for n in ("split", "category", "view", "size_bytes")}
    plans = []
    for split in SPLITS:
        by_class: dict[str, dict] = {}
        for i, (s, category, view) in enumerate(zip(columns["split"], columns["category"], columns["view"])):
            if s == split:
                by_class.setdefault(category, {}).setdefault(view, []).append(i)
        if not by_class:
            continue
        if split == "train":
            order = _interleave({(c, v): rows for c, views in by_class.items() for v, rows in views.items()})
        else:
            order = [row for c, views in by_class.items() for row in _interleave({(c, v): r for v, r in views.items()})]
        sizes = np.asarray([max(1, columns["size_bytes"][i]) for i in order], dtype=np.int64)
        count = max(1, min(len(order), math.ceil(int(sizes.sum()) / shard_bytes)))
        # cut at equal shares of the bytes, so shards come out the same size rather than full + remainder
        cuts = np.searchsorted(np.cumsum(sizes), np.arange(1, count) * sizes.sum() / count)
        for k, part in enumerate(np.split(np.asarray(order), cuts)):
            if len(part):
                plans.append(ShardPlan(f"{split}-{k:05d}.parquet", split, part.tolist()))
    return plans


# --------------------------------------------------------------------------- verification


def check_row(uri: str, data: bytes | OSError, mask_uri: str | None = None, mask_data: bytes | OSError | None = None,
              max_pixels: int | None = DEFAULT_MAX_PIXELS) -> str | None:
    """Why a row cannot be used (its image does not decode in full, its mask does not, or the mask's size differs
    from the image's, naming both files), or None when it is fine."""
    try:
        for failed in (data, mask_data):
            if isinstance(failed, OSError):
                raise failed
        image = decode_image(data, uri, max_pixels)
        if mask_data is not None:
            mask = decode_mask(mask_data, mask_uri, max_pixels)
            check_mask_size(image.size, mask.size, uri, mask_uri)
    except _VERIFY_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    return None


def _fetch(uri: str | None, data_config: DataConfig | None) -> bytes | OSError | None:
    if uri is None:
        return None
    try:
        return read_bytes(uri, None, data_config)
    except OSError as err:  # kept for check_row, which reports it
        return err


def _fetch_rows(table: pa.Table, rows: Sequence[int], data_config: DataConfig | None, pool: ThreadPoolExecutor):
    """(uri, image bytes, mask uri, mask bytes) of manifest rows, fetched concurrently, in order."""
    uris = table.column("image_uri").take(list(rows)).to_pylist()
    masks = table.column("mask_uri").take(list(rows)).to_pylist()
    images = pool.map(lambda u: _fetch(u, data_config), uris)
    mask_data = pool.map(lambda u: _fetch(u, data_config), masks)
    return zip(uris, images, masks, mask_data)


def _packed_rows(table: pa.Table, rows: Sequence[int], data_config: DataConfig | None):
    """(uri, image bytes, mask uri, mask bytes) of packed manifest rows, read from their shards as training and
    evaluation read them (the files at image_uri may be gone), in order."""
    names = ("image_uri", "mask_uri", "shard_uri", "shard_row")
    for uri, mask_uri, shard, at in zip(*(table.column(n).take(list(rows)).to_pylist() for n in names)):
        try:
            data, mask_data = read_packed_row(shard, at, None, data_config)
        except OSError as err:  # a missing shard: each of its rows is bad
            data, mask_data = err, None
        except pa.ArrowInvalid as err:  # not a Parquet file (cut short, overwritten)
            data, mask_data = OSError(f"cannot read shard {shard}: {err}"), None
        yield uri, data, mask_uri, (mask_data if mask_uri else None)


def verify_manifest(table: pa.Table, data_config: DataConfig | None = None, strict: bool = False
                    ) -> list[tuple[str, str]]:
    """Every row's image and mask read and checked (check_row) -> [(image uri, reason)] of the bad ones.

    A packed manifest's rows are read from its shards, the bytes training and evaluation use.
    strict: raise ValueError on the first bad row instead.
    """
    max_pixels = (data_config.max_image_pixels or None) if data_config else DEFAULT_MAX_PIXELS
    bad = []
    with _pool() as pool:
        for start in range(0, table.num_rows, 256):
            rows = range(start, min(start + 256, table.num_rows))
            fetched = (_packed_rows(table, rows, data_config) if is_packed(table)
                       else _fetch_rows(table, rows, data_config, pool))
            for uri, data, mask_uri, mask_data in fetched:
                reason = check_row(uri, data, mask_uri, mask_data, max_pixels)
                if reason:
                    _fail_if_strict(uri, reason, strict)
                    bad.append((uri, reason))
    return bad


def _fail_if_strict(uri: str, reason: str, strict: bool) -> None:  # not logged: the caller lists bad rows once
    if strict:
        raise ValueError(f"bad row {uri} (data.strict=true): {reason}")


@contextmanager
def _pool():
    """A fetch pool that, on Ctrl-C or an error, drops the reads not yet started instead of finishing them all."""
    pool = ThreadPoolExecutor(FETCH_THREADS)
    try:
        yield pool
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- packing


def _targets(out_uri: str, data_config: DataConfig | None) -> tuple[str, DataRoot]:
    """out_uri (a folder / prefix, or the .parquet index to write) -> (index URI, shard folder)."""
    out_uri = out_uri.rstrip("/")
    if out_uri.endswith(".parquet"):
        index, folder = out_uri, out_uri[:-len(".parquet")] + "-shards"
    else:
        index, folder = f"{out_uri}/manifest.parquet", f"{out_uri}/shards"
    shards = resolve_root(folder, None, data_config)
    if not shards.scheme:
        os.makedirs(shards.base, exist_ok=True)
    return index, shards


def _finished(shards: DataRoot, plan: ShardPlan, fingerprint: str) -> dict | None:
    """The metadata of a shard already written for this plan, else None."""
    path = shards.path(plan.name)
    if shards.fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        with shards.fs.open_input_file(path) as handle:
            meta = pq.ParquetFile(handle).schema_arrow.metadata or {}
    except (OSError, pa.ArrowInvalid):  # a stray partial file: rewrite it
        return None
    info = json.loads(meta.get(SHARD_KEY, b"{}"))
    return info if info.get("plan") == fingerprint else None


def _write_shard(table: pa.Table, plan: ShardPlan, shards: DataRoot, fingerprint: str,
                 data_config: DataConfig | None, strict: bool, pool: ThreadPoolExecutor) -> dict:
    """Verify the plan's rows and write the good ones to one shard, a row group at a time; returns its metadata."""
    max_pixels = (data_config.max_image_pixels or None) if data_config else DEFAULT_MAX_PIXELS
    keep, payloads, bad = [], [], []
    for row, (uri, data, mask_uri, mask_data) in zip(plan.rows, _fetch_rows(table, plan.rows, data_config, pool)):
        reason = check_row(uri, data, mask_uri, mask_data, max_pixels)
        if reason:
            _fail_if_strict(uri, reason, strict)
            bad.append((uri, reason))
        else:
            keep.append(row)
            payloads.append((data, mask_data))
    info = {"plan": fingerprint, "rows": len(keep), "bad": bad}
    schema = SHARD_SCHEMA.with_metadata({**MANIFEST_SCHEMA.metadata, SHARD_KEY: json.dumps(info).encode()})
    body = table.select(MANIFEST_SCHEMA.names).take(pa.array(keep, pa.int64())).cast(MANIFEST_SCHEMA)  # [] too
    body = body.append_column("image_bytes", pa.array([p[0] for p in payloads], pa.binary()))
    body = body.append_column("mask_bytes", pa.array([p[1] for p in payloads], pa.binary()))
    final = shards.path(plan.name)
    temporary = final if shards.scheme else shards.path(f".{plan.name}.partial")
    # image bytes are already compressed; only the small manifest columns are worth compressing
    with pq.ParquetWriter(temporary, schema, filesystem=shards.fs, use_dictionary=["category", "defect", "split"],
                          compression={n: ("none" if n.endswith("_bytes") else "zstd") for n in schema.names}) as out:
        out.write_table(body.cast(schema), row_group_size=ROWS_PER_GROUP)
    if temporary != final:
        shards.fs.move(temporary, final)
    logger.info("packed %s: %d rows, %d bad", shards.uri_of(plan.name), len(keep), len(bad))
    return info


def pack_manifest(manifest: pa.Table | str, out_uri: str, shard_bytes: int = DEFAULT_SHARD_BYTES,
                  data_config: DataConfig | None = None, strict: bool = False) -> str:
    """Pack a manifest (table or URI) into Parquet shards under out_uri; returns the packed manifest's URI.

    out_uri: a folder or s3:// prefix (index <out_uri>/manifest.parquet, shards in <out_uri>/shards/), or the
    .parquet index itself (shards in <name>-shards/ beside it). Rerunning continues an interrupted pack.
    Bad rows are left out and listed in the layout (packed_layout); strict: the first one raises ValueError.
    """
    table = manifest if isinstance(manifest, pa.Table) else read_manifest(manifest, data_config=data_config)
    if is_packed(table):
        raise ValueError("this manifest is already packed; pack the unpacked manifest it came from")
    index_uri, shards = _targets(out_uri, data_config)
    uris = table.column("image_uri").to_pylist()
    plans, infos = plan_shards(table, shard_bytes), []
    with _pool() as pool:
        for plan in plans:
            fingerprint = plan.fingerprint(uris)
            info = _finished(shards, plan, fingerprint)
            if info is None:
                info = _write_shard(table, plan, shards, fingerprint, data_config, strict, pool)
            else:
                logger.info("kept %s from an earlier run", shards.uri_of(plan.name))
            infos.append(info)
    index = _index(shards, plans, infos, shard_bytes)
    index_uri = write_manifest(index, index_uri, data_config=data_config)
    _warn_stale(shards, plans)
    return index_uri


def _warn_stale(shards: DataRoot, plans: list[ShardPlan]) -> None:
    """Name the shards an earlier pack left in this folder that the new manifest does not use. Warned about, not
    deleted: they may be all that is left of another pack someone still reads, and a bucket has no undo."""
    names = {plan.name for plan in plans}
    stale = [n for n in shards.files("") if SHARD_NAME.fullmatch(n) and n not in names]
    if stale:
        listed = ", ".join(stale[:10]) + (f" and {len(stale) - 10} more" if len(stale) > 10 else "")
        logger.warning("%d shard files in %s are not part of this pack (left by an earlier one; nothing reads them, "
                       "delete them to save space): %s", len(stale), shards.uri, listed)


def _index(shards: DataRoot, plans: list[ShardPlan], infos: list[dict], shard_bytes: int) -> pa.Table:
    """The packed manifest: each shard's manifest columns with shard_uri/shard_row, and the layout as metadata."""
    parts, layout = [], []
    for plan in plans:
        part = pq.read_table(shards.path(plan.name), filesystem=shards.fs, columns=MANIFEST_SCHEMA.names)
        uri = shards.uri_of(plan.name)
        part = part.append_column("shard_uri", pa.array([uri] * part.num_rows, pa.string()))
        parts.append(part.append_column("shard_row", pa.array(np.arange(part.num_rows, dtype=np.int32))))
        layout.append({"uri": uri, "split": plan.split, "rows": part.num_rows,
                       "bytes": shards.fs.get_file_info(shards.path(plan.name)).size,
                       "classes": dict(Counter(part.column("category").to_pylist())),
                       "views": dict(Counter(NO_VIEW if v is None else v for v in part.column("view").to_pylist()))})
    bad = [row for info in infos for row in info["bad"]]
    metadata = {"version": 1, "shard_bytes": shard_bytes, "rows_per_group": ROWS_PER_GROUP, "shards": layout, "bad_count": len(bad),
                "bad_files": bad[:MAX_LISTED]}
    table = pa.concat_tables(parts)
    return table.replace_schema_metadata({**(table.schema.metadata or {}),
                                          PACKED_LAYOUT_KEY: json.dumps(metadata).encode()})


def packed_layout(table: pa.Table) -> dict:
    """The shard layout recorded in a packed manifest read with read_manifest ({} when there is none)."""
    return json.loads((table.schema.metadata or {}).get(PACKED_LAYOUT_KEY, b"{}"))


# --------------------------------------------------------------------------- reading

_GROUPS: OrderedDict = OrderedDict()  # (shard uri, row group) -> its bytes columns, the latest few per process
_OFFSETS: dict[str, np.ndarray] = {}  # shard uri -> first row of each row group
CACHE_BYTES = 64 * 1024**2  # row groups kept per process beyond the one in use


def row_groups(table: pa.Table) -> np.ndarray:
    """A packed manifest's rows -> the id of the row group each one is stored in (int64 [N])."""
    shards = pc.dictionary_encode(table.column("shard_uri")).combine_chunks().indices.to_numpy()
    groups = table.column("shard_row").to_numpy() // ROWS_PER_GROUP
    return shards.astype(np.int64) * (1 << 32) + groups


def grouped_permutation(groups: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """A seeded permutation of rows that keeps each row group's rows together: the groups in random order
    (full ones first, so chunks of a multiple of ROWS_PER_GROUP rows line up with groups), the rows within
    each group shuffled. A chunk of it is read with one request per group it touches."""
    rng = np.random.default_rng([seed, epoch])
    unique, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    rank = np.empty(len(unique))
    rank[rng.permutation(len(unique))] = np.arange(len(unique))
    rank += np.where(counts < ROWS_PER_GROUP, len(unique), 0)  # partial groups (shard ends, filtered) last
    return np.lexsort((rng.random(len(groups)), rank[inverse]))


def read_packed_row(shard_uri: str, shard_row: int, filesystem: pafs.FileSystem | None = None,
                    storage=None) -> tuple[bytes, bytes | None]:
    """(image bytes, mask bytes or None) of one packed row; reads (and keeps a few of) whole row groups, so
    rows in shard order cost one read per row group."""
    source = resolve_root(shard_uri, filesystem, storage)
    if shard_uri not in _OFFSETS:
        with source.fs.open_input_file(source.base) as handle:
            meta = pq.ParquetFile(handle).metadata
        _OFFSETS[shard_uri] = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
    offsets = _OFFSETS[shard_uri]
    group = int(np.searchsorted(offsets, shard_row, side="right")) - 1
    key = (shard_uri, group)
    if key not in _GROUPS:
        with source.fs.open_input_file(source.base) as handle:
            _GROUPS[key] = pq.ParquetFile(handle).read_row_group(group, columns=["image_bytes", "mask_bytes"])
        while len(_GROUPS) > 1 and sum(t.nbytes for t in _GROUPS.values()) - _GROUPS[key].nbytes > CACHE_BYTES:
            _GROUPS.popitem(last=False)
    _GROUPS.move_to_end(key)
    rows = _GROUPS[key]
    at = shard_row - int(offsets[group])
    return rows.column("image_bytes")[at].as_py(), rows.column("mask_bytes")[at].as_py()
