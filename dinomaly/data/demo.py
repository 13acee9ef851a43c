"""A deterministic, procedurally generated multi-class dataset in the exact MVTec AD layout.

Four classes in two kinds, like MVTec: textures (`weave`, `wood`) fill the frame; objects (`nut`,
`pill`) sit on a background with pose jitter (position, rotation). Each test defect is painted into a
clean render, without anti-aliasing, so its mask is exact: the mask is 255 exactly where the defect
changed the image. Defects are strong-contrast (dark holes, coloured stains, scratches, missing chunks)
so that even a tiny random-weight encoder separates some of them.

    <root>/<cls>/train/good/000.png
    <root>/<cls>/test/good/000.png, test/<defect>/000.png
    <root>/<cls>/ground_truth/<defect>/000_mask.png   (0/255)

Every image has its own RNG stream seeded by (seed, class, split, index), so the same seed gives
byte-identical files, and a subset of classes gives the same files as the full set.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

DEMO_CLASSES = ("weave", "wood", "nut", "pill")
DEFECTS = {
    "weave": ("hole", "scratch", "stain"),
    "wood": ("hole", "scratch", "stain"),
    "nut": ("missing", "scratch", "stain"),
    "pill": ("crack", "missing", "stain"),
}
_MARKER = ".dinomaly_demo.json"
_SPLIT_CODES = {"train": 0, "test_good": 1, "test_defect": 2}


@dataclass
class Render:
    """One clean image: pixels uint8 [S,S,3], the object's pixels (None for textures), the background."""

    image: np.ndarray
    foreground: np.ndarray | None
    background: np.ndarray | None


