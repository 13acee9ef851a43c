"""Metrics: the reference metric sets, hand-computed AUPRO cases, an independent slow reference, the accumulator."""

import math
import statistics

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import measure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from dinomaly.metrics import METRIC_NAMES, MetricAccumulator, compute_metrics, pro_thresholds
from dinomaly.tables import format_csv, format_markdown, format_table, per_class_table

REFERENCE_KEYS = dict(zip(METRIC_NAMES, ("auroc_sp", "ap_sp", "f1_sp", "auroc_px", "ap_px", "f1_px", "aupro_px")))
METRIC_SETS = ("set0_blobs", "set1_hard", "set2_tiny_ties")


def metric_set(vectors, name):
    prefix = f"metrics/{name}/"
    return {k: np.asarray(vectors[prefix + k]) for k in ("gt", "maps", "labels", "image_scores")}


# --------------------------------------------------------------------------- independent slow reference


def slow_f1_max(labels, scores):
    precision, recall, _ = precision_recall_curve(labels, scores)
    return (2 * precision * recall / (recall + precision + 1e-7))[:-1].max()


def slow_compute_pro(masks, maps, num_th=200):
    """compute_pro written out: one pass per threshold over skimage regions (the masks' regions are fixed,
    so they are found once), statistics.mean, sklearn.metrics.auc."""
    regions = [r.coords for mask in masks for r in measure.regionprops(measure.label(mask))]
    region_images = [i for i, mask in enumerate(masks) for _ in measure.regionprops(measure.label(mask))]
    normal = ~masks
    min_th, max_th = maps.min(), maps.max()
    rows = []
    for th in np.arange(min_th, max_th, (max_th - min_th) / num_th):
        binary = maps > th
        pros = [binary[i][coords[:, 0], coords[:, 1]].sum() / len(coords) for i, coords in zip(region_images, regions)]
        fpr = np.logical_and(normal, binary).sum() / normal.sum()
        rows.append((statistics.mean(pros), fpr))
    pro, fpr = np.array(rows).T
    keep = fpr < 0.3
    return auc(fpr[keep] / fpr[keep].max(), pro[keep])


def slow_metrics(labels, scores, masks, maps):
    return dict(zip(METRIC_NAMES, (
        roc_auc_score(labels, scores), average_precision_score(labels, scores), slow_f1_max(labels, scores),
        roc_auc_score(masks.ravel(), maps.ravel()), average_precision_score(masks.ravel(), maps.ravel()),
        slow_f1_max(masks.ravel(), maps.ravel()), slow_compute_pro(masks, maps))))


def slow_exact_aupro(masks, maps, limit=0.3):
    """Exact PRO curve: one point per distinct score t (predicted anomalous: score >= t), cut at `limit`."""
    labels, count = ndimage.label(masks, structure=np.pad(np.ones((1, 3, 3), bool), ((1, 1), (0, 0), (0, 0))))
    thresholds = np.unique(maps)[::-1]
    pro = np.mean([(maps[labels == r][:, None] >= thresholds).mean(axis=0) for r in range(1, count + 1)], axis=0)
    fpr = (maps[~masks][:, None] >= thresholds).mean(axis=0)
    fpr, pro = np.concatenate([[0.0], fpr]), np.concatenate([[0.0], pro])
    cut = np.searchsorted(fpr, limit, side="right")
    y_cut = np.interp(limit, fpr[cut - 1:cut + 1], pro[cut - 1:cut + 1])
    return np.trapezoid(np.append(pro[:cut], y_cut), np.append(fpr[:cut], limit)) / limit


