"""Manifest -> Ray Data: streamed, decoded and cropped on CPU workers, split across training workers.

    manifest rows (URIs, labels) --[shuffle rows]--> map_batches(read + decode + resize + crop)
        --> uint8 images [B, crop, crop, 3] --> trainer: normalize()

Only URIs are shuffled, and only uint8 pixels cross the object store (4x smaller than float32), so
memory stays bounded by Ray Data's streaming backpressure whatever the number of images: nothing is
materialised. Normalisation runs on the trainer with dinomaly.data.transforms.normalize, so tensors
equal the reference transforms exactly (Reference: dataset.py get_data_transforms @c5c76d0).

Training shuffle: the manifest rows are globally shuffled before decoding, with a seed that Ray
re-derives for each execution (`RandomSeedConfig(reseed_after_execution=True)`), so every epoch is a
fresh seeded permutation, like the reference's DataLoader(shuffle=True). Blocks then stream in task
completion order (forcing block order would serialise the map tasks), so the order is uniform but not
bit-reproducible; data.shuffle=False gives manifest order. A full shuffle of decoded images would hold
the whole dataset; a block-order shuffle plus a local buffer is cheaper but not uniform. Shuffling URIs
costs one small all-to-all per epoch (on few blocks: see shuffle_blocks) and nothing else.

Bad files: an unreadable image (dinomaly.data.reader's error policy: vanished, I/O error, zero-byte,
truncated, not an image) is dropped by the map task, logged with its URI and recorded in an `ErrorCounter`
actor, whose summary goes to the run summary; with data.strict the task raises instead. Structural problems (missing manifest, root or
bucket, unknown category, empty class) raise on the driver before any Ray work.
"""

from __future__ import annotations

import itertools
import logging
import math
import weakref
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch

from dinomaly.config import Config
from dinomaly.data.manifest import read_manifest, select
from dinomaly.data.reader import RowError, RowReader
from dinomaly.data.storage import StorageOptions, check_reachable, filesystem_for, split_uri
from dinomaly.data.transforms import normalize

logger = logging.getLogger(__name__)

TARGET_BLOCK_BYTES = 16 * 1024**2  # decoded pixels per block: enough rows to amortise a task, little memory
MAX_LISTED_ERRORS = 100  # URIs kept for the run summary (the count is always exact)
_ERRORS_BY_DATASET: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- bad-file accounting


@ray.remote(num_cpus=0)
class _ErrorLog:
    """Distinct unreadable URIs with their reason, reported by map tasks (fire and forget)."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}

    def record(self, uri: str, reason: str) -> None:
        self.reasons.setdefault(uri, reason)

    def summary(self, limit: int) -> tuple[int, list[tuple[str, str]]]:
        return len(self.reasons), list(self.reasons.items())[:limit]


class ErrorCounter:
    """Driver-side handle on the files a pipeline skipped; picklable, so it can go to Train workers too."""

    def __init__(self) -> None:
        self.actor = _ErrorLog.remote()

    def record(self, uri: str, reason: str) -> None:
        self.actor.record.remote(uri, reason)

    def summary(self) -> dict:
        """{'data_errors': distinct files skipped, 'error_files': [(uri, reason), ...] (first 100)}."""
        count, listed = ray.get(self.actor.summary.remote(MAX_LISTED_ERRORS))
        return {"data_errors": count, "error_files": listed}


def count_errors(dataset: ray.data.Dataset) -> dict:
    """The bad-file summary of a dataset made by train_dataset (see ErrorCounter.summary)."""
    if dataset not in _ERRORS_BY_DATASET:
        raise ValueError("this dataset was not built by dinomaly.distributed.train.data; pass errors=ErrorCounter() "
                         "when building it and read that counter")
    return _ERRORS_BY_DATASET[dataset].summary()


# --------------------------------------------------------------------------- driver-side checks


def _check_storage(table: pa.Table, options: StorageOptions) -> None:
    """One request per bucket (or local folder) and per class's first image: fail before any cluster work."""
    roots, firsts = set(), {}
    for uri, category in zip(table.column("image_uri").to_pylist(), table.column("category").to_pylist()):
        scheme, path = split_uri(uri)
        roots.add(f"{scheme}://{path.split('/', 1)[0]}" if scheme else path.rsplit("/", 1)[0])
        firsts.setdefault(category, uri)
    for uri in sorted(roots) + list(firsts.values()):
        check_reachable(uri, options)


def select_rows(manifest: pa.Table | str, config: Config, split: str) -> pa.Table:
    """Manifest (table or Parquet URI) -> the rows of `split` for config.data.categories, validated.

    Raises FileNotFoundError / ValueError / PermissionError / ConnectionError for a missing manifest,
    unknown category, class without images in `split`, or unreachable data; never starts Ray work.
    """
    if isinstance(manifest, pa.Table):
        table = manifest
    else:  # the config's endpoint/region apply to the manifest too
        table = read_manifest(str(manifest), filesystem_for(str(manifest), config.data)[0])
    wanted = config.data.categories or sorted(set(table.column("category").to_pylist()))
    rows = select(table, split=split, categories=wanted)
    present = set(rows.column("category").to_pylist())
    empty = [c for c in wanted if c not in present]
    if empty:
        raise ValueError(f"classes {empty} have no {split} images in the manifest; drop them from "
                         "data.categories or fix the dataset")
    _check_storage(rows, StorageOptions.resolve(config.data))
    return rows


# --------------------------------------------------------------------------- the map task


