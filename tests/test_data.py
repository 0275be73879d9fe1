"""Tests for minicnn.datasets.loading: CIFAR-10 parsing and download, image folders, splits, augmentation."""
import hashlib
import os
import pickle
import re
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minicnn.datasets import loading as data
from minicnn.backend import to_numpy
from minicnn.errors import DataError

from _data_helpers import (BATCHES, CLASSES, LocalServer, binary_files, fake_cifar, md5_of,
                           numpy2_dumps, python2_dumps, python_files, write_tar_gz)

SHARED_ARCHIVE = (Path(__file__).resolve().parents[1].parent / "shared" / "data"
                  / "cifar10-train-jpeg.tar.gz")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test caches into its own folder and retries without waiting."""
    monkeypatch.setenv("MINICNN_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "RETRY_DELAY_S", 0.0)
    return tmp_path / "cache"


@pytest.fixture
def server():
    local = LocalServer()
    yield local
    local.close()


@pytest.fixture
def batches():
    return fake_cifar(records_per_batch=20)


def expected_arrays(batches):
    x_train = np.concatenate([batches[name][0] for name in BATCHES[:5]])
    y_train = np.concatenate([batches[name][1] for name in BATCHES[:5]])
    return x_train, y_train, batches["test_batch"][0], batches["test_batch"][1]


def assert_matches(dataset, batches):
    x_train, y_train, x_test, y_test = expected_arrays(batches)
    assert dataset.x_train.dtype == np.uint8 and dataset.x_train.shape == (100, 3, 32, 32)
    assert dataset.y_train.dtype == np.int64
    np.testing.assert_array_equal(dataset.x_train, x_train)
    np.testing.assert_array_equal(dataset.y_train, y_train)
    np.testing.assert_array_equal(dataset.x_test, x_test)
    np.testing.assert_array_equal(dataset.y_test, y_test)
    assert dataset.classes == CLASSES


# ---------------------------------------------------------------- CIFAR-10 parsing

def test_binary_record_bytes_land_at_label_channel_row_col(tmp_path, batches):
    images, labels = batches["data_batch_2"]
    images[3] = 0
    images[3, 0, 0, 0] = 200          # byte 1 of the record: R plane, row 0, col 0
    images[3, 1, 2, 5] = 77           # byte 1 + 1024 + 2*32 + 5: G plane, row 2, col 5
    images[3, 2, 31, 30] = 9          # byte 1 + 2048 + 31*32 + 30: B plane, row 31, col 30
    labels[3] = 7
    files = binary_files(batches)
    record = files["data_batch_2.bin"][3 * 3073:4 * 3073]
    assert record[0] == 7 and record[1] == 200 and record[1 + 1024 + 2 * 32 + 5] == 77
    assert record[1 + 2048 + 31 * 32 + 30] == 9
    archive = write_tar_gz(tmp_path / "small.tar.gz", "cifar-10-batches-bin", files)

    dataset = data.load_cifar10(archive)

    assert_matches(dataset, batches)
    i = 20 + 3                                      # data_batch_2 follows 20 records of batch 1
    assert dataset.y_train[i] == 7
    assert dataset.x_train[i, 0, 0, 0] == 200 and dataset.x_train[i, 1, 2, 5] == 77
    assert dataset.x_train[i, 2, 31, 30] == 9
    assert dataset.x_train[i].sum() == 200 + 77 + 9
    assert_matches(data.load_dataset(archive), batches)


def test_extracted_binary_directory_loads(tmp_path, batches):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for name, raw in binary_files(batches).items():
        (folder / name).write_bytes(raw)
    assert_matches(data.load_cifar10(folder), batches)
    assert_matches(data.load_dataset(folder), batches)


@pytest.mark.parametrize("dumps", [python2_dumps, numpy2_dumps])
def test_python_version_archive_loads(tmp_path, batches, dumps):
    files = python_files(batches, dumps)
    archive = write_tar_gz(tmp_path / "py.tar.gz", "cifar-10-batches-py", files)
    assert_matches(data.load_cifar10(archive), batches)


class _OpensAFile:
    """Unpickled by pickle.loads, this creates (opens for writing) the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("packed", ["directory", "archive"])
