"""Images/s of the exported model (onnxruntime, OpenVINO f32 and bf16) against eager PyTorch, on CPU.

Every backend runs the whole scoring path from the model input: uint8 crops [B, crop, crop, 3] -> normalisation
-> network -> anomaly map -> resize to eval.resize + Gaussian blur -> top-1 % score. Decoding and the
resize/crop of the image files are the same for every backend and left out. Models have random weights
(encoder_weights none, as pretrained=False): speed does not depend on the values.

    tiny  the demo preset's model (width 48, 12 blocks), 128 -> 112 px
    vits  vit_small_patch14_reg4_dinov2 (width 384, 12 blocks), 256 -> 224 px

The export goes through dinomaly.export.export_checked (the agreement check of pipelines/export.py on
--check-images images). Timings alternate the backends batch by batch in one process, so load from other
processes on the machine hits all of them alike; the median over --rounds is reported. bf16 is OpenVINO's
inference precision hint: it is NOT what the export check accepted, so its worst deviation from PyTorch on the
timed batch is printed next to its time.
Run: .venv/bin/python benchmarks/export_speed.py [--models tiny,vits] [--batch 8] [--threads 2] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dinomaly.config import load_config
from dinomaly.export import ExportedRuntime, export_checked, generated_images
from dinomaly.inference import Predictor
from dinomaly.model.dinomaly import Dinomaly

MODELS = {
    "tiny": [],  # the demo preset as it is
    "vits": ["model.encoder_kwargs={}", "model.image_size=256", "model.crop_size=224"],
}


def backends(model: Dinomaly, config, folder: Path, threads: int, check_images: int):
    """name -> callable(pixels) -> scores, plus what the exports measured."""
    torch.set_num_threads(threads)
    predictor = Predictor(model, config.eval, device="cpu")
    pixels = generated_images(check_images, config.model.crop_size, seed=1)
    runs, facts = {"torch eager": lambda x: predictor.predict_pixels(x).scores}, {}
    for fmt in ("onnx", "openvino"):
        start = time.perf_counter()
        path, agreement = export_checked(model, config, fmt, folder / fmt, pixels, threads=threads,
                                         log=lambda _line: None)
        facts[fmt] = {"export_s": round(time.perf_counter() - start, 1), "score_rel": agreement.score_rel,
                      "map_abs": agreement.map_abs}
        precisions = ("f32", "bf16") if fmt == "openvino" else ("f32",)
        for precision in precisions:
            runtime = ExportedRuntime(path, threads=threads, precision=precision)
            runs[f"{fmt} {precision}"] = lambda x, r=runtime: r.run(x)[0]
    return runs, facts


def measure(name: str, batch: int, threads: int, rounds: int, check_images: int) -> dict:
    config = load_config("demo", MODELS[name] + [f"eval.batch_size={batch}"])
    torch.manual_seed(0)
    model = Dinomaly(config.model).eval()
    with tempfile.TemporaryDirectory(prefix="export-speed-") as folder:
        runs, facts = backends(model, config, Path(folder), threads, check_images)
        pixels = generated_images(batch, config.model.crop_size, seed=2)
        reference = runs["torch eager"](pixels)
        deviation = {label: float(np.max(np.abs(run(pixels) - reference) / np.abs(reference)))
                     for label, run in runs.items()}  # also the warm-up call of each backend
        times: dict[str, list[float]] = {label: [] for label in runs}
        for _ in range(rounds):
            for label, run in runs.items():  # alternating: every backend sees the same load
                start = time.perf_counter()
                run(pixels)
                times[label].append(time.perf_counter() - start)
    rows = {label: {"s_per_batch": round(statistics.median(t), 4), "images_per_s": round(batch / statistics.median(t), 2),
                    "score_rel_vs_torch": deviation[label]} for label, t in times.items()}
    return {"model": name, "crop": config.model.crop_size, "batch": batch, "threads": threads, "rounds": rounds,
            "exports": facts, "backends": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,vits")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--check-images", type=int, default=16, help="images of the export's agreement check")
    args = parser.parse_args()
    for name in args.models.split(","):
        result = measure(name, args.batch, args.threads, args.rounds, args.check_images)
        print(json.dumps(result))
        for label, row in result["backends"].items():
            print(f"  {name:5s} {label:14s} {row['s_per_batch']:8.4f} s/batch  {row['images_per_s']:8.2f} img/s  "
                  f"score dev vs torch {row['score_rel_vs_torch']:.2g}")


if __name__ == "__main__":
    main()
