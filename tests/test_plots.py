import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from minicnn.training.plots import plot_confusion, plot_curves, plot_predictions

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = ["airplane", "automobile", "bird", "cat"]
ORANGE = (255, 127, 14)                                   # matplotlib's tab:orange


def assert_png(path, min_width=300, min_height=200):
    """path holds a readable PNG of at least the given size, and nothing else is beside it."""
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_width and image.height >= min_height
        # A blank canvas would mean nothing was drawn.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 10
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]   # no temp files


def history(epochs=5, with_val=True):
    h = {"epoch": list(range(1, epochs + 1)),
         "train_loss": [2.0 / e for e in range(1, epochs + 1)],
         "train_acc": [0.2 + 0.1 * e for e in range(1, epochs + 1)]}
    if with_val:
        h["val_loss"] = [2.2 / e for e in range(1, epochs + 1)]
        h["val_acc"] = [0.15 + 0.1 * e for e in range(1, epochs + 1)]
    return h


@pytest.mark.parametrize("case", ["with_val", "val_missing", "val_none", "val_gaps"])
def test_plot_curves_writes_png(tmp_path, case):
    h = history(with_val=case != "val_missing")
    if case == "val_none":
        h["val_loss"] = h["val_acc"] = None
    if case == "val_gaps":                             # validation every other epoch
        h["val_loss"][1::2] = [None] * 2
        h["val_acc"][1::2] = [None] * 2
    path = tmp_path / "curves.png"
    plot_curves(h, path)
    assert_png(path, min_width=800, min_height=300)
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    val_drawn = np.all(pixels == ORANGE, axis=1).any()    # the second line's colour
    assert val_drawn == (case in ("with_val", "val_gaps"))


@pytest.mark.parametrize("normalize", [True, False])
def test_plot_confusion_writes_png(tmp_path, normalize):
    confusion = np.array([[50, 3, 2, 0],
                          [4, 40, 0, 1],
                          [0, 0, 0, 0],                # a class with no samples
                          [7, 1, 2, 30]])
    path = tmp_path / "confusion.png"
    plot_confusion(confusion, NAMES, path, normalize=normalize)
    assert_png(path, min_width=400, min_height=400)


def test_plot_confusion_rejects_wrong_number_of_names(tmp_path):
    with pytest.raises(ValueError, match="3 class names given for 4 classes"):
        plot_confusion(np.eye(4, dtype=int), NAMES[:3], tmp_path / "c.png")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("n, layout", [(30, "nchw"), (25, "nhwc"), (7, "nchw"), (1, "nhwc")])
def test_plot_predictions_writes_png(tmp_path, n, layout):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    if layout == "nhwc":
        images = images.transpose(0, 2, 3, 1)
    y_true = rng.integers(0, 4, size=n)
    y_pred = y_true.copy()
    y_pred[::3] = (y_pred[::3] + 1) % 4                # every third one a mistake
    probs = rng.dirichlet(np.ones(4), size=n)          # (n, 4)
    path = tmp_path / "predictions.png"
    plot_predictions(images, y_true, y_pred, NAMES, path, probs=probs)
    assert_png(path, min_width=200, min_height=200)


def test_plot_predictions_rejects_float_images(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        plot_predictions(np.zeros((2, 3, 8, 8)), [0, 1], [0, 1], NAMES, tmp_path / "p.png")


def test_plot_replaces_existing_file_and_creates_directories(tmp_path):
    path = tmp_path / "run" / "curves.png"
    plot_curves(history(epochs=2), path)
    first = path.read_bytes()
    plot_curves(history(epochs=8), path)
    assert path.read_bytes() != first
    assert_png(path)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_plot_file_gets_ordinary_permissions(tmp_path):
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / "curves.png"
    plot_curves(history(), path)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)


@pytest.mark.parametrize("mistakes", [0, 2])
def test_plot_predictions_marks_mistakes_red_and_correct_green(tmp_path, mistakes):
    red, green = (214, 39, 40), (44, 160, 44)            # matplotlib's tab:red, tab:green
    images = np.full((4, 16, 16, 3), 128, dtype=np.uint8)  # grey, so only marks are coloured
    y_true = np.array([0, 1, 2, 3])
    y_pred = y_true.copy()
    y_pred[:mistakes] = (y_pred[:mistakes] + 1) % 4
    path = tmp_path / "predictions.png"
    plot_predictions(images, y_true, y_pred, NAMES, path)
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    count = {name: int(np.all(pixels == colour, axis=1).sum())
             for name, colour in (("red", red), ("green", green))}
    assert (count["red"] > 0) == (mistakes > 0)
    assert count["green"] > 0


def test_plots_never_import_pyplot(tmp_path):
    # pyplot is what selects a global backend; without it a user's choice stays untouched.
    code = ("import sys; from minicnn.training.plots import plot_curves; "
            "plot_curves({'epoch': [1], 'train_loss': [1.0], 'train_acc': [0.5]}, sys.argv[1]); "
            "assert 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.png")], check=True)
