"""The peer's side of benchmarks/export_speed.py --peer-python: anomalib's Dinomaly, exported by anomalib itself.

Runs ONLY under a separate venv holding the peer (anomalib 2.7.0 with torch, onnx, onnxscript, onnxruntime,
openvino), never under ours:

    python3.11 -m venv /work/peer/venv
    /work/peer/venv/bin/pip install anomalib==2.7.0 torch==2.14.1 torchvision==0.29.1 onnx onnxscript \
        onnxruntime openvino
    /work/peer/venv/bin/python benchmarks/peer_export.py export --output /tmp/peer
    /work/peer/venv/bin/python benchmarks/peer_export.py time --folder /tmp/peer   # driven by export_speed.py

The model is anomalib's `Dinomaly(encoder_name="vit_small_patch14_reg4_dinov2")` with random weights: timm is
asked for pretrained=False (nothing is downloaded), seed 0. Its pre-processor is set to the ViT-S@224 geometry
of ours (resize 256, centre crop 224, ImageNet mean/std) and its post-processor gets normalisation statistics and
thresholds taken from the eager model's own outputs on generated images, as training would set them (left NaN,
every normalised output would be NaN). `export` runs anomalib's `to_onnx` and `to_openvino` (its defaults: the
dynamo exporter, opset 14, OpenVINO without fp16 compression) with input_size=(256, 256), and checks both files
against the eager model. `time` loads them (torch eager, onnxruntime f32, OpenVINO f32 and bf16, with the
runtime settings ours uses: threads, graph optimisation, OpenVINO latency hint) and times one batch of the
backend named on each stdin line: export_speed.py --peer-python alternates it batch by batch with ours.

Input: float32 [B, 3, 256, 256] in [0, 1], resized and cropped inside the graph (ours takes uint8 crops
[B, 224, 224, 3]: the crop happens before). Outputs: normalised score, label, the 224 x 224 map (anomalib
returns the map BEFORE the 256 resize and blur its score is computed on) and a mask.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

IMAGE, CROP = 256, 224
ENCODER = "vit_small_patch14_reg4_dinov2"


def offline_timm() -> None:
    """Make anomalib's timm feature extractor build its encoder with random weights, without downloads."""
    import timm
    from anomalib.models.components.feature_extractors import timm as extractor

    create = timm.create_model

    def create_random(*args, **kwargs):
        kwargs["pretrained"] = False
        return create(*args, **kwargs)

    extractor.timm.create_model = create_random  # the module's own reference to timm


def images(count: int, seed: int) -> np.ndarray:
    """float32 [count, 3, IMAGE, IMAGE] in [0, 1]: smooth gradients plus noise (speed does not depend on them)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, IMAGE, dtype=np.float32)
    base = rng.uniform(0.2, 0.8, (count, 3, 1, 1)) * (0.6 + 0.2 * np.add.outer(ramp, ramp))
    return np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1).astype(np.float32)


def build_model():
    """anomalib's Dinomaly ViT-S@224, random weights (seed 0), post-processor fitted on generated images."""
    offline_timm()
    from anomalib.models import Dinomaly

    torch.manual_seed(0)
    model = Dinomaly(encoder_name=ENCODER, pre_processor=Dinomaly.configure_pre_processor((IMAGE, IMAGE), CROP),
                     evaluator=False, visualizer=False).eval()
    post = model.post_processor
    with torch.no_grad():
        raw = model.model(model.pre_processor(torch.from_numpy(images(8, seed=5))))
    scores, maps = raw.pred_score, raw.anomaly_map
    spread = float(scores.max() - scores.min()) or 1.0  # margins keep normalised values inside (0, 1)
    for name, value in (("image_min", scores.min() - spread), ("image_max", scores.max() + spread),
                        ("_image_threshold", scores.median()), ("pixel_min", maps.min()),
                        ("pixel_max", maps.max()), ("_pixel_threshold", maps.median())):
        getattr(post, name).copy_(torch.as_tensor(float(value)))
    return model


class Eager:
    def __init__(self, model):
        self.model = model

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(batch)).pred_score.numpy()


class Onnx:
    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()  # as dinomaly.export.runtime sets them for ours
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        outputs = dict(zip(self.names, self.session.run(None, {self.session.get_inputs()[0].name: batch})))
        return outputs["pred_score"].reshape(-1)


class OpenVino:
    def __init__(self, path: Path, threads: int, precision: str):
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": threads}
        compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = compiled.create_infer_request()
        self.score = [i for i, o in enumerate(compiled.outputs) if "pred_score" in o.names][0]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.request.infer({0: batch})
        return self.request.get_output_tensor(self.score).data.copy().reshape(-1)


def worst_relative(values: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(values.astype(np.float64) - reference) / np.abs(reference)))


def export(output: Path, check_images: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    model = build_model()
    facts = {}
    for fmt in ("onnx", "openvino"):
        start = time.perf_counter()
        method = model.to_onnx if fmt == "onnx" else model.to_openvino
        path = method(output / fmt, input_size=(IMAGE, IMAGE))
        facts[fmt] = {"path": str(path), "export_s": round(time.perf_counter() - start, 1)}
    batch = images(check_images, seed=1)
    reference = Eager(model)(batch)
    facts["onnx"]["score_rel"] = worst_relative(Onnx(Path(facts["onnx"]["path"]), threads)(batch), reference)
    facts["openvino"]["score_rel"] = worst_relative(
        OpenVino(Path(facts["openvino"]["path"]), threads, "f32")(batch), reference)
    (output / "facts.json").write_text(json.dumps(facts))
    return facts


def serve(folder: Path, batch: int, threads: int) -> None:
    """Load the exports, report each backend's score deviation from the eager model (its warm-up call), then
    time one batch of the backend named on each stdin line and answer '@@ seconds' (export_speed.py's protocol)."""
    torch.set_num_threads(threads)
    facts = json.loads((folder / "facts.json").read_text())
    runs = {"torch eager": Eager(build_model()), "onnx f32": Onnx(Path(facts["onnx"]["path"]), threads)}
    for precision in ("f32", "bf16"):
        runs[f"openvino {precision}"] = OpenVino(Path(facts["openvino"]["path"]), threads, precision)
    pixels = images(batch, seed=2)
    reference = runs["torch eager"](pixels)
    print("@@", json.dumps({label: worst_relative(run(pixels), reference) for label, run in runs.items()}),
          flush=True)
    for line in sys.stdin:
        start = time.perf_counter()
        runs[line.strip()](pixels)
        print("@@", time.perf_counter() - start, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("export", "time"))
    parser.add_argument("--output", type=Path, help="export: the folder to write (created)")
    parser.add_argument("--folder", type=Path, help="time: the folder `export` wrote")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check-images", type=int, default=16)
    args = parser.parse_args()
    if args.mode == "export":
        if args.output is None:
            parser.error("export needs --output FOLDER")
        args.output.mkdir(parents=True, exist_ok=True)
        print(json.dumps(export(args.output, args.check_images, args.threads)))
    else:
        if args.folder is None:
            parser.error("time needs --folder, the folder `export` wrote")
        serve(args.folder, args.batch, args.threads)


if __name__ == "__main__":
    main()
