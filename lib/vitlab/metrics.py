"""Accuracy, F1, confusions, latency statistics, bootstrap intervals and logit divergence."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
from scipy.special import log_softmax
from sklearn.metrics import confusion_matrix, f1_score, top_k_accuracy_score

if TYPE_CHECKING:
    import pandas as pd


def classification(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """top-1 / top-5 accuracy and macro / weighted F1 (scikit-learn)."""
    classes = np.arange(num_classes)
    preds = logits.argmax(1)
    k = min(5, num_classes - 1) if num_classes > 2 else 1
    return {
        "n": int(len(labels)),
        "top1": float(top_k_accuracy_score(labels, logits, k=1, labels=classes)),
        "top5": float(top_k_accuracy_score(labels, logits, k=k, labels=classes)),
        "f1_macro": float(f1_score(labels, preds, average="macro", labels=classes, zero_division=0)),
        "f1_weighted": float(f1_score(labels, preds, average="weighted", labels=classes, zero_division=0)),
    }


def confusion_table(labels: np.ndarray, preds: np.ndarray, class_names: Sequence[str]) -> "pd.DataFrame":
    """The full confusion matrix: rows are true classes, columns predicted ones, both by name."""
    import pandas as pd

    cm = confusion_matrix(labels, preds, labels=np.arange(len(class_names)))
    return pd.DataFrame(cm, index=pd.Index(class_names, name="true"), columns=pd.Index(class_names, name="predicted"))


def confused_pairs(table: "pd.DataFrame", n: int = 5) -> list[dict]:
    """The n most frequent (true, predicted) mistakes of a `confusion_table`."""
    class_names = list(table.index)
    cm = table.to_numpy().copy()
    np.fill_diagonal(cm, 0)
    order = np.argsort(cm, axis=None)[::-1][:n]
    pairs = []
    for flat in order:
        t, p = np.unravel_index(flat, cm.shape)
        if cm[t, p] == 0:
            break
        pairs.append({"true": class_names[t], "predicted": class_names[p], "count": int(cm[t, p])})
    return pairs


def latency_stats(ms: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation and percentiles (linear interpolation) of latencies in milliseconds."""
    a = np.asarray(ms, dtype=float)
    if a.size == 0:
        raise ValueError("latency_stats needs at least one timing")
    return {"mean_ms": float(a.mean()), "std_ms": float(a.std()), "p50_ms": float(np.percentile(a, 50)),
            "p95_ms": float(np.percentile(a, 95)), "p99_ms": float(np.percentile(a, 99)),
            "min_ms": float(a.min()), "n": int(a.size)}


def bootstrap_ci(correct: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-image values (top-1 hits as 0/1, KL in nats)."""
    rng = np.random.default_rng(seed)
    correct = np.asarray(correct, dtype=float)
    means = rng.choice(correct, size=(n_boot, correct.size), replace=True).mean(1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def paired_bootstrap_diff(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0,
                          level: float = 0.95) -> tuple[float, float, float]:
    """Mean of a - b and its percentile bootstrap interval, resampling the same images for both."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    diffs = a[idx].mean(1) - b[idx].mean(1)
    tail = (1 - level) / 2 * 100
    return float(a.mean() - b.mean()), float(np.percentile(diffs, tail)), float(np.percentile(diffs, 100 - tail))


def kl_per_image(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(logits)) in nats, per image: how far a variant's predictions drift."""
    log_p = log_softmax(ref_logits.astype(np.float64), axis=1)
    log_q = log_softmax(logits.astype(np.float64), axis=1)
    return (np.exp(log_p) * (log_p - log_q)).sum(1)


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL over the images (see kl_per_image)."""
    return float(kl_per_image(ref_logits, logits).mean())
