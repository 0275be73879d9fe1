import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minicnn.training.metrics import (classification_report, confusion_matrix, format_report,
                             per_class_metrics, topk_accuracy)

# A 3-class example worked by hand.
#   true 0: predicted 0, 1, 0      -> row [2, 1, 0]
#   true 1: predicted 1, 2         -> row [0, 1, 1]
#   true 2: predicted 2, 2, 0, 0   -> row [2, 0, 2]
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
Y_PRED = np.array([0, 1, 0, 1, 2, 2, 2, 0, 0])
CONFUSION = [[2, 1, 0],
             [0, 1, 1],
             [2, 0, 2]]
# TP = (2, 1, 2); predicted (column sums) = (4, 2, 3); support (row sums) = (3, 2, 4).
PRECISION = [2 / 4, 1 / 2, 2 / 3]
RECALL = [2 / 3, 1 / 2, 2 / 4]
F1 = [4 / 7, 1 / 2, 4 / 7]          # 2 TP / (2 TP + FP + FN) = 4/7, 2/4, 4/7
NAMES = ["cat", "dog", "horse"]


def one_hot_logits(y_pred, num_classes):
    """Logits whose argmax is y_pred, with a distinct runner-up so top-k is well defined."""
    logits = np.tile(np.linspace(0.0, 0.1, num_classes), (len(y_pred), 1))   # (N, K)
    logits[np.arange(len(y_pred)), y_pred] = 5.0
    return logits


def naive_confusion(y_true, y_pred, num_classes):
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    for i in range(num_classes):
        for j in range(num_classes):
            counts[i, j] = np.sum((y_true == i) & (y_pred == j))
    return counts


def test_confusion_matrix_by_hand():
    confusion = confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert confusion.dtype == np.int64
    np.testing.assert_array_equal(confusion, CONFUSION)
    assert confusion.sum() == len(Y_TRUE)


def test_confusion_matrix_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)


def test_per_class_metrics_by_hand():
    m = per_class_metrics(np.array(CONFUSION))
    np.testing.assert_allclose(m["precision"], PRECISION)
    np.testing.assert_allclose(m["recall"], RECALL)
    np.testing.assert_allclose(m["f1"], F1)
    np.testing.assert_array_equal(m["support"], [3, 2, 4])


