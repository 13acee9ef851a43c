"""Running an exported model without torch: onnxruntime for .onnx, OpenVINO for .xml; and its metadata.

Metadata travels inside the artefact, as JSON strings under the keys of `METADATA_KEYS`: in an ONNX file's
metadata_props, in an OpenVINO model's rt_info under "dinomaly" (model.xml). `read_metadata` returns them
parsed, whichever the format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "dinomaly-export/1"
ONNX_FILE, OPENVINO_FILE = "model.onnx", "model.xml"
# format: FORMAT; config: the Config as a dict; metadata: the checkpoint's metadata (thresholds, calibration);
# model: name, version, source, registry tags; preprocessing: what the input must be; agreement: the check
METADATA_KEYS = ("format", "config", "metadata", "model", "preprocessing", "agreement")
PRECISIONS = ("f32", "bf16")


def _format_of(path: Path) -> str:
    if path.suffix == ".onnx":
        return "onnx"
    if path.suffix == ".xml":
        return "openvino"
    raise ValueError(f"{path} is neither an ONNX (.onnx) nor an OpenVINO (.xml) file; pass the {ONNX_FILE} or "
                     f"{OPENVINO_FILE} that pipelines/export.py wrote")


def write_metadata(path: Path, values: dict[str, Any]) -> None:
    """Store `values` (JSON-able, keys from METADATA_KEYS) inside the artefact at `path`, in place."""
    unknown = set(values) - set(METADATA_KEYS)
    if unknown:
        raise ValueError(f"unknown export metadata keys {sorted(unknown)}; use {METADATA_KEYS}")
    if _format_of(path) == "onnx":
        import onnx

        proto = onnx.load(str(path))
        kept = [p for p in proto.metadata_props if p.key not in values]
        del proto.metadata_props[:]
        proto.metadata_props.extend(kept)
        for key, value in values.items():
            proto.metadata_props.add(key=key, value=json.dumps(value))
        onnx.save(proto, str(path))
        return
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    for key, value in values.items():
        model.set_rt_info(json.dumps(value), ["dinomaly", key])
    staged = path.with_name(f".rewrite-{path.name}")
    ov.save_model(model, str(staged), compress_to_fp16=False)
    staged.replace(path)
    staged.with_suffix(".bin").replace(path.with_suffix(".bin"))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The artefact's metadata, parsed; ValueError when it is not an export of ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model {str(path)!r} does not exist; pass the {ONNX_FILE} or "
                                f"{OPENVINO_FILE} that pipelines/export.py wrote")
    if _format_of(path) == "onnx":
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        raw = {p.key: p.value for p in proto.metadata_props}
    else:
        import openvino as ov

        model = ov.Core().read_model(str(path))
        raw = {key: model.get_rt_info(["dinomaly", key]).astype(str) for key in METADATA_KEYS
               if model.has_rt_info(["dinomaly", key])}
    values = {key: json.loads(value) for key, value in raw.items() if key in METADATA_KEYS}
    if values.get("format") != FORMAT:
        raise ValueError(f"{path} carries no {FORMAT} metadata; it was not written by pipelines/export.py "
                         "(export the checkpoint with it)")
    return values


class ExportedRuntime:
    """One compiled exported model: `run(pixels uint8 [B, crop, crop, 3])` -> (scores [B], maps [B, S, S]).

    threads: intra-op threads (None = the runtime's default). precision: OpenVINO's inference precision
    ('f32' keeps the checked agreement; 'bf16' is faster on CPUs that have it and is NOT what was checked).
    """

    def __init__(self, path: str | Path, threads: int | None = None, precision: str = "f32"):
        self.path = Path(path)
        self.format = _format_of(self.path)
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
        if self.format == "onnx":
            import onnxruntime as ort

            if precision != "f32":
                raise ValueError("onnxruntime runs the exported model in f32 only; use an OpenVINO export for bf16")
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if threads:
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
            self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            self._input = self._session.get_inputs()[0].name
        else:
            import openvino as ov

            config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                      "PERFORMANCE_HINT": "LATENCY"}
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
            self._compiled = ov.Core().compile_model(str(self.path), "CPU", config)
            self._request = self._compiled.create_infer_request()

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"pixels must be uint8 [B, crop, crop, 3] (resized and centre-cropped RGB), got "
                             f"shape {pixels.shape}")
        if self.format == "onnx":
            scores, maps = self._session.run(None, {self._input: pixels})
        else:
            self._request.infer({0: pixels})
            scores, maps = (self._request.get_output_tensor(i).data.copy() for i in range(2))
        return np.asarray(scores, dtype=np.float32), np.asarray(maps, dtype=np.float32)
