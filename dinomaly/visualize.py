"""Heatmap overlays and image grids with PIL only (matplotlib is not a dependency).

Used for the MLflow heatmap artifact: a grid of test images, each beside its anomaly map blended
over it in a jet-like colour map, with the ground-truth outline in green.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from dinomaly.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# jet: dark blue -> blue -> cyan -> yellow -> red -> dark red at these positions
_JET_POSITIONS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_JET_COLOURS = np.array([[0, 0, 0.5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0.5, 0, 0]])


def denormalize(image: torch.Tensor) -> np.ndarray:
    """A normalised [3, H, W] tensor (ImageNet mean/std) -> uint8 [H, W, 3]."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    pixels = (image.detach().float().cpu() * std + mean).clamp(0, 1) * 255
    return pixels.round().byte().permute(1, 2, 0).numpy()


def colorize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """[H, W] floats -> uint8 [H, W, 3] in a jet colour map over [vmin, vmax]."""
    scaled = np.clip((np.asarray(values, np.float64) - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    rgb = np.stack([np.interp(scaled, _JET_POSITIONS, _JET_COLOURS[:, c]) for c in range(3)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float, mask: np.ndarray | None = None,
            alpha: float = 0.5) -> Image.Image:
    """image uint8 [H, W, 3], anomaly_map [h, w] (resized to H x W), optional mask [H', W'] outlined in green."""
    height, width = image.shape[:2]
    heat = Image.fromarray(colorize(anomaly_map, vmin, vmax)).resize((width, height), Image.BILINEAR)
    blended = Image.blend(Image.fromarray(image), heat, alpha)
    if mask is not None and np.any(mask):
        region = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
        edge = region.filter(ImageFilter.FIND_EDGES)
        blended.paste((0, 255, 0), mask=edge)
    return blended


def image_grid(rows: Sequence[Sequence[Image.Image]], captions: Sequence[str] = (), pad: int = 4) -> Image.Image:
    """Tiles (all the size of the first) in rows, each row optionally captioned on its left edge in a band above."""
    tile_w, tile_h = rows[0][0].size
    band = 12 if captions else 0
    columns = max(len(r) for r in rows)
    grid = Image.new("RGB", (columns * (tile_w + pad) + pad, len(rows) * (tile_h + pad + band) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        top = pad + r * (tile_h + pad + band)
        if captions:
            draw.text((pad, top), captions[r], fill="black")
        for c, tile in enumerate(row):
            grid.paste(tile.resize((tile_w, tile_h)), (pad + c * (tile_w + pad), top + band))
    return grid
