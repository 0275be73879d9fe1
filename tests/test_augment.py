"""Tests for minicnn.augment: the batched affine warp against np.rot90, flips and Keras's own
computation (scipy.ndimage.affine_transform, as keras apply_affine_transform calls it), the
random parameters, flow, the device path and parse_spec."""
import ast
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st
from scipy import ndimage

from minicnn import augment
from minicnn.augment import (FILL_MODES, IDENTITY, ImageDataGenerator, affine_warp,
                             apply_transforms, parse_spec)
from minicnn.backend import array_module, to_numpy


# ---------------------------------------------------------------- Keras's computation

def keras_matrix(params, h, w):
    """scipy's (matrix (2, 2), offset (2,)) in (row, col) coordinates for a channels-first
    image, built line by line as Keras's apply_affine_transform builds it
    (keras/src/legacy/preprocessing/image.py), with one change marked below."""
    theta, shear = np.deg2rad(params["theta"]), np.deg2rad(params["shear"])
    m = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0],
                  [0, 0, 1]])
    m = m @ np.array([[1, 0, params["tx"]], [0, 1, params["ty"]], [0, 0, 1]])
    m = m @ np.array([[1, -np.sin(shear), 0], [0, np.cos(shear), 0], [0, 0, 1]])
    m = m @ np.array([[params["zx"], 0, 0], [0, params["zy"], 0], [0, 0, 1]])
    # transform_matrix_offset_center(m, x, y). Keras passes (h, w), which after its x/y swap
    # below centres x at (H-1)/2: right for square images only. minicnn turns about the image's
    # centre, so here (w, h); for square images this line is Keras's.
    o_x, o_y = w / 2 - 0.5, h / 2 - 0.5
    m = np.array([[1, 0, o_x], [0, 1, o_y], [0, 0, 1]]) @ m @ np.array(
        [[1, 0, -o_x], [0, 1, -o_y], [0, 0, 1]])
    m[:, [0, 1]] = m[:, [1, 0]]          # col_axis > row_axis: Keras's swap, M' = P M P
    m[[0, 1]] = m[[1, 0]]
    return m[:2, :2], m[:2, 2]


def keras_apply(x, params, fill_mode, cval):
    """x (C, H, W) float64 transformed as Keras does: per channel, scipy order=1. Keras passes
    fill_mode to scipy as it is; for "wrap" minicnn means the periodic 'grid-wrap' (scipy's
    'wrap' has period n-1: its first and last pixels coincide), so that is what we compare with."""
    matrix, offset = keras_matrix(params, *x.shape[1:])
    mode = {"wrap": "grid-wrap"}.get(fill_mode, fill_mode)
    return np.stack([ndimage.affine_transform(channel, matrix, offset, order=1, mode=mode,
                                              cval=cval) for channel in x])


def near_the_edge(params, h, w, eps=1e-5):
    """(H, W) bool: the output pixels whose source point lies within eps of the image's edge
    lines, where mode="constant" jumps from a pixel to cval (rounding decides the side)."""
    matrix, offset = keras_matrix(params, h, w)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    src = np.einsum("ij,jhw->ihw", matrix, np.stack([rows, cols])) + offset[:, None, None]
    return ((np.abs(src[0]) < eps) | (np.abs(src[0] - (h - 1)) < eps)
            | (np.abs(src[1]) < eps) | (np.abs(src[1] - (w - 1)) < eps))


@st.composite
def transforms(draw, square=False):
    """(image (C, H, W) float64, params, fill_mode, cval)."""
    h = draw(st.integers(2, 12))
    w = h if square else draw(st.integers(2, 12))
    c = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    params = dict(IDENTITY,
                  theta=draw(st.floats(-180, 180)), shear=draw(st.floats(-45, 45)),
                  tx=draw(st.floats(-w, w)), ty=draw(st.floats(-h, h)),
                  zx=draw(st.floats(0.5, 2.0)), zy=draw(st.floats(0.5, 2.0)))
    fill_mode = draw(st.sampled_from(FILL_MODES))
    return (np.random.default_rng(seed).random((c, h, w)), params, fill_mode,
            draw(st.floats(-2, 2)))


# ---------------------------------------------------------------- 1. rotations by 90 degrees

