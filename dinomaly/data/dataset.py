"""A torch Dataset over manifest rows, for the local (non-Ray) loop and evaluation.

Each item is read by dinomaly.data.reader.RowReader and transformed exactly as the reference
(dinomaly.data.transforms). A file that cannot be read (the reader's error policy) is never dropped
silently: it is logged with its URI and counted in the dataset's `corrupt` counter (or raises
CorruptImageError when `strict`), and training batches are topped up from the next images so that
every batch keeps `batch_size` images.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import pyarrow as pa
import pyarrow.fs as pafs
import torch
from torch.utils.data import DataLoader, Dataset

from dinomaly.config import DataConfig, DinomalyConfig
from dinomaly.data.manifest import MANIFEST_SCHEMA, select
from dinomaly.data.reader import RowError, RowReader
from dinomaly.data.transforms import DEFAULT_MAX_PIXELS, CorruptImageError, mask_to_tensor, normalize


@dataclass
class CorruptFiles:
    """URIs skipped because they could not be read, with the reason; `count` goes to the run summary."""

    uris: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.uris)

    def add(self, skipped: RowError) -> None:
        self.uris.append(skipped.uri)
        self.reasons.append(skipped.reason)


class Batch(NamedTuple):
    images: torch.Tensor  # [B, 3, crop, crop] normalised
    labels: torch.Tensor  # [B] int64
    masks: torch.Tensor  # [B, 1, crop, crop] in 0..1
    categories: list[str]
    uris: list[str]
    skipped: list[RowError]


class ManifestDataset(Dataset):
    """Manifest rows -> (image [3,crop,crop], label, mask [1,crop,crop] or zeros, category, uri).

    `split` keeps one split (None = all rows); masks are read only when `with_masks` and the row is
    anomalous with a mask (reference: normal images get an all-zero mask).
    Reference: dataset.py MVTecDataset.__getitem__ @c5c76d0
    """

    def __init__(self, table_or_rows: pa.Table | Sequence[dict], model_config: DinomalyConfig,
                 split: str | None = None, with_masks: bool = True, *, data_config: DataConfig | None = None,
                 strict: bool | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 filesystem: pafs.FileSystem | None = None):
        table = table_or_rows if isinstance(table_or_rows, pa.Table) else pa.Table.from_pylist(
            list(table_or_rows), schema=MANIFEST_SCHEMA)
        table = select(table, split=split)
        packed = ["shard_uri", "shard_row"] if "shard_uri" in table.column_names else []  # bytes in shards
        self.rows = table.select(["image_uri", "mask_uri", "label", "category", *packed]).to_pylist()
        self.image_size, self.crop_size = model_config.image_size, model_config.crop_size
        self.with_masks = with_masks
        # data_config (data.strict, data.max_image_pixels, S3 endpoint) wins over the keyword defaults
        self.strict = data_config.strict if data_config is not None and strict is None else bool(strict)
        self.max_pixels = (data_config.max_image_pixels or None) if data_config is not None else max_pixels
        self.reader = RowReader(self.image_size, self.crop_size, keep_errors=not self.strict,
                                max_pixels=self.max_pixels, storage=data_config, filesystem=filesystem,
                                fast_decode=data_config.fast_decode if data_config is not None else False)
        self.corrupt = CorruptFiles()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple | RowError:
        row = self.rows[index]
        wants_mask = self.with_masks and row["label"] and row["mask_uri"]
        at = (row["shard_uri"], row["shard_row"]) if "shard_uri" in row else None
        read = self.reader.read(row["image_uri"], row["mask_uri"] if wants_mask else None, at)
        if isinstance(read, RowError):
            return read
        mask = torch.zeros(1, self.crop_size, self.crop_size) if read.mask is None else mask_to_tensor(read.mask)
        return normalize(read.image), row["label"], mask, row["category"], row["image_uri"]


def collate_samples(items: list) -> Batch:
    """Stack samples, setting RowError entries aside (they may come back from loader workers)."""
    good = [item for item in items if not isinstance(item, RowError)]
    skipped = [item for item in items if isinstance(item, RowError)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0), [], [], skipped)
    images, labels, masks, categories, uris = zip(*good)
    return Batch(torch.stack(images), torch.tensor(labels, dtype=torch.long), torch.stack(masks),
                 list(categories), list(uris), skipped)


def load_batches(dataset: ManifestDataset, index_lists: Iterable[list[int]], num_workers: int = 0) -> Iterator[Batch]:
    """One Batch per list of dataset indices, in order; unreadable files are counted on `dataset.corrupt`
    (a batch may come out short, or empty: uris == [])."""
    loader = DataLoader(dataset, batch_sampler=index_lists, num_workers=num_workers, collate_fn=collate_samples,
                        persistent_workers=False)
    for batch in loader:
        for skipped in batch.skipped:
            dataset.corrupt.add(skipped)
        yield batch


def iterate_batches(dataset: ManifestDataset, batch_size: int, num_workers: int = 0) -> Iterator[Batch]:
    """One ordered pass (evaluation): non-empty batches in manifest order; skipped files counted on the dataset."""
    order = list(range(len(dataset)))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    yield from (batch for batch in load_batches(dataset, chunks, num_workers) if batch.uris)


def epoch_indices(count: int, batch_size: int, seed: int, shuffle: bool, drop_last: bool) -> Iterator[list[int]]:
    """Endless index lists of `batch_size`: a seeded permutation of range(count) per epoch (manifest order when
    not `shuffle`), the last partial batch of each epoch dropped when `drop_last`."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(count, generator=generator).tolist() if shuffle else list(range(count))
        end = count - count % batch_size if drop_last else count
        for start in range(0, end, batch_size):
            yield order[start:start + batch_size]


def infinite_train_batches(dataset: ManifestDataset, batch_size: int, seed: int, shuffle: bool = True,
                           drop_last: bool = True, num_workers: int = 0) -> Iterator[torch.Tensor]:
    """Endless [batch_size, 3, crop, crop] image batches for dinomaly.loop.train_steps.

    Like the reference DataLoader(shuffle=True, drop_last=True) over all classes concatenated:
    uniform sampling over images, a fresh permutation each epoch (seeded), the last partial batch
    of an epoch dropped; shuffle=False repeats manifest order. Unreadable files are counted on
    `dataset.corrupt` and replaced by the next images, so batches stay full.
    Reference: dinomaly_mvtec_uni.py train_dataloader / `while True` epoch loop @c5c76d0
    """
    if len(dataset) < batch_size and drop_last:
        raise ValueError(f"the training set has {len(dataset)} images, fewer than batch_size={batch_size}; "
                         "lower train.batch_size or add images")
    if len(dataset) == 0:
        raise ValueError("the training set is empty")
    pending: list[torch.Tensor] = []
    failures_in_a_row = 0
    for batch in load_batches(dataset, epoch_indices(len(dataset), batch_size, seed, shuffle, drop_last), num_workers):
        failures_in_a_row = 0 if batch.uris else failures_in_a_row + 1
        if failures_in_a_row * batch_size >= 2 * len(dataset):
            raise CorruptImageError(f"no readable training image in {failures_in_a_row} batches "
                                    f"({dataset.corrupt.count} files skipped); check the dataset")
        if not batch.skipped and not pending:
            yield batch.images
            continue
        pending.extend(batch.images)
        while len(pending) >= batch_size:
            yield torch.stack(pending[:batch_size])
            pending = pending[batch_size:]
