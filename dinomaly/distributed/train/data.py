"""Manifest -> Ray Data: streamed, decoded and cropped on CPU workers, split across training workers.

    read task i = (epoch, chunk of rows) --> map_batches(read + decode + resize + crop)
        --> uint8 images [B, crop, crop, 3] --> trainer: prefetch thread, normalize()

Only uint8 pixels cross the object store (4x smaller than float32), so memory stays bounded by Ray
Data's streaming backpressure whatever the number of images: nothing is materialised. The manifest
rows (URIs, labels) go to the object store once; each read task picks its rows from them. Normalisation
runs on the trainer with dinomaly.data.transforms.normalize, so tensors equal the reference transforms
exactly (Reference: dataset.py get_data_transforms @c5c76d0).

Epochs in one stream: a training dataset holds all the epochs the run needs (`epochs_for`), one after
the other, in one execution. Epoch e+1's reads start as soon as Ray Data has room, while epoch e's last
blocks are still being trained on, so the trainer never waits at an epoch boundary (a new execution per
epoch restarted the pipeline: one to two seconds of empty queue each time, 10-25 % of a short run). The
last partial batch is dropped only at the end of the stream, so a batch may hold the end of one epoch
and the start of the next.

Training shuffle: epoch e is the permutation numpy.random.default_rng([train.seed, e]) of the rows,
like the reference's DataLoader(shuffle=True) with a fresh permutation per epoch. Blocks then stream in
task completion order (forcing block order would serialise the map tasks), so the order is uniform
but not bit-reproducible; data.shuffle=False gives manifest order, epoch after epoch. No all-to-all
shuffle runs, so nothing stalls the stream. A packed manifest (dinomaly.data.pack) goes through the same
tasks, but its permutation keeps each row group of a shard together (groups in a seeded random order, rows
shuffled within them) and its chunks are whole groups, so a task fetches each group it decodes in one request.

Decode tasks at once: data.decode_images_per_s (what the trainers consume together) x the read+decode
time of one image, measured on the driver on a few rows, capped at the CPUs the trainers leave free
(`decode_concurrency`); unset, Ray Data runs as many as its free CPUs allow.

Bad files: an unreadable image (dinomaly.data.reader's error policy: vanished, I/O error, zero-byte,
truncated, not an image) is dropped by the map task, logged with its URI and recorded in an `ErrorCounter`
actor, whose summary goes to the run summary; with data.strict the task raises instead. Structural problems (missing manifest, root or
bucket, unknown category, empty class) raise on the driver before any Ray work.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import statistics
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import ray
import ray.data

from dinomaly.config import Config
from dinomaly.data.manifest import is_packed, read_manifest, select
from dinomaly.data.pack import ROWS_PER_GROUP, grouped_permutation, row_groups
from dinomaly.data.reader import RowError, RowReader
from dinomaly.data.storage import StorageOptions, check_reachable, filesystem_for, split_uri
from dinomaly.data.transforms import normalize
from dinomaly.distributed.train.prefetch import prefetched

if TYPE_CHECKING:  # the read tasks import this module: no torch there
    import torch

logger = logging.getLogger(__name__)

TARGET_BLOCK_BYTES = 16 * 1024**2  # decoded pixels per block: enough rows to amortise a task, little memory
PREFETCH_BATCHES = 4  # batches a trainer keeps ready (uint8 blocks + normalised tensors: small)
DECODE_SAMPLE = 8  # images timed on the driver to size the decode tasks
MAX_LISTED_ERRORS = 100  # URIs kept for the run summary (the count is always exact)
_ERRORS_BY_DATASET: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- bad-file accounting


@ray.remote(num_cpus=0)
class _ErrorLog:
    """Distinct unreadable URIs with their reason, reported by map tasks."""

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
        # waited for (bad files are rare): a summary read right after the stream ends then counts it
        ray.get(self.actor.record.remote(uri, reason))

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
    where = "shard_uri" if is_packed(table) else "image_uri"  # a packed row's bytes are in its shard
    for uri, category in zip(table.column(where).to_pylist(), table.column("category").to_pylist()):
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
    packed = list(zip(batch["shard_uri"], batch["shard_row"])) if "shard_uri" in batch else None
    read = reader.read_many([(uri, None) for uri in batch["image_uri"]], packed)
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


def epochs_for(config: Config, num_rows: int) -> int:
    """Epochs one stream holds: enough for train.total_steps global batches, plus one for skipped files."""
    return math.ceil(config.train.total_steps * config.train.batch_size / max(1, num_rows)) + 1


@dataclass(frozen=True)
class StreamPlan:
    """Which manifest rows read task `i` decodes: chunk i % chunks of epoch i // chunks.

    rows: a one-element list holding the ObjectRef of the rows table (in a list, so Ray hands the task
    the reference, not a copy per task); each worker process fetches the table once.
    """

    rows: list
    num_rows: int
    per_block: int
    epochs: int
    seed: int | None  # None: manifest order every epoch

    @property
    def chunks(self) -> int:
        return math.ceil(self.num_rows / self.per_block)

    @property
    def tasks(self) -> int:
        return self.epochs * self.chunks

    def task_rows(self, task: int, groups: np.ndarray | None = None) -> tuple[int, np.ndarray]:
        """(epoch, row indices) of read task `task`; `groups`: a packed manifest's row groups, kept together."""
        epoch, chunk = divmod(task, self.chunks)
        if groups is not None and self.seed is not None:
            order = _grouped_order(self.rows[0].hex(), groups, self.seed, epoch)
        else:
            order = _epoch_order(self.num_rows, self.seed, epoch)
        return epoch, order[chunk * self.per_block:(chunk + 1) * self.per_block]


