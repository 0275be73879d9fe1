"""Random image augmentation like Keras's ImageDataGenerator, on NumPy or CuPy arrays.

    gen = ImageDataGenerator(rotation_range=15, width_shift_range=0.1, horizontal_flip=True,
                             fill_mode="reflect", seed=0)
    for x_batch, y_batch in gen.flow(x, y, batch_size=128):    # x (N, C, H, W); endless
        ...

Images are NCHW (Keras's data_format="channels_first"), float or integer (uint8). Each image
gets its own affine transform (rotation, shift, shear, zoom about its centre) and its own flips;
a whole batch is warped at once on its arrays' device: transform_matrices (the 3x3 matrices, on
the host) -> source_coordinates (where every output pixel samples) -> sample_bilinear (4
neighbours, gathered by index, fill_mode outside the image).

The parameters mean what they mean in Keras's apply_affine_transform
(keras/src/legacy/preprocessing/image.py), whose results tests/test_augment.py compares with:
x is the column (width) axis, y the row (height) axis, and output pixel (x, y) reads the source
point M (x, y, 1), so theta=90 is np.rot90 (counterclockwise as displayed, row 0 on top),
tx=2 moves the content 2 pixels left and zx=2 zooms out. Where Keras disagrees with itself we
follow its apply_affine_transform and the documented meaning of the ranges:
- tx (along x) is drawn from width_shift_range and ty from height_shift_range; Keras draws tx
  from the height range although it applies tx along x (keras-preprocessing #318, #348);
- rotation, shear and zoom turn about ((W-1)/2, (H-1)/2); Keras's centre is ((H-1)/2, (W-1)/2),
  the same for square images only;
- fill_mode="wrap" is periodic with period H and W (scipy's "grid-wrap"); Keras passes scipy's
  "wrap", whose first and last pixels coincide (period H-1 and W-1).
"""
import numpy as np

from minicnn.backend import array_module

FILL_MODES = ("nearest", "reflect", "wrap", "constant")
# Rounding puts the edge pixels of a rotation by 180 degrees a few 1e-16 outside the image;
# scipy's mode="constant" (and so Keras) then writes cval over them. Within this many pixels of
# the edge a point reads the edge pixel instead, so rotations by multiples of 90 are exact.
EDGE_TOLERANCE = 1e-6
IDENTITY = dict(theta=0.0, tx=0.0, ty=0.0, shear=0.0, zx=1.0, zy=1.0,
                flip_horizontal=False, flip_vertical=False)


# ---------------------------------------------------------------- the batched warp

def _affine(a, b, c, d, e, f):
    """(N, 3, 3) matrices [[a, b, c], [d, e, f], [0, 0, 1]] from (N,) arrays or scalars."""
    a, b, c, d, e, f = np.broadcast_arrays(a, b, c, d, e, f)
    zero, one = np.zeros_like(a), np.ones_like(a)
    return np.stack([a, b, c, d, e, f, zero, zero, one], axis=-1).reshape(-1, 3, 3)


def transform_matrices(params, height, width):
    """(N, 3, 3) float64 NumPy matrices, one per params dict (Keras's keys, missing ones mean
    no change), each mapping an output pixel (x, y, 1) to the source point it samples:

        M = Centre R(theta) T(tx, ty) Shear(shear) Zoom(zx, zy) Centre^-1

    the product apply_affine_transform and transform_matrix_offset_center form in Keras (theta
    and shear in degrees, tx and ty in pixels); Centre moves (0, 0) to ((W-1)/2, (H-1)/2)."""
    def values(key):
        return np.array([float(p.get(key, IDENTITY[key])) for p in params])   # (N,)
    theta, shear = np.deg2rad(values("theta")), np.deg2rad(values("shear"))
    rotation = _affine(np.cos(theta), -np.sin(theta), 0, np.sin(theta), np.cos(theta), 0)
    shift = _affine(1, 0, values("tx"), 0, 1, values("ty"))
    shearing = _affine(1, -np.sin(shear), 0, 0, np.cos(shear), 0)
    zoom = _affine(values("zx"), 0, 0, 0, values("zy"), 0)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    to_centre, from_centre = _affine(1, 0, cx, 0, 1, cy), _affine(1, 0, -cx, 0, 1, -cy)
    return to_centre @ rotation @ shift @ shearing @ zoom @ from_centre      # (N, 3, 3)


