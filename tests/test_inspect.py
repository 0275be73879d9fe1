"""minicnn.inspect: the saliency map against centred differences, the filter and feature-map
pictures, and the command (its files, and one sentence with exit status 2 for bad input)."""
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import minicnn
from minicnn import inspect as mi
from minicnn.nn import (BatchNorm2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU, Residual,
                        Sequential)
from minicnn.nn.gradcheck import _numerical_gradient
from minicnn.nn.zoo import keras_tutorial

from _data_helpers import SHAPES, shape_image


def small_net(rng):
    """float64, every kind of layer the saliency passes through; BatchNorm with running
    statistics far from 0 and 1, so that inference and training modes differ."""
    d = dict(dtype=np.float64, rng=rng)
    bn = BatchNorm2D(4, dtype=np.float64)
    bn.state["running_mean"][...] = rng.standard_normal(4)
    bn.state["running_var"][...] = rng.uniform(0.5, 2.0, 4)
    return Sequential([Conv2D(2, 4, 3, padding=1, **d), bn, ReLU(),
                       Residual([Conv2D(4, 4, 3, padding=1, **d), ReLU()]), MaxPool2D(2),
                       Flatten(), Dropout(0.5, rng=rng), Dense(4 * 3 * 3, 5, **d)])


@pytest.mark.parametrize("implementation", ["reference", "fast"])
def test_saliency_is_the_gradient_of_the_class_score_by_central_differences(implementation):
    rng = np.random.default_rng(0)
    model = small_net(rng)
    x = rng.standard_normal((3, 2, 6, 6))
    with minicnn.use(implementation):
        dx, logits, classes = mi.input_gradient(model, x)
        s = mi.saliency(model, x, classes=[1, 4, 0])
    np.testing.assert_array_equal(classes, model.forward(x).argmax(axis=1))     # predicted
    np.testing.assert_allclose(logits, model.forward(x), rtol=1e-12)             # inference

    def score(chosen):                       # the sum of each image's score: images are apart
        return lambda: float(model.forward(x)[np.arange(3), chosen].sum())
    numeric = _numerical_gradient(score(classes), x, 1e-6, range(x.size)).reshape(x.shape)
    np.testing.assert_allclose(dx, numeric, rtol=1e-6, atol=1e-8)
    other = _numerical_gradient(score(np.array([1, 4, 0])), x, 1e-6,
                                range(x.size)).reshape(x.shape)
    np.testing.assert_allclose(s.maps, np.abs(other).max(axis=1), rtol=1e-6, atol=1e-8)
    assert s.maps.shape == (3, 6, 6)
    # the pass changed nothing: layers trainable again, Dropout's p back
    assert all(layer.trainable for layer in minicnn.nn.walk(model))
    assert model[6].p == 0.5


def test_filter_grid_tiles_each_filter_scaled_to_its_own_range():
    rng = np.random.default_rng(0)
    model = keras_tutorial(rng=rng, image_size=18)
    w = model[0].params["weight"]                                # (32, 3, 3, 3)
    grid = mi.filter_grid(w)
    assert grid.shape == (4 * 4 + 1, 8 * 4 + 1, 3)
    assert grid.min() == 0 and grid.max() == 1
    tile = grid[1 + 4:1 + 4 + 3, 1 + 4 * 2:1 + 4 * 2 + 3]        # filter 10: row 1, column 2
    f = w[10].transpose(1, 2, 0)
    np.testing.assert_allclose(tile, (f - f.min()) / (f.max() - f.min()), rtol=1e-6)
    assert (grid[0] == 1).all() and (grid[:, 0] == 1).all()      # white borders
    gray = mi.filter_grid(np.ones((5, 4, 2, 2)))                 # not RGB: channels' mean
    assert gray.shape == (1 * 3 + 1, 5 * 3 + 1)                  # one row of 5
    assert np.isnan(gray[0]).all() and np.nanmax(gray) == 0      # a constant tile is 0


def test_feature_maps_are_the_layers_outputs_in_list_order():
    rng = np.random.default_rng(0)
    model = keras_tutorial(rng=rng, image_size=18)
    x = rng.standard_normal((2, 3, 18, 18)).astype(np.float32)
    maps = mi.feature_maps(model, x)                              # default: every Conv2D
    assert {k: v.shape for k, v in maps.items()} == {"0": (32, 16, 16), "3": (64, 6, 6),
                                                     "6": (64, 1, 1)}
    np.testing.assert_array_equal(maps["0"], model[0].forward(x[:1])[0])   # uncropped, image 0
    pooled = mi.feature_maps(model, x[0], layers=["2"])["2"]                # one (C, H, W) image
    np.testing.assert_array_equal(pooled, model[2].forward(model[1].forward(maps["0"][None]))[0])
    with pytest.raises(minicnn.errors.UsageError, match="no layer '12'.*0 \\(Conv2D\\)"):
        mi.feature_maps(model, x, layers=["12"])
    with pytest.raises(minicnn.errors.UsageError, match="Layer 9 \\(Dense\\) gives \\(N, 64\\)"):
        mi.feature_maps(model, x, layers=["9"])
    assert [name for name, _ in mi.named_layers(small_net(rng))] == [
        "0", "1", "2", "3.body.0", "3.body.1", "3", "4", "5", "6", "7"]


