"""dinomaly.heatmap: overlay PNGs, grids and the peak location, without Ray."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dinomaly.heatmap import heatmap_grid, overlay_png, peak_location


def test_overlay_png_is_the_image_size_and_shows_the_hot_spot_in_red():
    image = np.full((40, 60, 3), 128, np.uint8)
    amap = np.zeros((8, 8), np.float32)
    amap[0, 7] = 1.0  # top-right corner
    overlay = np.asarray(Image.open(io.BytesIO(overlay_png(image, amap))))
    assert overlay.shape == (40, 60, 3)
    corner, opposite = overlay[1, -2].astype(int), overlay[-2, 1].astype(int)
    assert corner[0] > corner[2] and opposite[2] > opposite[0]  # hot = red, cold = blue


def test_shared_colour_range_keeps_a_flat_low_map_blue():
    image = np.zeros((16, 16, 3), np.uint8)
    low = np.full((4, 4), 0.1, np.float32)
    pixels = np.asarray(Image.open(io.BytesIO(overlay_png(image, low, vmin=0.0, vmax=1.0))))
    assert pixels[..., 2].mean() > pixels[..., 0].mean()


def test_grid_has_one_row_per_image_and_rejects_mismatches():
    images = [np.zeros((20, 20, 3), np.uint8)] * 3
    maps = [np.random.default_rng(i).random((5, 5)) for i in range(3)]
    grid = Image.open(io.BytesIO(heatmap_grid(images, maps, ["a", "b", "c"])))
    assert grid.height > 3 * 20 and grid.width > 2 * 20
    with pytest.raises(ValueError, match="one map per image"):
        heatmap_grid(images, maps[:2])
    with pytest.raises(ValueError, match="uint8"):
        overlay_png(np.zeros((4, 4, 3), np.float32), maps[0])


def test_peak_location_maps_back_to_original_pixels():
    # identity (no resize, no crop, a 256 px original): the centroid of the 640 hot map pixels
    amap = np.zeros((256, 256), np.float32)
    amap[40:60, 180:212] = 1.0
    row, col, row_map, col_map = peak_location(amap, 640 / 65536, 256, 256, 256, 256)
    assert (row_map, col_map) == (49.5, 195.5) and (row, col) == pytest.approx((49.5, 195.5))
    # the map covers the centre crop (448 -> 392) of an image resized from 1000 x 800 (rows x cols)
    centre = np.zeros((256, 256), np.float32)
    centre[127:129, 127:129] = 1.0
    row, col, _, _ = peak_location(centre, 4 / 65536, 448, 392, 1000, 800)
    assert (row, col) == pytest.approx((499.5, 399.5))
    corner = np.zeros((256, 256), np.float32)
    corner[0, 0] = 1.0  # first map pixel = top-left of the crop, 28 resized pixels in
    row, col, _, _ = peak_location(corner, 1 / 65536, 448, 392, 1000, 800)
    assert row == pytest.approx((28 + 0.5 * 392 / 256) * 1000 / 448 - 0.5)
    assert col == pytest.approx((28 + 0.5 * 392 / 256) * 800 / 448 - 0.5)
