"""Reading one manifest row: image (and mask) file -> the reference's resized, centre-cropped uint8 pixels.

Every reader of images goes through `RowReader`: the local torch Dataset, the Ray Data training pipeline and
batch scoring (evaluate, predict). They share one error policy. A file is *unreadable* when
  - it cannot be read: any OSError (FileNotFoundError, PermissionError, a storage failure that survived
    dinomaly.data.storage's retries), or
  - its bytes are not a complete image: CorruptImageError (zero-byte, truncated, not an image, more pixels
    than max_pixels).
With keep_errors=True an unreadable image or mask turns its row into a `RowError` (uri, reason) and the
caller goes on with the rest of the batch; with keep_errors=False it raises CorruptImageError naming the
file (data.strict). A mask whose size differs from its image's raises MaskSizeError naming both files, in
either mode: scoring against a stretched mask would give wrong metrics without a word. Any other exception
is a bug and propagates.

The bytes come from the file at the row's URI, or from a packed manifest's shard (`packed=(shard_uri,
shard_row)`, dinomaly.data.pack: one ranged read per row group, kept for the next rows).
With fast_decode, big JPEGs decode at a reduced DCT scale (dinomaly.data.transforms.fast_decode_scale).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs

from dinomaly.config import DataConfig
from dinomaly.data.pack import read_packed_row
from dinomaly.data.paths import read_bytes
from dinomaly.data.storage import StorageOptions
from dinomaly.data.transforms import (
    DEFAULT_MAX_PIXELS,
    CorruptImageError,
    check_mask_size,
    decode_image,
    decode_mask,
    original_size,
    resize_crop_image,
    resize_crop_mask,
)

logger = logging.getLogger(__name__)

# What makes a file unreadable (see the module docstring).
UNREADABLE_ERRORS = (CorruptImageError, OSError)
FETCH_THREADS = 8  # concurrent reads in read_many: object stores answer in tens of ms, decoding stays sequential
_FETCH_POOL: ThreadPoolExecutor | None = None  # one per process, created on first use


@dataclass(frozen=True)
class RowPixels:
    """A readable row: the model's input crop, the original size, and the mask crop when one was read."""

    image: np.ndarray  # uint8 [crop, crop, 3]
    height: int  # the original image, before resize and crop
    width: int
    mask: np.ndarray | None  # uint8 [crop, crop] (0..255, edges fractional after the resize), None if not read


@dataclass(frozen=True)
class RowError:
    """An unreadable row: its image URI and why (the exception's type and message)."""

    uri: str
    reason: str


@dataclass(frozen=True)
class RowReader:
    """Reads rows with the model's resize/crop; picklable, so the driver's settings travel to Ray workers.

    storage: S3 settings for s3:// URIs (a DataConfig, or StorageOptions resolved on the driver);
    filesystem: a pyarrow filesystem that plain paths live in (None = the local disk);
    fast_decode: decode big JPEGs at a reduced DCT scale (data.fast_decode; off = the reference's pixels).
    """

    image_size: int
    crop_size: int
    keep_errors: bool = True
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    storage: DataConfig | StorageOptions | None = None
    filesystem: pafs.FileSystem | None = None
    fast_decode: bool = False

    def read(self, uri: str, mask_uri: str | None = None, packed: tuple[str, int] | None = None
             ) -> RowPixels | RowError:
        """One row; the mask is read only when `mask_uri` is given; `packed` = (shard_uri, shard_row) of a
        packed manifest's row, whose bytes are read from the shard instead of `uri`."""
        if packed is None:
            return self.decode(uri, self._fetch(uri), mask_uri, self._fetch(mask_uri))
        try:
            data, mask_data = read_packed_row(packed[0], int(packed[1]), self.filesystem, self.storage)
        except OSError as err:
            return self.decode(uri, err, mask_uri, None)
        return self.decode(uri, data, mask_uri, mask_data if mask_uri else None)

    def read_many(self, rows: Sequence[tuple[str, str | None]],
                  packed: Sequence[tuple[str, int]] | None = None) -> list[RowPixels | RowError]:
        """(image uri, mask uri or None) rows, fetched concurrently and decoded in order; `packed` gives each
        row's (shard_uri, shard_row) for a packed manifest (rows in shard order share row-group reads)."""
        if packed is not None:
            return [self.read(uri, mask_uri, at) for (uri, mask_uri), at in zip(rows, packed)]
        global _FETCH_POOL
        if _FETCH_POOL is None:
            _FETCH_POOL = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="dinomaly-fetch")
        uris = [uri for uri, _ in rows] + [mask_uri for _, mask_uri in rows]
        fetched = list(_FETCH_POOL.map(self._fetch, uris))
        return [self.decode(uri, fetched[i], mask_uri, fetched[len(rows) + i])
                for i, (uri, mask_uri) in enumerate(rows)]

    def decode(self, uri: str, data: bytes | OSError, mask_uri: str | None = None,
               mask_data: bytes | OSError | None = None) -> RowPixels | RowError:
        """Fetched bytes (or the OSError fetching them raised) -> RowPixels, or RowError / raise per keep_errors."""
        try:
            for failed in (data, mask_data):
                if isinstance(failed, OSError):
                    raise failed
            image = decode_image(data, uri, self.max_pixels, self.image_size if self.fast_decode else None)
            pixels = resize_crop_image(image, self.image_size, self.crop_size)
            mask = None
            if mask_data is not None:
                mask_image = decode_mask(mask_data, mask_uri, self.max_pixels)
                check_mask_size(original_size(image), mask_image.size, uri, mask_uri)
                mask = resize_crop_mask(mask_image, self.image_size, self.crop_size)
        except UNREADABLE_ERRORS as err:
            reason = f"{type(err).__name__}: {err}"
            if not self.keep_errors:
                raise CorruptImageError(f"unreadable file for image {uri} (data.strict=true): {reason}") from err
            logger.warning("unreadable image %s: %s", uri, reason)
            return RowError(uri, reason)
        width, height = original_size(image)
        return RowPixels(pixels, height, width, mask)

    def _fetch(self, uri: str | None) -> bytes | OSError | None:
        if uri is None:
            return None
        try:
            return read_bytes(uri, self.filesystem, self.storage)
        except OSError as err:  # kept for decode, which applies the error policy
            return err
