"""The fully connected layer: one matrix product. (The fast version, minicnn.ops.basic, is the
same code: there is nothing to speed up that BLAS does not already.)"""


def dense_forward(x, w, b):
    """y = x @ w^T + b

    x (N, IN), w (OUT, IN), b (OUT,) or None -> y (N, OUT). cache: x and w.
    """
    y = x @ w.T                                                   # (N, OUT)
    if b is not None:
        y = y + b                                                 # b broadcast over rows
    return y, (x, w)


def dense_backward(dy, cache, input_grad=True, weight_grad=True):
    """dx = dy @ w,  dw = dy^T @ x,  db = sum_n dy

    dy (N, OUT) -> dx (N, IN) (None when input_grad=False), dw (OUT, IN), db (OUT,) (both
    None when weight_grad=False: a frozen layer).
    db is returned with or without a bias, as the fast version (the layer ignores it then).
    """
    x, w = cache
    dx = dy @ w if input_grad else None                           # (N, IN)
    if not weight_grad:
        return dx, None, None
    dw = dy.T @ x                                                 # (OUT, IN)
    db = dy.sum(axis=0)                                           # (OUT,)
    return dx, dw, db
