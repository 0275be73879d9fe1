"""ReLU, softmax and dropout: elementwise maps and their derivatives.

The fast versions (minicnn.ops.basic) compute the same values, ReLU on workers a range of the
batch each, into arrays that keep the input's memory order.
"""
from minicnn.backend import array_module


def relu_forward(x, training=True):
    """y = max(x, 0), any shape. cache: the mask x > 0 only (None when not training)."""
    mask = x > 0                                                  # x's shape, bool
    return x * mask, (mask if training else None)


def relu_backward(dy, mask):
    """dx = dy where the input was positive, else 0."""
    return dy * mask


def softmax(z):
    """p[n, k] = exp(z[n, k]) / sum_j exp(z[n, j]).  z (N, K) -> p (N, K), rows summing to 1.

    Subtracting each row's max first changes nothing but keeps exp() from overflowing.
    """
    xp = array_module(z)
    e = xp.exp(z - z.max(axis=1, keepdims=True))                  # (N, K)
    return e / e.sum(axis=1, keepdims=True)


def log_softmax(z):
    """log p[n, k] = z[n, k] - log sum_j exp(z[n, j]).  z (N, K) -> (N, K), stable."""
    xp = array_module(z)
    z = z - z.max(axis=1, keepdims=True)                          # (N, K), max 0 per row
    return z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))


def softmax_backward(dy, y):
    """dz = y * (dy - sum_k dy_k y_k): the softmax Jacobian diag(y) - y y^T applied to dy.

    dy, y (N, K) -> dz (N, K); y is the forward's output (its cache).
    """
    return y * (dy - (dy * y).sum(axis=1, keepdims=True))


def dropout_forward(x, p, rng, first=0):
    """Inverted dropout, as PyTorch: y = x * keep / (1 - p), keep ~ Bernoulli(1 - p).

    x (N, ...), p in [0, 1] (p >= 1 drops everything), rng a numpy Generator; first: the index
    of x[0] in the whole batch when x is a part of it (a data-parallel worker's), else 0.
    Image n's mask comes from its own generator, image_generators(rng, N, first)[n], drawn on
    the CPU as the fast version draws it (the same rng gives the same mask) and moved to x's
    device. cache: the scaled mask keep / (1 - p), x's shape and dtype.
    """
    xp = array_module(x)
    keep = [image_rng.random(x.shape[1:], dtype="float32") >= p    # image n's, bool, host
            for image_rng in image_generators(rng, len(x), first)]
    scale = 0.0 if p >= 1 else 1.0 / (1.0 - p)
    mask = xp.asarray(keep, dtype=x.dtype).reshape(x.shape) * x.dtype.type(scale)  # x's device
    return x * mask, mask


def image_generators(rng, count, first=0):
    """Dropout's seeding rule: [the Generator of the mask of image first + i, for i < count]:
    one seed drawn from rng a call, then image b's own generator, of rng's kind, seeded with
    [seed, b] (np.random.default_rng([seed, b]) when rng is a default_rng).

    Why one an image, keyed by its place b in the whole batch: a batch split over workers
    (minicnn.parallel.data_parallel), each part drawing from a copy of rng and passing its
    first image's index, then gets exactly the masks one model draws on the whole batch, with
    any number of workers; and rng alone (which a training checkpoint saves) still decides every
    mask, so a resumed run is bitwise the one that was not stopped.
    """
    seed = int(rng.integers(2**63))
    generator, bit_generator = type(rng), type(rng.bit_generator)   # default_rng: PCG64
    return [generator(bit_generator([seed, first + i])) for i in range(count)]


def dropout_backward(dy, mask):
    """dx = dy * keep / (1 - p): the forward's scaled mask."""
    return dy * mask
