"""The encoder-feature cache: the frozen encoder's target-layer outputs of every training image, computed once.

The encoder never trains and the training transforms (resize, centre crop, normalise) are deterministic,
so an image's encoder outputs are the same in every step, epoch and Tune trial. The cache stores them
once per dataset + encoder + transform; trials then run only the bottleneck and decoder
(`Dinomaly.forward_from_encoder`). Batches come in exactly the order of the image reader
(dinomaly.distributed.train.batches.ManifestBatches), so a trial trains on the same numbers either way.

Layout: <cache_root>/<encoder>-<key>/features.arrow, an Arrow IPC file with one record batch per computed
batch (columns image_uri: string, features: fixed_size_list<float32>[L*N*D]), and meta.json (written
last: the cache is complete when it exists). The key hashes the encoder settings and weights file, the
transform sizes, the target layers and every image's URI and size. Local caches are memory-mapped
(nothing is copied until a batch is taken); a remote (s3://) cache is downloaded once per process.
Size: 4 * L * N * D bytes per image, e.g. 19.4 MB for ViT-B/14 at 392 px (8 layers x 789 tokens x 768).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dinomaly.config import Config, DataConfig, DinomalyConfig
from dinomaly.data.dataset import ManifestDataset, epoch_indices, iterate_batches
from dinomaly.data.storage import filesystem_for, split_uri

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
FEATURES_FILE = "features.arrow"
META_FILE = "meta.json"


def cache_key(rows: pa.Table, model: DinomalyConfig, seed: int) -> str:
    """sha256 over everything the features depend on: encoder, its weights, transform sizes, layers, images."""
    weights = model.encoder_weights
    path = Path(weights).expanduser()
    if weights not in ("hub", "none") and path.is_file():
        stat = path.stat()
        weights = f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    if weights == "none":
        weights = f"none:seed={seed}"  # random weights drawn after seeding with train.seed
    sizes = rows.column("size_bytes").to_pylist() if "size_bytes" in rows.column_names else [None] * rows.num_rows
    parts = dict(format=CACHE_FORMAT, encoder=model.encoder, weights=weights, encoder_kwargs=model.encoder_kwargs,
                 target_layers=model.target_layers, image_size=model.image_size, crop_size=model.crop_size,
                 images=list(zip(rows.column("image_uri").to_pylist(), sizes)))
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cache_uri(root: str, rows: pa.Table, config: Config) -> str:
    """Where the cache of these images under this config's encoder lives below `root`."""
    key = cache_key(rows, config.model, config.train.seed)
    return f"{str(root).rstrip('/')}/{config.model.encoder}-{key[:16]}"


def _exists(uri: str, data: DataConfig | None) -> bool:
    fs, path = filesystem_for(f"{uri}/{META_FILE}", data)
    return fs.get_file_info(path).type == pafs.FileType.File


@torch.no_grad()
def _write_features(rows: pa.Table, config: Config, folder: Path, batch_size: int, device: torch.device) -> dict:
    """Encode every image of `rows` into folder/features.arrow; returns the meta.json content."""
    from dinomaly.model.encoder import Encoder

    with torch.random.fork_rng(devices=[]):  # random-weight encoders: the weights a run seeded with train.seed builds
        torch.manual_seed(config.train.seed)
        encoder = Encoder(config.model).to(device)
    dataset = ManifestDataset(rows, config.model, with_masks=False, data_config=config.data)
    shape, count = None, 0
    writer, schema = None, None
    try:
        for batch in iterate_batches(dataset, batch_size, config.data.loader_workers):
            stacked = torch.stack(encoder(batch.images.to(device)), dim=1).float().cpu()  # [B, L, N, D]
            if writer is None:
                shape = list(stacked.shape[1:])
                schema = pa.schema([("image_uri", pa.string()),
                                    ("features", pa.list_(pa.float32(), int(np.prod(shape))))])
                writer = ipc.new_file(str(folder / FEATURES_FILE), schema)
            flat = pa.array(stacked.reshape(-1).numpy())
            features = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(shape)))
            writer.write_batch(pa.record_batch([pa.array(batch.uris), features], schema=schema))
            count += len(batch.uris)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise ValueError(f"no readable training image among {rows.num_rows} rows; nothing to cache "
                         f"({dataset.corrupt.count} unreadable: {dataset.corrupt.uris[:3]})")
    return dict(format=CACHE_FORMAT, shape=shape, count=count, encoder=config.model.encoder,
                target_layers=config.model.target_layers, crop_size=config.model.crop_size,
                skipped=dataset.corrupt.uris)


