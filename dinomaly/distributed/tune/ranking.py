"""The ranking of a sweep's trials and the reports made from it (tables, files, the closing summary).

Each trial counts by its best evaluation (the objective by its mode, and the checkpoint kept with it).
Best first: completed and early-stopped trials by that objective alone, then interrupted, pending and
failed ones; each row carries its status, the steps it trained, the sampled values (config/<key>), the
means of its best evaluation and a failure's one-line reason. Used by the sweep (files, printout) and its MLflow tracking (the parent run's artifacts).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinomaly.config import Config
from dinomaly.results import MetricsRecord, json_safe

RESULT_FILES = ("tune_results.csv", "tune_results.json")
STATUS_ORDER = {"completed": 0, "early_stopped": 1, "interrupted": 2, "pending": 3, "failed": 4}
RANKED = ("completed", "early_stopped")  # ranked by objective; the other statuses follow, in STATUS_ORDER
RULE = ("ranked by each trial's best evaluation (objective, {mode}; 'at step' = where it was measured, the checkpoint "
        "kept and registered); completed and early-stopped trials alike, then interrupted, pending, failed")


@dataclass
class SweepOutcome:
    """The ranked trials (best first) and what happened to the best one."""

    rows: list[dict[str, Any]]
    objective: str  # 'labelled' or 'holdout_loss'
    mode: str  # 'max' or 'min'
    experiment_path: str
    interrupted: bool = False
    parent_run_id: str | None = None
    registered_version: str | None = None
    champion: bool = False
    files: list[Path] = field(default_factory=list)

    @property
    def best(self) -> dict[str, Any] | None:
        top = self.rows[0] if self.rows else None
        return top if top is not None and top["status"] in RANKED and top["checkpoint"] else None


def _status(trial, result, evaluations: int) -> str:
    if result.error is not None or trial.status == "ERROR":
        return "failed"
    if trial.status in ("RUNNING", "PENDING", "PAUSED"):  # loaded from storage, RUNNING reads back as PENDING
        return "interrupted" if result.metrics else "pending"
    if not result.metrics:
        return "pending"
    if result.metrics.get("evaluation", 0) >= evaluations:
        return "completed"
    return "early_stopped"  # TERMINATED before its last evaluation: the scheduler stopped it


def _reason(error: BaseException | None) -> str:
    if error is None:
        return ""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    marked = [line for line in lines if line.startswith(("TrialFailed", "TrialDiverged", "ValueError",
                                                         "ResourcesUnavailable"))
              or "TrialFailed:" in line or "TrialDiverged:" in line or "ResourcesUnavailable:" in line]
    return (marked[-1] if marked else lines[-1] if lines else type(error).__name__)[:500]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def best_evaluation(reports: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The report with the best finite objective (the earliest of equals) that came with a checkpoint, or None.

    reports: what a trial reported to Tune, in order (one per evaluation; a resumed trial may repeat one).
    """
    sign = -1 if mode == "max" else 1
    scored = [(sign * r["objective"], i, r) for i, r in enumerate(reports)
              if _finite(r.get("objective")) and isinstance(r.get("checkpoint_path"), str) and r["checkpoint_path"]]
    return min(scored, key=lambda item: item[:2])[2] if scored else None


def _reports(result) -> list[dict[str, Any]]:
    frame = getattr(result, "metrics_dataframe", None)
    reports = frame.to_dict("records") if frame is not None and len(frame) else []
    return reports or ([result.metrics] if result.metrics else [])


def rank_trials(results: Iterable, stored: Mapping[str, Any], *, evaluations: int, expected: int,
                mode: str) -> tuple[list[dict[str, Any]], bool]:
    """Rows for every trial, best first, and whether the sweep stopped before every trial finished (an interrupt).

    A trial is scored by its best evaluation (objective by `mode`), which is also the checkpoint it keeps and
    registers; beside it the row shows its status and the steps it trained. Completed and early-stopped trials
    are ranked by that objective alone; interrupted, pending and failed ones follow, in that order.

    results: Tune's Result per trial; stored: trial id -> Tune Trial as last saved to storage (an interrupt
    saves RUNNING there, then marks the in-memory trials TERMINATED); evaluations: tune.evaluations;
    expected: trials the sweep should have (fewer stored means it was interrupted before starting them all).
    """
    unfinished = any(t.status not in ("TERMINATED", "ERROR") for t in stored.values())
    interrupted = unfinished or len(stored) < expected
    rows = []
    for result in results:
        trial_id = Path(result.path).name
        last = result.metrics or {}
        best = json_safe(best_evaluation(_reports(result), mode) or {})  # pandas gives numpy numbers
        row = dict(trial_id=trial_id, status=_status(stored[trial_id], result, evaluations),
                   objective=best.get("objective"), best_evaluation=int(best.get("evaluation", 0)),
                   best_step=int(best.get("step", 0)), evaluations=int(last.get("evaluation", 0)),
                   steps=int(last.get("step", 0)), last_objective=last.get("objective"))
        row.update({k: v for k, v in best.items() if k.startswith("mean_") or k == "holdout_loss"})
        row.update({f"config/{k}": v for k, v in (result.config or {}).items()})
        row.update(error=_reason(result.error), checkpoint=best.get("checkpoint_path", ""))
        rows.append(row)
    sign = -1 if mode == "max" else 1

    def key(row):
        if row["status"] in RANKED and _finite(row["objective"]):
            return 0, sign * row["objective"], 0, row["trial_id"]
        return 1, 0.0, STATUS_ORDER[row["status"]], row["trial_id"]

    rows.sort(key=key)
    return [dict(rank=number, **row) for number, row in enumerate(rows, start=1)], interrupted


