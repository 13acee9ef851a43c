"""Per-class metric tables: one row per class plus the unweighted mean, as text, Markdown and CSV."""

from __future__ import annotations

import csv
import io

import numpy as np

from dinomaly.metrics import METRIC_NAMES

_COLUMN_TITLES = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "P-AUPRO")


def per_class_table(results: dict[str, dict[str, float]]) -> list[dict[str, float | str]]:
    """Rows {'class', seven metrics} per class, then 'mean': the unweighted mean over classes (issue #12)."""
    if not results:
        raise ValueError("per_class_table needs at least one class of results")
    rows: list[dict[str, float | str]] = [{"class": name, **{k: float(m[k]) for k in METRIC_NAMES}}
                                          for name, m in results.items()]
    rows.append({"class": "mean", **{k: float(np.mean([m[k] for m in results.values()])) for k in METRIC_NAMES}})
    return rows


def format_table(rows: list[dict[str, float | str]], digits: int = 4) -> str:
    """Aligned plain-text table of per_class_table rows, values with `digits` decimals like the reference logs."""
    cells = [["class", *_COLUMN_TITLES]] + [[str(r["class"]), *(f"{r[k]:.{digits}f}" for k in METRIC_NAMES)]
                                           for r in rows]
    return _aligned(cells)


def format_markdown(rows: list[dict[str, float | str]], digits: int = 4) -> str:
    """Markdown table of per_class_table rows (for MLflow artifacts and reports)."""
    lines = ["| class | " + " | ".join(_COLUMN_TITLES) + " |", "|---" * (len(_COLUMN_TITLES) + 1) + "|"]
    lines += ["| " + " | ".join([str(r["class"]), *(f"{r[k]:.{digits}f}" for k in METRIC_NAMES)]) + " |"
              for r in rows]
    return "\n".join(lines)


def format_csv(rows: list[dict[str, float | str]]) -> str:
    """CSV of per_class_table rows with full precision, header = the metric keys."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["class", *METRIC_NAMES])
    writer.writerows([str(r["class"]), *(repr(float(r[k])) for k in METRIC_NAMES)] for r in rows)
    return out.getvalue()


_DECISION_TITLES = ("class", "threshold", "source", "n", "95% interval", "target FPR", "test FPR", "test recall",
                    "F1-opt (test-tuned)", "its FPR", "its recall")


def format_decision_table(report: dict[str, dict], digits: int = 4) -> str:
    """Aligned table of dinomaly.calibration.decision_report: per class the calibrated threshold, its source and
    the FPR/recall it achieves on the labelled test split against its target, then the test-tuned F1-optimal."""
    def number(value, places: int = digits) -> str:
        return "-" if value is None or not np.isfinite(value) else f"{value:.{places}f}"

    cells = [list(_DECISION_TITLES)]
    for name, r in report.items():
        low, high = r["interval"] or (None, None)
        tuned = r["test_tuned"]
        cells.append([name, number(r["threshold"]), r["source"], str(r["n_images"]),
                      f"{number(low)}-{number(high)}", number(r["target_fpr"], 3), number(r["test_fpr"], 3),
                      number(r["test_recall"], 3), number(tuned["threshold"]), number(tuned["fpr"], 3),
                      number(tuned["recall"], 3)])
    return _aligned(cells, left=(0, 2))


def format_threshold_table(table, previous=None, digits: int = 4) -> str:
    """Aligned table of a dinomaly.calibration.ThresholdTable (per class, then 'global'), with the previous
    table's threshold beside each when given (a recalibration)."""
    def number(value) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    entries = [*table.classes.items(), ("global", table.global_threshold)]
    old = {**(previous.classes if previous else {}), "global": previous.global_threshold} if previous else {}
    cells = [["class", "threshold", "source", "n", "95% interval", "target FPR", "previous"]]
    for name, e in entries:
        low, high = e.interval or (None, None)
        cells.append([name, number(e.threshold), e.source, str(e.n_images), f"{number(low)}-{number(high)}",
                      "-" if e.target_fpr is None else f"{e.target_fpr:.3f}",
                      number(old[name].threshold) if name in old else "-"])
    return _aligned(cells, left=(0, 2))


def _aligned(cells: list[list[str]], left: tuple[int, ...] = (0,)) -> str:
    """Rows of cells as columns two spaces apart: the `left` columns left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)
