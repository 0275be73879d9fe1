"""Losses: callables (logits, labels) -> (mean loss, dlogits). The loss is a 0-d array on logits'
device (a NumPy scalar on the CPU): reading it, float(loss), waits for a GPU, so fit does that
only when it shows or hands out numbers."""
from minicnn import implementation
from minicnn.backend import array_module


class SoftmaxCrossEntropy:
    """Softmax followed by cross-entropy, fused: the gradient is simply softmax(z) - target.

    label_smoothing: eps in [0, 1); the target is (1 - eps) * onehot + eps / K, as PyTorch's
    CrossEntropyLoss(label_smoothing=eps). Stable for logits of any magnitude (log-sum-exp).
    """

    def __init__(self, label_smoothing=0.0):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.label_smoothing = label_smoothing

    def __call__(self, logits, labels):
        """logits (N, K) float, labels (N,) ints in [0, K), on the host or logits' device
        -> (loss, dlogits (N, K)). Labels on the host are checked there (no wait for a GPU),
        then moved to logits' device."""
        if getattr(logits, "ndim", None) != 2:
            raise ValueError(f"SoftmaxCrossEntropy expects logits of shape (N, K), got "
                             f"{getattr(logits, 'shape', type(logits).__name__)}.")
        if getattr(labels, "shape", None) != logits.shape[:1] or labels.dtype.kind not in "iu":
            raise ValueError(f"SoftmaxCrossEntropy expects integer labels of shape "
                             f"({logits.shape[0]},), got {getattr(labels, 'shape', labels)!r} "
                             f"of {getattr(labels, 'dtype', type(labels).__name__)}.")
        if logits.shape[0] == 0:
            raise ValueError("SoftmaxCrossEntropy got an empty batch (N = 0); its mean loss is "
                             "undefined.")
        if bool(((labels < 0) | (labels >= logits.shape[1])).any()):   # device labels: one wait
            raise ValueError(f"SoftmaxCrossEntropy labels must lie in [0, {logits.shape[1]}), got "
                             f"values from {int(labels.min())} to {int(labels.max())}.")
        fns = implementation.ops_for(logits)         # minicnn.reference or minicnn.ops
        return fns.softmax_cross_entropy(logits, array_module(logits).asarray(labels),
                                         self.label_smoothing)

    def __repr__(self):
        return f"SoftmaxCrossEntropy(label_smoothing={self.label_smoothing})"