def source_coordinates(matrices, height, width):
    """matrices (N, 3, 3) on x's device -> rows, cols (N, H, W) float64: output pixel (i, j)
    of image n samples its source at (rows[n, i, j], cols[n, i, j]), where
    (cols, rows, 1) = M_n (j, i, 1)."""
    xp = array_module(matrices)
    m = matrices[:, :2, :, None, None]                    # (N, 2, 3, 1, 1)
    y = xp.arange(height, dtype=xp.float64)[:, None]      # (H, 1) output rows
    x = xp.arange(width, dtype=xp.float64)[None, :]       # (1, W) output columns
    cols = m[:, 0, 0] * x + m[:, 0, 1] * y + m[:, 0, 2]   # (N, H, W)
    rows = m[:, 1, 0] * x + m[:, 1, 1] * y + m[:, 1, 2]   # (N, H, W)
    return rows, cols


def _fill_index(i, n, fill_mode):
    """Integer positions i (any shape, possibly outside 0..n-1) -> the pixel each one reads:
    nearest clamps (a a | a b c | c c), reflect mirrors about the edges (b a | a b c | c b),
    wrap repeats (b c | a b c | a b); constant clamps too (its caller writes cval outside)."""
    xp = array_module(i)
    if fill_mode == "reflect":
        i = i % (2 * n)                                   # period 2n, as scipy's "reflect"
        return xp.where(i < n, i, 2 * n - 1 - i)
    if fill_mode == "wrap":
        return i % n
    return xp.clip(i, 0, n - 1)


def sample_bilinear(x, rows, cols, fill_mode="nearest", cval=0.0):
    """x (N, C, H, W) float, rows and cols (N, H, W) float64 -> out (N, C, H, W) in x.dtype:

        out[n, :, i, j] = (1-a)(1-b) x[n, :, r, c] + (1-a) b x[n, :, r, c+1]
                          + a (1-b) x[n, :, r+1, c] + a b x[n, :, r+1, c+1]

    with r = floor(rows[n, i, j]), a = rows[n, i, j] - r, and c, b the same for cols (scipy's
    order=1). fill_mode decides what neighbours outside the image read (_fill_index); with
    "constant", points outside [0, H-1] x [0, W-1] are cval, with no blending across the edge,
    as scipy.ndimage's mode="constant", except that points within EDGE_TOLERANCE of the edge
    count as inside."""
    xp = array_module(x)
    n, c, h, w = x.shape
    r0, c0 = xp.floor(rows), xp.floor(cols)                        # (N, H, W)
    a = (rows - r0).astype(x.dtype)[:, None]                       # (N, 1, H, W)
    b = (cols - c0).astype(x.dtype)[:, None]                       # (N, 1, H, W)
    r0, c0 = r0.astype(xp.int64), c0.astype(xp.int64)
    flat = x.reshape(-1)                                           # (N*C*H*W,)
    channel_start = (xp.arange(n * c) * (h * w)).reshape(n, c, 1, 1)   # (N, C, 1, 1)

    def pixels(r, cc):                                             # (N, H, W) -> (N, C, H, W)
        offset = _fill_index(r, h, fill_mode) * w + _fill_index(cc, w, fill_mode)
        return flat[channel_start + offset[:, None]]

    top = (1 - b) * pixels(r0, c0) + b * pixels(r0, c0 + 1)
    bottom = (1 - b) * pixels(r0 + 1, c0) + b * pixels(r0 + 1, c0 + 1)
    out = (1 - a) * top + a * bottom                               # (N, C, H, W)
    if fill_mode == "constant":
        e = EDGE_TOLERANCE
        inside = (rows >= -e) & (rows <= h - 1 + e) & (cols >= -e) & (cols <= w - 1 + e)  # (N,H,W)
        out = xp.where(inside[:, None], out, xp.asarray(cval, dtype=x.dtype))
    return out


