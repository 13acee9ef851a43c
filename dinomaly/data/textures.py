"""Natural-looking synthetic photographs, for measuring decoders where a flat colour would hide every error.

Pink (1/f) noise in three correlated colour channels gives texture at every scale, as photographs have;
a few hard-edged shapes add the sharp edges that DCT scaling blurs most.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw


def synthetic_photo(size_px: int, seed: int = 0) -> Image.Image:
    """An RGB image of size_px x size_px: 1/f noise texture plus a few sharp-edged shapes."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(size_px)[:, None]
    fx = np.fft.rfftfreq(size_px)[None, :]
    falloff = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / size_px)
    base = rng.normal(size=(size_px, size_px // 2 + 1)) + 1j * rng.normal(size=(size_px, size_px // 2 + 1))
    texture = np.fft.irfft2(base * falloff, s=(size_px, size_px))
    texture = (texture - texture.mean()) / (texture.std() + 1e-9)
    tint = rng.uniform(0.6, 1.0, size=3)
    fine = rng.normal(scale=0.35, size=(size_px, size_px, 3))  # sensor-like grain, differs per channel
    pixels = 128 + 40 * (texture[..., None] * tint + fine)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, size_px, size=2)
        extent = rng.integers(size_px // 16, size_px // 4, size=2)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([int(x0), int(y0), int(x0 + extent[0]), int(y0 + extent[1])], fill=colour)
    return image


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    """The image encoded as a baseline JPEG (4:2:0 chroma, as cameras and dataset releases write)."""
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()
