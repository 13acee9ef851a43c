"""A torch Dataset over manifest rows, for the local (non-Ray) loop and evaluation.

Each item is decoded and transformed exactly as the reference (dinomaly.data.transforms). A file
that cannot be read is never dropped silently: it is logged with its URI and counted in the
dataset's `corrupt` counter (or raises CorruptImageError when `strict`), and training batches are
topped up from the next images so that every batch keeps `batch_size` images.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import pyarrow as pa
import pyarrow.fs as pafs
import torch
from torch.utils.data import DataLoader, Dataset

from dinomaly.config import DataConfig, DinomalyConfig
from dinomaly.data.manifest import MANIFEST_SCHEMA, select
from dinomaly.data.paths import read_bytes
from dinomaly.data.transforms import (
    DEFAULT_MAX_PIXELS,
    CorruptImageError,
    decode_image,
    decode_mask,
    mask_to_tensor,
    normalize,
    resize_crop_image,
    resize_crop_mask,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SkippedImage:
    """Returned instead of a sample when a file cannot be read (non-strict mode)."""

    uri: str
    reason: str


@dataclass
class CorruptFiles:
    """URIs skipped because they could not be read, with the reason; `count` goes to the run summary."""

    uris: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.uris)

    def add(self, skipped: SkippedImage) -> None:
        logger.warning("skipping unreadable image %s: %s", skipped.uri, skipped.reason)
        self.uris.append(skipped.uri)
        self.reasons.append(skipped.reason)


class Batch(NamedTuple):
    images: torch.Tensor  # [B, 3, crop, crop] normalised
    labels: torch.Tensor  # [B] int64
    masks: torch.Tensor  # [B, 1, crop, crop] in 0..1
    categories: list[str]
    uris: list[str]
    skipped: list[SkippedImage]


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
        self.rows = table.select(["image_uri", "mask_uri", "label", "category"]).to_pylist()
        self.image_size, self.crop_size = model_config.image_size, model_config.crop_size
        self.with_masks = with_masks
        # data_config (data.strict, data.max_image_pixels, S3 endpoint) wins over the keyword defaults
        self.strict = data_config.strict if data_config is not None and strict is None else bool(strict)
        self.max_pixels = (data_config.max_image_pixels or None) if data_config is not None else max_pixels
        self.data_config, self.filesystem = data_config, filesystem
        self.corrupt = CorruptFiles()

    def __len__(self) -> int:
        return len(self.rows)

    def _load(self, row: dict) -> tuple[torch.Tensor, torch.Tensor]:
        uri = row["image_uri"]
        image = decode_image(read_bytes(uri, self.filesystem, self.data_config), uri, self.max_pixels)
        pixels = normalize(resize_crop_image(image, self.image_size, self.crop_size))
        if self.with_masks and row["label"] and row["mask_uri"]:
            mask_uri = row["mask_uri"]
            mask = decode_mask(read_bytes(mask_uri, self.filesystem, self.data_config), mask_uri, self.max_pixels)
            return pixels, mask_to_tensor(resize_crop_mask(mask, self.image_size, self.crop_size))
        return pixels, torch.zeros(1, self.crop_size, self.crop_size)

    def __getitem__(self, index: int) -> tuple | SkippedImage:
        row = self.rows[index]
        try:
            image, mask = self._load(row)
        except (CorruptImageError, FileNotFoundError) as err:
            if self.strict:
                raise
            return SkippedImage(row["image_uri"], f"{type(err).__name__}: {err}")
        return image, row["label"], mask, row["category"], row["image_uri"]


def collate_samples(items: list) -> Batch:
    """Stack samples, setting SkippedImage entries aside (they may come back from loader workers)."""
    good = [item for item in items if not isinstance(item, SkippedImage)]
    skipped = [item for item in items if isinstance(item, SkippedImage)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0), [], [], skipped)
    images, labels, masks, categories, uris = zip(*good)
    return Batch(torch.stack(images), torch.tensor(labels, dtype=torch.long), torch.stack(masks),
                 list(categories), list(uris), skipped)


def _loader(dataset: ManifestDataset, batch_sampler, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                      collate_fn=collate_samples, persistent_workers=False)


def iterate_batches(dataset: ManifestDataset, batch_size: int, num_workers: int = 0) -> Iterator[Batch]:
    """One ordered pass (evaluation): batches in manifest order; skipped files counted on the dataset."""
    order = list(range(len(dataset)))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in _loader(dataset, chunks, num_workers):
        for skipped in batch.skipped:
            dataset.corrupt.add(skipped)
        if batch.uris:
            yield batch


def _epoch_indices(count: int, batch_size: int, seed: int, shuffle: bool, drop_last: bool) -> Iterator[list[int]]:
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
    for batch in _loader(dataset, _epoch_indices(len(dataset), batch_size, seed, shuffle, drop_last), num_workers):
        for skipped in batch.skipped:
            dataset.corrupt.add(skipped)
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
