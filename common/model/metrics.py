"""Classification metrics: exact ones from predictions, and the same ones from (noisy) counts.

A site never sends exact metrics on its own data. Under DP it releases a histogram of
its test predictions with Gaussian noise (:mod:`common.privacy.releases`); the coordinator
turns the noisy counts back into the metrics clinicians read with :func:`metrics_from_counts`
(post-processing, free of privacy cost). :func:`evaluation_counts` defines that histogram:

- two classes: records by true class and by the bin of the model's logit for class 1,
  ``log p1 - log p0``, with edges :data:`LOGIT_EDGES` (8 bins; the decision threshold 0 is
  an edge), so sensitivity, specificity, F1 and a binned ROC AUC all follow from it;
- more classes: the confusion matrix (true class by predicted class); no AUC.

One record falls in exactly one cell, so adding or removing a record changes the
histogram by 1 in one cell: L2 sensitivity 1.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    log_loss,
    roc_auc_score,
)

#: Every metric reported for a model on a test set; "test-size" is the number of rows (a noisy
#: count when it comes from a DP release).
METRIC_NAMES = ("roc-auc", "balanced-accuracy", "f1", "sensitivity", "specificity", "accuracy", "test-size")
#: Bin edges of the class-1 logit in the two-class evaluation histogram.
LOGIT_EDGES = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)


def _safe(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator > 0 else math.nan


def _binary_rates(tp: float, fn: float, fp: float, tn: float) -> dict[str, float]:
    sensitivity, specificity = _safe(tp, tp + fn), _safe(tn, tn + fp)
    return {
        "balanced-accuracy": (sensitivity + specificity) / 2,
        "f1": _safe(2 * tp, 2 * tp + fp + fn),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "accuracy": _safe(tp + tn, tp + tn + fp + fn),
        "test-size": float(tp + tn + fp + fn),
    }


def classification_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Every metric of :data:`METRIC_NAMES`, plus cross-entropy ``loss``, of ``proba`` against ``y_true``.

    Two classes: class 1 is the positive class (sensitivity = its recall, specificity = class
    0's recall), predicted when its probability is the larger. More classes: balanced accuracy
    and macro F1; sensitivity and specificity are NaN. ROC AUC is NaN when the labels hold one class.
    """
    y_true = np.asarray(y_true)
    num_classes = proba.shape[1]
    labels = list(range(num_classes))
    predicted = proba.argmax(axis=1)
    present = len(np.unique(y_true))
    if present < 2:
        auc = math.nan
    elif num_classes == 2:
        auc = float(roc_auc_score(y_true, proba[:, 1]))
    else:
        auc = float(roc_auc_score(y_true, proba, multi_class="ovr", labels=labels))
    if num_classes == 2:
        tp = float(np.sum((predicted == 1) & (y_true == 1)))
        fn = float(np.sum((predicted == 0) & (y_true == 1)))
        fp = float(np.sum((predicted == 1) & (y_true == 0)))
        tn = float(np.sum((predicted == 0) & (y_true == 0)))
        values = _binary_rates(tp, fn, fp, tn)
        if present < 2:  # one class only: balanced accuracy is that class's recall
            values["balanced-accuracy"] = values["sensitivity"] if y_true[0] == 1 else values["specificity"]
    else:
        values = {
            "balanced-accuracy": float(balanced_accuracy_score(y_true, predicted))
            if present > 1
            else float(accuracy_score(y_true, predicted)),
            "f1": float(f1_score(y_true, predicted, average="macro", labels=labels, zero_division=0)),
            "sensitivity": math.nan,
            "specificity": math.nan,
            "accuracy": float(accuracy_score(y_true, predicted)),
            "test-size": float(len(y_true)),
        }
    return {"roc-auc": auc, **values, "loss": float(log_loss(y_true, np.clip(proba, 1e-7, 1.0), labels=labels))}


def headline_metric(num_classes: int, chosen: str = "") -> str:
    """The metric a comparison leads with: ``chosen``, else ROC AUC for two classes, balanced accuracy otherwise."""
    return chosen or ("roc-auc" if num_classes == 2 else "balanced-accuracy")


