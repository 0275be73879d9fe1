"""Classification metrics: top-k accuracy, the confusion matrix and per-class scores.

Plain NumPy functions on host arrays (move CuPy arrays over with ``.get()`` first).
N is the number of samples and K the number of classes throughout.
"""
import numpy as np

from minicnn.datasets.loading import printable


def topk_accuracy(scores, labels, k):
    """Fraction of samples whose label is among the k highest scores.

    scores: (N, K) logits or probabilities (any monotone map of them gives the same result).
    labels: (N,) integer class indices in [0, K).
    Ties rank the lower class index first (a stable argsort of the negated scores), which
    agrees with ``argmax`` for k = 1; a tie at the k-th place can therefore count as a miss.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    n, num_classes = scores.shape
    if n == 0:
        raise ValueError("topk_accuracy needs at least one sample, got none.")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match scores {scores.shape}, "
                         f"got {labels.shape}.")
    if not 1 <= k <= num_classes:
        raise ValueError(f"k must be between 1 and the number of classes {num_classes}, got {k}.")
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]      # (N, k)
    hits = (top == labels[:, None]).any(axis=1)                   # (N,)
    return float(hits.mean())


def confusion_matrix(y_true, y_pred, num_classes):
    """Counts of (true class, predicted class) pairs.

    y_true, y_pred: (N,) integer class indices in [0, num_classes).
    Returns int64 (K, K): row i, column j counts samples of class i predicted as j,
    so the rows sum to each class's support and the whole matrix to N.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D and of one length, "
                         f"got shapes {y_true.shape} and {y_pred.shape}.")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (not np.issubdtype(y.dtype, np.integer)
                       or y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} must hold integer class indices in [0, {num_classes}).")
    pair = y_true.astype(np.int64) * num_classes + y_pred.astype(np.int64)   # (N,) flat (i, j)
    counts = np.bincount(pair, minlength=num_classes * num_classes)   # (K*K,)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def _safe_divide(numerator, denominator):
    """numerator / denominator elementwise, 0.0 where the denominator is 0."""
    out = np.zeros(numerator.shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def per_class_metrics(confusion):
    """Precision, recall, F1 and support of each class from a (K, K) confusion matrix.

    precision = TP / (TP + FP)   (column j: everything predicted as j)
    recall    = TP / (TP + FN)   (row i: everything that truly is i)
    f1        = 2 TP / (2 TP + FP + FN), the harmonic mean of precision and recall
    A zero denominator gives 0.0, as scikit-learn's ``zero_division=0`` does.
    Returns a dict of (K,) arrays: float64 precision, recall, f1 and int64 support.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    tp = np.diag(confusion)                                      # (K,)
    predicted = confusion.sum(axis=0)                            # (K,) TP + FP
    support = confusion.sum(axis=1)                              # (K,) TP + FN
    return {
        "precision": _safe_divide(tp, predicted),
        "recall": _safe_divide(tp, support),
        "f1": _safe_divide(2 * tp, predicted + support),
        "support": support,
    }


def classification_report(logits, labels, class_names):
    """Every metric of a classifier's outputs, as a JSON-serialisable dict.

    logits: (N, K) scores; labels: (N,) true class indices; class_names: K strings.
    Keys: "top1", "top5" (top-min(5, K) accuracy), "num_samples", "classes",
    "per_class" {name: {"precision", "recall", "f1", "support"}}, "macro_avg" (the
    unweighted mean over the classes that occur among the labels or the predictions, as
    scikit-learn's classification_report; support = N) and "confusion"
    (K lists of K ints, rows = true class). Predictions are ``argmax`` (first on ties).
    Class names appear as ``loading.printable`` shows them: one printable line each (bytes of
    a folder name that are not UTF-8 as \\xNN, a newline as \\n; printable names as they are),
    so the report prints and writes as valid UTF-8 JSON whatever the names.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    num_classes = logits.shape[1]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names given for {num_classes} classes.")
    confusion = confusion_matrix(labels, logits.argmax(axis=1), num_classes)   # (K, K)
    scores = per_class_metrics(confusion)
    names = [printable(name) for name in class_names]           # printable, valid text
    per_class = {
        name: {"precision": float(scores["precision"][i]), "recall": float(scores["recall"][i]),
               "f1": float(scores["f1"][i]), "support": int(scores["support"][i])}
        for i, name in enumerate(names)
    }
    # A class that neither occurs nor is predicted (evaluating on a subset of the classes) has
    # no precision or recall to speak of: it would pull the averages down with zeros.
    seen = (scores["support"] > 0) | (confusion.sum(axis=0) > 0)              # (K,)
    if not seen.any():                                                        # no samples
        seen[:] = True
    return {
        "top1": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, min(5, num_classes)),
        "num_samples": int(labels.shape[0]),
        "classes": names,
        "per_class": per_class,
        "macro_avg": {"precision": float(scores["precision"][seen].mean()),
                      "recall": float(scores["recall"][seen].mean()),
                      "f1": float(scores["f1"][seen].mean()),
                      "support": int(scores["support"].sum())},
        "confusion": confusion.tolist(),
    }


def _abbreviate(name, width):
    """name cut to at most width characters, a trailing '.' marking a cut."""
    return name if len(name) <= width else name[:width - 1] + "."


def format_report(report, name_width=20):
    """A fixed-width text table of a ``classification_report`` dict.

    The per-class table follows scikit-learn's layout; class names longer than name_width,
    and confusion-matrix headers longer than a column, are abbreviated with a trailing '.'.
    """
    names = report["classes"]
    label_width = max([len("macro avg")] + [len(_abbreviate(n, name_width)) for n in names])
    header = f"{'':>{label_width}}  {'precision':>9}  {'recall':>9}  {'f1-score':>9}  {'support':>9}"

    def row(label, m):
        return (f"{_abbreviate(label, name_width):>{label_width}}  {m['precision']:>9.2f}  "
                f"{m['recall']:>9.2f}  {m['f1']:>9.2f}  {m['support']:>9d}")

    lines = [header, ""]
    lines += [row(name, report["per_class"][name]) for name in names]
    lines += ["", row("macro avg", report["macro_avg"]), ""]
    k5 = min(5, len(names))
    lines.append(f"top-1 accuracy: {report['top1']:.4f}")
    lines.append(f"top-{k5} accuracy: {report['top5']:.4f}")
    lines.append(f"samples: {report['num_samples']}")

    confusion = report["confusion"]
    largest = max((count for r in confusion for count in r), default=0)
    cell = max(5, len(str(largest)))
    lines += ["", "confusion matrix (rows = true class, columns = predicted):"]
    lines.append(" " * label_width + "".join(f" {_abbreviate(n, cell):>{cell}}" for n in names))
    for name, counts in zip(names, confusion):
        lines.append(f"{_abbreviate(name, name_width):>{label_width}}"
                     + "".join(f" {c:>{cell}d}" for c in counts))
    return "\n".join(lines)