def affine_warp(x, matrices, fill_mode="nearest", cval=0.0):
    """x (N, C, H, W) float, matrices (N, 3, 3) from transform_matrices -> (N, C, H, W): image
    n resampled through its own matrix, out[n, :, y, x] = x[n] at M_n (x, y, 1)."""
    xp = array_module(x)
    rows, cols = source_coordinates(xp.asarray(matrices), *x.shape[2:])   # (N, H, W) each
    return sample_bilinear(x, rows, cols, fill_mode, cval)


def _flip(x, flags, axis):
    """x (N, C, H, W) with the given axis reversed in the images whose flag is set."""
    flags = np.asarray(flags, dtype=bool)                          # (N,)
    if not flags.any():
        return x
    xp = array_module(x)
    return xp.where(xp.asarray(flags)[:, None, None, None], xp.flip(x, axis=axis), x)


def _check_fill_mode(fill_mode):
    if fill_mode not in FILL_MODES:
        raise ValueError(f"fill_mode must be one of {', '.join(FILL_MODES)}, got {fill_mode!r}.")


def apply_transforms(x, params, fill_mode="nearest", cval=0.0):
    """x (N, C, H, W), params a list of N dicts -> (N, C, H, W) of x's dtype: each image warped
    by its own affine transform, then flipped (exact axis reversals, after the warp as Keras
    does). Integer images are warped in float32, then rounded and clipped to their dtype."""
    _check_fill_mode(fill_mode)
    if x.ndim != 4 or len(params) != x.shape[0]:
        raise ValueError(f"apply_transforms takes images (N, C, H, W) and N params dicts, got "
                         f"shape {tuple(x.shape)} and {len(params)} dicts.")
    xp = array_module(x)
    out = x
    matrices = transform_matrices(params, *x.shape[2:])           # (N, 3, 3)
    if not (matrices == np.eye(3)).all():                          # Keras skips the identity too
        is_float = np.issubdtype(x.dtype, np.floating)
        out = affine_warp(x if is_float else x.astype(xp.float32), matrices, fill_mode, cval)
        if not is_float:
            limits = np.iinfo(x.dtype)
            out = xp.clip(xp.rint(out), limits.min, limits.max).astype(x.dtype)
    out = _flip(out, [p.get("flip_horizontal", False) for p in params], axis=3)
    out = _flip(out, [p.get("flip_vertical", False) for p in params], axis=2)
    return out.copy() if out is x else out


# ---------------------------------------------------------------- random parameters, Keras's API

def _zoom_pair(zoom_range):
    """Keras's zoom_range: z -> [1 - z, 1 + z]; a pair [lower, upper] stays as it is."""
    if isinstance(zoom_range, (int, float)):
        return [1 - zoom_range, 1 + zoom_range]
    if len(zoom_range) == 2 and all(isinstance(z, (int, float)) for z in zoom_range):
        return [zoom_range[0], zoom_range[1]]
    raise ValueError(f"zoom_range must be a number or a pair [lower, upper], got {zoom_range!r}.")


def _draw_symmetric(rng, r):
    """uniform(-r, r), or 0 without a draw when r is 0 (as Keras)."""
    return float(rng.uniform(-r, r)) if r else 0.0


def _draw_shift(rng, shift_range, size):
    """One shift in pixels along an axis of `size` pixels, drawn as Keras draws it: a float r
    gives uniform(-r, r), an int r an integer in (-r, r), a list one of its values with a random
    sign; a range below 1 is a fraction of the size, one of 1 or more is in pixels."""
    if np.all(np.asarray(shift_range) == 0):
        return 0.0
    if isinstance(shift_range, (int, np.integer)):
        shift = rng.integers(shift_range) * rng.choice([-1, 1])
    elif isinstance(shift_range, (float, np.floating)):
        shift = rng.uniform(-shift_range, shift_range)
    else:
        shift = rng.choice(shift_range) * rng.choice([-1, 1])
    return float(shift * size if np.max(shift_range) < 1 else shift)