@functools.lru_cache(maxsize=2)
def _epoch_order(num_rows: int, seed: int | None, epoch: int) -> np.ndarray:
    if seed is None:
        return np.arange(num_rows)
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


_GROUPED: dict[tuple[str, int], np.ndarray] = {}  # per worker process: (rows table, epoch) -> order


def _grouped_order(table_key: str, groups: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    key = (table_key, epoch)
    if key not in _GROUPED:
        _GROUPED.clear()
        _GROUPED[key] = grouped_permutation(groups, seed, epoch)
    return _GROUPED[key]


_TABLES: dict[str, pa.Table] = {}  # per worker process: the rows table of the plan it last ran


def _plan_table(plan: StreamPlan) -> pa.Table:
    key = plan.rows[0].hex()
    if key not in _TABLES:
        _TABLES.clear()
        _TABLES[key] = ray.get(plan.rows[0])
    return _TABLES[key]


def decode_tasks(batch: dict[str, np.ndarray], plan: StreamPlan, reader: RowReader, errors: ErrorCounter | None
                 ) -> dict[str, np.ndarray]:
    """Read task ids -> their rows, decoded (see decode_batch), with each row's epoch."""
    table, parts = _plan_table(plan), []
    groups = table.column("row_group").to_numpy() if "row_group" in table.column_names else None
    for task in batch["id"]:
        epoch, indices = plan.task_rows(int(task), groups)
        rows = table.take(pa.array(indices))
        part = decode_batch({name: rows.column(name).to_numpy(zero_copy_only=False)
                             for name in rows.column_names}, reader, errors)
        part["epoch"] = np.full(len(part["label"]), epoch, np.int32)
        parts.append(part)
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _decoded(rows: pa.Table, config: Config, epochs: int, errors: ErrorCounter) -> ray.data.Dataset:
    columns = rows.select(["image_uri", "label", "category"]).combine_chunks()
    per_block = rows_per_block(columns.num_rows, config.model.crop_size)
    if is_packed(rows):  # tasks read whole row groups: blocks of a multiple of their rows line up with them
        columns = columns.append_column("shard_uri", rows.column("shard_uri")).append_column(
            "shard_row", rows.column("shard_row")).append_column("row_group", pa.array(row_groups(rows)))
        per_block = max(ROWS_PER_GROUP, per_block // ROWS_PER_GROUP * ROWS_PER_GROUP)
    seed = config.train.seed if config.data.shuffle else None
    plan = StreamPlan([ray.put(columns)], columns.num_rows, per_block, epochs, seed)
    data = config.data
    reader = RowReader(config.model.image_size, config.model.crop_size, keep_errors=not data.strict,
                       max_pixels=data.max_image_pixels or None, storage=StorageOptions.resolve(data),
                       fast_decode=data.fast_decode)
    # one read task (and one decoded block) per chunk of rows: tasks run in parallel, and in order
    dataset = ray.data.range(plan.tasks, override_num_blocks=plan.tasks)
    tasks = decode_concurrency(columns, reader, config)  # None: Ray Data's own (and read + decode fuse)
    dataset = dataset.map_batches(decode_tasks, batch_size=None, batch_format="numpy",
                                  compute=ray.data.TaskPoolStrategy(size=tasks) if tasks else None,
                                  fn_kwargs={"plan": plan, "reader": reader, "errors": errors})
    # one decoded batch = one block: Ray's default (128 MiB) would buffer ~8 batches per map task
    dataset.context.target_max_block_size = 2 * TARGET_BLOCK_BYTES
    _ERRORS_BY_DATASET[dataset] = errors
    return dataset


def measure_decode_s(columns: pa.Table, reader: RowReader, sample: int = DECODE_SAMPLE) -> float:
    """Seconds to read and decode one image, the median over the first `sample` rows (after one warm-up row)."""
    times = []
    for row in range(min(columns.num_rows, sample + 1)):
        one = columns.slice(row, 1)
        started = time.perf_counter()
        decode_batch({name: one.column(name).to_numpy(zero_copy_only=False) for name in one.column_names},
                     dataclasses.replace(reader, keep_errors=True), None)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:] or times)


