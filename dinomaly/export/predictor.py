"""`OnnxPredictor`: `dinomaly.inference.Predictor`'s interface over an exported model, torch-free when scoring.

    predictor = OnnxPredictor("exported/model.onnx")          # or model.xml (OpenVINO)
    result = predictor.predict_pixels(uint8 [B, crop, crop, 3])  # PredictResult(scores, maps)

The pixels are what `dinomaly.data.transforms.resize_crop_image` returns; normalisation, the model and the
post-processing all run inside the runtime. `config` and `metadata` (thresholds, calibration) come from the
artefact, so nothing but the file is needed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dinomaly.config import Config, from_dict
from dinomaly.export.runtime import ExportedRuntime, read_metadata
from dinomaly.inference import PredictResult

EXPORTED_SUFFIXES = (".onnx", ".xml")


def is_exported(uri: str | Path) -> bool:
    """Whether a --model value names an exported file (model.onnx / model.xml) rather than a checkpoint."""
    return Path(str(uri)).suffix.lower() in EXPORTED_SUFFIXES


def exported_files(path: str | Path) -> dict[str, bytes]:
    """The artefact's files by name (model.onnx, or model.xml + model.bin): what ships to other processes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model {str(path)!r} does not exist; pass the model.onnx or model.xml "
                                "that pipelines/export.py wrote")
    parts = [path] + ([path.with_suffix(".bin")] if path.suffix.lower() == ".xml" else [])
    return {part.name: part.read_bytes() for part in parts}


class OnnxPredictor:
    """Scores images with an exported model; same results and `PredictResult` as `Predictor`.

    Batches are split into eval.batch_size chunks as `Predictor` does. threads: the runtime's intra-op
    threads (None = its default).
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        values = read_metadata(self.path)
        self.config: Config = from_dict(Config, values["config"])
        self.model_config = self.config.model
        self.eval_config = self.config.eval
        self.metadata: dict[str, Any] = values.get("metadata", {})
        self.model_info: dict[str, Any] = values.get("model", {})
        self.agreement: dict[str, Any] = values.get("agreement", {})
        self.runtime = ExportedRuntime(self.path, threads=threads)

    @classmethod
    def from_files(cls, files: dict[str, bytes], threads: int | None = None) -> OnnxPredictor:
        """From `exported_files` bytes; the runtime holds the model in memory, so the copy is removed."""
        folder = Path(tempfile.mkdtemp(prefix="dinomaly-exported-"))
        try:
            for name, data in files.items():
                (folder / name).write_bytes(data)
            main = next(name for name in files if is_exported(name))
            return cls(folder / main, threads=threads)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def predict_pixels(self, pixels: np.ndarray) -> PredictResult:
        """uint8 [B, crop, crop, 3] resized + cropped RGB -> scores [B], maps [B, resize, resize]."""
        pixels = np.asarray(pixels)
        crop = self.model_config.crop_size
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (crop, crop, 3):
            raise ValueError(f"the exported model takes uint8 [B, {crop}, {crop}, 3] pixels (resized to "
                             f"{self.model_config.image_size}, centre-cropped), got {pixels.dtype} {pixels.shape}")
        step = max(1, self.eval_config.batch_size)
        parts = [self.runtime.run(pixels[i:i + step]) for i in range(0, len(pixels), step)]
        if not parts:
            size = self.eval_config.resize
            return PredictResult(scores=np.zeros(0, np.float32), maps=np.zeros((0, size, size), np.float32))
        return PredictResult(scores=np.concatenate([p[0] for p in parts]), maps=np.concatenate([p[1] for p in parts]))

    def predict(self, images: Any, return_raw: bool = False) -> PredictResult:
        """`Predictor.predict`'s name: takes the pixels (not normalised floats: that happens inside)."""
        if return_raw:
            raise ValueError("an exported model returns final maps only; use the checkpoint for raw maps")
        if getattr(images, "dtype", None) != np.uint8:
            raise ValueError("the exported model takes uint8 pixels [B, crop, crop, 3], not normalised images; "
                             "call predict_pixels(resize_crop_image(...)) without normalize()")
        return self.predict_pixels(images)
