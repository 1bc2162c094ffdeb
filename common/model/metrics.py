"""Classification metrics reported by sites and baselines."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, log_loss, roc_auc_score

METRIC_NAMES = ("accuracy", "balanced-accuracy", "f1", "roc-auc", "loss")


def classification_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, F1, ROC AUC and cross-entropy of ``proba`` against ``y_true``.

    F1 is for the positive class (index 1) with two classes, macro-averaged otherwise.
    ROC AUC is NaN when the labels hold a single class (it is undefined there).
    """
    num_classes = proba.shape[1]
    labels = list(range(num_classes))
    predicted = proba.argmax(axis=1)
    binary = num_classes == 2
    if len(np.unique(y_true)) < 2:
        auc = math.nan
    elif binary:
        auc = float(roc_auc_score(y_true, proba[:, 1]))
    else:
        auc = float(roc_auc_score(y_true, proba, multi_class="ovr", labels=labels))
    return {
        "accuracy": float(accuracy_score(y_true, predicted)),
        "balanced-accuracy": float(balanced_accuracy_score(y_true, predicted)) if len(np.unique(y_true)) > 1 else float(accuracy_score(y_true, predicted)),
        "f1": float(f1_score(y_true, predicted, average="binary" if binary else "macro", labels=labels, zero_division=0)),
        "roc-auc": auc,
        "loss": float(log_loss(y_true, np.clip(proba, 1e-7, 1.0), labels=labels)),
    }
