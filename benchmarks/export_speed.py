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

Side by side with the peer (anomalib 2.7's Dinomaly, exported by anomalib; see benchmarks/peer_export.py for its
venv): --peer-python /work/peer/venv/bin/python exports ViT-S@224 on both sides once, starts one timing process
per side and ALTERNATES them batch by batch (backend by backend, ours then the peer's, the order swapped every
round, --rounds rounds), so load from elsewhere hits both alike; it prints one table of the medians.
Both sides run their files with the same runtime settings (threads, ORT_ENABLE_ALL, OpenVINO latency hint).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
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


def build(name: str, batch: int):
    config = load_config("demo", MODELS[name] + [f"eval.batch_size={batch}"])
    torch.manual_seed(0)
    return Dinomaly(config.model).eval(), config


def export_all(model: Dinomaly, config, folder: Path, threads: int, check_images: int) -> dict:
    """Checked ONNX and OpenVINO exports under folder/<format>; what each export measured."""
    pixels = generated_images(check_images, config.model.crop_size, seed=1)
    facts = {}
    for fmt in ("onnx", "openvino"):
        start = time.perf_counter()
        path, agreement = export_checked(model, config, fmt, folder / fmt, pixels, threads=threads,
                                         log=lambda _line: None)
        facts[fmt] = {"path": str(path), "export_s": round(time.perf_counter() - start, 1),
                      "score_rel": agreement.score_rel, "map_abs": agreement.map_abs}
    return facts


def backends(model: Dinomaly, config, facts: dict, threads: int):
    """name -> callable(pixels) -> scores: eager PyTorch and the exported files of `facts`."""
    torch.set_num_threads(threads)
    predictor = Predictor(model, config.eval, device="cpu")
    runs = {"torch eager": lambda x: predictor.predict_pixels(x).scores}
    for fmt in ("onnx", "openvino"):
        for precision in ("f32", "bf16") if fmt == "openvino" else ("f32",):
            runtime = ExportedRuntime(facts[fmt]["path"], threads=threads, precision=precision)
            runs[f"{fmt} {precision}"] = lambda x, r=runtime: r.run(x)[0]
    return runs


def time_runs(runs: dict, pixels: np.ndarray, rounds: int) -> dict:
    """Median seconds per batch of each backend over `rounds` alternating rounds, and its score deviation."""
    reference = runs["torch eager"](pixels)
    deviation = {label: float(np.max(np.abs(run(pixels) - reference) / np.abs(reference)))
                 for label, run in runs.items()}  # also the warm-up call of each backend
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(rounds):
        for label, run in runs.items():  # alternating: every backend sees the same load
            start = time.perf_counter()
            run(pixels)
            times[label].append(time.perf_counter() - start)
    return {label: {"s_per_batch": statistics.median(t), "score_rel_vs_torch": deviation[label]}
            for label, t in times.items()}


def measure(name: str, batch: int, threads: int, rounds: int, check_images: int) -> dict:
    model, config = build(name, batch)
    with tempfile.TemporaryDirectory(prefix="export-speed-") as folder:
        facts = export_all(model, config, Path(folder), threads, check_images)
        runs = backends(model, config, facts, threads)
        timed = time_runs(runs, generated_images(batch, config.model.crop_size, seed=2), rounds)
    rows = {label: {"s_per_batch": round(row["s_per_batch"], 4), "images_per_s": round(batch / row["s_per_batch"], 2),
                    "score_rel_vs_torch": row["score_rel_vs_torch"]} for label, row in timed.items()}
    return {"model": name, "crop": config.model.crop_size, "batch": batch, "threads": threads, "rounds": rounds,
            "exports": {fmt: {k: v for k, v in f.items() if k != "path"} for fmt, f in facts.items()},
            "backends": rows}


def serve_batches(runs: dict, pixels: np.ndarray) -> None:
    """The worker side of --peer-python: report each backend's score deviation (its warm-up call), then time
    one batch of the backend named on each stdin line, answering '@@ seconds'. peer_export.py does the same."""
    reference = runs["torch eager"](pixels)
    deviation = {label: float(np.max(np.abs(run(pixels) - reference) / np.abs(reference)))
                 for label, run in runs.items()}
    print("@@", json.dumps(deviation), flush=True)
    for line in sys.stdin:
        start = time.perf_counter()
        runs[line.strip()](pixels)
        print("@@", time.perf_counter() - start, flush=True)


def answer(process: subprocess.Popen) -> str:
    """The next protocol line of a worker; anything else it prints is skipped."""
    for line in process.stdout:
        if line.startswith("@@ "):
            return line[3:]
    raise RuntimeError(f"a timing worker exited early (code {process.wait()}); run it alone to see why")


