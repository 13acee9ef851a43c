"""Checked export of a trained model (with its pre- and post-processing) to ONNX / OpenVINO, and scoring with it.

graph.py (the traced module), checked.py (trace, convert, compare with PyTorch, write or refuse),
runtime.py (onnxruntime / OpenVINO sessions, metadata in the artefact), predictor.py (OnnxPredictor).
"""

from dinomaly.export.checked import (
           MAP_ATOL,
           SCORE_RTOL,
           Agreement,
           ExportRefused,
           export_checked,
           generated_images,
)
from dinomaly.export.predictor import OnnxPredictor, is_exported
from dinomaly.export.runtime import ONNX_FILE, OPENVINO_FILE, ExportedRuntime, read_metadata

__all__ = ["MAP_ATOL", "ONNX_FILE", "OPENVINO_FILE", "SCORE_RTOL", "Agreement", "ExportRefused", "ExportedRuntime",
           "OnnxPredictor", "export_checked", "generated_images", "is_exported", "read_metadata"]