def bootstrap_intervals(
    y_true: np.ndarray, proba: np.ndarray, replicates: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of every metric (test rows resampled with replacement).

    For the simulator's own evaluations only (it holds the test data): a site never computes
    or sends these. Replicates where a metric is undefined (one class drawn) are left out.
    """
    y_true = np.asarray(y_true)
    rng = np.random.default_rng(seed)
    names = [m for m in METRIC_NAMES if m != "test-size"]
    drawn: dict[str, list[float]] = {m: [] for m in names}
    for _ in range(replicates):
        rows = rng.integers(0, len(y_true), len(y_true))
        values = _fast_metrics(y_true[rows], proba[rows])
        for name in names:
            if not math.isnan(values[name]):
                drawn[name].append(values[name])
    tail = (1 - level) / 2 * 100
    return {
        name: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) if len(v) >= 10 else (math.nan,) * 2
        for name, v in drawn.items()
    }


def _fast_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """:func:`classification_metrics` without the loss, fast enough to bootstrap."""
    predicted = proba.argmax(axis=1)
    if proba.shape[1] == 2:
        positives, negatives = y_true == 1, y_true == 0
        tp, fn = float(np.sum(predicted[positives] == 1)), float(np.sum(predicted[positives] == 0))
        fp, tn = float(np.sum(predicted[negatives] == 1)), float(np.sum(predicted[negatives] == 0))
        values = _binary_rates(tp, fn, fp, tn)
        if positives.any() and negatives.any():
            ranks = rankdata(proba[:, 1])
            n1, n0 = float(positives.sum()), float(negatives.sum())
            values["roc-auc"] = float((ranks[positives].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
        else:
            values["roc-auc"] = math.nan
            values["balanced-accuracy"] = math.nan
        return values
    return {k: v for k, v in classification_metrics(y_true, proba).items() if k != "loss"}


def counts_shape(num_classes: int) -> tuple[int, int]:
    """The shape of :func:`evaluation_counts`' histogram for a model with ``num_classes`` classes."""
    return (2, len(LOGIT_EDGES) + 1) if num_classes == 2 else (num_classes, num_classes)


def evaluation_counts(y_true: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """The evaluation histogram (see the module docstring): (2, 8) for two classes, else (K, K)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    num_classes = proba.shape[1]
    if num_classes == 2:
        logit = np.log(np.clip(proba[:, 1], 1e-12, 1.0)) - np.log(np.clip(proba[:, 0], 1e-12, 1.0))
        bins = np.searchsorted(np.asarray(LOGIT_EDGES), logit, side="right")
        counts = np.zeros((2, len(LOGIT_EDGES) + 1))
        np.add.at(counts, (y_true, bins), 1.0)
        return counts
    counts = np.zeros((num_classes, num_classes))
    np.add.at(counts, (y_true, proba.argmax(axis=1)), 1.0)
    return counts


def metrics_from_counts(counts: np.ndarray) -> dict[str, float]:
    """The metrics of :data:`METRIC_NAMES` from an evaluation histogram, noisy or exact.

    Noisy counts are first clipped at 0. With two classes, ROC AUC is the Mann-Whitney
    statistic over the logit bins (records in one bin count as ties), so it is coarser than
    the exact AUC even without noise.
    """
    counts = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None)
    rows, columns = counts.shape
    if rows == 2 and columns == len(LOGIT_EDGES) + 1:
        negative, positive = counts
        threshold = LOGIT_EDGES.index(0.0) + 1  # bins from here on predict class 1
        tp, fn = positive[threshold:].sum(), positive[:threshold].sum()
        fp, tn = negative[threshold:].sum(), negative[:threshold].sum()
        below = np.concatenate([[0.0], np.cumsum(negative)[:-1]])
        auc = _safe(float(np.sum(positive * (below + 0.5 * negative))), float(positive.sum() * negative.sum()))
        return {"roc-auc": auc, **_binary_rates(tp, fn, fp, tn)}
    true_totals, predicted_totals, hits = counts.sum(axis=1), counts.sum(axis=0), np.diag(counts)
    recalls = [_safe(h, t) for h, t in zip(hits, true_totals) if t > 0]
    f1s = [_safe(2 * h, t + p) for h, t, p in zip(hits, true_totals, predicted_totals)]
    return {
        "roc-auc": math.nan,
        "balanced-accuracy": float(np.mean(recalls)) if recalls else math.nan,
        "f1": float(np.nanmean(f1s)) if not all(math.isnan(f) for f in f1s) else math.nan,
        "sensitivity": math.nan,
        "specificity": math.nan,
        "accuracy": _safe(float(hits.sum()), float(counts.sum())),
        "test-size": float(counts.sum()),
    }