def build_feature_cache(rows: pa.Table, config: Config, root: str, batch_size: int = 16,
                        device: str | torch.device = "cpu") -> str:
    """The cache URI for `rows` (a manifest's training rows) under `root`, computing it if it is missing.

    Unreadable images are logged, left out and listed in meta.json ("skipped"). Written to a temporary
    folder first and moved (or uploaded) into place, meta.json last, so a crash never leaves a half cache.
    """
    uri = cache_uri(root, rows, config)
    if _exists(uri, config.data):
        logger.info("feature cache %s exists; reusing it", uri)
        return uri
    scheme, path = split_uri(uri)
    with tempfile.TemporaryDirectory(prefix="dinomaly-features-") as tmp:
        meta = _write_features(rows, config, Path(tmp), batch_size, torch.device(device))
        fs, target = filesystem_for(uri, config.data)
        if not scheme:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=Path(path).parent))
            shutil.move(str(Path(tmp) / FEATURES_FILE), staging / FEATURES_FILE)
            (staging / META_FILE).write_text(json.dumps(meta, indent=1))
            if Path(path).exists():  # another process finished first: keep theirs
                shutil.rmtree(staging)
            else:
                staging.rename(path)
        else:
            fs.create_dir(target, recursive=True)
            pafs.copy_files(str(Path(tmp) / FEATURES_FILE), f"{target}/{FEATURES_FILE}",
                            source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
            with fs.open_output_stream(f"{target}/{META_FILE}") as out:
                out.write(json.dumps(meta, indent=1).encode())
    logger.info("feature cache %s: %d images x %s floats (%.1f MB)", uri, meta["count"], meta["shape"],
                meta["count"] * 4 * np.prod(meta["shape"]) / 1e6)
    return uri


@dataclass
class FeatureCache:
    """An opened cache: `features(indices)` -> float32 [len(indices), L, N, D], rows in image_uri order."""

    uri: str
    image_uris: list[str]
    shape: tuple[int, ...]
    _chunks: list[np.ndarray] = field(repr=False, default_factory=list)  # per record batch [b, L, N, D]
    _starts: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int64))
    _local_copy: tempfile.TemporaryDirectory | None = field(repr=False, default=None)

    @classmethod
    def open(cls, uri: str, data: DataConfig | None = None) -> FeatureCache:
        if not _exists(uri, data):
            raise FileNotFoundError(f"no complete feature cache at {uri} (meta.json missing); build it with "
                                    "dinomaly.features.build_feature_cache or set tune.feature_cache false")
        scheme, path = split_uri(uri)
        local_copy = None
        if scheme:  # memory maps need a local file: download once
            local_copy = tempfile.TemporaryDirectory(prefix="dinomaly-features-")
            fs, remote = filesystem_for(uri, data)
            pafs.copy_files(remote, local_copy.name, source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
            path = local_copy.name
        meta = json.loads(Path(path, META_FILE).read_text())
        table = ipc.open_file(pa.memory_map(str(Path(path, FEATURES_FILE)))).read_all()
        shape = tuple(meta["shape"])
        chunks = [chunk.values.to_numpy(zero_copy_only=True).reshape(-1, *shape)
                  for chunk in table.column("features").chunks]
        starts = np.cumsum([0] + [len(c) for c in chunks])[:-1]
        return cls(uri=uri, image_uris=table.column("image_uri").to_pylist(), shape=shape, _chunks=chunks,
                   _starts=starts, _local_copy=local_copy)

    def __len__(self) -> int:
        return len(self.image_uris)

    def features(self, indices: list[int]) -> torch.Tensor:
        """Stacked features [len(indices), L, N, D] (a copy; the cache stays read-only)."""
        chunk_ids = np.searchsorted(self._starts, indices, side="right") - 1
        rows = [self._chunks[c][i - self._starts[c]] for c, i in zip(chunk_ids, indices)]
        return torch.from_numpy(np.stack(rows))

    def indices_of(self, image_uris: list[str]) -> list[int]:
        """Cache rows of `image_uris`; a URI the cache lacks is an error naming it."""
        where = {u: i for i, u in enumerate(self.image_uris)}
        missing = [u for u in image_uris if u not in where]
        if missing:
            raise ValueError(f"{len(missing)} training images are not in the feature cache {self.uri} (e.g. "
                             f"{missing[0]}); the cache was built for other images: rebuild it")
        return [where[u] for u in image_uris]


class _CachedRows(Dataset):
    """Cache rows as a map-style dataset, so batches go through a DataLoader like the image reader's."""

    def __init__(self, cache: FeatureCache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.cache.features([index])[0]


@dataclass
class FeatureBatches:
    """Training batches of cached features [B/W, L, N, D], in ManifestBatches' order over `image_uris`.

    The same global batches as reading the images (the seeded permutation per epoch, or manifest order,
    last partial batch dropped); rank r of W takes rows [r*B/W, (r+1)*B/W) of each. They pass through a
    torch DataLoader as the images do: creating its iterator draws one number from the torch RNG, and
    skipping that draw would shift every later dropout mask.
    """

    cache_uri: str
    image_uris: list[str]
    config: Config

    def iterate(self, rank: int, world: int, start_step: int) -> Iterator[torch.Tensor]:
        tc, data = self.config.train, self.config.data
        cache = FeatureCache.open(self.cache_uri, data)
        rows = cache.indices_of(self.image_uris)
        if len(rows) < tc.batch_size:
            raise ValueError(f"the training set has {len(rows)} images, fewer than train.batch_size="
                             f"{tc.batch_size}; lower the batch or add images")
        if tc.batch_size % world:
            raise ValueError(f"global batch {tc.batch_size} does not split evenly over {world} workers")
        size = tc.batch_size // world
        order = epoch_indices(len(rows), tc.batch_size, tc.seed, data.shuffle, drop_last=True)
        shard = ([rows[i] for i in indices[rank * size:(rank + 1) * size]]
                 for indices in itertools.islice(order, start_step, None))
        yield from DataLoader(_CachedRows(cache), batch_sampler=shard, collate_fn=torch.stack)


class FeatureInput(nn.Module):
    """A Dinomaly driven by cached encoder features: forward(features [B, L, N, D]) -> (enc groups, dec groups).

    dinomaly.loop.train_steps trains it like the model itself (it exposes trainable_parameters()).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.model.trainable_parameters()

    def forward(self, features: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.model.forward_from_encoder(features)
