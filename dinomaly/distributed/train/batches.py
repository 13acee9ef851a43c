"""Where a Ray Train worker's training batches come from: each source yields this rank's part of every step.

All sources take the global batch (train.batch_size) as the unit: step s uses global batch s, and
rank r of W trains on its rows [r*B/W, (r+1)*B/W). So a run on W workers sees the same images per
step as one worker does (what makes 2 workers x 4 == 1 worker x 8 in deterministic mode), and a resumed
run continues at the right batch without re-reading the skipped ones.

    TensorBatches    global batches given as tensors (reference trajectory, benchmarks)
    ManifestBatches  the manifest's train rows read by the worker itself (exact order; deterministic mode)
    RayDataBatches   the worker's Ray Data shard (`get_dataset_shard`), streamed and decoded by Ray Data
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import torch

from dinomaly.config import Config
from dinomaly.data.dataset import ManifestDataset, epoch_indices, load_batches

logger = logging.getLogger(__name__)



def local_rows(global_batch: int, rank: int, world: int) -> slice:
    """Rows of a global batch that rank `rank` of `world` trains on."""
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} does not split evenly over {world} workers")
    size = global_batch // world
    return slice(rank * size, (rank + 1) * size)


@dataclass
class TensorBatches:
    """Fixed global batches [B, 3, H, W] (normalised), used in order, one per step; runs out after the last."""

    batches: list[torch.Tensor]

    def iterate(self, rank: int, world: int, start_step: int) -> Iterator[torch.Tensor]:
        for batch in self.batches[start_step:]:
            yield batch[local_rows(batch.shape[0], rank, world)].float()


@dataclass
class ManifestBatches:
    """The train split of a manifest, read by every worker for its own rows of each global batch.

    Global batch order is exactly dinomaly.data.dataset.infinite_train_batches' (a seeded permutation per
    epoch, or manifest order when data.shuffle is false; the last partial batch dropped), so 1 worker here
    trains on what the local loop trains on. Resuming at step s skips s index lists, not s decoded batches.
    The table must hold at least one global batch (the driver checks: run.load_tables, the sweep's split).
    An unreadable image is logged and counted and leaves that step's batch on this rank one image short.
    """

    train_table: pa.Table
    config: Config

    def iterate(self, rank: int, world: int, start_step: int) -> Iterator[torch.Tensor]:
        tc, data = self.config.train, self.config.data
        dataset = ManifestDataset(self.train_table, self.config.model, with_masks=False, strict=data.strict,
                                  max_pixels=data.max_image_pixels or None)
        rows = local_rows(tc.batch_size, rank, world)
        order = epoch_indices(len(dataset), tc.batch_size, tc.seed, data.shuffle, drop_last=True)
        shard = (indices[rows] for indices in itertools.islice(order, start_step, None))
        for batch in load_batches(dataset, shard, data.loader_workers):
            if batch.uris:
                yield batch.images


@dataclass
class RayDataBatches:
    """This worker's shard of the Ray Data `train` dataset (dinomaly.distributed.train.data), epoch after epoch.

    Ray Data decides which rows each shard gets, so this source is not in manifest order, and a resumed
    run starts a fresh pass over the data (the step count and the schedule still continue exactly).
    """

    config: Config
    dataset_name: str = "train"

    def iterate(self, rank: int, world: int, start_step: int) -> Iterator[torch.Tensor]:
        import ray.train

        from dinomaly.distributed.train.data import iter_train_batches

        shard = ray.train.get_dataset_shard(self.dataset_name)
        rows = local_rows(self.config.train.batch_size, rank, world)
        return iter_train_batches(shard, rows.stop - rows.start)
