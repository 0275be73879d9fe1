"""minicnn.datasets: Keras's cifar10.load_data and image_dataset_from_directory, in minicnn's
NCHW layout, on small data made here."""
import numpy as np
import pytest
from PIL import Image

from minicnn.datasets import cifar10, image_dataset_from_directory
from minicnn.errors import DataError
from _data_helpers import binary_files, fake_cifar, make_folder, write_tar_gz


def test_cifar10_load_data_gives_kerass_tuples_in_nchw(tmp_path, monkeypatch):
    monkeypatch.setenv("MINICNN_DATA", str(tmp_path / "cache"))
    batches = fake_cifar(4)
    archive = write_tar_gz(tmp_path / "small-cifar.tar.gz", "cifar-10-batches-bin",
                           binary_files(batches))
    (x_train, y_train), (x_test, y_test) = cifar10.load_data(archive)
    assert x_train.shape == (20, 3, 32, 32) and x_train.dtype == np.uint8
    assert y_train.shape == (20,) and y_train.dtype.kind == "i"
    assert x_test.shape == (4, 3, 32, 32) and y_test.shape == (4,)
    np.testing.assert_array_equal(x_test, batches["test_batch"][0])
    np.testing.assert_array_equal(y_train[:4], batches["data_batch_1"][1])
    assert len(cifar10.CLASS_NAMES) == 10


def _tree(root):
    """Two classes; "b" has images in a nested folder, a non-image and a broken .png."""
    make_folder(root, per_class=3, classes=("circle", "stripes"))
    nested = root / "stripes" / "more" / "deeper"
    nested.mkdir(parents=True)
    Image.new("RGB", (40, 20), (255, 0, 0)).save(nested / "wide.jpg")
    (root / "stripes" / "notes.txt").write_text("not an image")
    (root / "circle" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / ".hidden").mkdir()
    return root


def test_image_dataset_from_directory_follows_kerass_folder_rules(tmp_path):
    root = _tree(tmp_path / "shapes")
    with pytest.warns(UserWarning, match="Skipped 1 unreadable image files"):
        x, y, names = image_dataset_from_directory(root, image_size=(16, 24))
    assert names == ["circle", "stripes"]                   # sorted folders; hidden ones not
    assert x.shape == (7, 3, 16, 24) and x.dtype == np.uint8  # 3 + 3 + 1 nested image
    assert list(y) == [0, 0, 0, 1, 1, 1, 1]
    red = x[-1]                                             # the nested 40x20 jpg, resized
    assert red[0].mean() > 200 and red[1].mean() < 40


def test_image_dataset_validation_split_is_seeded_disjoint_and_complete(tmp_path):
    root = make_folder(tmp_path / "shapes", per_class=10)
    (x_tr, y_tr), (x_va, y_va), names = image_dataset_from_directory(
        root, image_size=(8, 8), validation_split=0.2, subset="both", seed=3)
    assert len(x_tr) == 24 and len(x_va) == 6
    x_va2, y_va2, _ = image_dataset_from_directory(root, image_size=(8, 8),
                                                   validation_split=0.2, subset="validation",
                                                   seed=3)
    np.testing.assert_array_equal(x_va, x_va2)
    everything, _, _ = image_dataset_from_directory(root, image_size=(8, 8))
    rows = {a.tobytes() for a in everything}
    assert {a.tobytes() for a in x_tr} | {a.tobytes() for a in x_va} == rows
    assert not {a.tobytes() for a in x_tr} & {a.tobytes() for a in x_va}
    other, _, _ = image_dataset_from_directory(root, image_size=(8, 8), validation_split=0.2,
                                               subset="validation", seed=4)
    assert {a.tobytes() for a in other} != {a.tobytes() for a in x_va}


@pytest.mark.parametrize("kwargs, message", [
    (dict(validation_split=0.2), "subset="), (dict(subset="training"), "needs validation_split"),
    (dict(validation_split=1.5, subset="training", seed=0), "between 0 and 1")])
def test_image_dataset_bad_arguments_are_one_sentence(tmp_path, kwargs, message):
    root = make_folder(tmp_path / "shapes", per_class=2)
    with pytest.raises(ValueError, match=message):
        image_dataset_from_directory(root, image_size=(8, 8), **kwargs)


def test_image_dataset_of_a_folder_without_classes_is_a_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        image_dataset_from_directory(tmp_path / "empty")
    with pytest.raises(DataError, match="not a directory"):
        image_dataset_from_directory(tmp_path / "missing")
