"""Anomaly-map heatmaps (PIL only): the one look for serving, bulk scoring, evaluation and training.

Colour ramp: jet (dark blue -> blue -> cyan -> yellow -> red -> dark red), blended half over the image when
there is one, with a ground-truth mask outlined in green.

Scale: every map is coloured on one FIXED range, the same for every image, never its own min..max (which
makes a normal image look as anomalous as a defective one). 0 is the bottom of the ramp and `scale` its
top; larger values are clipped to the top. `colour_scale` ties it to the image threshold t of the image's
class (the global one when no class is known): scale = 2 t. The image score is the mean of the hottest map
pixels (dinomaly.inference), so a pixel at the threshold is mid-ramp (green) in every class, a normal image
stays blue and a defect's hot region turns red.
Without a usable threshold (none in the checkpoint, or not > 0) the fallback is the highest value over all
the maps drawn together (a scoring batch, an evaluation's kept examples, a grid), never one image's own;
1.0 when no maps are given (maps are 1 - cosine similarity, so 0..2).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dinomaly.calibration import ThresholdTable
from dinomaly.data.transforms import center_crop_box

SCALE_PER_THRESHOLD = 2.0  # scale = 2 x threshold: the threshold sits mid-ramp
FALLBACK_SCALE = 1.0  # no threshold and no map to take a maximum over


def colour_scale(threshold: float | None, maps: Iterable[np.ndarray] = ()) -> float:
    """The map value drawn at the top of the ramp: 2 x `threshold`, else the max over `maps` (see above)."""
    if threshold is not None and math.isfinite(threshold) and threshold > 0:
        return SCALE_PER_THRESHOLD * float(threshold)
    top = max((float(np.max(m)) for m in maps), default=0.0)
    return top if math.isfinite(top) and top > 0 else FALLBACK_SCALE


def class_scales(classes: Sequence[str | None], thresholds: ThresholdTable | float | None,
                 maps: Iterable[np.ndarray] = ()) -> list[float]:
    """One colour scale per row: its class's threshold in a per-class table (the table's global one for a class
    it lacks, or none), else one image threshold for every row, else the highest value over `maps`."""
    if isinstance(thresholds, ThresholdTable):
        return [colour_scale(thresholds.classes.get(name, thresholds.global_threshold).threshold) for name in classes]
    return [colour_scale(thresholds, maps)] * len(classes)


def colorize(anomaly_map: np.ndarray, scale: float) -> np.ndarray:
    """[h, w] map -> uint8 [h, w, 3] jet colours over 0 .. scale (clipped)."""
    values = np.clip(np.asarray(anomaly_map, np.float64) / max(float(scale), 1e-12), 0.0, 1.0)
    channels = [np.clip(1.5 - np.abs(4.0 * values - offset), 0.0, 1.0) for offset in (3.0, 2.0, 1.0)]  # r, g, b
    return np.round(np.stack(channels, axis=-1) * 255.0).astype(np.uint8)


def _checked(image: np.ndarray | None, anomaly_map: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    amap = np.squeeze(np.asarray(anomaly_map, dtype=np.float32))
    if amap.ndim != 2:
        raise ValueError(f"anomaly map must be [h, w], got shape {amap.shape}")
    if image is not None:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    return image, amap


def overlay(image: np.ndarray, anomaly_map: np.ndarray, scale: float, mask: np.ndarray | None = None,
            alpha: float = 0.5) -> Image.Image:
    """image uint8 [H, W, 3] with anomaly_map [h, w] (resized bilinearly to H x W) blended over it.

    mask [H', W'] (> 0 = defect), when given, is outlined in green.
    """
    image, amap = _checked(image, anomaly_map)
    height, width = image.shape[:2]
    heat = Image.fromarray(colorize(amap, scale)).resize((width, height), Image.BILINEAR)
    blended = Image.blend(Image.fromarray(image), heat, alpha)
    if mask is not None and np.any(mask):
        region = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
        blended.paste((0, 255, 0), mask=region.filter(ImageFilter.FIND_EDGES))
    return blended


def encode_png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def png_bytes(anomaly_map: np.ndarray, scale: float, image: np.ndarray | None = None,
              mask: np.ndarray | None = None) -> bytes:
    """PNG of the coloured map alone (at the map's size), or of its `overlay` on `image` when given."""
    if image is None:
        return encode_png(Image.fromarray(colorize(_checked(None, anomaly_map)[1], scale), mode="RGB"))
    return encode_png(overlay(image, anomaly_map, scale, mask))


def grid(images: Sequence[np.ndarray], maps: Sequence[np.ndarray], scale: float | Sequence[float],
         captions: Sequence[str] = (), masks: Sequence[np.ndarray | None] | None = None, pad: int = 4) -> Image.Image:
    """One row per image, [image | overlay], each row optionally captioned in a band above it.

    images: uint8 [H, W, 3] each (tiles take the first one's size); maps: [h, w] each, all on `scale`, or
    one scale per row (rows of different classes, each on its class threshold's scale).
    """
    if not images or len(images) != len(maps):
        raise ValueError(f"a heatmap grid needs one map per image and at least one image, got {len(images)} "
                         f"images and {len(maps)} maps")
    if captions and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images; give one per image or none")
    masks = list(masks) if masks is not None else [None] * len(images)
    scales = [float(scale)] * len(images) if np.ndim(scale) == 0 else list(scale)
    if len(scales) != len(images):
        raise ValueError(f"{len(scales)} scales for {len(images)} images; give one scale, or one per image")
    rows = [(Image.fromarray(np.asarray(image)), overlay(image, amap, row_scale, mask))
            for image, amap, row_scale, mask in zip(images, maps, scales, masks)]
    tile_w, tile_h = rows[0][0].size
    band = 12 if captions else 0
    picture = Image.new("RGB", (2 * (tile_w + pad) + pad, len(rows) * (tile_h + pad + band) + pad), "white")
    draw = ImageDraw.Draw(picture)
    for r, row in enumerate(rows):
        top = pad + r * (tile_h + pad + band)
        if captions:
            draw.text((pad, top), captions[r], fill="black")
        for c, tile in enumerate(row):
            picture.paste(tile.resize((tile_w, tile_h)), (pad + c * (tile_w + pad), top + band))
    return picture


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