def test_per_class_metrics_zero_division_gives_zero_without_warnings():
    # Class 1 is never predicted (precision 0/0); class 2 never occurs and is never predicted.
    confusion = np.array([[3, 0, 0],
                          [2, 0, 0],
                          [0, 0, 0]])
    with np.errstate(all="raise"):
        m = per_class_metrics(confusion)
    np.testing.assert_allclose(m["precision"], [3 / 5, 0.0, 0.0])
    np.testing.assert_allclose(m["recall"], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(m["f1"], [6 / 8, 0.0, 0.0])
    np.testing.assert_array_equal(m["support"], [3, 2, 0])


def test_topk_accuracy_by_hand():
    scores = np.array([[0.1, 0.7, 0.2],      # ranking 1, 2, 0
                       [0.5, 0.3, 0.2],      # ranking 0, 1, 2
                       [0.2, 0.3, 0.5],      # ranking 2, 1, 0
                       [0.6, 0.1, 0.3]])     # ranking 0, 2, 1
    labels = np.array([1, 1, 0, 1])
    assert topk_accuracy(scores, labels, 1) == pytest.approx(1 / 4)
    assert topk_accuracy(scores, labels, 2) == pytest.approx(2 / 4)
    assert topk_accuracy(scores, labels, 3) == 1.0


def test_topk_accuracy_ties_rank_the_lower_class_first():
    scores = np.array([[1.0, 1.0, 0.0]])
    assert topk_accuracy(scores, np.array([0]), 1) == 1.0
    assert topk_accuracy(scores, np.array([1]), 1) == 0.0
    assert topk_accuracy(scores, np.array([1]), 2) == 1.0


@pytest.mark.parametrize("k", [0, 4])
def test_topk_accuracy_rejects_k_outside_1_to_K(k):
    with pytest.raises(ValueError, match="k must be"):
        topk_accuracy(np.zeros((2, 3)), np.array([0, 1]), k)


def test_classification_report_values_and_json():
    report = classification_report(one_hot_logits(Y_PRED, 3), Y_TRUE, NAMES)
    decoded = json.loads(json.dumps(report))
    assert decoded == report
    assert report["classes"] == NAMES
    assert report["num_samples"] == 9
    assert report["top1"] == pytest.approx(5 / 9)         # trace of CONFUSION / N
    assert report["top5"] == 1.0                          # top-min(5, K) = top-3 of 3 classes
    assert report["confusion"] == CONFUSION
    for i, name in enumerate(NAMES):
        assert report["per_class"][name] == pytest.approx(
            {"precision": PRECISION[i], "recall": RECALL[i], "f1": F1[i],
             "support": int(np.sum(Y_TRUE == i))})
    assert report["macro_avg"] == pytest.approx(
        {"precision": np.mean(PRECISION), "recall": np.mean(RECALL), "f1": np.mean(F1),
         "support": 9})


def test_macro_average_leaves_out_classes_neither_present_nor_predicted():
    # three of five classes occur; class 3 is predicted once but absent, class 4 neither
    y_true, y_pred = np.array([0, 0, 1, 2, 2]), np.array([0, 3, 1, 2, 2])
    report = classification_report(one_hot_logits(y_pred, 5), y_true, list("abcde"))
    assert report["per_class"]["e"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    precision, recall = [1.0, 1.0, 1.0, 0.0], [0.5, 1.0, 1.0, 0.0]    # classes a, b, c, d
    assert report["macro_avg"]["precision"] == pytest.approx(np.mean(precision))
    assert report["macro_avg"]["recall"] == pytest.approx(np.mean(recall))


def test_classification_report_top5_on_many_classes():
    labels = np.arange(10)
    logits = np.tile(-np.arange(10.0), (10, 1))            # every row ranks 0, 1, ..., 9
    report = classification_report(logits, labels, [f"c{i}" for i in range(10)])
    assert report["top1"] == pytest.approx(1 / 10)
    assert report["top5"] == pytest.approx(5 / 10)


def test_format_report_shows_names_numbers_and_confusion():
    names = ["cat", "dog", "a_remarkably_long_class_name"]
    text = format_report(classification_report(one_hot_logits(Y_PRED, 3), Y_TRUE, names))
    lines = text.splitlines()
    assert "a_remarkably_long_class_name" not in text       # abbreviated to fit
    assert "a_remarkably_long_c." in text                   # row label, 20 characters
    assert lines[-4].split() == ["cat", "dog", "a_re."]     # confusion header, 5 characters
    assert "top-1 accuracy: 0.5556" in text
    assert "top-3 accuracy: 1.0000" in text
    assert lines[2].split() == ["cat", "0.50", "0.67", "0.57", "3"]   # after header and blank
    macro = next(line for line in lines if "macro avg" in line)
    assert macro.split() == ["macro", "avg", "0.56", "0.56", "0.55", "9"]
    assert [line.split()[-3:] for line in lines[-3:]] == [[str(c) for c in r] for r in CONFUSION]
    assert lines[-3].split()[0] == "cat"
    assert max(len(line) for line in lines) <= 80


labelled = st.integers(1, 8).flatmap(lambda k: st.tuples(
    st.just(k),
    st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), min_size=1, max_size=60)))


@settings(max_examples=200, deadline=None)
@given(labelled)
def test_confusion_matches_naive_loop_and_macro_metrics_are_in_unit_interval(case):
    num_classes, pairs = case
    y_true, y_pred = (np.array(column) for column in zip(*pairs))
    confusion = confusion_matrix(y_true, y_pred, num_classes)
    np.testing.assert_array_equal(confusion, naive_confusion(y_true, y_pred, num_classes))
    assert confusion.sum() == len(pairs)

    report = classification_report(one_hot_logits(y_pred, num_classes), y_true,
                                   [str(i) for i in range(num_classes)])
    for key in ("precision", "recall", "f1"):
        assert 0.0 <= report["macro_avg"][key] <= 1.0
    assert report["top1"] == pytest.approx(np.trace(confusion) / len(pairs))
    assert report["top1"] <= report["top5"]
