"""What a training job returns: one typed record, built once on the driver after the fit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dinomaly.config import Config
from dinomaly.data.storage import storage_uri
from dinomaly.distributed.train.worker import data_wait
from dinomaly.results import MetricsRecord

if TYPE_CHECKING:
    from dinomaly.distributed.train.worker import WorkerLog


@dataclass(frozen=True)
class TrainResult:
    """One Ray Train run (or, with children, one run per class of train.setting=separate).

    rows: the final evaluation, dinomaly.metrics.per_class_table rows (each class, then 'mean'); empty when
    the run was not evaluated (fixed batches, or stopped before train.total_steps). For the per-class parent,
    each class's row is that class's run mean.
    """

    config: Config  # as run: prepare_config applied (absolute MLflow URI, deterministic mode)
    final_step: int
    rows: list[dict]
    thresholds: dict | None  # image-score thresholds (F1-optimal, normal quantile), pooled and per class
    checkpoint_uri: str | None  # the latest checkpoint on Ray storage
    mlflow_run_id: str | None
    model_version: str | None  # the Model Registry version (None when not registered)
    data_errors: dict | None  # unreadable training files skipped by the Ray Data source (None: local reader)
    output_dir: Path | None  # where checkpoint/, config.yaml and metrics.json were written (None: nowhere)
    log: WorkerLog | None = None  # rank 0's per-step records, start step and timings (None for the parent)
    children: tuple[TrainResult, ...] = ()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def mean(self) -> dict[str, float]:
        return {k: v for k, v in self.rows[-1].items() if k != "class"} if self.rows else {}

    @property
    def registered_model(self) -> str | None:
        return self.config.tracking.registered_model_name if self.model_version else None

    def metrics_record(self) -> MetricsRecord:
        """metrics.json's content (dinomaly.results layout) with this run's fields."""
        if self.children:
            return MetricsRecord.from_rows("train", self.rows, run=self.name, setting="separate",
                                           step=self.final_step, describes="last",
                                           runs={c.name: str(c.output_dir) for c in self.children})
        fields = dict(run=self.name, setting=self.config.train.setting, step=self.final_step, describes="last",
                      checkpoint_uri=self.checkpoint_uri, mlflow_run_id=self.mlflow_run_id,
                      registered_model=self.registered_model, model_version=self.model_version,
                      data_errors=self.data_errors, data_wait=data_wait(self.log))
        best = self.log.best if self.log is not None else None
        if not best:
            return MetricsRecord.from_rows("train", self.rows, self.thresholds, **fields)
        # train.keep_best: the best evaluation, its checkpoint and version; the last one's beside them
        fields.update(step=best["step"], describes="best", score=best["score"],
                      checkpoint_uri=storage_uri(best["path"], self.config.output_root),
                      model_version=best["model_version"], final_step=self.final_step,
                      last_checkpoint_uri=self.checkpoint_uri, last_model_version=self.model_version)
        return MetricsRecord.from_rows("train", best["rows"], best["thresholds"], **fields)