# --------------------------------------------------------------------------- procedural pieces


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return yy + 0.5, xx + 0.5


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [0,1]: a (cells+1)^2 random lattice, bilinearly interpolated to [size,size]."""
    lattice = rng.random((cells + 1, cells + 1))
    t = np.linspace(0.0, cells, size, endpoint=False)
    i = t.astype(int)
    f = t - i
    rows = lattice[i] * (1 - f)[:, None] + lattice[i + 1] * f[:, None]  # [size, cells+1]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _colourise(shade: np.ndarray, dark: Sequence[float], light: Sequence[float]) -> np.ndarray:
    """shade [S,S] in 0..1 -> float RGB [S,S,3] between two colours."""
    dark_, light_ = np.asarray(dark, float), np.asarray(light, float)
    return dark_ + (light_ - dark_) * shade[..., None]


def _segment_distance(yy, xx, p0, p1) -> np.ndarray:
    """Distance of every pixel centre to the segment p0-p1 ((y, x) points)."""
    (y0, x0), (y1, x1) = p0, p1
    dy, dx = y1 - y0, x1 - x0
    t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / max(dy * dy + dx * dx, 1e-9), 0.0, 1.0)
    return np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx))


# --------------------------------------------------------------------------- class renderers


def _render_weave(rng: np.random.Generator, size: int) -> Render:
    yy, xx = _grid(size)
    period = size / 10.0 * rng.uniform(0.95, 1.05)
    u, v = (xx + rng.uniform(0, period)) / period, (yy + rng.uniform(0, period)) / period
    over = (np.floor(u) + np.floor(v)) % 2 == 0
    warp = np.sin(np.pi * (u % 1.0)) ** 0.7  # thread running vertically, shaded across its width
    weft = np.sin(np.pi * (v % 1.0)) ** 0.7
    shade = np.where(over, 0.25 + 0.75 * warp, 0.15 + 0.65 * weft)
    shade = shade + 0.08 * (_smooth_noise(rng, size, 16) - 0.5) + rng.normal(0, 0.02, (size, size))
    tint = rng.uniform(-4, 4, 3)
    image = _colourise(np.clip(shade, 0, 1), (95 + tint[0], 80 + tint[1], 60), (205, 180 + tint[2], 135))
    return Render(_to_uint8(image), None, None)


def _render_wood(rng: np.random.Generator, size: int) -> Render:
    yy, xx = _grid(size)
    turbulence = _smooth_noise(rng, size, 4) + 0.3 * _smooth_noise(rng, size, 12)
    frequency = rng.uniform(7.0, 10.0)
    tilt = rng.uniform(-0.15, 0.15)
    grain = np.sin(2 * np.pi * ((yy + tilt * xx) / size * frequency + 1.2 * turbulence))
    shade = 0.55 + 0.3 * grain ** 3 + 0.1 * (_smooth_noise(rng, size, 24) - 0.5)
    shade = shade + rng.normal(0, 0.015, (size, size))
    image = _colourise(np.clip(shade, 0, 1), (120, 70, 35), (215, 160, 105))
    return Render(_to_uint8(image), None, None)


def _background(rng: np.random.Generator, size: int, base: Sequence[float]) -> np.ndarray:
    noise = 10 * (_smooth_noise(rng, size, 6) - 0.5) + rng.normal(0, 2.0, (size, size))
    return np.asarray(base, float)[None, None, :] + noise[..., None]


def _render_nut(rng: np.random.Generator, size: int) -> Render:
    """A round metal nut: ring with a bore, a ridge and a notch whose angle is the pose."""
    yy, xx = _grid(size)
    cy, cx = size / 2 + rng.uniform(-0.04, 0.04, 2) * size
    radius = np.hypot(yy - cy, xx - cx)
    angle = np.arctan2(yy - cy, xx - cx)
    outer, bore = 0.34 * size, 0.13 * size
    pose = rng.uniform(-np.pi, np.pi)
    notch = (np.abs(np.angle(np.exp(1j * (angle - pose)))) < 0.18) & (radius > outer - 0.06 * size)
    foreground = (radius <= outer) & (radius >= bore) & ~notch
    light = 0.6 + 0.3 * np.cos(angle - 2.3) * (radius / outer)
    ridge = np.abs(radius - 0.24 * size) < 0.012 * size
    shade = np.clip(light - 0.25 * ridge + 0.04 * (_smooth_noise(rng, size, 10) - 0.5), 0, 1)
    metal = _colourise(shade, (70, 72, 78), (215, 215, 222))
    background = _background(rng, size, (52, 50, 56))
    image = np.where(foreground[..., None], metal, background)
    return Render(_to_uint8(image), foreground, _to_uint8(background))


def _render_pill(rng: np.random.Generator, size: int) -> Render:
    """An ivory capsule with red speckles (normal variation) and a score line, rotated and shifted."""
    yy, xx = _grid(size)
    cy, cx = size / 2 + rng.uniform(-0.04, 0.04, 2) * size
    theta = rng.uniform(-0.2, 0.2)
    half, width = 0.3 * size, 0.14 * size
    dy, dx = np.sin(theta) * half, np.cos(theta) * half
    distance = _segment_distance(yy, xx, (cy - dy, cx - dx), (cy + dy, cx + dx))
    foreground = distance <= width
    along = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    shade = 0.85 - 0.35 * (distance / width) ** 2 - 0.25 * (np.abs(along) < 0.01 * size + 0.5)
    body = _colourise(np.clip(shade, 0, 1), (120, 112, 95), (240, 234, 218))
    for _ in range(int(rng.integers(8, 15))):
        t, s = rng.uniform(-0.9, 0.9), rng.uniform(-0.7, 0.7)
        sy = cy + t * dy + s * width * np.cos(theta)
        sx = cx + t * dx - s * width * np.sin(theta)
        body[np.hypot(yy - sy, xx - sx) <= 0.012 * size + 0.6] = (185, 60, 55)
    background = _background(rng, size, (38, 34, 30))
    image = np.where(foreground[..., None], body, background)
    return Render(_to_uint8(image), foreground, _to_uint8(background))


RENDERERS: dict[str, Callable[[np.random.Generator, int], Render]] = {
    "weave": _render_weave, "wood": _render_wood, "nut": _render_nut, "pill": _render_pill,
}


# --------------------------------------------------------------------------- defects


def _defect_centre(rng: np.random.Generator, render: Render) -> tuple[float, float]:
    """A point well inside the centre crop; on the object for object classes."""
    size = render.image.shape[0]
    if render.foreground is None:
        return tuple(rng.uniform(0.22, 0.78, 2) * size)
    ys, xs = np.nonzero(render.foreground)
    inside = (ys > 0.2 * size) & (ys < 0.8 * size) & (xs > 0.2 * size) & (xs < 0.8 * size)
    pick = int(rng.integers(int(inside.sum())))
    return float(ys[inside][pick]) + 0.5, float(xs[inside][pick]) + 0.5


def _contrast_colour(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    bright = image[region].mean() > 110 if region.any() else True
    return np.array((25, 22, 20) if bright else (240, 238, 230), float)


def _paint_scratch(rng, render: Render) -> tuple[np.ndarray, np.ndarray]:
    size = render.image.shape[0]
    yy, xx = _grid(size)
    cy, cx = _defect_centre(rng, render)
    length, angle = rng.uniform(0.16, 0.28) * size, rng.uniform(0, np.pi)
    dy, dx = np.sin(angle) * length / 2, np.cos(angle) * length / 2
    region = _segment_distance(yy, xx, (cy - dy, cx - dx), (cy + dy, cx + dx)) <= max(1.0, size / 80)
    if render.foreground is not None:
        region &= render.foreground
    return _contrast_colour(render.image, region), region


def _paint_hole(rng, render: Render) -> tuple[np.ndarray, np.ndarray]:
    size = render.image.shape[0]
    yy, xx = _grid(size)
    cy, cx = _defect_centre(rng, render)
    region = np.hypot(yy - cy, xx - cx) <= rng.uniform(0.035, 0.06) * size
    return np.array((12, 10, 10), float), region


def _paint_stain(rng, render: Render) -> tuple[np.ndarray, np.ndarray]:
    size = render.image.shape[0]
    yy, xx = _grid(size)
    cy, cx = _defect_centre(rng, render)
    ry, rx = rng.uniform(0.05, 0.09, 2) * size
    blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 + 0.6 * (_smooth_noise(rng, size, 10) - 0.5)
    region = blob < 1.0
    if render.foreground is not None:
        region &= render.foreground
    colour = np.array(((175, 30, 40), (40, 70, 190), (60, 150, 40))[int(rng.integers(3))], float)
    return 0.2 * render.image.astype(float) + 0.8 * colour, region


def _paint_missing(rng, render: Render) -> tuple[np.ndarray, np.ndarray]:
    """A chunk bitten out of the object's edge: object pixels in a disc become background."""
    size = render.image.shape[0]
    yy, xx = _grid(size)
    edge = render.foreground & ~np.roll(render.foreground, 2, 0) | render.foreground & ~np.roll(
        render.foreground, -2, 1)
    ys, xs = np.nonzero(edge & (yy > 0.2 * size) & (yy < 0.8 * size) & (xx > 0.2 * size) & (xx < 0.8 * size))
    pick = int(rng.integers(len(ys)))
    region = np.hypot(yy - ys[pick] - 0.5, xx - xs[pick] - 0.5) <= rng.uniform(0.07, 0.1) * size
    return render.background.astype(float), region & render.foreground


