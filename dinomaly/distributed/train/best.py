"""train.keep_best: a training run's best-evaluated checkpoint, kept beside its latest ones and registered too.

An evaluation's score is the mean of config.tune.metrics over the test split's class means (higher is better:
a sweep's labelled objective). At each evaluation that beats the best so far, rank 0 saves the model to
<run folder>/best_checkpoint on the run's storage, where Ray's keep-K rotation of checkpoint_* folders never
reaches; every regular checkpoint carries the best so far in its metadata, so a restored run goes on
comparing against it. The best checkpoint carries its evaluation's per-class threshold table (metadata key
"calibration", as the final checkpoint does), so Serve, predict and export decide with it.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from dinomaly.calibration import METADATA_KEY as CALIBRATION_KEY
from dinomaly.checkpoint import save
from dinomaly.results import json_safe

BEST_FOLDER = "best_checkpoint"
METADATA_KEY = "best"  # in a checkpoint's metadata: the BestCheckpoint so far


def evaluation_score(mean: dict[str, float], metrics: list[str]) -> float:
    """Mean of the finite `metrics` among an evaluation's class means; NaN when none is finite."""
    values = [mean.get(name, float("nan")) for name in metrics]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


@dataclass
class BestCheckpoint:
    """The best evaluation so far: its score, step, per-class rows, thresholds and where its checkpoint is."""

    score: float
    step: int
    rows: list[dict]
    thresholds: dict | None
    path: str  # on the run's storage filesystem
    model_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


class BestKeeper:
    """Rank 0's record of the best evaluation; `storage` = (pyarrow filesystem, run folder) of the Ray run."""

    def __init__(self, metrics: list[str], storage: tuple[pafs.FileSystem, str]):
        self.metrics, (self.filesystem, folder) = metrics, storage
        self.path = f"{folder.rstrip('/')}/{BEST_FOLDER}"
        self.best: BestCheckpoint | None = None

    def restore(self, metadata: dict) -> None:
        """Continue from the best recorded in a restored checkpoint's metadata (if any)."""
        if metadata.get(METADATA_KEY):
            self.best = BestCheckpoint(**metadata[METADATA_KEY])

    def consider(self, step: int, rows: list[dict], thresholds: dict | None, model, config) -> bool:
        """Save the model as the best checkpoint when this evaluation's score beats the best so far."""
        mean = next((r for r in rows if r["class"] == "mean"), {})
        score = evaluation_score(mean, self.metrics)
        if not math.isfinite(score) or (self.best is not None and score <= self.best.score):
            return False
        metadata = dict(step=step, run_name=config.name, score=score, thresholds=thresholds,
                        metrics={str(r["class"]): {k: v for k, v in r.items() if k != "class"} for r in rows})
        if thresholds and thresholds.get("calibration"):  # the per-class table the service and exports read
            metadata[CALIBRATION_KEY] = thresholds["calibration"]
        with tempfile.TemporaryDirectory() as tmp:
            save(tmp, model, config, metadata=json_safe(metadata))
            self.filesystem.create_dir(self.path)
            self.filesystem.delete_dir_contents(self.path, missing_dir_ok=True)
            pafs.copy_files(tmp, self.path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.filesystem)
        self.best = BestCheckpoint(score=score, step=step, rows=json_safe(rows), thresholds=json_safe(thresholds),
                                   path=self.path)
        return True

    def download(self, folder: str) -> str:
        """Copy the best checkpoint into local `folder` (made if missing); returns it."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path, folder, source_filesystem=self.filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
        return folder


def best_version_tags(best: BestCheckpoint, run_name: str) -> dict[str, Any]:
    """Registry version tags of the best checkpoint: its class means, step and score, its F1 and normal-quantile
    cuts and, when the evaluation calibrated, the per-class threshold table (as JSON text, like the last one's)."""
    mean = next(r for r in best.rows if r["class"] == "mean")
    thresholds = best.thresholds or {}
    tags: dict[str, Any] = {**{f"mean_{k}": v for k, v in mean.items() if k != "class"}, "checkpoint": "best",
                            "step": best.step, "score": best.score, "run_name": run_name}
    tags.update({f"threshold_{k}": v for k, v in thresholds.items() if k in ("image_f1_optimal", "image_normal_quantile")})
    if thresholds.get("calibration"):
        tags[CALIBRATION_KEY] = json.dumps(json_safe(thresholds["calibration"]))
    return tags
