"""Export a trained model to ONNX or OpenVINO, checked against PyTorch before anything is written.

    python pipelines/export.py --model runs/demo/checkpoint --format onnx --output exported/demo
    python pipelines/export.py --model models:/dinomaly@champion --format openvino --output exported/champion-ov \\
        --data demo_data/manifest.parquet --images 32

The artefact holds the whole scoring path: input normalisation, the network, the anomaly map, its resize and
Gaussian blur, and the top-1 % image score. Its input is uint8 pixels [B, crop, crop, 3] (RGB, channels last)
of an image resized to model.image_size and centre-cropped to model.crop_size; it returns (score [B], map
[B, eval.resize, eval.resize]). Thresholds, the per-class table and the config travel as metadata in the file
(ONNX metadata_props; OpenVINO rt_info in model.xml, under "dinomaly").

Before writing, --images held-out images (from --data: test rows of a manifest first; else generated) run through
PyTorch and the exported runtime; unless every score agrees within 1e-4 relative and every map pixel within
1e-3 absolute, the export is refused (exit 2) and --output is left untouched. The worst errors are printed
either way. Serve or score the result with `serve.py --model DIR/model.onnx`, `predict.py --model DIR/model.onnx`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import dinomaly.distributed  # noqa: F401 - sets Ray's loopback environment before Ray is imported
from dinomaly.config.cli import at_least, entry_parser, local_output, start_logging


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser(__doc__, keys=("model", "data", "eval", "tracking", "serve.threshold", "serve.threshold_method"),
                          flags=("config", "data", "output", "set", "model"), required=("model", "output"),
                          set_example="--set eval.resize=256",
                          help={"data": "held-out images for the check: a .parquet manifest (test rows first), a "
                                        "folder or an s3:// prefix; default: generated images",
                                "output": "required: new folder for the artefact (model.onnx, or model.xml + model.bin); "
                                          "missing parent folders are created"})
    add = parser.add_argument
    add("--format", required=True, choices=("onnx", "openvino"), help="onnx (onnxruntime) or openvino")
    add("--images", type=at_least(1), default=16, metavar="N", help="held-out images checked before writing (default 16)")
    add("--threads", type=at_least(1), default=None, metavar="N", help="runtime threads for the check (default: all)")
    return parser


def held_out_uris(data: str, config, count: int) -> list[str]:
    """Up to `count` image URIs from --data, test rows of a manifest before the rest, spread over the list."""
    from dinomaly.distributed.batch.predict import list_inputs

    uris = list_inputs(data, config)
    if data.endswith(".parquet"):
        import pyarrow.parquet as pq

        from dinomaly.data.storage import filesystem_for

        fs, path = filesystem_for(data, config.data)
        table = pq.read_table(path, filesystem=fs)
        if {"split", "image_uri"} <= set(table.column_names):
            trained = {u for u, s in zip(table.column("image_uri").to_pylist(), table.column("split").to_pylist())
                       if s == "train"}
            held = [u for u in uris if u not in trained]
            if len(held) < count:
                return (held + [u for u in uris if u in trained])[:count]
            uris = held
    step = max(1, len(uris) // count)
    return uris[::step][:count]


def check_images(data: str | None, config, count: int):
    """uint8 [N, crop, crop, 3]: read from --data with the evaluation's resize/crop, or generated."""
    import numpy as np

    from dinomaly.data.reader import RowError, RowReader
    from dinomaly.export import generated_images

    if count < 1:
        raise ValueError(f"--images {count} must be at least 1")
    crop = config.model.crop_size
    if data is None:
        return generated_images(count, crop)
    reader = RowReader(config.model.image_size, crop, keep_errors=True, storage=config.data)
    rows = reader.read_many([(uri, None) for uri in held_out_uris(data, config, count)])
    pixels = [row.image for row in rows if not isinstance(row, RowError)]
    if not pixels:
        raise ValueError(f"no readable image in --data {data}; pass other images or leave --data out")
    return np.stack(pixels)


def prepare(args: argparse.Namespace):
    """Everything checked before the export: the model, the output folder, the check images."""
    from dinomaly.distributed.batch.scoring import build_model, load_bundle
    from dinomaly.export.checked import check_output

    local_output(args.output, "; export to a local folder, then copy it")
    check_output(Path(args.output))
    bundle = load_bundle(args.model, args.config, args.set)
    model = build_model(bundle.config.model, bundle.state_dict, "cpu")
    info = {"name": bundle.name, "version": bundle.version, "source": bundle.source, "tags": bundle.tags}
    return bundle, model, info, check_images(args.data, bundle.config, args.images)


def export(args: argparse.Namespace, prepared) -> int:
    from dinomaly.distributed.entry import UsageError
    from dinomaly.export import ExportRefused, export_checked

    bundle, model, info, pixels = prepared
    try:
        path, _ = export_checked(model, bundle.config, args.format, args.output, pixels, model_info=info,
                                 metadata=bundle.metadata, threads=args.threads)
    except ExportRefused as err:
        raise UsageError(f"{err}; nothing was written to {args.output}") from err
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start_logging()
    from dinomaly.distributed.entry import run_job

    return run_job(lambda: prepare(args), lambda prepared: export(args, prepared), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