PAINTERS = {"scratch": _paint_scratch, "crack": _paint_scratch, "hole": _paint_hole, "stain": _paint_stain,
            "missing": _paint_missing}


def apply_defect(render: Render, defect: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint `defect` into a clean render -> (image uint8 [S,S,3], mask bool [S,S]).

    The mask is exactly the set of changed pixels: a masked pixel whose paint happens to equal the
    clean value is nudged, so `mask == (image != clean).any(-1)` always holds.
    """
    paint, region = PAINTERS[defect](rng, render)
    clean = render.image
    painted = _to_uint8(np.broadcast_to(paint, clean.shape))
    image = np.where(region[..., None], painted, clean)
    unchanged = region & (image == clean).all(-1)
    red = image[..., 0]
    red[unchanged] = np.where(red[unchanged] < 128, red[unchanged] + 64, red[unchanged] - 64)
    return image, region


# --------------------------------------------------------------------------- writing the dataset


def sample_rng(seed: int, cls: str, split: str, index: int) -> np.random.Generator:
    """The RNG stream of one image: the render draws first, then its defect (if any)."""
    entropy = [seed, DEMO_CLASSES.index(cls), _SPLIT_CODES[split], index]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _write_class(root: Path, cls: str, counts: tuple[int, int, int], size: int, seed: int) -> None:
    train, test_good, test_defect = counts
    render = RENDERERS[cls]
    for i in range(train):
        _save_png(render(sample_rng(seed, cls, "train", i), size).image, root / cls / "train" / "good" / f"{i:03d}.png")
    for i in range(test_good):
        _save_png(render(sample_rng(seed, cls, "test_good", i), size).image, root / cls / "test" / "good" / f"{i:03d}.png")
    for i in range(test_defect):
        defect = DEFECTS[cls][i % len(DEFECTS[cls])]
        rng = sample_rng(seed, cls, "test_defect", i)
        image, mask = apply_defect(render(rng, size), defect, rng)
        name = f"{i // len(DEFECTS[cls]):03d}"
        _save_png(image, root / cls / "test" / defect / f"{name}.png")
        _save_png(np.where(mask, 255, 0).astype(np.uint8), root / cls / "ground_truth" / defect / f"{name}_mask.png")


def generate_demo_dataset(root: str | Path, classes: Sequence[str] | None = None, train_per_class: int = 40,
                          test_good_per_class: int = 8, test_defect_per_class: int = 9, size: int = 128,
                          seed: int = 0) -> Path:
    """Write the demo dataset under `root` (MVTec AD layout) and return the root.

    Defects cycle through the class's defect types (DEFECTS). Re-running with the same arguments is
    a no-op; different arguments regenerate the classes this function wrote before. A non-empty root
    that this function did not write is refused (FileExistsError), never overwritten.
    """
    classes = list(DEMO_CLASSES if classes is None else classes)
    unknown = sorted(set(classes) - set(DEMO_CLASSES))
    if unknown:
        raise ValueError(f"unknown demo classes {unknown}; choose from {list(DEMO_CLASSES)}")
    if min(train_per_class, test_good_per_class, test_defect_per_class) < 1:
        raise ValueError("train_per_class, test_good_per_class and test_defect_per_class must be >= 1")
    if size < 32:
        raise ValueError(f"size={size} is too small to draw defects; use at least 32 pixels")
    root = Path(root)
    params = dict(classes=classes, train_per_class=train_per_class, test_good_per_class=test_good_per_class,
                  test_defect_per_class=test_defect_per_class, size=size, seed=seed, version=1)
    marker = root / _MARKER
    if marker.exists():
        previous = json.loads(marker.read_text())
        if previous == params:
            logger.info("demo dataset already at %s", root)
            return root
        for cls in previous.get("classes", []):
            shutil.rmtree(root / cls, ignore_errors=True)
        marker.unlink()
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not a demo dataset written by generate_demo_dataset; "
                              "choose an empty or new folder")
    root.mkdir(parents=True, exist_ok=True)
    for cls in classes:
        _write_class(root, cls, (train_per_class, test_good_per_class, test_defect_per_class), size, seed)
    marker.write_text(json.dumps(params))
    logger.info("wrote demo dataset (%d classes, %d px) to %s", len(classes), size, root)
    return root
