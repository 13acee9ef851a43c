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
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    return "\n".join(lines)


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
