"""Slow, obvious nested-loop implementations: the specification the fast paths must match."""
import numpy as np


def conv2d_reference(x, w, b, stride, padding):
    """x (N,C,H,W), w (F,C,KH,KW), b (F,) or None, stride (sh,sw), padding ((t,b),(l,r))."""
    (pt, pb), (pl, pr) = padding
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    n, c, h, wd = xp.shape
    f, _, kh, kw = w.shape
    sh, sw = stride
    oh, ow = (h - kh) // sh + 1, (wd - kw) // sw + 1
    out = np.zeros((n, f, oh, ow), dtype=x.dtype)
    for i in range(n):
        for o in range(f):
            for r in range(oh):
                for s in range(ow):
                    patch = xp[i, :, r * sh:r * sh + kh, s * sw:s * sw + kw]
                    out[i, o, r, s] = (patch * w[o]).sum() + (b[o] if b is not None else 0)
    return out


def pool2d_reference(x, kernel, stride, reduce):
    """reduce: np.max or np.mean over each window."""
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
