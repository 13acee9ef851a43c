"""Checked export: trace, convert, run held-out images through PyTorch and the runtime, write only on agreement.

The artefact is built in a hidden staging folder beside `output` and renamed into place only after its scores
agree with PyTorch within SCORE_RTOL (relative) and its maps within MAP_ATOL (absolute); a refused export
leaves nothing behind. PyTorch's side is the eager `Predictor`, run after tracing, so whatever changed
between the traced graph and the model (a wrong op, a weight changed after tracing) shows as disagreement.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinomaly.config import Config, to_dict
from dinomaly.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from dinomaly.export.graph import trace_onnx
from dinomaly.export.runtime import FORMAT, ONNX_FILE, OPENVINO_FILE, ExportedRuntime, write_metadata
from dinomaly.inference import Predictor
from dinomaly.model.dinomaly import Dinomaly

SCORE_RTOL, MAP_ATOL = 1e-4, 1e-3
FORMATS = ("onnx", "openvino")


@dataclass
class Agreement:
    """Worst differences between the runtime and PyTorch over `images` held-out images."""

    images: int
    score_rel: float  # max |runtime - torch| / |torch| over the image scores
    map_abs: float  # max |runtime - torch| over every map pixel
    worst_image: int  # index of the image with the worst score
    score_rtol: float = SCORE_RTOL
    map_atol: float = MAP_ATOL

    @property
    def ok(self) -> bool:
        # written so that NaN fails
        return bool(self.score_rel <= self.score_rtol and self.map_abs <= self.map_atol)

    def describe(self) -> str:
        verdict = "agree" if self.ok else "DISAGREE"
        return (f"{verdict} on {self.images} images: worst score error {self.score_rel:.3g} relative "
                f"(image {self.worst_image}; limit {self.score_rtol:g}), worst map error {self.map_abs:.3g} "
                f"absolute (limit {self.map_atol:g})")


class ExportRefused(ValueError):
    """The runtime disagrees with PyTorch; nothing was written."""

    def __init__(self, agreement: Agreement):
        super().__init__(f"export refused, the exported model does not match PyTorch: {agreement.describe()}")
        self.agreement = agreement


def compare(torch_scores: np.ndarray, torch_maps: np.ndarray, scores: np.ndarray, maps: np.ndarray) -> Agreement:
    """The worst relative score error and absolute map error of a runtime against PyTorch."""
    if scores.shape != torch_scores.shape or maps.shape != torch_maps.shape:
        return Agreement(len(torch_scores), float("inf"), float("inf"), 0)
    score_err = np.abs(scores.astype(np.float64) - torch_scores) / np.maximum(np.abs(torch_scores), 1e-12)
    worst = int(np.nanargmax(score_err)) if np.isfinite(score_err).any() else 0
    score_rel = float(score_err.max()) if np.isfinite(score_err).all() else float("inf")
    map_err = np.abs(maps.astype(np.float64) - torch_maps)
    map_abs = float(map_err.max()) if np.isfinite(map_err).all() else float("inf")
    return Agreement(len(torch_scores), score_rel, map_abs, worst)


def generated_images(count: int, crop_size: int, seed: int = 0) -> np.ndarray:
    """uint8 [count, crop, crop, 3] check images: smooth gradients with noise and a bright patch each."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, crop_size, dtype=np.float32)
    images = np.empty((count, crop_size, crop_size, 3), dtype=np.uint8)
    for i in range(count):
        base = rng.uniform(40, 200, 3) * (0.6 + 0.4 * np.add.outer(ramp, ramp)[..., None] / 2)
        noisy = base + rng.normal(0, 12 + i, (crop_size, crop_size, 3))
        top, left = rng.integers(0, crop_size // 2, 2)
        noisy[top:top + crop_size // 4, left:left + crop_size // 4] = rng.uniform(0, 255)
        images[i] = np.clip(noisy, 0, 255).astype(np.uint8)
    return images


def preprocessing(config: Config) -> dict[str, Any]:
    """What the exported graph expects and returns, for the metadata."""
    model, ev = config.model, config.eval
    return {"input": "uint8 [B, crop_size, crop_size, 3] RGB, channels last: the image resized (bilinear) to "
                     "image_size x image_size, then centre-cropped to crop_size",
            "image_size": model.image_size, "crop_size": model.crop_size, "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "normalised_inside": True,
            "outputs": {"score": "float32 [B]: mean of the top max_ratio of each map",
                        "map": "float32 [B, resize, resize]: anomaly map after resize and Gaussian blur"},
            "resize": ev.resize, "blur_kernel": ev.blur_kernel, "blur_sigma": ev.blur_sigma,
            "max_ratio": ev.max_ratio}


def check_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"--output {output} exists and is not an empty folder; choose a new folder or remove it")
    existing = next(p for p in output.parents if p.exists())  # missing parents are created when writing
    if not existing.is_dir():
        raise ValueError(f"--output {output} lies under {existing}, which is a file; choose another --output")


def _convert_openvino(onnx_path: Path) -> Path:
    import openvino as ov

    target = onnx_path.with_name(OPENVINO_FILE)
    # compress_to_fp16=False: the default halves the weights, which the agreement check would then refuse
    ov.save_model(ov.convert_model(str(onnx_path)), str(target), compress_to_fp16=False)
    onnx_path.unlink()
    return target


def export_checked(model: Dinomaly, config: Config, fmt: str, output: str | Path, pixels: np.ndarray, *,
                   model_info: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None,
                   threads: int | None = None, log=print) -> tuple[Path, Agreement]:
    """Export `model` (with pre/post-processing) as `fmt` into the new folder `output`, checked on `pixels`.

    pixels: uint8 [N, crop, crop, 3] held-out images. Returns (artefact path, agreement); raises ExportRefused
    (nothing written) when the runtime disagrees, ValueError for bad arguments. `log` gets progress lines.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {FORMATS}")
    output = Path(output)
    check_output(output)
    crop = config.model.crop_size
    if pixels.ndim != 4 or pixels.shape[1:] != (crop, crop, 3) or pixels.dtype != np.uint8 or not len(pixels):
        raise ValueError(f"check images must be uint8 [N, {crop}, {crop}, 3], got {pixels.dtype} {pixels.shape}")
    created = [p for p in output.parents if not p.exists()]  # removed again when the export is refused
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        start = time.perf_counter()
        artefact = trace_onnx(model, config.eval, staging / ONNX_FILE)
        if fmt == "openvino":
            artefact = _convert_openvino(artefact)
        log(f"traced {fmt} in {time.perf_counter() - start:.1f} s; checking on {len(pixels)} images")
        write_metadata(artefact, {"format": FORMAT, "config": to_dict(config), "metadata": metadata or {},
                                  "model": model_info or {}, "preprocessing": preprocessing(config)})
        scores, maps = ExportedRuntime(artefact, threads=threads).run(pixels)
        reference = Predictor(model, config.eval, device="cpu").predict(normalize(pixels))
        agreement = compare(reference.scores, reference.maps, scores, maps)
        log(agreement.describe())
        if not agreement.ok:
            raise ExportRefused(agreement)
        write_metadata(artefact, {"agreement": asdict(agreement)})
        if output.exists():
            output.rmdir()  # empty, checked above
        staging.rename(output)
        created = []
        return output / artefact.name, agreement
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # deepest first; one that something else wrote into stays
            with contextlib.suppress(OSError):
                folder.rmdir()
