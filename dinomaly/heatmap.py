"""Anomaly-map overlays as PNG bytes (PIL only): one look for evaluation, bulk scoring, training and serving.

The colour map and blending are dinomaly.visualize's (`colorize`, `overlay`, `image_grid`); this module
turns them into the two things callers store: one overlay PNG per image, and a captioned grid PNG.
Pass a shared `vmin`/`vmax` to compare images: per-image min-max (the default) makes a normal image look
as anomalous as a defective one (anomalib#3085).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from dinomaly.data.transforms import center_crop_box
from dinomaly.visualize import image_grid, overlay


def _range(amaps: Sequence[np.ndarray], vmin: float | None, vmax: float | None) -> tuple[float, float]:
    low = float(min(np.min(a) for a in amaps)) if vmin is None else float(vmin)
    high = float(max(np.max(a) for a in amaps)) if vmax is None else float(vmax)
    return low, high


def _check(image_uint8: np.ndarray, amap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image, amap = np.asarray(image_uint8), np.squeeze(np.asarray(amap, dtype=np.float32))
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if amap.ndim != 2:
        raise ValueError(f"anomaly map must be [h, w], got shape {amap.shape}")
    return image, amap


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_png(image_uint8: np.ndarray, amap: np.ndarray, vmin: float | None = None,
                vmax: float | None = None, mask: np.ndarray | None = None) -> bytes:
    """PNG bytes of `amap` [h, w] (resized bilinearly to the image) blended over image_uint8 [H, W, 3].

    vmin / vmax: the colour range (None = the map's own min / max). mask [H', W'] (> 0 = defect) is
    outlined in green when given.
    """
    image, amap = _check(image_uint8, amap)
    low, high = _range([amap], vmin, vmax)
    return _png(overlay(image, amap, low, high, mask))


def heatmap_grid(images: Sequence[np.ndarray], amaps: Sequence[np.ndarray], captions: Sequence[str] = (),
                 masks: Sequence[np.ndarray | None] | None = None, vmin: float | None = None,
                 vmax: float | None = None) -> bytes:
    """PNG bytes of a grid: one row per image, [image | overlay], optionally captioned.

    images: uint8 [H, W, 3] each; amaps: [h, w] each; one shared colour range over all maps unless given.
    """
    if not images or len(images) != len(amaps):
        raise ValueError(f"heatmap_grid needs one map per image and at least one image, got {len(images)} "
                         f"images and {len(amaps)} maps")
    if captions and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images; give one per image or none")
    checked = [_check(image, amap) for image, amap in zip(images, amaps)]
    low, high = _range([amap for _, amap in checked], vmin, vmax)
    masks = list(masks) if masks is not None else [None] * len(checked)
    rows = [[Image.fromarray(image), overlay(image, amap, low, high, mask)]
            for (image, amap), mask in zip(checked, masks)]
    return _png(image_grid(rows, list(captions)))


def peak_location(final_map: np.ndarray, max_ratio: float, image_size: int, crop_size: int, height: int,
                  width: int) -> tuple[float, float, float, float]:
    """Where the image score comes from: the centroid of the top max_ratio pixels of a final map [S, S].

    These are the pixels whose mean is the image score (dinomaly.inference.image_scores). Returns
    (row, col) in ORIGINAL image pixel coordinates (height x width, before the reference resize to
    image_size and centre crop to crop_size; continuous, pixel centres at integers), then (row, col) in
    final-map pixels. The map covers the crop only: a location is never outside the cropped region.
    """
    side = final_map.shape[-1]
    flat = np.asarray(final_map, dtype=np.float32).reshape(-1)
    k = max(1, int(flat.size * max_ratio))
    top = np.argpartition(-flat, k - 1)[:k]
    row_map, col_map = float(np.mean(top // side)), float(np.mean(top % side))
    offset_row, offset_col = center_crop_box(image_size, image_size, crop_size)
    row = ((row_map + 0.5) * crop_size / side + offset_row) * height / image_size - 0.5
    col = ((col_map + 0.5) * crop_size / side + offset_col) * width / image_size - 0.5
    return row, col, row_map, col_map