def test_importing_it_leaves_the_standard_librarys_inspect_alone():
    import inspect
    assert inspect is not mi and inspect.signature(test_filter_grid_tiles_each_filter_scaled_to_its_own_range)
    assert sys.modules["inspect"] is inspect and sys.modules["minicnn.inspect"] is mi


# ---- the command ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    """A checkpoint of a 16x16 model as minicnn.train writes one (classes, statistics), and
    three images: two of one name in two folders (RGB, 16x16), one grayscale 40x30."""
    root = tmp_path_factory.mktemp("inspect")
    rng = np.random.default_rng(0)
    model = keras_tutorial(num_classes=3, rng=rng, image_size=18)
    model.save(root / "best.npz", kind="checkpoint", classes=list(SHAPES),
               norm={"mean": [0.2, 0.2, 0.2], "std": [0.3, 0.3, 0.3]}, input_shape=[3, 18, 18])
    images = []
    for folder, kind in (("a", "circle"), ("b", "cross")):
        (root / folder).mkdir()
        images.append(root / folder / "0000.png")
        Image.fromarray(shape_image(kind, rng, size=18)).save(images[-1])
    images.append(root / "gray.png")
    Image.fromarray(rng.integers(0, 255, (30, 40), dtype=np.uint8), "L").save(images[-1])
    return root, [str(p) for p in images]


def test_the_command_writes_the_filters_feature_maps_and_saliency_of_each_image(run_files,
                                                                                  capsys):
    root, images = run_files
    out = root / "pictures"
    assert mi.main(["--checkpoint", str(root / "best.npz"), *images, "--layers", "0,2",
                    "--out", str(out), "--prefix", "inspect_"]) == 0
    names = ["inspect_filters.png"] + [f"inspect_{stem}_{what}.png"
                                       for stem in ("a_0000", "b_0000", "gray")
                                       for what in ("features", "saliency")]
    assert capsys.readouterr().out.split() == [str(out / name) for name in names]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)     # no temporary files left
    for name in names:
        with Image.open(out / name) as picture:
            assert picture.format == "PNG" and min(picture.size) > 100


@pytest.mark.parametrize("case,message", [
    ("missing checkpoint", "nothing.npz"),
    ("corrupt checkpoint", "corrupt.npz"),
    ("missing image", "missing.png"),
    ("unknown layer", "no layer 'conv9'; choose from: 0 (Conv2D), 1 (ReLU)"),
    ("dense layer", "Layer 9 (Dense) gives (N, 64), not feature maps"),
])
def test_bad_input_is_one_sentence_and_exit_status_2(run_files, capsys, case, message):
    root, images = run_files
    (root / "corrupt.npz").write_bytes(b"PK\x03\x04 not a zip file")
    args = {"missing checkpoint": ["--checkpoint", str(root / "nothing.npz"), images[0]],
            "corrupt checkpoint": ["--checkpoint", str(root / "corrupt.npz"), images[0]],
            "missing image": ["--checkpoint", str(root / "best.npz"), str(root / "missing.png")],
            "unknown layer": ["--checkpoint", str(root / "best.npz"), images[0],
                              "--layers", "conv9"],
            "dense layer": ["--checkpoint", str(root / "best.npz"), images[0], "--layers", "9"],
            }[case]
    assert mi.main(args + ["--out", str(root / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (root / "bad" / "inspect_filters.png").exists()


def test_python_dash_m_minicnn_inspect_runs(run_files, tmp_path):
    root, images = run_files
    done = subprocess.run([sys.executable, "-m", "minicnn.inspect", "--checkpoint",
                           str(root / "best.npz"), images[2], "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["filters.png", "gray_features.png",
                                                          "gray_saliency.png"]


def test_the_commands_docs_inspect_md_shows_are_ones_the_tool_accepts():
    text = (Path(__file__).resolve().parent.parent / "docs" / "inspect.md").read_text()
    commands = [shlex.split(line)[3:] for line in text.splitlines()
                if line.startswith("python -m minicnn.inspect ")]
    assert commands
    for args in commands:
        mi.build_parser().parse_args(args)                 # SystemExit(2) on a wrong flag


def test_saliency_and_feature_maps_on_cupy_arrays_match_numpys(gpu_xp):
    """fake_cupy everywhere (CuPy's device boundary: nothing may mix host and device arrays),
    CuPy itself on a GPU."""
    rng = np.random.default_rng(0)
    model = small_net(rng)
    x = rng.standard_normal((2, 2, 6, 6))
    expected, maps = mi.saliency(model, x), mi.feature_maps(model, x, ["0", "3"])
    model.to("cupy")
    got = mi.saliency(model, gpu_xp.asarray(x))
    np.testing.assert_allclose(got.maps, expected.maps, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(got.classes, expected.classes)
    for name, m in mi.feature_maps(model, gpu_xp.asarray(x), ["0", "3"]).items():
        assert isinstance(m, np.ndarray)
        np.testing.assert_allclose(m, maps[name], rtol=1e-10, atol=1e-12)