def test_a_pickle_that_would_run_code_is_refused_and_not_run(tmp_path, batches, packed):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_OpensAFile(control), protocol=2)).close()
    assert control.exists()                              # the payload is real: plain pickle runs it
    marker = tmp_path / "pwned"
    files = python_files(batches)
    files["data_batch_3"] = pickle.dumps({"batch_label": "x", "data": _OpensAFile(marker),
                                          "labels": [0]}, protocol=2)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
    source = folder if packed == "directory" else write_tar_gz(
        tmp_path / "py.tar.gz", "cifar-10-batches-py", files)

    with pytest.raises(DataError) as error:
        data.load_cifar10(source)
    assert not marker.exists()
    message = str(error.value)
    assert re.search(r"refers to (io|builtins)\.open, ", message) and "\n" not in message
    assert message.endswith("it was not loaded, so use the official archive.")


def test_truncated_archive_raises(tmp_path, batches):
    whole = write_tar_gz(tmp_path / "whole.tar.gz", "cifar-10-batches-bin", binary_files(batches))
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        data.load_cifar10(truncated)


def test_record_of_wrong_size_raises(tmp_path, batches):
    files = binary_files(batches)
    files["test_batch.bin"] = files["test_batch.bin"][:-10]
    archive = write_tar_gz(tmp_path / "short.tar.gz", "cifar-10-batches-bin", files)
    with pytest.raises(DataError, match="truncated or corrupt"):
        data.load_cifar10(archive)


def test_class_names_that_are_not_text_raise(tmp_path, batches):
    """Found by test_robustness's mutations: a corrupt batches.meta.txt was a UnicodeDecodeError."""
    files = binary_files(batches)
    files["batches.meta.txt"] = b"airplane\n\x80\xff\n"
    archive = write_tar_gz(tmp_path / "names.tar.gz", "cifar-10-batches-bin", files)
    with pytest.raises(DataError, match="class names that are not text"):
        data.load_cifar10(archive)


def test_archive_under_official_name_is_checked_against_official_md5(tmp_path, batches):
    archive = write_tar_gz(tmp_path / "cifar-10-binary.tar.gz", "cifar-10-batches-bin",
                           binary_files(batches))
    with pytest.raises(DataError, match="official MD5"):
        data.load_cifar10(archive)


# ---------------------------------------------------------------- download and cache

def test_download_verifies_md5_and_leaves_only_the_final_file(tmp_path, server):
    payload = os.urandom(300_000)
    server.files["blob.bin"] = payload
    dest = tmp_path / "dl" / "blob.bin"
    data.download(f"{server.url}/blob.bin", dest,
                  md5=hashlib.md5(payload).hexdigest(), timeout=5, progress=False)
    assert dest.read_bytes() == payload
    assert os.listdir(dest.parent) == ["blob.bin"]


def test_download_with_wrong_md5_removes_the_file(tmp_path, server):
    server.files["blob.bin"] = b"abc" * 1000
    dest = tmp_path / "dl" / "blob.bin"
    with pytest.raises(DataError, match="removed"):
        data.download(f"{server.url}/blob.bin", dest, md5="0" * 32, timeout=5, progress=False)
    assert os.listdir(dest.parent) == []


@pytest.mark.parametrize("path", ["missing", "short"])
def test_failed_transfer_is_retried_then_raises(tmp_path, server, path):
    dest = tmp_path / "dl" / "file"
    with pytest.raises(DataError, match="after 3 attempts"):
        data.download(f"{server.url}/{path}", dest, timeout=2, retries=3, progress=False)
    assert server.hits[path] == 3
    assert os.listdir(dest.parent) == []


def test_download_times_out_on_a_silent_server(tmp_path):
    import socket
    with socket.socket() as silent:                 # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/x"
        start = time.perf_counter()
        with pytest.raises(DataError, match="after 2 attempts"):
            data.download(url, tmp_path / "x", timeout=0.2, retries=2, progress=False)
        assert time.perf_counter() - start < 5