@pytest.mark.parametrize("size", [2, 3, 4, 5, 8, 9, 32, 33])
@pytest.mark.parametrize("fill_mode", FILL_MODES)
def test_a_rotation_by_90_degrees_is_rot90(size, fill_mode):
    """Keras's theta > 0 turns counterclockwise as displayed (row 0 on top): np.rot90's way."""
    x = np.random.default_rng(size).random((2, size, size))
    gen = ImageDataGenerator(fill_mode=fill_mode, cval=-7.0)
    for k in (1, 2, 3, -1):
        out = gen.apply_transform(x, dict(IDENTITY, theta=90 * k))
        np.testing.assert_allclose(out, np.rot90(x, k, axes=(1, 2)), rtol=0, atol=1e-12)


def test_a_rotation_by_180_degrees_turns_a_non_square_image_about_its_centre():
    x = np.random.default_rng(0).random((3, 4, 7))
    for fill_mode in FILL_MODES:
        out = ImageDataGenerator(fill_mode=fill_mode).apply_transform(x, dict(theta=180))
        np.testing.assert_allclose(out, x[:, ::-1, ::-1], rtol=0, atol=1e-12)


def test_tx_moves_the_content_left_and_ty_up_on_a_non_square_image():
    x = np.random.default_rng(1).random((2, 5, 8))
    gen = ImageDataGenerator(fill_mode="constant", cval=-1.0)
    out = gen.apply_transform(x, dict(tx=3))
    np.testing.assert_array_equal(out[:, :, :5], x[:, :, 3:])
    np.testing.assert_array_equal(out[:, :, 5:], -1.0)
    out = gen.apply_transform(x, dict(ty=-2))
    np.testing.assert_array_equal(out[:, 2:], x[:, :3])
    np.testing.assert_array_equal(out[:, :2], -1.0)


# ---------------------------------------------------------------- 2. Keras (scipy) agrees

@given(transforms(square=True))
def test_random_transforms_of_square_images_match_keras(problem):
    x, params, fill_mode, cval = problem
    _assert_matches_keras(x, params, fill_mode, cval)


@given(transforms())
def test_random_transforms_of_any_image_match_keras_about_the_true_centre(problem):
    x, params, fill_mode, cval = problem
    _assert_matches_keras(x, params, fill_mode, cval)


def _assert_matches_keras(x, params, fill_mode, cval):
    out = ImageDataGenerator(fill_mode=fill_mode, cval=cval).apply_transform(x, params)
    expected = keras_apply(x, params, fill_mode, cval)
    compared = np.ones(x.shape[1:], dtype=bool)
    if fill_mode == "constant":
        # A source point on the edge line reads the edge pixel or cval depending on the last
        # bit of its coordinate (and minicnn allows EDGE_TOLERANCE): compare all but those.
        compared = ~near_the_edge(params, *x.shape[1:])
    np.testing.assert_allclose(out[:, compared], expected[:, compared], rtol=0, atol=1e-9)


def test_the_fill_modes_read_what_scipy_reads_outside_the_image():
    """A pure shift far outside the image on a 1-row image: every period of each mode."""
    x = np.array([[[1.0, 2.0, 4.0, 8.0]]])
    for fill_mode in FILL_MODES:
        gen = ImageDataGenerator(fill_mode=fill_mode, cval=5.0)
        for tx in np.arange(-9.75, 9.0, 0.75):
            params = dict(IDENTITY, tx=tx)
            np.testing.assert_allclose(gen.apply_transform(x, params),
                                       keras_apply(x, params, fill_mode, 5.0), atol=1e-12)


# ---------------------------------------------------------------- 3. flips, identity, batches

