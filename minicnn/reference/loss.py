"""Softmax cross-entropy, fused: its gradient is simply (softmax - target) / N."""
from minicnn.backend import array_module
from minicnn.reference.activations import log_softmax, softmax


def softmax_cross_entropy(logits, labels, label_smoothing=0.0):
    """loss = -1/N sum_n sum_k q[n, k] log softmax(logits)[n, k],
    dlogits = (softmax(logits) - q) / N,  target q = (1 - eps) * onehot(labels) + eps / K
    (PyTorch's CrossEntropyLoss(label_smoothing=eps)).

    logits (N, K), labels (N,) ints in [0, K) -> (loss, a 0-d array on logits' device,
    dlogits (N, K)); float(loss) reads the loss (on a GPU, a wait for it).
    """
    xp = array_module(logits)
    n, k = logits.shape
    labels = xp.asarray(labels)                                   # on logits' device
    onehot = (labels.reshape(n, 1) == xp.arange(k)).astype(logits.dtype)   # (N, K)
    q = (1.0 - label_smoothing) * onehot + label_smoothing / k    # (N, K)
    loss = -(q * log_softmax(logits)).sum() / n
    dlogits = (softmax(logits) - q) / n                           # (N, K)
    return loss, dlogits
