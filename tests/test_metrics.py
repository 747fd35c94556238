import numpy as np
import pytest
from sklearn.metrics import f1_score

from vitlab import metrics


def test_classification_on_known_inputs():
    labels = np.array([0, 1, 2, 2])
    logits = np.array([[3, 1, 0], [0, 1, 3], [0, 1, 2], [2, 1, 0]], dtype=float)
    m = metrics.classification(logits, labels, 3)
    assert m["top1"] == pytest.approx(0.5)  # rows 0 and 2 right
    assert m["top5"] == pytest.approx(0.75)  # 3 classes: top-2; row 3 has class 2 last
    preds = logits.argmax(1)
    assert m["f1_macro"] == pytest.approx(f1_score(labels, preds, average="macro"))
    assert m["f1_weighted"] == pytest.approx(f1_score(labels, preds, average="weighted"))


def test_confused_pairs_counts_mistakes():
    labels = np.array([0, 0, 0, 1, 2])
    preds = np.array([1, 1, 0, 1, 0])
    table = metrics.confusion_table(labels, preds, ["a", "b", "c"])
    assert table.loc["a"].tolist() == [1, 2, 0] and int(table.to_numpy().sum()) == 5  # rows true, columns predicted
    pairs = metrics.confused_pairs(table)
    assert pairs[0] == {"true": "a", "predicted": "b", "count": 2}
    assert pairs[1] == {"true": "c", "predicted": "a", "count": 1} and len(pairs) == 2


def test_latency_stats_on_a_known_list():
    s = metrics.latency_stats(list(range(1, 101)))
    assert s["mean_ms"] == pytest.approx(50.5) and s["p50_ms"] == pytest.approx(50.5)
    assert s["p95_ms"] == pytest.approx(95.05) and s["p99_ms"] == pytest.approx(99.01) and s["n"] == 100
    with pytest.raises(ValueError):
        metrics.latency_stats([])


def test_bootstrap_interval_covers_the_mean_and_narrows_with_n():
    small = np.array([1, 0] * 50)
    large = np.array([1, 0] * 5000)
    lo, hi = metrics.bootstrap_ci(small)
    assert lo < 0.5 < hi and hi - lo > 0.1
    lo2, hi2 = metrics.bootstrap_ci(large)
    assert hi2 - lo2 < (hi - lo) / 5
    diff, dlo, dhi = metrics.paired_bootstrap_diff(small, small)
    assert diff == dlo == dhi == 0


def test_kl_divergence():
    a = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    assert metrics.kl_divergence(a, a) == pytest.approx(0.0, abs=1e-12)
    assert metrics.kl_divergence(a, a + 5.0) == pytest.approx(0.0, abs=1e-12)  # shift-invariant
    p = np.exp(a[0]) / np.exp(a[0]).sum()
    expected = (p * np.log(p / (1 / 3))).sum() / 2
    assert metrics.kl_divergence(a, np.zeros_like(a)) == pytest.approx(expected)
