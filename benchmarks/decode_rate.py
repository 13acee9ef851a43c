"""Decode + transform rate of JPEGs on one core: full decode vs JPEG DCT scaling (PIL `Image.draft`).

For each size (256, 1024, 2048 px by default) it writes a few generated JPEGs with a natural-looking
texture (1/f^1.5 noise under a few hard-edged shapes, quality 90), then times, in this process on one
thread, decode -> resize to image_size (bilinear) -> centre crop -> normalise (the reference transform) with:
    full:  a full decode (decode_image; parity mode)
    fast:  decode_image(draft_px=image_size), the data.fast_decode rule: the smallest DCT scale (1/2, 1/4,
           1/8) that keeps FAST_DECODE_MARGIN x image_size on each side
    draft: PIL's own draft rule, the smallest DCT scale that still covers image_size (fastest, least exact)
It prints images/s per core as images per second of this process's CPU time (what one dedicated core
would do; on a shared machine wall-clock rates mostly measure the other jobs), the wall-clock rate beside
it, each the best of --repeats rounds, and the pixel difference of the two paths (uint8 after the crop).
Nothing is downloaded; it never asserts.

    .venv/bin/python benchmarks/decode_rate.py [--sizes 256 1024 2048] [--images 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from dinomaly.data import transforms

IMAGE_SIZE, CROP_SIZE = 448, 392  # the reference composition
SPECTRUM_SLOPE = 1.5  # amplitude ~ f^-1.5: between a photo (1) and a smooth, out-of-focus scene (2)


def natural_jpeg(size_px: int, seed: int, quality: int = 90) -> bytes:
    """A size_px square JPEG with a 1/f-noise texture and a few hard edges, like a photographed part."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((size_px, size_px, 3))
    fy = np.fft.fftfreq(size_px)[:, None]
    fx = np.fft.rfftfreq(size_px)[None, :]
    falloff = np.maximum(np.hypot(fx, fy), 1.0 / size_px) ** -SPECTRUM_SLOPE
    texture = np.stack([np.fft.irfft2(np.fft.rfft2(noise[..., c]) * falloff, s=(size_px, size_px))
                        for c in range(3)], axis=-1)
    texture = (texture - texture.mean()) / (texture.std() + 1e-9)
    pixels = np.clip(128 + 40 * texture, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):  # edges and flat-ish regions, which the DCT scaling treats differently from noise
        x0, y0 = rng.integers(0, size_px, 2)
        extent = int(rng.integers(size_px // 10, size_px // 3))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x0 + extent, y0 + extent), outline=colour, width=max(1, size_px // 200))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def decode_draft(data: bytes, image_size: int) -> Image.Image:
    """Decode at the smallest JPEG DCT scale whose output is still at least image_size on both sides."""
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (image_size, image_size))  # a no-op for non-JPEG files
    image.load()
    return image.convert("RGB")


DECODERS = {
    "full": transforms.decode_image,
    "fast": lambda data: transforms.decode_image(data, draft_px=IMAGE_SIZE),
    "draft": lambda data: decode_draft(data, IMAGE_SIZE),
}


def transform(decode, data: bytes) -> torch.Tensor:
    return transforms.preprocess_image(decode(data), IMAGE_SIZE, CROP_SIZE)


def images_per_s(decode, blobs: list[bytes], repeats: int, min_s: float) -> tuple[float, float]:
    """(per CPU-second, per wall-second), each the best of `repeats` rounds of >= min_s CPU seconds."""
    transform(decode, blobs[0])  # warm-up
    best_cpu = best_wall = 0.0
    for _ in range(repeats):
        count, cpu_start, wall_start = 0, time.process_time(), time.perf_counter()
        while (cpu := time.process_time() - cpu_start) < min_s:
            for blob in blobs:
                transform(decode, blob)
            count += len(blobs)
        best_cpu = max(best_cpu, count / cpu)
        best_wall = max(best_wall, count / (time.perf_counter() - wall_start))
    return best_cpu, best_wall


def pixel_difference(decode, blobs: list[bytes]) -> tuple[int, float]:
    """(max, mean) |full - decode| in uint8 levels after resize + crop, over the blobs."""
    worst, means = 0, []
    for blob in blobs:
        full = transforms.resize_crop_image(transforms.decode_image(blob), IMAGE_SIZE, CROP_SIZE)
        reduced = transforms.resize_crop_image(decode(blob), IMAGE_SIZE, CROP_SIZE)
        diff = np.abs(full.astype(np.int16) - reduced.astype(np.int16))
        worst, means = max(worst, int(diff.max())), means + [float(diff.mean())]
    return worst, float(np.mean(means))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 1024, 2048])
    parser.add_argument("--images", type=int, default=8, help="distinct JPEGs per size")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per case; the best is printed")
    parser.add_argument("--min-s", type=float, default=2.0, help="seconds per round")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core: PIL decodes and resizes on the calling thread
    load = os.getloadavg()[0]
    print(f"one process, 1 thread; load average {load:.1f} on {os.cpu_count()} cores; images/s per CPU-second "
          f"(wall-clock in brackets), best of {args.repeats} rounds of >= {args.min_s:g} CPU-s")
    print(f"{'px':>5} {'KB/img':>7} {'decoder':>7} {'decoded px':>10} {'img/s per core':>14} {'(wall)':>8} "
          f"{'vs full':>8} {'max diff':>9} {'mean diff':>10}")
    for size_px in args.sizes:
        blobs = [natural_jpeg(size_px, seed) for seed in range(args.images)]
        kb = np.mean([len(b) for b in blobs]) / 1024
        rates = {}
        for name, decode in DECODERS.items():
            rates[name] = images_per_s(decode, blobs, args.repeats, args.min_s)
            worst, mean = pixel_difference(decode, blobs)
            print(f"{size_px:5d} {kb:7.0f} {name:>7} {decode(blobs[0]).size[0]:10d} {rates[name][0]:14.1f} "
                  f"{rates[name][1]:8.1f} {rates[name][0] / rates['full'][0]:7.2f}x {worst:9d} {mean:10.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