def side_by_side(peer_python: str, batch: int, threads: int, rounds: int, check_images: int,
                 peer_export: Path | None) -> None:
    """Ours and the peer's ViT-S@224 in two worker processes, timed batch by batch in alternation (ours, peer,
    peer, ours, ...: each round swaps who goes first); prints one table of medians.

    peer_export: a folder `peer_export.py export` wrote before, to reuse (its export is slow); None: export.
    """
    peer_script = Path(__file__).with_name("peer_export.py")
    common = ["--batch", str(batch), "--threads", str(threads)]
    with tempfile.TemporaryDirectory(prefix="export-speed-") as folder:
        ours_dir, peer_dir = Path(folder) / "ours", peer_export or Path(folder) / "peer"
        ours_dir.mkdir()
        model, config = build("vits", batch)
        torch.set_num_threads(threads)
        facts = {"dinomaly": export_all(model, config, ours_dir, threads, check_images)}
        (ours_dir / "facts.json").write_text(json.dumps(facts["dinomaly"]))
        del model
        if peer_export is None:
            subprocess.run([peer_python, str(peer_script), "export", "--output", str(peer_dir), "--threads",
                            str(threads), "--check-images", str(check_images)], check=True, capture_output=True)
        facts["anomalib"] = json.loads((peer_dir / "facts.json").read_text())
        commands = {"dinomaly": [sys.executable, __file__, "--worker", str(ours_dir), *common],
                    "anomalib": [peer_python, str(peer_script), "time", "--folder", str(peer_dir), *common]}
        workers = {side: subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                   for side, command in commands.items()}
        try:
            deviation = {side: json.loads(answer(process)) for side, process in workers.items()}
            times: dict[str, dict[str, list[float]]] = {side: {label: [] for label in deviation["dinomaly"]}
                                                        for side in workers}
            for index in range(rounds):
                order = list(workers) if index % 2 == 0 else list(workers)[::-1]
                for label in deviation["dinomaly"]:
                    for side in order:
                        workers[side].stdin.write(label + "\n")
                        workers[side].stdin.flush()
                        times[side][label].append(float(answer(workers[side])))
        finally:
            for process in workers.values():
                process.stdin.close()
                process.wait(timeout=120)
    exports = {side: {fmt: {k: v for k, v in f.items() if k != "path"} for fmt, f in fx.items()}
               for side, fx in facts.items()}
    print(json.dumps({"exports": exports, "times": times, "score_rel_vs_torch": deviation}))
    print(f"ViT-S@224, batch {batch}, {threads} threads, pre- and post-processing inside; median of {rounds} "
          "batches per backend, ours and the peer's batches alternating")
    print(f"  {'backend':14s} {'dinomaly s/batch':>17s} {'anomalib s/batch':>17s} {'ours/peer':>9s} "
          f"{'paired':>7s}   score dev vs own torch (ours | peer)")
    for label in deviation["dinomaly"]:
        med = {side: statistics.median(times[side][label]) for side in times}
        # paired: the median of ours / peer over the back-to-back pairs, robust to load that drifts between rounds
        paired = statistics.median(a / b for a, b in zip(times["dinomaly"][label], times["anomalib"][label]))
        print(f"  {label:14s} {med['dinomaly']:17.3f} {med['anomalib']:17.3f} {med['dinomaly'] / med['anomalib']:9.2f}"
              f" {paired:7.2f}   {deviation['dinomaly'][label]:.2g} | {deviation['anomalib'][label]:.2g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,vits")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--check-images", type=int, default=16, help="images of the export's agreement check")
    parser.add_argument("--peer-python", help="the peer venv's python: time ViT-S side by side with anomalib")
    parser.add_argument("--peer-export", type=Path, help="with --peer-python: reuse this `peer_export.py "
                        "export` folder instead of exporting the peer again")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # one timing process of --peer-python
    args = parser.parse_args()
    if args.worker:
        model, config = build("vits", args.batch)
        facts = json.loads((args.worker / "facts.json").read_text())
        serve_batches(backends(model, config, facts, args.threads),
                      generated_images(args.batch, config.model.crop_size, seed=2))
        return
    if args.peer_python:
        side_by_side(args.peer_python, args.batch, args.threads, args.rounds, args.check_images,
                     args.peer_export)
        return
    for name in args.models.split(","):
        result = measure(name, args.batch, args.threads, args.rounds, args.check_images)
        print(json.dumps(result))
        for label, row in result["backends"].items():
            print(f"  {name:5s} {label:14s} {row['s_per_batch']:8.4f} s/batch  {row['images_per_s']:8.2f} img/s  "
                  f"score dev vs torch {row['score_rel_vs_torch']:.2g}")


if __name__ == "__main__":
    main()