def test_load_cifar10_downloads_once_then_uses_the_caches(tmp_path, server, batches,
                                                           private_cache, monkeypatch):
    archive = write_tar_gz(tmp_path / "cifar-10-binary.tar.gz", "cifar-10-batches-bin",
                           binary_files(batches))
    server.files["cifar-10-binary.tar.gz"] = archive.read_bytes()
    url, md5 = f"{server.url}/cifar-10-binary.tar.gz", md5_of(archive)

    assert_matches(data.load_cifar10(url=url, md5=md5), batches)
    assert (private_cache / "cifar-10-binary.tar.gz").read_bytes() == archive.read_bytes()

    def parse_again(*args):
        raise AssertionError("the archive was parsed again instead of read from the cache")
    monkeypatch.setattr(data, "_parse_cifar_archive", parse_again)
    assert_matches(data.load_cifar10(url=url, md5=md5), batches)
    assert server.hits["cifar-10-binary.tar.gz"] == 1


def test_corrupt_cache_file_is_rebuilt(tmp_path, batches, private_cache):
    archive = write_tar_gz(tmp_path / "small.tar.gz", "cifar-10-batches-bin", binary_files(batches))
    data.load_cifar10(archive)
    [cached] = private_cache.glob("cifar10-*.npz")
    cached.write_bytes(cached.read_bytes()[:1000])
    assert_matches(data.load_cifar10(archive), batches)
    assert np.load(cached, allow_pickle=False)["x_train"].shape == (100, 3, 32, 32)


# ---------------------------------------------------------------- image folders

@pytest.fixture
def images(tmp_path):
    """An empty folder for image trees, apart from the cache folder beside it."""
    folder = tmp_path / "images"
    folder.mkdir()
    return folder


