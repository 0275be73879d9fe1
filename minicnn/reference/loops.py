"""Slow, obvious nested-loop convolution and pooling: the specification the array code (the
reference and the fast paths) must match. NumPy only; one output value per loop iteration."""
import numpy as np


def conv2d_loops(x, w, b, stride, padding):
    """out[n, f, oh, ow] = sum_{c,i,j} w[f, c, i, j] * xpad[n, c, sh*oh + i, sw*ow + j] + b[f]

    x (N,C,H,W), w (F,C,KH,KW), b (F,) or None, stride (sh,sw), padding ((t,b),(l,r)).
    """
    (pt, pb), (pl, pr) = padding
    xpad = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    n, c, h, wd = xpad.shape
    f, _, kh, kw = w.shape
    sh, sw = stride
    oh, ow = (h - kh) // sh + 1, (wd - kw) // sw + 1
    out = np.zeros((n, f, oh, ow), dtype=x.dtype)
    for i in range(n):
        for o in range(f):
            for r in range(oh):
                for s in range(ow):
                    patch = xpad[i, :, r * sh:r * sh + kh, s * sw:s * sw + kw]
                    out[i, o, r, s] = (patch * w[o]).sum() + (b[o] if b is not None else 0)
    return out


def pool2d_loops(x, kernel, stride, reduce):
    """out[n, c, oh, ow] = reduce(x[n, c, sh*oh:sh*oh + KH, sw*ow:sw*ow + KW]);
    reduce: np.max or np.mean over each window."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw) = kernel, stride
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    out = np.zeros((n, c, oh, ow), dtype=x.dtype)
    for i in range(n):
        for ch in range(c):
            for r in range(oh):
                for s in range(ow):
                    out[i, ch, r, s] = reduce(x[i, ch, r * sh:r * sh + kh, s * sw:s * sw + kw])
    return out