def decode_batch(batch: dict[str, np.ndarray], reader: RowReader, errors: ErrorCounter | None
                 ) -> dict[str, np.ndarray]:
    """Manifest rows -> image uint8 [B, crop, crop, 3], label, category, image_uri.

    Unreadable rows are dropped and recorded in `errors` (B may shrink), or raise when the reader
    does not keep errors (data.strict).
    """
    read = reader.read_many([(uri, None) for uri in batch["image_uri"]])
    keep = [i for i, row in enumerate(read) if not isinstance(row, RowError)]
    for row in read:
        if isinstance(row, RowError) and errors is not None:
            errors.record(row.uri, row.reason)
    crop = reader.crop_size
    return {
        "image": np.stack([read[i].image for i in keep]) if keep else np.zeros((0, crop, crop, 3), np.uint8),
        "label": np.asarray(batch["label"])[keep].astype(np.int8),
        "category": np.asarray(batch["category"], dtype=object)[keep],
        "image_uri": np.asarray(batch["image_uri"], dtype=object)[keep],
    }


# --------------------------------------------------------------------------- datasets


def rows_per_block(num_rows: int, crop_size: int, parallelism: int = 8) -> int:
    """Manifest rows per output block: <= TARGET_BLOCK_BYTES of decoded pixels, and >= `parallelism` blocks."""
    by_bytes = max(1, TARGET_BLOCK_BYTES // (crop_size * crop_size * 3))
    return max(1, min(by_bytes, math.ceil(num_rows / parallelism)))


def shuffle_blocks(num_rows: int) -> int:
    """Blocks of URIs to shuffle: 2 per cluster CPU, at most 64.

    Ray's shuffle cuts every input block into one piece per output block (k^2 objects: 441 blocks of a
    15k-row manifest took 24 s here, 16 blocks 2 s), so the shuffle runs on few large blocks and each
    map task then streams its block out in decoded blocks of `rows_per_block` rows.
    """
    cpus = int(ray.cluster_resources().get("CPU", 4)) if ray.is_initialized() else 4
    return max(1, min(num_rows, 64, max(4, 2 * cpus)))


def _decoded(rows: pa.Table, config: Config, shuffle_seed: int | None, errors: ErrorCounter) -> ray.data.Dataset:
    columns = rows.select(["image_uri", "label", "category"])
    per_block = rows_per_block(columns.num_rows, config.model.crop_size)
    if shuffle_seed is None:  # many small blocks, in order
        blocks = [columns.slice(start, per_block) for start in range(0, columns.num_rows, per_block)]
        dataset = ray.data.from_arrow(blocks)
    else:
        per_shuffle_block = math.ceil(columns.num_rows / shuffle_blocks(columns.num_rows))
        blocks = [columns.slice(start, per_shuffle_block) for start in range(0, columns.num_rows, per_shuffle_block)]
        seed = ray.data.RandomSeedConfig(seed=shuffle_seed, reseed_after_execution=True)  # new order each epoch
        dataset = ray.data.from_arrow(blocks).random_shuffle(seed=seed)  # keeps the number of blocks
    data = config.data
    reader = RowReader(config.model.image_size, config.model.crop_size, keep_errors=not data.strict,
                       max_pixels=data.max_image_pixels or None, storage=StorageOptions.resolve(data))
    dataset = dataset.map_batches(decode_batch, batch_size=per_block, batch_format="numpy",
                                  fn_kwargs={"reader": reader, "errors": errors})
    # one decoded batch = one block: Ray's default (128 MiB) would buffer ~8 batches per map task
    dataset.context.target_max_block_size = 2 * TARGET_BLOCK_BYTES
    _ERRORS_BY_DATASET[dataset] = errors
    return dataset


def train_dataset(manifest: pa.Table | str, config: Config, errors: ErrorCounter | None = None) -> ray.data.Dataset:
    """The train split as a lazy Ray Dataset of uint8 images (columns image, label, category, image_uri).

    config.data.shuffle: a fresh permutation (seeded by config.train.seed) of all rows per execution
    (epoch), streamed in completion order; False: manifest order (exact for one consumer; with several,
    Ray assigns blocks to consumers as they ask).
    Pass it to TorchTrainer(datasets={"train": ...}) and read it with iter_train_batches in each worker.
    """
    rows = select_rows(manifest, config, "train")
    seed = config.train.seed if config.data.shuffle else None
    dataset = _decoded(rows, config, shuffle_seed=seed, errors=errors or ErrorCounter())
    if not config.data.shuffle:
        dataset.context.execution_options.preserve_order = True
    return dataset


# --------------------------------------------------------------------------- consuming


def _writable(array: np.ndarray) -> np.ndarray:
    # Ray hands out read-only zero-copy views; torch warns on those, so copy only when needed
    return np.require(array, requirements="W")


def iter_train_batches(shard: ray.data.DataIterator | ray.data.Dataset, batch_size: int,
                       max_epochs: int | None = None) -> Iterator[torch.Tensor]:
    """Endless normalised image batches [batch_size, 3, crop, crop] float32 from a worker's shard.

    Each pass over the shard is one epoch (a new execution, hence a new shuffle); the last partial
    batch of an epoch is dropped, as the reference's drop_last=True. Shards of `streaming_split(n,
    equal=True)` (Ray Train's default) hold the same number of rows, so workers stay in lockstep.
    """
    for epoch in itertools.count():
        if max_epochs is not None and epoch >= max_epochs:
            return
        produced = 0
        for batch in shard.iter_batches(batch_size=batch_size, drop_last=True, batch_format="numpy"):
            produced += 1
            yield normalize(_writable(batch["image"]))
        if produced == 0:
            raise ValueError(f"epoch {epoch} gave no full batch of {batch_size} images; lower the batch size "
                             "or add training images (unreadable files are skipped: see count_errors)")