def save_image(path, mode, size, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_image_folder_converts_resizes_and_skips_odd_files(tmp_path):
    root = tmp_path / "pets"
    save_image(root / "dog" / "a.png", "RGB", (32, 32), (10, 20, 30))
    save_image(root / "dog" / "gray.png", "L", (32, 32), 100)
    save_image(root / "cat" / "rgba.png", "RGBA", (32, 32), (1, 2, 3, 128))
    save_image(root / "cat" / "big.jpg", "RGB", (64, 48), (250, 0, 0))
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.png").write_text("ignored, not even counted")
    (root / ".git").mkdir()

    with pytest.warns(UserWarning, match="Skipped 1 unreadable"):
        dataset = data.load_image_folder(root)

    assert dataset.classes == ["cat", "dog"]
    assert dataset.x_train.shape == (4, 3, 32, 32) and dataset.x_train.dtype == np.uint8
    assert dataset.x_test is None and dataset.y_test is None
    np.testing.assert_array_equal(dataset.y_train, [0, 0, 1, 1])
    # Files in sorted order: cat/big.jpg, cat/rgba.png, dog/a.png, dog/gray.png.
    assert abs(int(dataset.x_train[0, 0].mean()) - 250) <= 3          # JPEG is lossy
    assert dataset.x_train[1, :, 0, 0].tolist() == [1, 2, 3]          # alpha dropped
    assert dataset.x_train[2, :, 0, 0].tolist() == [10, 20, 30]
    assert dataset.x_train[3, :, 5, 5].tolist() == [100, 100, 100]    # gray copied to R, G, B


def test_image_folder_resizes_to_image_size(images):
    save_image(images / "a" / "x.png", "RGB", (32, 32), (5, 6, 7))
    dataset = data.load_dataset(images, image_size=(16, 24))
    assert dataset.x_train.shape == (1, 3, 16, 24)
    assert dataset.x_train[0, :, 8, 12].tolist() == [5, 6, 7]


def test_train_test_layout_maps_test_classes_by_name(images):
    for split, classes in [("train", ["ant", "bee", "cow"]), ("test", ["bee", "cow"])]:
        for label, name in enumerate(classes):
            save_image(images / split / name / "0.png", "RGB", (32, 32), (label, 0, 0))
    dataset = data.load_image_folder(images)
    assert dataset.classes == ["ant", "bee", "cow"]
    np.testing.assert_array_equal(dataset.y_train, [0, 1, 2])
    np.testing.assert_array_equal(dataset.y_test, [1, 2])
    assert dataset.x_test.shape == (2, 3, 32, 32)


def test_test_class_unknown_to_train_raises(images):
    save_image(images / "train" / "ant" / "0.png", "RGB", (8, 8), 0)
    save_image(images / "test" / "emu" / "0.png", "RGB", (8, 8), 0)
    with pytest.raises(DataError, match="emu"):
        data.load_image_folder(images)


def test_empty_class_folder_raises_naming_it(images):
    save_image(images / "ant" / "0.png", "RGB", (8, 8), 0)
    (images / "bee").mkdir()
    with pytest.raises(DataError, match=r"bee has no images"):
        data.load_image_folder(images)


def test_class_folder_without_readable_images_raises_naming_it(images):
    save_image(images / "ant" / "0.png", "RGB", (8, 8), 0)
    (images / "bee").mkdir()
    (images / "bee" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=r"bee has no readable images"):
            data.load_image_folder(images)


def test_empty_root_and_missing_path_raise(images):
    with pytest.raises(DataError, match="no class folders"):
        data.load_image_folder(images)
    with pytest.raises(DataError, match="does not exist"):
        data.load_dataset(images / "nowhere")
    (images / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="neither"):
        data.load_dataset(images / "notes.txt")


def test_image_folder_cache_is_used_and_notices_changes(images, monkeypatch):
    save_image(images / "ant" / "0.png", "RGB", (8, 8), (1, 1, 1))
    first = data.load_image_folder(images)
    decode = data._decode_class_files

    def no_decoding(*args):
        raise AssertionError("decoded again although nothing changed")
    monkeypatch.setattr(data, "_decode_class_files", no_decoding)
    np.testing.assert_array_equal(data.load_image_folder(images).x_train, first.x_train)

    monkeypatch.setattr(data, "_decode_class_files", decode)
    save_image(images / "ant" / "1.png", "RGB", (8, 8), (2, 2, 2))
    assert len(data.load_image_folder(images).x_train) == 2


# ---------------------------------------------------------------- splits and normalisation

def test_stratified_split_is_proportional_and_seeded():
    y = np.repeat(np.arange(4), [100, 50, 10, 1])
    train, val = data.stratified_split(y, 0.2, np.random.default_rng(0))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    assert np.intersect1d(train, val).size == 0 and train.size + val.size == y.size
    # round(0.2 * count) per class; the class of one sample keeps it for training.
    assert np.bincount(y[val], minlength=4).tolist() == [20, 10, 2, 0]
    again = data.stratified_split(y, 0.2, np.random.default_rng(0))
    other = data.stratified_split(y, 0.2, np.random.default_rng(1))
    np.testing.assert_array_equal(again[1], val)
    assert not np.array_equal(other[1], val)


def test_stratified_split_with_zero_fraction_has_empty_validation():
    y = np.array([0, 1, 1, 2])
    train, val = data.stratified_split(y, 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(train, [0, 1, 2, 3])
    assert val.size == 0 and val.dtype == np.int64
    with pytest.raises(DataError, match="fraction"):
        data.stratified_split(y, 1.0, np.random.default_rng(0))


def test_channel_stats_matches_numpy():
    x = np.random.default_rng(0).integers(0, 256, size=(37, 3, 5, 6), dtype=np.uint8)
    mean, std = data.channel_stats(x, chunk=8)
    xf = x.astype(np.float64) / 255
    assert mean.dtype == np.float32 and mean.shape == (3,)
    np.testing.assert_allclose(mean, xf.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(std, xf.std(axis=(0, 2, 3)), rtol=1e-5)


def test_normalize_gives_float32_zero_mean_unit_std():
    x = np.random.default_rng(0).integers(0, 256, size=(50, 3, 4, 4), dtype=np.uint8)
    mean, std = data.channel_stats(x)
    z = data.normalize(x, mean, std)
    assert z.dtype == np.float32 and z.shape == x.shape
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(0, 2, 3)), 1, atol=1e-4)
    np.testing.assert_allclose(z[1, 2, 3, 0], (x[1, 2, 3, 0] / 255 - mean[2]) / std[2], rtol=1e-6)


# ---------------------------------------------------------------- augmentation, both backends

# xp: conftest.py's fixture (numpy, cupy on a GPU, fake_cupy).

def batch(xp, n=64, c=3, h=8, w=8):
    x = np.random.default_rng(0).standard_normal((n, c, h, w)).astype(np.float32)
    return xp.asarray(x)


def test_crop_with_zero_padding_is_identity(xp):
    x = batch(xp)
    np.testing.assert_array_equal(to_numpy(data.random_crop(x, 0, np.random.default_rng(0))),
                                  to_numpy(x))


def test_crop_is_a_translation_with_zero_fill(xp):
    x = batch(xp) + 10                                  # no zeros of its own
    out = to_numpy(data.random_crop(x, 2, np.random.default_rng(0)))
    assert out.shape == x.shape and out.dtype == np.float32
    x = to_numpy(x)
    padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    for i in range(len(x)):   # each output is one of the 25 windows of the padded image
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(np.array_equal(out[i], win) for win in windows)
    assert (out == 0).any() and (out != 0).any()


def test_flip_mirrors_about_half_the_images(xp):
    x = batch(xp)
    out, x = to_numpy(data.random_flip(x, np.random.default_rng(0))), to_numpy(x)
    flipped = [np.array_equal(out[i], x[i, :, :, ::-1]) for i in range(len(x))]
    kept = [np.array_equal(out[i], x[i]) for i in range(len(x))]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 16 < sum(flipped) < 48


def test_cutout_zeroes_one_clipped_square_per_image(xp):
    size, x = 3, xp.ones((200, 2, 8, 8), dtype=xp.float32)
    out = to_numpy(data.cutout(x, size, np.random.default_rng(0)))
    interior = 0
    for image in out:
        zeros = image[0] == 0                                       # (H, W)
        np.testing.assert_array_equal(zeros, image[1] == 0)         # same square in every channel
        rows, cols = np.flatnonzero(zeros.any(axis=1)), np.flatnonzero(zeros.any(axis=0))
        assert zeros[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()   # one solid rectangle
        assert zeros.sum() == rows.size * cols.size
        touches_border = rows[0] == 0 or cols[0] == 0 or rows[-1] == 7 or cols[-1] == 7
        if not touches_border:
            assert zeros.sum() == size * size
            interior += 1
        assert rows.size <= size and cols.size <= size
    assert interior > 20           # a quarter of the centres give an interior square


def test_augment_is_reproducible_from_the_seed(xp):
    x = batch(xp)
    a = data.augment(x, np.random.default_rng(7), crop_padding=2, cutout_size=3)
    b = data.augment(x, np.random.default_rng(7), crop_padding=2, cutout_size=3)
    c = data.augment(x, np.random.default_rng(8), crop_padding=2, cutout_size=3)
    assert a.shape == x.shape and a.dtype == np.float32
    np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    assert not np.array_equal(to_numpy(a), to_numpy(c))


# ---------------------------------------------------------------- batches

def test_batch_iterator_covers_each_sample_once_per_epoch():
    x, y = np.arange(10)[:, None] * np.ones((1, 3)), np.arange(10)
    batches = data.BatchIterator(x, y, 4, rng=np.random.default_rng(0))
    assert len(batches) == 3
    epochs = [np.concatenate([yb for _, yb in batches]) for _ in range(2)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(10))
    assert not np.array_equal(epochs[0], epochs[1])
    for xb, yb in batches:
        np.testing.assert_array_equal(xb[:, 0], yb)
    dropped = data.BatchIterator(x, y, 4, rng=np.random.default_rng(0), drop_last=True)
    assert len(dropped) == 2 and [len(yb) for _, yb in dropped] == [4, 4]
    in_order = data.BatchIterator(x, y, 4, shuffle=False)
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in in_order]), y)


