"""dinomaly.heatmap: the colour ramp, the fixed scale, overlays, PNGs, grids and the peak location, without Ray."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dinomaly.heatmap import colorize, colour_scale, grid, overlay, peak_location, png_bytes


def decoded(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_ramp_ends_and_mask_outline():
    ramp = colorize(np.array([[0.0, 1.0, 5.0]]), 1.0)
    assert ramp[0, 0].tolist() == [0, 0, 128] and ramp[0, 1].tolist() == [128, 0, 0]  # jet ends
    assert ramp[0, 2].tolist() == [128, 0, 0]  # above the scale: clipped to the top
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 1
    tile = np.asarray(overlay(np.zeros((16, 16, 3), np.uint8), np.zeros((4, 4)), 1.0, mask))
    assert tile[4, 6].tolist() == [0, 255, 0] and tile[0, 0].tolist() != [0, 255, 0]  # outline only


def test_scale_is_tied_to_the_threshold_with_a_set_wide_fallback():
    maps = [np.full((4, 4), 0.2), np.full((4, 4), 0.7)]
    assert colour_scale(0.1, maps) == pytest.approx(0.2)  # 2 x threshold, whatever the maps
    for missing in (None, 0.0, -1.0, float("nan")):
        assert colour_scale(missing, maps) == pytest.approx(0.7)  # the max over all maps drawn together
    assert colour_scale(None) == 1.0 and colour_scale(None, [np.zeros((2, 2))]) == 1.0


def test_fixed_scale_colours_a_normal_map_cool_and_a_defective_one_hot():
    """Not min-max per image: a flat map at half the threshold is the same colour whatever its size."""
    scale = colour_scale(0.1)
    low, high = np.full((8, 6), 0.05, np.float32), np.full((8, 6), 0.5, np.float32)
    png = Image.open(io.BytesIO(png_bytes(low, scale)))
    assert png.format == "PNG" and png.size == (6, 8)  # the map alone, at its own size
    low_rgb, high_rgb = decoded(png_bytes(low, scale)), decoded(png_bytes(high, scale))
    assert low_rgb[0, 0, 2] > low_rgb[0, 0, 0] and high_rgb[0, 0, 0] > high_rgb[0, 0, 2]  # blue vs red
    assert (decoded(png_bytes(low[:4], scale)) == low_rgb[:4]).all()  # the colour of a value never changes


def test_overlay_png_is_the_image_size_and_shows_the_hot_spot_in_red():
    image = np.full((40, 60, 3), 128, np.uint8)
    amap = np.zeros((8, 8), np.float32)
    amap[0, 7] = 1.0  # top-right corner
    overlay_rgb = decoded(png_bytes(amap, colour_scale(0.5), image))
    assert overlay_rgb.shape == (40, 60, 3)
    corner, opposite = overlay_rgb[1, -2].astype(int), overlay_rgb[-2, 1].astype(int)
    assert corner[0] > corner[2] and opposite[2] > opposite[0]  # hot = red, cold = blue


def test_grid_has_one_row_per_image_and_rejects_mismatches():
    images = [np.zeros((16, 16, 3), np.uint8)] * 3
    maps = [np.random.default_rng(i).random((5, 5)) for i in range(3)]
    picture = grid(images, maps, colour_scale(None, maps), ["a", "b", "c"])
    assert picture.size == (2 * 20 + 4, 3 * (16 + 4 + 12) + 4)  # [image | overlay] + captions
    with pytest.raises(ValueError, match="one map per image"):
        grid(images, maps[:2], 1.0)
    with pytest.raises(ValueError, match="uint8"):
        png_bytes(maps[0], 1.0, np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="2 scales for 3 images"):
        grid(images, maps, [1.0, 2.0])


def test_grid_rows_of_different_classes_use_their_own_threshold_scale():
    """A map at its class threshold is mid-ramp (green) whether that threshold is 0.1 or 0.4."""
    images = [np.zeros((8, 8, 3), np.uint8)] * 2
    maps = [np.full((8, 8), 0.1, np.float32), np.full((8, 8), 0.4, np.float32)]
    picture = np.asarray(grid(images, maps, [colour_scale(0.1), colour_scale(0.4)], pad=0))
    first, second = picture[4, 12].astype(int), picture[12, 12].astype(int)  # overlay tiles of rows 1 and 2
    assert (first == second).all() and first[1] > first[0] and first[1] > first[2]
    shared = np.asarray(grid(images, maps, colour_scale(0.1), pad=0))
    assert (shared[12, 12] != picture[12, 12]).any()  # on one scale the second row would be hotter


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


def test_each_row_is_coloured_on_its_class_threshold():
    """The grids of training (MLflow) and evaluate and predict's heatmaps: each row's scale is tied to its class's
    threshold from the calibration table (a class the table lacks: the table's global one), as Serve's."""
    from dinomaly.calibration import ClassThreshold, ThresholdTable
    from dinomaly.heatmap import class_scales

    table = ThresholdTable(ClassThreshold(0.3, "calibration"), {"nut": ClassThreshold(0.1, "calibration"),
                                                                "pill": ClassThreshold(0.4, "calibration")})
    maps = [np.full((4, 4), 0.05)] * 3
    assert class_scales(["nut", "pill", "wood"], table, maps) == [colour_scale(0.1), colour_scale(0.4),
                                                                     colour_scale(0.3)]
    assert class_scales(["nut", "pill"], 0.2, maps[:2]) == [colour_scale(0.2)] * 2  # one image threshold
    assert class_scales(["nut"], None, [np.full((4, 4), 0.7)]) == [0.7]  # none: the maps' highest value
