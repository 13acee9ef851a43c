"""Text for the driver's console: one progress line per report, and the end-of-run summary.

The library only builds the strings; entry points (pipelines/train.py, pipelines/demo.py) print them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from dinomaly.data.storage import storage_uri
from dinomaly.distributed.train.worker import data_wait
from dinomaly.metrics import METRIC_NAMES
from dinomaly.tables import format_table

if TYPE_CHECKING:
    from dinomaly.distributed.train.result import TrainResult


class ProgressFormatter:
    """note (a worker report: step, loss, lr, p, images_per_s, total_steps, run) -> one line with an ETA.

    The ETA uses the speed between this run's last two notes, so start-up and evaluations do not skew it.
    """

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, note: dict) -> str:
        now, step, total, run = time.monotonic(), note["step"], note["total_steps"], note["run"]
        seen_at, seen_step = self._last.get(run, (now, step))
        self._last[run] = (now, step)
        rate = (step - seen_step) / (now - seen_at) if now > seen_at and step > seen_step else 0.0
        eta = _duration((total - step) / rate) if rate else "?"
        line = (f"[{run}] step {step}/{total}  loss {note['loss']:.4f}  lr {note['lr']:.2e}  p {note['p']:.4f}  "
                f"{note['images_per_s']:.1f} images/s  data wait {100 * note['data_wait_fraction']:.0f}%  ETA {eta}")
        if "test/mean/image_auroc" in note:
            line += (f"  | test mean image AUROC {note['test/mean/image_auroc']:.4f}, "
                     f"pixel AUROC {note['test/mean/pixel_auroc']:.4f}")
        return line


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def data_wait_line(figures: dict) -> str:
    """One line for a console: the data-wait share, steady and whole-run, with the per-step figures."""
    steady = figures["steady_share"]
    head = f"data wait {100 * steady:.1f} % of step time" if steady is not None else \
        f"data wait {100 * figures['share']:.1f} % of step time"
    return (f"{head} (median {figures['median_wait_ms']:.1f} ms of a {figures['mean_step_ms']:.0f} ms step; "
            f"{100 * figures['share']:.1f} % with the {figures['first_wait_s']:.1f} s pipeline start-up before "
            "step 1)")


def summary_lines(result: TrainResult) -> list[str]:
    """Per-class table(s), then where each record went: checkpoint, metrics.json, MLflow run, registered model."""
    tracking = result.config.tracking
    lines: list[str] = []
    for run in result.children or (result,):
        if run.rows:
            lines += ["", f"{run.name}, step {run.final_step}:", format_table(run.rows)]
        errors = run.data_errors or {}
        if errors.get("data_errors"):
            lines.append(f"unreadable training files skipped: {errors['data_errors']} (listed in metrics.json), "
                         f"e.g. {[uri for uri, _ in errors['error_files'][:3]]}")
        if (waited := data_wait(run.log)) is not None:
            lines.append(data_wait_line(waited))
        lines += _record_lines(run)
    if result.children and result.mean:
        lines.append("mean over classes: " + "  ".join(f"{k} {result.mean[k]:.4f}" for k in METRIC_NAMES))
    if result.children and result.output_dir:
        lines.append(f"  metrics.json:     {result.output_dir.resolve() / 'metrics.json'}")
    if tracking.enabled:
        lines.append(f"browse runs: mlflow ui --backend-store-uri {tracking.tracking_uri}")
    return lines


def _record_lines(run: TrainResult) -> list[str]:
    tracking = run.config.tracking
    out = run.output_dir.resolve() if run.output_dir else None
    ray_folder = storage_uri(run.checkpoint_uri, run.config.output_root)
    lines = [f"records of {run.name}:",
             f"  checkpoint:       {out / 'checkpoint' if out else ray_folder}  (Ray's run folder: {ray_folder})"]
    if out:
        lines.append(f"  metrics.json:     {out / 'metrics.json'}")
    if run.mlflow_run_id:
        lines.append(f"  MLflow run:       {run.mlflow_run_id} (experiment '{tracking.experiment_name}') in "
                     f"{tracking.tracking_uri}")
    if run.model_version:
        lines.append(f"  registered model: models:/{run.registered_model}/{run.model_version}")
    return lines