def test_batch_iterator_epoch_replays_from_saved_rng_state():
    rng = np.random.default_rng(3)
    batches = data.BatchIterator(np.zeros((50, 2)), np.arange(50), 8, rng=rng)
    next(iter(batches))                           # an earlier epoch, abandoned part-way
    state = rng.bit_generator.state
    first = [yb.tolist() for _, yb in batches]
    rng.bit_generator.state = state
    assert [yb.tolist() for _, yb in batches] == first
    for step in (0, 3, 6, 7):                     # a mid-epoch resume: the rest of that epoch
        rng.bit_generator.state = state
        assert [yb.tolist() for _, yb in batches.start_at(step)] == first[step:]


def test_batch_larger_than_dataset_with_drop_last_raises():
    with pytest.raises(DataError, match="larger than the dataset"):
        data.BatchIterator(np.zeros((5, 2)), np.zeros(5), 8, rng=np.random.default_rng(0),
                           drop_last=True)


# ---------------------------------------------------------------- the real CIFAR-10 folder

@pytest.fixture(scope="session")
def cifar_jpeg_folder(tmp_path_factory):
    if not SHARED_ARCHIVE.exists():
        pytest.skip(f"{SHARED_ARCHIVE} is absent")
    target = tmp_path_factory.mktemp("cifar-jpeg")
    with tarfile.open(SHARED_ARCHIVE) as tar:
        tar.extractall(target, filter="data")
    return target / "cifar10-train"


