"""Image-score thresholds that turn anomaly scores into verdicts (stored with every trained model).

Two kinds: the F1-optimal threshold on a labelled test split (what the reference's F1-max metric
implies), and a quantile of normal images' scores, usable where no anomalous examples exist.
An image is called anomalous when its score is >= the threshold.
"""

from __future__ import annotations

import numpy as np


def f1_optimal_threshold(image_labels, image_scores) -> tuple[float, float]:
    """(threshold, F1 at it): the score cut that maximises F1 over all distinct scores.

    image_labels [N] (1 = anomalous), image_scores [N]. F1 = 2PR / (P + R) with
    "anomalous" = score >= threshold, the operating point behind the reference's f1_score_max
    (utils.py @c5c76d0, which reports only the F1). NaN, NaN when the labels hold one class only.
    """
    labels = np.asarray(image_labels).ravel().astype(bool)
    scores = np.asarray(image_scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"image_labels {labels.shape} and image_scores {scores.shape} must match")
    if labels.all() or not labels.any():
        return float("nan"), float("nan")
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_value = np.r_[scores[1:] != scores[:-1], True]  # cut after each run of equal scores
    true_pos = np.cumsum(labels)[last_of_value]
    predicted = (np.arange(scores.size) + 1)[last_of_value]
    precision, recall = true_pos / predicted, true_pos / labels.sum()
    f1 = np.where(true_pos > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    best = int(np.argmax(f1))
    return float(scores[last_of_value][best]), float(f1[best])


def normal_quantile_threshold(image_labels, image_scores, quantile: float = 0.99) -> float:
    """The `quantile` of the normal images' scores (linear interpolation); NaN without normal images.

    About 1 - quantile of normal images score above it: a threshold for data without labelled defects.
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile={quantile} must be in (0, 1]")
    labels = np.asarray(image_labels).ravel()
    normal = np.asarray(image_scores, dtype=np.float64).ravel()[labels == 0]
    return float(np.quantile(normal, quantile)) if normal.size else float("nan")