def test_flips_are_exact_axis_reversals_done_after_the_warp():
    x = np.random.default_rng(2).random((3, 5, 6)).astype(np.float32)
    gen = ImageDataGenerator()
    np.testing.assert_array_equal(gen.apply_transform(x, dict(flip_horizontal=True)), x[..., ::-1])
    np.testing.assert_array_equal(gen.apply_transform(x, dict(flip_vertical=True)), x[:, ::-1])
    both = dict(flip_horizontal=True, flip_vertical=True)
    np.testing.assert_array_equal(gen.apply_transform(x, both), x[:, ::-1, ::-1])
    warped = gen.apply_transform(x, dict(theta=30, tx=1.5))
    np.testing.assert_array_equal(gen.apply_transform(x, dict(theta=30, tx=1.5, **both)),
                                  warped[:, ::-1, ::-1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
def test_the_identity_gives_the_image_back_exactly(dtype):
    x = (np.random.default_rng(3).random((4, 3, 7, 6)) * 255).astype(dtype)
    gen = ImageDataGenerator(fill_mode="constant", cval=9)
    for params in ({}, IDENTITY):
        out = gen.apply_transform(x, params)
        assert out.dtype == x.dtype and out is not x
        np.testing.assert_array_equal(out, x)
    # The warp itself, with identity matrices (apply_transforms skips it for the identity).
    work = x.astype(np.float32) if dtype == np.uint8 else x
    np.testing.assert_array_equal(affine_warp(work, np.tile(np.eye(3), (4, 1, 1)), "constant", 9),
                                  work)


def test_a_batch_with_its_own_params_equals_each_image_warped_alone():
    rng = np.random.default_rng(4)
    x = rng.random((6, 2, 9, 7))
    gen = ImageDataGenerator(rotation_range=40, width_shift_range=0.2, height_shift_range=0.2,
                             shear_range=20, zoom_range=0.3, horizontal_flip=True,
                             vertical_flip=True, seed=0)
    params = [gen.get_random_transform(x.shape[1:]) for _ in x]
    assert len({p["theta"] for p in params}) == len(x)
    for fill_mode in FILL_MODES:
        batch = apply_transforms(x, params, fill_mode, 0.5)
        for i in range(len(x)):
            np.testing.assert_array_equal(batch[i], apply_transforms(x[i:i + 1], params[i:i + 1],
                                                                     fill_mode, 0.5)[0])


def test_uint8_images_are_rounded_and_clipped():
    x = np.random.default_rng(5).integers(0, 256, (2, 3, 8, 8)).astype(np.uint8)
    gen = ImageDataGenerator(fill_mode="constant", cval=300)
    params = dict(theta=17, zx=0.8, zy=1.3)
    out = gen.apply_transform(x, params)
    as_float = gen.apply_transform(x.astype(np.float32), params)
    assert out.dtype == np.uint8 and as_float.max() == 300
    np.testing.assert_array_equal(out, np.clip(np.rint(as_float), 0, 255).astype(np.uint8))
    one = gen.apply_transform(x[0], params)
    assert one.shape == x[0].shape and one.dtype == np.uint8


def test_the_same_params_transform_a_batch_and_each_of_its_images_alike():
    x = np.random.default_rng(6).random((3, 2, 6, 6))
    gen = ImageDataGenerator(fill_mode="reflect")
    params = dict(theta=-33, shear=12, zx=1.1, flip_horizontal=True)
    batch = gen.apply_transform(x, params)
    for i in range(3):
        np.testing.assert_array_equal(batch[i], gen.apply_transform(x[i], params))


# ---------------------------------------------------------------- random parameters

def test_random_parameters_follow_the_ranges():
    gen = ImageDataGenerator(rotation_range=20, width_shift_range=0.25, height_shift_range=3.0,
                             shear_range=10, zoom_range=[0.5, 0.75], seed=0)
    params = [gen.get_random_transform((3, 8, 40)) for _ in range(300)]
    for key, low, high in [("theta", -20, 20), ("tx", -10, 10), ("ty", -3, 3),
                           ("shear", -10, 10), ("zx", 0.5, 0.75), ("zy", 0.5, 0.75)]:
        values = np.array([p[key] for p in params])
        assert low <= values.min() < low + 0.2 * (high - low), key
        assert high - 0.2 * (high - low) < values.max() <= high, key
    assert all(p["zx"] != p["zy"] for p in params)            # drawn apart
    assert not any(p["flip_horizontal"] or p["flip_vertical"] for p in params)
    assert set(params[0]) == set(IDENTITY)


def test_shift_ranges_as_keras_reads_them():
    zoom = ImageDataGenerator(zoom_range=0.2, seed=1)
    values = [zoom.get_random_transform((1, 4, 4))["zx"] for _ in range(200)]
    assert 0.8 <= min(values) < 0.85 and 1.15 < max(values) <= 1.2
    ints = ImageDataGenerator(width_shift_range=3, seed=1)     # an int: whole pixels in (-3, 3)
    assert {ints.get_random_transform((1, 4, 4))["tx"] for _ in range(200)} == {-2, -1, 0, 1, 2}
    listed = ImageDataGenerator(height_shift_range=[2, 5], seed=1)
    assert {listed.get_random_transform((1, 4, 4))["ty"] for _ in range(200)} == {-5, -2, 2, 5}
    flips = ImageDataGenerator(horizontal_flip=True, seed=1)
    drawn = [flips.get_random_transform((1, 4, 4))["flip_horizontal"] for _ in range(200)]
    assert 60 < sum(drawn) < 140
    with pytest.raises(ValueError, match="zoom_range"):
        ImageDataGenerator(zoom_range=[0.5, 1.0, 2.0])
    with pytest.raises(ValueError, match="fill_mode"):
        ImageDataGenerator(fill_mode="mirror")


def test_a_seed_makes_the_draws_reproducible():
    kwargs = dict(rotation_range=30, width_shift_range=0.1, zoom_range=0.1, horizontal_flip=True)
    a, b = ImageDataGenerator(seed=7, **kwargs), ImageDataGenerator(seed=7, **kwargs)
    assert [a.get_random_transform((3, 8, 8)) for _ in range(5)] == \
           [b.get_random_transform((3, 8, 8)) for _ in range(5)]
    assert a.get_random_transform((3, 8, 8), seed=3) == b.get_random_transform((3, 8, 8), seed=3)
    assert a.get_random_transform((3, 8, 8)) != a.get_random_transform((3, 8, 8))
    x = np.random.default_rng(0).random((3, 8, 8))
    np.testing.assert_array_equal(a.random_transform(x, seed=5), b.random_transform(x, seed=5))


# ---------------------------------------------------------------- 4. flow

def _flow_data(n=10):
    x = np.random.default_rng(8).random((n, 2, 5, 5)).astype(np.float32)
    return x, np.arange(n) + 100


def test_flow_batches_cover_every_image_once_per_epoch_and_reshuffle():
    x, y = _flow_data()
    it = ImageDataGenerator(seed=0).flow(x, y, batch_size=4)
    assert len(it) == 3
    epochs = []
    for _ in range(3):
        batches = [next(it) for _ in range(len(it))]
        assert [len(b[0]) for b in batches] == [4, 4, 2]
        labels = np.concatenate([b[1] for b in batches])
        assert sorted(labels) == list(y)
        for xb, yb in batches:                                # y follows x (no transform)
            np.testing.assert_array_equal(xb, x[yb - 100])
        epochs.append(list(labels))
    assert epochs[0] != epochs[1] != epochs[2]


def test_flow_without_shuffle_keeps_the_order_and_without_y_gives_images():
    x, _ = _flow_data()
    it = ImageDataGenerator().flow(x, batch_size=3, shuffle=False)
    assert len(it) == 4
    batches = [next(it) for _ in range(5)]
    np.testing.assert_array_equal(np.concatenate(batches[:4]), x)
    np.testing.assert_array_equal(batches[4], x[:3])          # the next epoch starts again
    np.testing.assert_array_equal(it[3], x[9:])
    with pytest.raises(IndexError):
        it[4]


def test_flow_transforms_each_image_alone_and_a_seed_reproduces_it():
    x, y = _flow_data()
    gen = ImageDataGenerator(rotation_range=90, horizontal_flip=True, fill_mode="reflect")
    first = [next(gen.flow(x, y, batch_size=4, seed=3)) for _ in range(2)]
    np.testing.assert_array_equal(first[0][0], first[1][0])
    np.testing.assert_array_equal(first[0][1], first[1][1])
    other = next(gen.flow(x, y, batch_size=4, seed=4))
    assert not np.array_equal(first[0][0], other[0])
    xb, yb = first[0]
    for i in range(len(xb)):                                  # each image has its own transform
        assert not np.allclose(xb[i], x[yb[i] - 100])
    assert len({float(np.abs(xb[i] - x[yb[i] - 100]).sum()) for i in range(len(xb))}) == len(xb)
    seeded = ImageDataGenerator(rotation_range=90, seed=11)
    again = ImageDataGenerator(rotation_range=90, seed=11)
    np.testing.assert_array_equal(seeded.flow(x, y, batch_size=4)[1][0],
                                  again.flow(x, y, batch_size=4)[1][0])


def test_flow_keeps_uint8_and_checks_its_arguments():
    x = np.random.default_rng(9).integers(0, 256, (5, 3, 6, 6)).astype(np.uint8)
    gen = ImageDataGenerator(rotation_range=30, zoom_range=0.2, seed=0)
    xb, yb = next(gen.flow(x, list(range(5)), batch_size=8))
    assert xb.dtype == np.uint8 and xb.shape == (5, 3, 6, 6) and sorted(yb) == list(range(5))
    with pytest.raises(ValueError, match="labels"):
        gen.flow(x, np.arange(4))
    with pytest.raises(ValueError, match="N, C, H, W"):
        gen.flow(x[0])


# ---------------------------------------------------------------- 5. on the device

def test_the_warp_runs_on_each_backend_and_gives_the_numpy_result(xp):
    rng = np.random.default_rng(10)
    x = rng.random((5, 3, 8, 6)).astype(np.float32)
    gen = ImageDataGenerator(rotation_range=45, width_shift_range=0.2, height_shift_range=0.2,
                             shear_range=15, zoom_range=0.2, horizontal_flip=True,
                             vertical_flip=True, seed=0)
    params = [gen.get_random_transform(x.shape[1:]) for _ in x]
    for fill_mode in FILL_MODES:
        out = apply_transforms(xp.asarray(x), params, fill_mode, 0.25)
        assert array_module(out) is xp and out.dtype == np.float32
        np.testing.assert_allclose(to_numpy(out), apply_transforms(x, params, fill_mode, 0.25),
                                   rtol=0, atol=1e-6)
    x8 = (x * 255).astype(np.uint8)
    xb, yb = next(gen.flow(xp.asarray(x8), xp.asarray(np.arange(5)), batch_size=4, seed=1))
    assert array_module(xb) is xp and array_module(yb) is xp and xb.dtype == np.uint8
    expected, labels = next(gen.flow(x8, np.arange(5), batch_size=4, seed=1))
    np.testing.assert_array_equal(to_numpy(yb), labels)
    assert np.abs(to_numpy(xb).astype(int) - expected).max() <= 1   # float32 rounding at .5


# ---------------------------------------------------------------- 6. parse_spec

def test_parse_spec_reads_the_command_line_form():
    kwargs, rest = parse_spec("rotation=15+shift=0.1+shear=10+zoom=0.1+hflip+vflip+fill=reflect")
    assert kwargs == dict(rotation_range=15, width_shift_range=0.1, height_shift_range=0.1,
                          shear_range=10, zoom_range=0.1, horizontal_flip=True,
                          vertical_flip=True, fill_mode="reflect")
    assert rest == []
    kwargs, rest = parse_spec("crop+wshift=2+hshift=0.25+flip+cutout+fill=constant+cval=0.5")
    assert kwargs == dict(width_shift_range=2, height_shift_range=0.25, fill_mode="constant",
                          cval=0.5)
    assert isinstance(kwargs["width_shift_range"], int) and rest == ["crop", "flip", "cutout"]
    assert parse_spec("none") == ({}, []) and parse_spec("") == ({}, [])
    assert parse_spec("flip") == ({}, ["flip"])
    ImageDataGenerator(**parse_spec("rotation=15+zoom=0.1+fill=wrap")[0])


@pytest.mark.parametrize("spec, bad", [
    ("rotation=15+spin=3", "'spin=3'"), ("rotation", "'rotation'"), ("rotation=", "'rotation='"),
    ("shift=abc", "'shift=abc'"), ("zoom=nan", "'zoom=nan'"), ("fill=mirror", "'fill=mirror'"),
    ("hflip=1", "'hflip=1'"), ("crop++flip", "''"), ("none+crop", "'none'"),
])
def test_parse_spec_names_the_part_it_cannot_read(spec, bad):
    with pytest.raises(ValueError, match=f"^Cannot read {bad} in the augmentation"):
        parse_spec(spec)


def test_parse_spec_refuses_a_setting_given_twice():
    with pytest.raises(ValueError, match="'wshift=0.2' sets width_shift_range a second time"):
        parse_spec("shift=0.1+wshift=0.2")


def test_the_module_does_not_import_scipy():
    """scipy is a test-only dependency: the warp is minicnn's own."""
    tree = ast.parse(Path(augment.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported and not any(m.split(".")[0] == "scipy" for m in imported)