def test_real_cifar10_jpeg_folder_loads_and_caches(cifar_jpeg_folder):
    dataset = data.load_dataset(cifar_jpeg_folder)
    assert dataset.x_train.shape == (50000, 3, 32, 32) and dataset.x_train.dtype == np.uint8
    assert dataset.classes == sorted(CLASSES)
    assert np.bincount(dataset.y_train).tolist() == [5000] * 10
    assert dataset.x_test is None
    start = time.perf_counter()
    again = data.load_dataset(cifar_jpeg_folder)
    assert time.perf_counter() - start < 10
    np.testing.assert_array_equal(again.x_train, dataset.x_train)


# The load runs in a child whose files may not grow past 64 kB (RLIMIT_FSIZE), with SIGXFSZ
# ignored: the cache write then fails with a real EFBIG, as on a full disk it fails with ENOSPC.
_LOAD_WITH_SMALL_FILES = """
import sys
from minicnn.datasets import loading
dataset = loading.load_image_folder(sys.argv[1])
print(dataset.x_train.shape, dataset.classes)
"""


def _limit_file_size():
    import resource
    import signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_a_cache_that_cannot_be_written_only_costs_a_warning(tmp_path):
    root = tmp_path / "pets"
    for i in range(20):                  # 40 images: a 123 kB cache, over the 64 kB limit
        save_image(root / "dog" / f"{i}.png", "RGB", (32, 32), (10, 20, i))
        save_image(root / "cat" / f"{i}.png", "RGB", (32, 32), (1, 2, i))
    cache = tmp_path / "cache"
    env = dict(os.environ, MINICNN_DATA=str(cache), PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run([sys.executable, "-c", _LOAD_WITH_SMALL_FILES, str(root)], env=env,
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=_limit_file_size)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(40, 3, 32, 32) ['cat', 'dog']"
    [line] = [l for l in done.stderr.splitlines() if "UserWarning: Cannot cache" in l]
    assert re.search(rf"Cannot cache the decoded images in {re.escape(str(cache))}/folder-"
                     rf"[0-9a-f]{{20}}\.npz \(File too large\); going on without the cache", line)
    assert os.listdir(cache) == []                     # no partial cache, no temporary file


def test_a_file_where_the_cache_folder_should_be_only_costs_a_warning(tmp_path, monkeypatch):
    root = tmp_path / "pets"
    save_image(root / "dog" / "a.png", "RGB", (32, 32), (10, 20, 30))
    (tmp_path / "not-a-folder").write_text("the user's file")
    monkeypatch.setenv("MINICNN_DATA", str(tmp_path / "not-a-folder"))
    with pytest.warns(UserWarning, match=r"Cannot cache the decoded images in .*not-a-folder/"
                                         r"folder-.*\.npz \(File exists\)"):
        dataset = data.load_image_folder(root)
    assert dataset.classes == ["dog"] and dataset.x_train[0, :, 0, 0].tolist() == [10, 20, 30]
    assert (tmp_path / "not-a-folder").read_text() == "the user's file"


def test_a_channel_that_never_changes_gets_a_spread_of_one_grey_level():
    x = np.zeros((4, 3, 8, 8), dtype=np.uint8)
    x[:, 0] = np.arange(64, dtype=np.uint8).reshape(8, 8)          # red varies, green and blue not
    mean, std = data.channel_stats(x)
    assert std[0] > 0.05 and std[1] == std[2] == np.float32(1 / 255)
    assert np.isfinite(data.normalize(x, mean, std)).all()


def test_an_image_over_pillows_pixel_limit_is_a_data_error(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)            # warns above, errors at 2x
    for side in (12, 40):
        save_image(tmp_path / f"{side}.png", "RGB", (side, side), (1, 2, 3))
        with pytest.raises(DataError, match="has more than 100 pixels"):
            data.decode_image(tmp_path / f"{side}.png")