class ImageDataGenerator:
    """Random rotations, shifts, shears, zooms and flips of NCHW images, as Keras's
    ImageDataGenerator (without its normalisation options). The ranges mean what they mean in
    Keras (see the module docstring for the axes); seed seeds the generator's own numpy
    Generator, so a seeded run draws the same transforms every time."""

    def __init__(self, rotation_range=0, width_shift_range=0.0, height_shift_range=0.0,
                 shear_range=0.0, zoom_range=0.0, horizontal_flip=False, vertical_flip=False,
                 fill_mode="nearest", cval=0.0, seed=None):
        _check_fill_mode(fill_mode)
        self.rotation_range = rotation_range          # degrees: theta ~ uniform(-r, r)
        self.width_shift_range = width_shift_range    # fraction of W (< 1) or pixels: tx
        self.height_shift_range = height_shift_range  # fraction of H (< 1) or pixels: ty
        self.shear_range = shear_range                # degrees
        self.zoom_range = _zoom_pair(zoom_range)      # [lower, upper]; zx, zy drawn apart
        self.horizontal_flip, self.vertical_flip = horizontal_flip, vertical_flip
        self.fill_mode, self.cval = fill_mode, cval
        self.rng = np.random.default_rng(seed)

    def get_random_transform(self, img_shape, seed=None):
        """A dict of random parameters (Keras's keys: theta, tx, ty, shear, zx, zy,
        flip_horizontal, flip_vertical) for an image of shape (C, H, W) (or an image itself).
        seed: an int or a numpy Generator to draw from instead of the generator's own."""
        h, w = getattr(img_shape, "shape", img_shape)[-2:]
        rng = self.rng if seed is None else np.random.default_rng(seed)
        lower, upper = self.zoom_range
        zx, zy = (1.0, 1.0) if lower == upper == 1 else rng.uniform(lower, upper, 2)
        return dict(theta=_draw_symmetric(rng, self.rotation_range),
                    tx=_draw_shift(rng, self.width_shift_range, w),
                    ty=_draw_shift(rng, self.height_shift_range, h),
                    shear=_draw_symmetric(rng, self.shear_range),
                    zx=float(zx), zy=float(zy),
                    flip_horizontal=bool(self.horizontal_flip and rng.random() < 0.5),
                    flip_vertical=bool(self.vertical_flip and rng.random() < 0.5))

    def apply_transform(self, x, transform_parameters):
        """One image (C, H, W), or every image of a batch (N, C, H, W), transformed by one
        params dict; the result has x's shape and dtype."""
        if x.ndim not in (3, 4):
            raise ValueError(f"apply_transform takes an image (C, H, W) or a batch (N, C, H, W), "
                             f"got shape {tuple(x.shape)}.")
        batch = x[None] if x.ndim == 3 else x                          # (N, C, H, W)
        params = [transform_parameters] * len(batch)
        out = apply_transforms(batch, params, self.fill_mode, self.cval)
        return out[0] if x.ndim == 3 else out

    def random_transform(self, x, seed=None):
        """x transformed by one random draw, as Keras's random_transform (x (C, H, W) or
        (N, C, H, W): a batch gets one transform for all its images)."""
        return self.apply_transform(x, self.get_random_transform(x.shape, seed))

    def flow(self, x, y=None, batch_size=32, shuffle=True, seed=None):
        """Endless batches of (x_batch, y_batch) (x_batch alone when y is None), each image with
        its own random transform; see NumpyArrayIterator."""
        return NumpyArrayIterator(x, y, self, batch_size=batch_size, shuffle=shuffle, seed=seed)