def decode_concurrency(columns: pa.Table, reader: RowReader, config: Config) -> int | None:
    """Decode tasks Ray Data runs at once: data.decode_images_per_s x the measured seconds per image (a task
    decodes 1/seconds images/s), at least 1 and at most the CPUs the training workers leave free; None
    (data.decode_images_per_s 0): as many as Ray Data's free CPUs allow."""
    if not config.data.decode_images_per_s:
        return None
    tc = config.train
    free = max(1, int(ray.cluster_resources().get("CPU", 1.0) - tc.num_workers * (tc.cpus_per_worker or 1.0)))
    seconds = measure_decode_s(columns, reader)
    wanted = math.ceil(config.data.decode_images_per_s * seconds)
    logger.info("read+decode %.1f ms per image (measured on the driver): %.0f images/s need %d decode tasks; "
                "%d CPUs are free for them", 1000 * seconds, config.data.decode_images_per_s, wanted, free)
    if wanted > free:
        logger.warning("decoding %.0f images/s needs %d CPUs for Ray Data, %d are free: the trainers will wait for "
                       "data; add CPUs (cluster/README.md sizes them) or turn on data.fast_decode",
                       config.data.decode_images_per_s, wanted, free)
    return max(1, min(wanted, free))


def train_dataset(manifest: pa.Table | str, config: Config, errors: ErrorCounter | None = None,
                  epochs: int | None = None) -> ray.data.Dataset:
    """The train split as a lazy Ray Dataset of uint8 images (columns image, label, category, image_uri, epoch).

    epochs: passes over the rows in one stream (None: epochs_for(config), all the run needs).
    config.data.shuffle: each epoch a fresh permutation (seeded by config.train.seed), streamed in
    completion order; False: manifest order (exact for one consumer; with several, Ray assigns blocks
    to consumers as they ask). Iterating the dataset again repeats the same epochs.
    Pass it to TorchTrainer(datasets={"train": ...}) and read it with iter_train_batches in each worker.
    """
    rows = select_rows(manifest, config, "train")
    epochs = epochs or epochs_for(config, rows.num_rows)
    dataset = _decoded(rows, config, epochs, errors=errors or ErrorCounter())
    if not config.data.shuffle:
        dataset.context.execution_options.preserve_order = True
    return dataset


# --------------------------------------------------------------------------- consuming


def _writable(array: np.ndarray) -> np.ndarray:
    # Ray hands out read-only zero-copy views; torch warns on those, so copy only when needed
    return np.require(array, requirements="W")


def iter_train_batches(shard: ray.data.DataIterator | ray.data.Dataset, batch_size: int,
                       max_passes: int | None = None, prefetch: int = PREFETCH_BATCHES) -> Iterator[torch.Tensor]:
    """Endless normalised image batches [batch_size, 3, crop, crop] float32 from a worker's shard.

    A background thread assembles and normalises up to `prefetch` batches ahead of the training step.
    Each pass over the shard is one execution of its dataset (train_dataset streams every epoch of the
    run in one); the last partial batch of a pass is dropped, as the reference's drop_last=True. Shards
    of `streaming_split(n, equal=True)` (Ray Train's default) hold the same number of rows, so workers
    stay in lockstep.
    """
    def passes() -> Iterator[torch.Tensor]:
        for index in itertools.count():
            if max_passes is not None and index >= max_passes:
                return
            produced = 0
            for batch in shard.iter_batches(batch_size=batch_size, drop_last=True, batch_format="numpy",
                                            prefetch_batches=prefetch):
                produced += 1
                yield normalize(_writable(batch["image"]))
            if produced == 0:
                raise ValueError(f"a pass over the data gave no full batch of {batch_size} images; lower the "
                                 "batch size or add training images (unreadable files are skipped: see count_errors)")

    return prefetched(passes(), prefetch) if prefetch > 0 else passes()