def random_set(seed, num=12, size=24, quantise=None):
    """Blob masks on half the images, maps = noisy smoothed masks (+ false positives); optional ties:
    quantise=q rounds to multiples of 1/q, quantise="thresholds" snaps half the values between the minimum and
    the maximum onto the float32-rounded PRO thresholds (values equal to a threshold, or just above it)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((num, size, size), bool)
    yy, xx = np.mgrid[:size, :size]
    for i in range(num // 2, num):
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(1, 4)]
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        masks[i, rng.integers(size), rng.integers(size)] = True  # single pixels, some touching diagonally
    maps = ndimage.gaussian_filter(masks.astype(float), (0, 1.5, 1.5)) * rng.uniform(0.2, 1.5, (num, 1, 1))
    maps += 0.3 * ndimage.gaussian_filter(rng.normal(size=masks.shape), (0, 2, 2)) + rng.uniform(0, 0.2, (num, 1, 1))
    maps = maps.astype(np.float32)
    if quantise == "thresholds":
        inner = (maps > maps.min()) & (maps < maps.max()) & (rng.random(maps.shape) < 0.5)
        snapped = np.arange(maps.min(), maps.max(), (maps.max() - maps.min()) / 200).astype(np.float32)
        maps[inner] = snapped[np.searchsorted(snapped, maps[inner]).clip(1, snapped.size - 1)]
    elif quantise:
        maps = (np.round(maps * quantise) / quantise).astype(np.float32)
    labels = masks.reshape(num, -1).any(1).astype(np.int64)
    scores = np.sort(maps.reshape(num, -1), axis=1)[:, ::-1][:, :5].mean(1)
    return labels, scores, masks, maps


# --------------------------------------------------------------------------- reference metric sets


@pytest.mark.parametrize("name", METRIC_SETS)
def test_metric_sets_match_reference(vectors, name):
    s = metric_set(vectors, name)
    got = compute_metrics(s["labels"], s["image_scores"], s["gt"], s["maps"])
    for key, ref_key in REFERENCE_KEYS.items():
        assert got[key] == pytest.approx(vectors[f"metrics/{name}/{ref_key}"], abs=1e-6), key
    thresholds = pro_thresholds(s["maps"].min(), s["maps"].max())
    assert len(thresholds) == vectors[f"metrics/{name}/pro_num_thresholds"]


def test_metric_sets_accept_tensors(vectors):
    s = metric_set(vectors, "set1_hard")
    got = compute_metrics(*(torch.from_numpy(s[k]) for k in ("labels", "image_scores", "gt", "maps")))
    assert got["pixel_aupro"] == pytest.approx(vectors["metrics/set1_hard/aupro_px"], abs=1e-6)


# --------------------------------------------------------------------------- AUPRO by hand


def hand_case():
    """Image 0: region A = (0,0) 1.0 + (0,1) 0.5, region B = (2,2) 0.5, 6 normal pixels at 0.
    Image 1: normal, one pixel 0.5, eight at 0. So 2 regions and 15 normal pixels, one of them at 0.5."""
    maps = np.zeros((2, 3, 3), np.float32)
    masks = np.zeros((2, 3, 3), bool)
    maps[0, 0, 0], maps[0, 0, 1], maps[0, 2, 2], maps[1, 1, 1] = 1.0, 0.5, 0.5, 0.5
    masks[0, 0, 0] = masks[0, 0, 1] = masks[0, 2, 2] = True
    return np.array([1, 0]), np.array([1.0, 0.5]), masks, maps


def test_aupro_reference_by_hand():
    # Thresholds th < 0.5 (0 ... 0.49999999): PRO = mean(2/2, 1/1) = 1, FPR = 1/15.
    # th >= 0.5: PRO = mean(1/2, 0/1) = 0.25, FPR = 0. All FPR < 0.3; rescaled by 1/15 the curve has one
    # step from (1, 1) to (0, 0.25): area = (1 + 0.25) / 2 = 0.625.
    got = compute_metrics(*hand_case())
    assert got["pixel_aupro"] == pytest.approx(0.625, abs=1e-12)
    assert got["image_auroc"] == 1.0
    assert got["image_f1_max"] == pytest.approx(2 / (2 + 1e-7), abs=1e-12)  # the reference's 1e-7


def test_aupro_exact_by_hand():
    # Curve: (0, 0) -> score >= 1: (0, 1/4) -> score >= 0.5: (1/15, 1) -> cut at (0.3, 1).
    # Area = 1/15 * (1/4 + 1) / 2 + (0.3 - 1/15) * 1 = 0.275; divided by 0.3.
    got = compute_metrics(*hand_case(), aupro="exact")
    assert got["pixel_aupro"] == pytest.approx(0.275 / 0.3, abs=1e-12)


def test_aupro_binarises_strictly_above_the_threshold():
    """`map > th`: region B at the minimum (= the first threshold) is never covered. A normal pixel at 0.001
    lies between the first two thresholds (0 and 0.005), so the curve has a step there too."""
    labels, scores, masks, maps = hand_case()
    maps[0, 2, 2], maps[0, 1, 0] = 0.0, 0.001
    # th = 0: PRO = mean(1, 0) = 0.5, FPR = 2/15 -> x = 1; 0 < th < 0.5: PRO 0.5, x = 0.5;
    # th >= 0.5: PRO = mean(1/2, 0) = 0.25, x = 0. Area = 0.5 * 0.5 + 0.5 * (0.5 + 0.25) / 2.
    got = compute_metrics(labels, scores, masks, maps)
    assert got["pixel_aupro"] == pytest.approx(0.25 + 0.1875, abs=1e-12)


def test_aupro_drops_fpr_of_exactly_0_3():
    """`fpr < 0.3` is strict: 10 normal pixels, 3 above the low thresholds -> FPR 0.3 is left out."""
    maps = np.array([[[1.0, 0.5, 0.25, 0.25, 0.75, 0, 0, 0, 0, 0, 0, 0]]], np.float32)
    masks = np.zeros_like(maps, bool)
    masks[0, 0, :2] = True
    # th < 0.25: FPR 0.3 (dropped); 0.25 <= th < 0.5: FPR 0.1, PRO 1; 0.5 <= th < 0.75: FPR 0.1, PRO 0.5;
    # th >= 0.75: FPR 0, PRO 0.5. Rescaled by 0.1: one step from (1, 0.5) to (0, 0.5): area 0.5.
    got = compute_metrics([1], [1.0], masks, maps)
    assert got["pixel_aupro"] == pytest.approx(0.5, abs=1e-12)


def test_diagonal_pixels_are_one_region():
    """8-connectivity: two diagonal pixels are one region; covering one of them gives PRO 1/2, not 1."""
    labels, scores, masks, maps = hand_case()
    masks[0, 2, 2] = False
    masks[0, 1, 2] = True  # (0,1)-(1,2) touch diagonally: one region of 3 pixels {1.0, 0.5, 0}
    maps[0, 1, 2] = 0.0
    # th < 0.5: PRO = 2/3, FPR = 2/15 (image 0's 0.5 at (2,2) is normal now); th >= 0.5: PRO = 1/3, FPR = 0
    got = compute_metrics(labels, scores, masks, maps)
    assert got["pixel_aupro"] == pytest.approx((2 / 3 + 1 / 3) / 2, abs=1e-12)


def test_perfect_map():
    """Perfect separation: 'exact' gives 1; the reference divides 0 by the largest kept FPR (0) and gets NaN."""
    labels, _, masks, _ = hand_case()
    maps = masks.astype(np.float32)
    got = compute_metrics(labels, [1.0, 0.0], masks, maps, aupro="exact")
    assert got["pixel_aupro"] == 1.0
    assert got["pixel_auroc"] == 1.0 and got["pixel_ap"] == 1.0
    assert math.isnan(compute_metrics(labels, [1.0, 0.0], masks, maps)["pixel_aupro"])


# --------------------------------------------------------------------------- against the slow reference


@pytest.mark.parametrize("seed,quantise", [(0, None), (1, None), (2, 16), (3, 64), (13, "thresholds")])
def test_matches_slow_reference(seed, quantise):
    labels, scores, masks, maps = random_set(seed, quantise=quantise)
    got = compute_metrics(labels, scores, masks, maps)
    expected = slow_metrics(labels, scores, masks, maps)
    for key in METRIC_NAMES:
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key


@pytest.mark.parametrize("seed,quantise", [(4, None), (5, 32)])
def test_exact_aupro_matches_slow_curve(seed, quantise):
    labels, scores, masks, maps = random_set(seed, num=8, size=16, quantise=quantise)
    got = compute_metrics(labels, scores, masks, maps, aupro="exact")["pixel_aupro"]
    assert got == pytest.approx(slow_exact_aupro(masks, maps), abs=1e-9)


def test_undefined_metrics_are_nan():
    labels, scores, masks, maps = random_set(6, num=4)
    got = compute_metrics(np.zeros(2, int), scores[:2], masks[:2], maps[:2])  # normal images only
    assert all(math.isnan(v) for v in got.values())


@pytest.mark.parametrize("bad", ["labels", "shape", "count", "mode"])
def test_bad_input_raises(bad):
    labels, scores, masks, maps = random_set(7, num=4)
    args = dict(image_labels=labels, image_scores=scores, pixel_masks=masks, pixel_maps=maps)
    if bad == "labels":
        args["image_labels"] = labels * 2
    elif bad == "shape":
        args["pixel_maps"] = maps[:, :8]
    elif bad == "count":
        args["image_scores"] = scores[:3]
        args["image_labels"] = labels[:3]
    else:
        args["aupro"] = "fast"
    with pytest.raises(ValueError):
        compute_metrics(**args)


# --------------------------------------------------------------------------- accumulator and tables


def accumulate(mode, batches, **kwargs):
    acc = MetricAccumulator(pixel_mode=mode, **kwargs)
    for category, batch in batches:
        acc.update(category, *batch)
    return acc.compute()


@pytest.mark.parametrize("aupro", ["reference", "exact"])
def test_accumulator_exact_equals_compute_metrics(aupro):
    a, b = random_set(8, num=10), random_set(9, num=8, quantise=32)
    batches = [("a", [x[:4] for x in a]), ("b", [x[:5] for x in b]), ("a", [x[4:] for x in a]),
               ("b", [x[5:] for x in b])]
    got = accumulate("exact", batches, aupro=aupro)
    assert list(got) == ["a", "b"]
    for name, data in (("a", a), ("b", b)):
        expected = compute_metrics(*data, aupro=aupro)
        for key in METRIC_NAMES:
            assert got[name][key] == pytest.approx(expected[key], abs=1e-12), (name, key)


def test_accumulator_per_image_categories_and_streaming():
    labels, scores, masks, maps = random_set(10, num=12)
    names = ["x", "y"] * 6
    acc_exact, acc_stream = MetricAccumulator(), MetricAccumulator(pixel_mode="streaming", mantissa_bits=10)
    for start in range(0, 12, 5):
        part = slice(start, start + 5)
        for acc in (acc_exact, acc_stream):
            acc.update(names[part], labels[part], scores[part], masks[part], maps[part])
    exact, stream = acc_exact.compute(), acc_stream.compute()
    expected_x = compute_metrics(labels[::2], scores[::2], masks[::2], maps[::2])
    assert exact["x"] == pytest.approx(expected_x, abs=1e-12)
    # 10 mantissa bits: normal pixels move by < 0.1 %; the metrics by far less than that
    for key in METRIC_NAMES:
        assert stream["y"][key] == pytest.approx(exact["y"][key], abs=2e-3), key


def test_streaming_memory_stays_bounded():
    """Streaming keeps normal pixels as counts of truncated values: adding pixels stops adding memory."""
    labels, scores, masks, maps = random_set(12, num=16, size=64)
    exact, stream = MetricAccumulator(), MetricAccumulator(pixel_mode="streaming", mantissa_bits=8)
    sizes = []
    for _ in range(3):
        for acc in (exact, stream):
            acc.update("a", np.zeros_like(labels), scores, np.zeros_like(masks), maps)  # normal pixels only
        stream.compute_class("a")  # compacts
        sizes.append(stream.nbytes)
    assert sizes[2] < 0.2 * exact.nbytes and sizes[2] < 1.2 * sizes[0]


def test_accumulator_rejects_mismatched_batch():
    labels, scores, masks, maps = random_set(11, num=4)
    with pytest.raises(ValueError, match="category"):
        MetricAccumulator().update(["a", "b"], labels, scores, masks, maps)
    with pytest.raises(ValueError, match="no batches"):
        MetricAccumulator().compute_class("a")


def test_tables():
    results = {"bottle": dict.fromkeys(METRIC_NAMES, 0.5), "cable": dict.fromkeys(METRIC_NAMES, 1.0)}
    results["cable"]["pixel_aupro"] = 0.91234
    rows = per_class_table(results)
    assert [r["class"] for r in rows] == ["bottle", "cable", "mean"]
    assert rows[-1]["image_auroc"] == 0.75 and rows[-1]["pixel_aupro"] == pytest.approx((0.5 + 0.91234) / 2)
    text = format_table(rows)
    assert "P-AUPRO" in text.splitlines()[0] and "0.9123" in text and "0.7062" in text.splitlines()[-1]
    assert len({len(line) for line in text.splitlines()}) == 1  # aligned columns
    assert format_markdown(rows).splitlines()[2].startswith("| bottle | 0.5000 |")
    assert format_csv(rows).splitlines()[2].endswith(",0.91234")
    assert format_csv(per_class_table({"a,b": results["bottle"]})).splitlines()[1].startswith('"a,b",0.5')