class NumpyArrayIterator:
    """Batches of randomly transformed images from x (N, C, H, W) (NumPy or CuPy) and labels y,
    as Keras's NumpyArrayIterator: iterating never stops (a new epoch, reshuffled when shuffle,
    starts after the last, possibly partial, batch), len() is the number of batches per epoch,
    and it[i] is batch i of the current epoch's order. Images keep their dtype and device.
    seed: an int for this iterator's own Generator (order and transforms); None shares the
    ImageDataGenerator's."""

    def __init__(self, x, y, image_data_generator, batch_size=32, shuffle=True, seed=None):
        if x.ndim != 4 or len(x) == 0:
            raise ValueError(f"flow takes a non-empty batch of images (N, C, H, W), got shape "
                             f"{tuple(x.shape)}.")
        if y is not None and len(y) != len(x):
            raise ValueError(f"flow takes as many labels as images, got {len(y)} labels for "
                             f"{len(x)} images.")
        if y is not None and not hasattr(y, "shape"):
            y = np.asarray(y)                                             # a list of labels
        self.x, self.y = x, y
        self.image_data_generator = image_data_generator
        self.n, self.batch_size, self.shuffle = len(x), batch_size, shuffle
        self.rng = image_data_generator.rng if seed is None else np.random.default_rng(seed)
        self.index_array = None          # this epoch's order of the images, (N,)
        self.batch_index = 0             # the batch next() returns

    def __len__(self):
        return -(-self.n // self.batch_size)

    def on_epoch_end(self):
        """Draw a new order of the images (a permutation when shuffle)."""
        self.index_array = self.rng.permutation(self.n) if self.shuffle else np.arange(self.n)

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} asked for, but an epoch has {len(self)} batches.")
        if self.index_array is None:
            self.on_epoch_end()
        return self._batch(self.index_array[i * self.batch_size:(i + 1) * self.batch_size])

    def __iter__(self):
        return self

    def __next__(self):
        if self.batch_index == 0:
            self.on_epoch_end()
        i = self.batch_index
        self.batch_index = (i + 1) % len(self)
        return self._batch(self.index_array[i * self.batch_size:(i + 1) * self.batch_size])

    def _batch(self, index):
        """The images at index (a NumPy int array), each randomly transformed, and their labels."""
        gen = self.image_data_generator
        x = self.x[array_module(self.x).asarray(index)]                   # (B, C, H, W)
        params = [gen.get_random_transform(x.shape[1:], self.rng) for _ in index]
        x = apply_transforms(x, params, gen.fill_mode, gen.cval)
        return x if self.y is None else (x, self.y[array_module(self.y).asarray(index)])


# ---------------------------------------------------------------- the command line's spec

TRAINER_WORDS = ("crop", "flip", "cutout")     # the trainer's own augmentation, not ours
_SPEC_KEYS = {"rotation": ("rotation_range",), "shift": ("width_shift_range", "height_shift_range"),
              "wshift": ("width_shift_range",), "hshift": ("height_shift_range",),
              "shear": ("shear_range",), "zoom": ("zoom_range",), "cval": ("cval",)}
_SPEC_HELP = ("rotation=DEG, shift=F, wshift=F, hshift=F, shear=DEG, zoom=F, hflip, vflip, "
              "fill=nearest|reflect|wrap|constant, cval=V, crop, flip, cutout")


def _number(text):
    """"15" -> 15 (an int: Keras reads an int shift range as whole pixels), "0.1" -> 0.1;
    ValueError for anything else, nan and inf included."""
    try:
        return int(text)
    except ValueError:
        value = float(text)
    if not np.isfinite(value):
        raise ValueError(text)
    return value


def _spec_part(part):
    """One part of a spec -> the ImageDataGenerator kwargs it sets; ValueError if unreadable."""
    key, _, value = part.partition("=")
    if part in ("hflip", "vflip"):
        return {"horizontal_flip" if part == "hflip" else "vertical_flip": True}
    if key == "fill" and value in FILL_MODES:
        return {"fill_mode": value}
    if key in _SPEC_KEYS and value:
        return dict.fromkeys(_SPEC_KEYS[key], _number(value))   # ValueError if not a number
    raise ValueError(part)


def parse_spec(spec):
    """"rotation=15+shift=0.1+hflip+fill=reflect+crop" -> (ImageDataGenerator kwargs, the
    trainer's words): ({"rotation_range": 15, "width_shift_range": 0.1, "height_shift_range":
    0.1, "horizontal_flip": True, "fill_mode": "reflect"}, ["crop"]). "none" or "" is
    ({}, []). Raises ValueError naming the part it cannot read."""
    kwargs, words = {}, []
    for part in [] if spec in ("none", "") else spec.split("+"):
        if part in TRAINER_WORDS:
            words += [] if part in words else [part]
            continue
        try:
            new = _spec_part(part)
        except ValueError:
            raise ValueError(f"Cannot read {part!r} in the augmentation {spec!r}: use "
                             f"{_SPEC_HELP}, joined by '+'.") from None
        if kwargs.keys() & new.keys():
            raise ValueError(f"{part!r} sets {', '.join(sorted(kwargs.keys() & new.keys()))} a "
                             f"second time in the augmentation {spec!r}.")
        kwargs.update(new)
    return kwargs, words