def ranking_csv(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def format_ranking(outcome: SweepOutcome, digits: int = 4) -> str:
    """A fixed-width table (rank, trial, status, best objective and its step, steps trained, evaluations,
    sampled values, reason) and the rule that ordered it."""
    if not outcome.rows:
        return "no trials"
    params = [k for k in outcome.rows[0] if k.startswith("config/")]
    header = ["rank", "trial", "status", f"objective ({outcome.mode})", "at step", "steps", "evals",
              *(p[7:] for p in params), "error"]
    lines = [header]
    for row in outcome.rows:
        value = row["objective"]
        shown = f"{value:.{digits}f}" if _finite(value) else "-"
        cells = [str(row["rank"]), row["trial_id"], row["status"], shown, str(row["best_step"] or "-"),
                 str(row["steps"]), str(row["evaluations"])]
        cells += [_short(row.get(p)) for p in params] + [row["error"][:80]]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
    return f"{table}\n{RULE.format(mode=outcome.mode)}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_results(outcome: SweepOutcome, folder: Path | None) -> list[Path]:
    """tune_results.csv and tune_results.json (summary + rows) in `folder`; [] when there is none."""
    if folder is None:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = (folder / name for name in RESULT_FILES)
    csv_path.write_text(ranking_csv(outcome.rows))
    json_path.write_text(json.dumps(summary(outcome), indent=1, default=str) + "\n")
    return [csv_path, json_path]


def trial_record(row: dict[str, Any], outcome: SweepOutcome, sweep: str, metadata: dict[str, Any]) -> MetricsRecord:
    """A trial's metrics.json: its best evaluation (the registered checkpoint), from that checkpoint's metadata
    (per-class metrics and thresholds of the labelled objective) and its ranking row."""
    classes = metadata.get("classes") or {}
    return MetricsRecord.from_rows(
        "tune", [{"class": name, **values} for name, values in classes.items()], metadata.get("thresholds"),
        sweep=sweep, trial_id=row["trial_id"], rank=row["rank"], status=row["status"], objective=row["objective"],
        objective_kind=outcome.objective, mode=outcome.mode, evaluation=row["best_evaluation"],
        step=row["best_step"], steps_trained=row["steps"], describes="best", checkpoint_uri=row["checkpoint"],
        params={k[7:]: v for k, v in row.items() if k.startswith("config/")},
        measured={k: v for k, v in row.items() if k.startswith("mean_") or k == "holdout_loss"},
        mlflow_run_id=row.get("mlflow_run_id") or None)


def summary(outcome: SweepOutcome) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for row in outcome.rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return dict(objective=outcome.objective, mode=outcome.mode, experiment_path=outcome.experiment_path,
                interrupted=outcome.interrupted, counts=counts, best=outcome.best, trials=outcome.rows,
                parent_run_id=outcome.parent_run_id)


def report_lines(outcome: SweepOutcome, config: Config) -> list[str]:
    """The closing summary: the best trial (config, metrics, checkpoint), the files, MLflow; or why none."""
    lines = [f"results: {', '.join(str(p) for p in outcome.files) or '(no local folder; see MLflow)'}",
             f"Ray's run folder (trial checkpoints, sweep state for --resume): {outcome.experiment_path}"]
    if outcome.parent_run_id:
        lines.append(f"MLflow: parent run {outcome.parent_run_id} in experiment {config.tracking.experiment_name!r} "
                     f"at {config.tracking.tracking_uri}")
    if outcome.interrupted:
        lines.append(f"sweep interrupted before every trial finished; finish it with --resume (same --config/--set): "
                     f"{outcome.experiment_path}")
    best = outcome.best
    if best is None:
        failed = [row for row in outcome.rows if row["status"] == "failed"]
        lines.append(f"no trial succeeded: {len(failed)} of {len(outcome.rows)} trials failed")
        lines += [f"  {row['trial_id']}: {row['error'] or 'no reason recorded'}" for row in failed]
        return lines
    values = {k[7:]: v for k, v in best.items() if k.startswith("config/")}
    measured = {k: v for k, v in best.items() if k.startswith("mean_") or k == "holdout_loss"}
    lines += [f"best trial {best['trial_id']} ({best['status']}): objective {best['objective']:.4f} "
              f"({outcome.objective}, {outcome.mode}) at step {best['best_step']} of {best['steps']} trained",
              f"  config: {values}", f"  metrics: {measured}",
              f"  checkpoint: {best['checkpoint']} (its best evaluation)"]
    if outcome.registered_version:
        alias = config.tune.champion_alias
        state = f"now @{alias}" if outcome.champion else f"@{alias} kept on the previous version"
        lines.append(f"  registered {config.tracking.registered_model_name} version {outcome.registered_version} "
                     f"({state})")
    return lines
