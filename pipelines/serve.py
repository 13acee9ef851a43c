"""Serve a trained model over HTTP on Ray Serve, in the foreground, until Ctrl-C.

    python pipelines/serve.py --model runs/demo/checkpoint --config demo
    python pipelines/serve.py --model models:/dinomaly@champion --host 127.0.0.1 --port 8000
    python pipelines/serve.py --model s3://bucket/runs/x/checkpoint --set serve.max_batch_size=16
    serve run pipelines.serve:app model=models:/dinomaly@champion serve.num_replicas=2    # Serve's CLI
    serve deploy cluster/serve_config.yaml                                                # a running cluster

Then: the page at http://127.0.0.1:8000/, the API docs at /docs, `curl --data-binary @img.png
http://127.0.0.1:8000/v1/predict`. Serving options are the serve.* config keys (`--set serve.KEY=VALUE`).
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from typing import Any

import dinomaly.distributed  # noqa: F401 - sets Ray's loopback environment before Ray is imported
from dinomaly.config import Config, apply_overrides, load_config
from dinomaly.config.cli import entry_parser, start_logging
from dinomaly.config.paths import with_absolute_paths
from dinomaly.distributed.batch.scoring import refuse_model_changes
from dinomaly.distributed.cluster import attaching_to_cluster
from dinomaly.distributed.entry import run_job
from dinomaly.distributed.serve import app as serving


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser(__doc__, keys=("model", "data", "eval", "serve", "tracking", "cluster"),
                          flags=("config", "set", "model", "workers", "gpu"), required=("model",),
                          set_example="--set serve.threshold=0.05",
                          help={"config": "YAML preset name or path (serve, tracking and data sections)",
                                "model": "the model to serve: a checkpoint folder, an s3:// prefix, "
                                         "models:/<name>/<version>, models:/<name>@<alias>, or a file "
                                         "exported by pipelines/export.py (model.onnx, OpenVINO model.xml); "
                                         "not official .pth weights (fine-tune them into a checkpoint with "
                                         "pipelines/train.py --init-from)",
                                "workers": "model replicas (serve.num_replicas)",
                                "gpu": "one GPU per replica (serve.num_gpus=1)"})
    parser.add_argument("--host", default=None, help="bind address (serve.host; default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (serve.port; default 8000)")
    return parser


def starts_local_ray() -> bool:
    """Whether ray.init() here starts a new local Ray, with a Serve proxy of its own, rather than joining a
    running cluster (RAY_ADDRESS, or the last `ray start` on this machine), whose Serve a redeploy reuses."""
    import ray
    from ray._private.utils import read_ray_address  # where ray.init() looks when given no address

    return not (attaching_to_cluster() or ray.is_initialized() or read_ray_address())


def check_port_free(host: str, port: int) -> None:
    """Refuse a host:port something already listens on. Serve's proxy binds with SO_REUSEPORT, so a second
    local Serve would share the port with the first and split requests between their models."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: a port left in TIME_WAIT by a stopped server is free; one with a listener is not
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ValueError(f"{host}:{port} is in use (another pipelines/serve.py?); stop it or pass "
                                 "--port") from None
            raise ValueError(f"cannot listen on {host}:{port} ({err.strerror or err}); pass another --host or "
                             "--port") from None


def app(args: dict[str, Any]):
    """Application builder for `serve run pipelines.serve:app model=... [config=...] [serve.KEY=VALUE ...]`."""
    args = dict(args)
    if "model" not in args:
        raise ValueError("pass the model: serve run pipelines.serve:app model=<checkpoint dir | models:/...>")
    model, preset = str(args.pop("model")), args.pop("config", None)
    fixed = [f"{k}={v}" for k, v in args.items() if k.startswith("model.")]  # only checked against the model's
    args = {k: v for k, v in args.items() if not k.startswith("model.")}
    config = load_config(preset, [f"{k}={v}" for k, v in args.items() if isinstance(v, str)])
    config = apply_overrides(config, {k: v for k, v in args.items() if not isinstance(v, str)})
    refuse_model_changes(serving.check_model(model, config).config, fixed)
    return serving.build_app(model, config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start_logging()
    flags = (("host", args.host), ("port", args.port), ("num_replicas", args.workers),
             ("num_gpus", 1.0 if args.gpu else None))
    overrides = {f"serve.{key}": value for key, value in flags if value is not None}

    def check() -> tuple[Config, serving.ModelInfo]:
        # the model's own model.* serve it: a --set model.* is only checked against them
        settings = [s for s in args.set if not s.strip().startswith("model.")]
        config = with_absolute_paths(apply_overrides(load_config(args.config, settings), overrides))
        if starts_local_ray():  # on a running cluster, Serve already holds the port: a redeploy replaces the app
            check_port_free(config.serve.host, config.serve.port)
        info = serving.check_model(args.model, config)  # a bad model or token set-up fails before Ray
        refuse_model_changes(info.config, args.set)
        return config, info

    return run_job(check, lambda checked: serving.serve_until_stopped(args.model, *checked),
                   prefix=f"cannot serve {args.model}: ", debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
