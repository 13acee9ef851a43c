"""Every test mask against its image, from the file headers, before a job starts (no pixels decoded).

A mask whose size differs from its image's is refused with MaskSizeError naming both files: found only while
scoring, inside a Ray worker, it would come after the cluster work started (and fail each restart of a
training run in turn).
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from dinomaly.config import DataConfig
from dinomaly.data.transforms import MaskSizeError, check_mask_size

logger = logging.getLogger(__name__)

HEADER_BYTES = 64 * 1024  # holds the size of PNG, BMP and TIFF files, and of JPEGs behind EXIF/ICC blocks
REMOTE_HEADER_CHECKS = 500  # object-store rows read up front (two ranged reads each, ~6 s on moto); the rest when scored


def header_size(uri: str, data: DataConfig) -> tuple[int, int] | None:
    """(width, height) read from a file's header without decoding its pixels; None when the header does not
    tell (the full read during evaluation decides then)."""
    from dinomaly.data.storage import filesystem_for

    scheme, sep, rest = uri.partition("://")
    try:
        if not sep or scheme == "file":
            with Image.open(rest if sep else uri) as image:
                return image.size
        filesystem, path = filesystem_for(uri, data)
        with filesystem.open_input_file(path) as handle:
            head = handle.read(HEADER_BYTES)
        with Image.open(io.BytesIO(head)) as image:
            return image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def check_mask_sizes(test_table: pa.Table, data: DataConfig, image_column: str = "image_uri") -> None:
    """Refuse (MaskSizeError) a test mask whose size differs from its image's, from the file headers, before
    training starts: found by evaluation inside a worker it would fail every restart of the run in turn.
    Packed rows were checked when packed; of object-store rows at most REMOTE_HEADER_CHECKS, evenly spread."""
    masked = test_table.filter(pc.invert(pc.is_null(test_table.column("mask_uri"))))
    if "shard_uri" in masked.column_names:
        masked = masked.filter(pc.is_null(masked.column("shard_uri")))
    rows = list(zip(masked.column(image_column).to_pylist(), masked.column("mask_uri").to_pylist()))
    remote = [i for i, (uri, _) in enumerate(rows) if "://" in uri and not uri.startswith("file://")]
    if len(remote) > REMOTE_HEADER_CHECKS:
        kept = {remote[j * len(remote) // REMOTE_HEADER_CHECKS] for j in range(REMOTE_HEADER_CHECKS)}
        logger.info("checking the mask sizes of %d of %d object-store test rows now; the rest when evaluated",
                    REMOTE_HEADER_CHECKS, len(remote))
        dropped = set(remote) - kept
        rows = [row for i, row in enumerate(rows) if i not in dropped]
    with ThreadPoolExecutor(16, thread_name_prefix="dinomaly-headers") as pool:
        sizes = list(pool.map(lambda uri: header_size(uri, data), [uri for row in rows for uri in row]))
    wrong = [(row, image, mask) for row, image, mask in zip(rows, sizes[0::2], sizes[1::2])
             if image is not None and mask is not None and image != mask]
    if wrong:
        (uri, mask_uri), image, mask = wrong[0]
        try:
            check_mask_size(image, mask, uri, mask_uri)
        except MaskSizeError as err:
            more = f" ({len(wrong)} masks in all differ from their images)" if len(wrong) > 1 else ""
            raise MaskSizeError(f"{err}{more}") from None
