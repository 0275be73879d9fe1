"""Data as users have it: every image mode and bit depth, class folders with subfolders, links
and fifos, names in any bytes the filesystem allows (end to end through python -m minicnn.train),
and archives or images that declare more bytes than they can hold."""
import gzip
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from _data_helpers import binary_files, fake_cifar, python_files, shape_image, write_tar_gz
from minicnn.datasets import image_dataset_from_directory
from minicnn.datasets import loading as data
from minicnn.errors import DataError
from minicnn.training.metrics import classification_report, format_report
from minicnn.training.plots import plot_confusion, plot_predictions


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINICNN_DATA", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def no_hang():
    """Fail, rather than hang, if something blocks (opening a fifo waits for a writer)."""
    def timeout(signum, frame):
        raise TimeoutError("blocked for 60 s")
    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- images of every mode

def png_bytes(array, colour_type):
    """A 16-bit PNG (Pillow writes 16-bit grey only): array uint16 (H, W, channels)."""
    h, w = array.shape[:2]

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    rows = b"".join(b"\x00" + array[r].astype(">u2").tobytes() for r in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type,
                                                               0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


SIXTEEN = np.array([[0, 255, 256, 0x7FFF], [0x8000, 0x8080, 0xFF00, 0xFFFF]], dtype=np.uint16)
HIGH_BYTE = (SIXTEEN >> 8).astype(np.uint8)          # 0 0 1 127 / 128 128 255 255


def decoded(tmp_path, image, name, **save):
    path = tmp_path / name
    image.save(path, **save)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                # no Pillow warning reaches the user
        return data.decode_image(path, image_size=image.size[::-1])       # (3, H, W)


def assert_grey(x, expected):
    assert x.dtype == np.uint8 and x.shape == (3,) + expected.shape
    for channel in x:
        np.testing.assert_array_equal(channel, expected)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_sixteen_bit_grey_keeps_its_high_byte(tmp_path, mode):
    image = Image.frombytes(mode, (4, 2), SIXTEEN.astype("<u2" if mode == "I;16" else ">u2").tobytes())
    assert image.mode == mode
    assert_grey(decoded(tmp_path, image, "a.tif"), HIGH_BYTE)


def test_a_sixteen_bit_png_is_not_saturated(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    image = Image.fromarray(ramp)
    path = tmp_path / "ramp.png"
    image.save(path)
    with Image.open(path) as opened:
        assert opened.mode.startswith("I")                # Pillow keeps the 16 bits
    x = data.decode_image(path, (64, 64))
    assert_grey(x, (ramp >> 8).astype(np.uint8))
    assert (x == 255).mean() < 0.01 and abs(float(x.mean()) - 127.5) < 1   # not 99% white


def test_thirty_two_bit_integers_are_read_as_sixteen_bit_data(tmp_path):
    values = np.array([[-5, 0, 255, 256], [0x8000, 0xFFFF, 0x10000, 1 << 30]], dtype=np.int32)
    image = Image.fromarray(values, mode="I")
    expected = np.array([[0, 0, 0, 1], [128, 255, 255, 255]], dtype=np.uint8)
    assert_grey(decoded(tmp_path, image, "a.tif"), expected)


def test_float_images_are_taken_as_zero_to_one(tmp_path):
    values = np.array([[-0.5, 0.0, 0.25, 0.5], [0.999, 1.0, 7.0, np.nan]], dtype=np.float32)
    expected = np.array([[0, 0, 64, 128], [255, 255, 255, 0]], dtype=np.uint8)
    assert_grey(decoded(tmp_path, Image.fromarray(values, mode="F"), "a.tif"), expected)


@pytest.mark.parametrize("colour_type, channels", [(2, 3), (6, 4), (4, 2)])
def test_sixteen_bit_colour_pngs_keep_their_high_byte(tmp_path, colour_type, channels):
    rng = np.random.default_rng(colour_type)
    array = rng.integers(0, 65536, (3, 5, channels)).astype(np.uint16)
    array[0, 0, :] = 0xFFFF
    array[0, 1, :] = 0x8080
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(array, colour_type))
    x = data.decode_image(path, (3, 5))
    high = (array >> 8).astype(np.uint8)
    colour = high[..., :3] if channels >= 3 else np.repeat(high[..., :1], 3, axis=2)  # alpha dropped
    np.testing.assert_array_equal(x, colour.transpose(2, 0, 1))


def test_eight_bit_modes_become_rgb_as_keras_load_img(tmp_path):
    rgba = Image.new("RGBA", (2, 1), (10, 200, 30, 0))          # fully transparent
    np.testing.assert_array_equal(decoded(tmp_path, rgba, "a.png")[:, 0, 0], [10, 200, 30])

    la = Image.new("LA", (2, 1), (100, 7))
    np.testing.assert_array_equal(decoded(tmp_path, la, "b.png")[:, 0, 0], [100, 100, 100])

    grey = Image.new("L", (2, 1), 77)
    np.testing.assert_array_equal(decoded(tmp_path, grey, "c.png")[:, 0, 0], [77, 77, 77])

    bits = Image.frombytes("1", (8, 1), bytes([0b10100000]))
    x = decoded(tmp_path, bits, "d.png")
    np.testing.assert_array_equal(x[0, 0], [255, 0, 255, 0, 0, 0, 0, 0])

    cmyk = Image.new("CMYK", (2, 1), (0, 255, 255, 0))          # red ink-free: pure red
    np.testing.assert_array_equal(decoded(tmp_path, cmyk, "e.tif")[:, 0, 0], [255, 0, 0])


@pytest.mark.parametrize("transparency", [0, b"\x00\xff"])
def test_palette_with_transparency_gives_its_colours_without_a_warning(tmp_path, transparency):
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((1, 0), 1)
    x = decoded(tmp_path, image, "p.png", transparency=transparency)
    np.testing.assert_array_equal(x[:, 0], [[255, 0], [0, 0], [0, 255]])   # alpha dropped


# ---------------------------------------------------------------- class folders, walked

def save(path, colour=(200, 0, 0), size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_images_in_subfolders_count_and_enter_the_cache_key(tmp_path):
    root = tmp_path / "pets"
    save(root / "cat" / "a.png", (1, 0, 0))
    save(root / "cat" / "indoor" / "b.png", (2, 0, 0))
    save(root / "cat" / "indoor" / "sofa" / "c.png", (3, 0, 0))
    save(root / "cat" / ".thumbs" / "hidden.png")                # hidden folder: not read
    save(root / "dog" / "z" / "d.png", (4, 0, 0))
    ds = data.load_image_folder(root, (8, 8))
    assert ds.classes == ["cat", "dog"]
    assert ds.x_train[:, 0, 0, 0].tolist() == [1, 2, 3, 4] and ds.y_train.tolist() == [0, 0, 0, 1]

    x, y, names = image_dataset_from_directory(root, image_size=(8, 8))   # the same walk
    np.testing.assert_array_equal(x, ds.x_train)
    np.testing.assert_array_equal(y, ds.y_train)

    save(root / "dog" / "z" / "deeper" / "e.png", (5, 0, 0))    # a new nested file
    again = data.load_image_folder(root, (8, 8))
    assert again.x_train[:, 0, 0, 0].tolist() == [1, 2, 3, 4, 5]


def test_links_loops_fifos_and_sockets_are_skipped_with_one_warning(tmp_path, no_hang):
    root = tmp_path / "pets"
    save(root / "cat" / "a.png")
    save(root / "dog" / "b.png")
    cat = root / "cat"
    os.symlink(".", cat / "loop")                        # a link to the folder itself
    os.symlink("ouroboros-2", cat / "ouroboros-1.png")   # a loop of two links: ELOOP
    os.symlink("ouroboros-1.png", cat / "ouroboros-2")
    os.symlink("nowhere.png", cat / "dangling.png")
    os.mkfifo(cat / "fifo.png")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(cat / "socket.png"))
    os.symlink(cat / "a.png", root / "dog" / "link-to-a.png")    # a link to a file is read
    try:
        with pytest.warns(UserWarning, match=r"Skipped 6 unreadable or non-image files under"):
            ds = data.load_image_folder(root, (8, 8))
        assert ds.y_train.tolist() == [0, 1, 1]
        with pytest.warns(UserWarning, match=r"Skipped 4 unreadable image files"):   # *.png only
            x, y, _ = image_dataset_from_directory(root, image_size=(8, 8))
        assert y.tolist() == [0, 1, 1]
        with pytest.raises(DataError, match="not a regular file"):
            data.decode_image(cat / "fifo.png")
    finally:
        sock.close()


def test_a_class_folder_of_unreadable_entries_says_so(tmp_path):
    save(tmp_path / "pets" / "cat" / "a.png")
    (tmp_path / "pets" / "dog").mkdir()
    os.symlink("nowhere.png", tmp_path / "pets" / "dog" / "dangling.png")
    with pytest.raises(DataError, match=r"dog has no readable images; add images"):
        data.load_image_folder(tmp_path / "pets")


def test_a_folder_where_the_cache_file_should_be_only_costs_a_warning(tmp_path, private_cache):
    root = tmp_path / "pets"
    save(root / "cat" / "a.png", (9, 0, 0))
    data.load_image_folder(root, (8, 8))
    [cached] = private_cache.glob("folder-*.npz")
    cached.unlink()
    cached.mkdir()                                        # something of the user's, in the way
    (cached / "notes.txt").write_text("kept")
    with pytest.warns(UserWarning, match=r"Cannot cache the decoded images in .*folder-[0-9a-f]+"
                                         r"\.npz \(Is a directory\); going on without"):
        dataset = data.load_image_folder(root, (8, 8))
    assert dataset.x_train[:, 0, 0, 0].tolist() == [9]
    assert (cached / "notes.txt").read_text() == "kept"
    assert sorted(p.name for p in private_cache.iterdir()) == [cached.name]   # no temporary


# ---------------------------------------------------------------- names in any bytes

ODD_CLASSES = [b"caf\xe9", b"new\nline", b"tab\tbed", "smile\U0001F600".encode()]


def odd_folder(root):
    """Four classes whose names hold invalid UTF-8, a newline, a tab and an emoji, each image
    named likewise; bytes paths all the way."""
    rng = np.random.default_rng(0)
    kinds = ["circle", "cross", "stripes", "circle"]
    for name, kind in zip(ODD_CLASSES, kinds):
        folder = os.path.join(os.fsencode(root), name)
        os.makedirs(os.path.join(folder, b"sub\xff\x01dir"))
        for i in range(6):
            sub = b"sub\xff\x01dir" if i % 2 else b""
            path = os.path.join(folder, sub, b"img-\xfe\n\t%d-\xf0\x9f\x90\x88.png" % i)
            Image.fromarray(shape_image(kind, rng)).save(os.fsdecode(path), format="PNG")
    return root


def test_display_name_is_printable_valid_text_and_tells_names_apart():
    names = [os.fsdecode(n) for n in ODD_CLASSES] + ["back\\slash", "caf\\xe9", "plain"]
    shown = [data.display_name(n) for n in names]
    assert shown[:4] == ["caf\\xe9", "new\\nline", "tab\\tbed", "smile\U0001F600"]
    assert shown[4:] == ["back\\\\slash", "caf\\\\xe9", "plain"]
    assert len(set(shown)) == len(shown)                  # caf+0xe9 and "caf\\xe9" differ
    for text in shown:
        assert text.isprintable()
        text.encode("utf-8")                                # no lone surrogate left
        assert data.printable(text) == text                 # printable text is left alone
    assert data.display_name(b"caf\xe9/x") == "caf\\xe9/x"
    assert data.printable("a\\b\x1b[0m\udcff") == "a\\b\\x1b[0m\\xff"


def test_the_class_names_are_the_folders_display_names(tmp_path):
    root = os.fsencode(tmp_path / "pets")
    for i, name in enumerate([b"caf\xe9", b"caf\\xe9", b"z\n"]):
        os.makedirs(os.path.join(root, name))
        save(tmp_path / "pets" / os.fsdecode(name) / "a.png", (i, 0, 0))
    ds = data.load_image_folder(os.fsdecode(root), (8, 8))
    assert ds.classes == ["caf\\\\xe9", "caf\\xe9", "z\\n"]       # sorted by folder name
    assert ds.x_train[:, 0, 0, 0].tolist() == [1, 0, 2] and ds.y_train.tolist() == [0, 1, 2]
    again = data.load_image_folder(os.fsdecode(root), (8, 8))       # from the cache
    assert again.classes == ds.classes
    _, _, names = image_dataset_from_directory(os.fsdecode(root), image_size=(8, 8))
    assert names == ["caf\\xe9", "caf\udce9", "z\n"]                # Keras's: the names as they are


def test_reports_and_pictures_take_any_class_name(tmp_path):
    names = [os.fsdecode(n) for n in ODD_CLASSES] + ["$x^2$", "a$b", "\x1b[31mred"]
    k = len(names)
    labels = np.arange(k)
    logits = np.eye(k)[(labels + 1) % k]
    report = classification_report(logits, labels, names)
    text = format_report(report)
    assert "caf\\xe9" in text and "new\\nline" in text and "\x1b" not in text
    assert len(text.splitlines()) == len(format_report(
        classification_report(logits, labels, [f"c{i}" for i in range(k)])).splitlines())
    json.loads(json.dumps(report, ensure_ascii=False).encode("utf-8").decode("utf-8"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # no glyph or mathtext warnings
        plot_confusion(report["confusion"], names, tmp_path / "confusion.png")
        images = np.zeros((k, 3, 8, 8), dtype=np.uint8)
        plot_predictions(images, labels, (labels + 1) % k, names, tmp_path / "pred.png")
    assert (tmp_path / "confusion.png").stat().st_size > 1000
    assert (tmp_path / "pred.png").stat().st_size > 1000


def test_odd_names_train_end_to_end_and_resume(tmp_path):
    root = odd_folder(tmp_path / "odd")
    out = tmp_path / "run"
    env = dict(os.environ, MINICNN_DATA=str(tmp_path / "cache"), PYTHONUTF8="0",
               LC_ALL="C.UTF-8", PYTHONIOENCODING="utf-8:strict")   # stdout refuses surrogates
    args = [sys.executable, "-m", "minicnn.train", "--data", str(root), "--out", str(out),
            "--epochs", "1", "--batch-size", "4", "--val-split", "0.25"]
    first = subprocess.run(args, env=env, capture_output=True, timeout=300)
    assert first.returncode == 0, first.stderr.decode(errors="replace")
    stdout = first.stdout.decode("utf-8")
    assert "caf\\xe9" in stdout and "new\\nline" in stdout and "smile\U0001F600" in stdout

    raw = (out / "report.json").read_bytes()
    report = json.loads(raw.decode("utf-8"))                 # valid UTF-8 JSON
    assert report["classes"] == ["caf\\xe9", "new\\nline", "smile\U0001F600", "tab\\tbed"]
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in json.dumps(report, ensure_ascii=False))
    for picture in ("confusion.png", "predictions.png", "curves.png"):
        with Image.open(out / picture) as image:
            assert image.format == "PNG"
    settings = json.loads((out / "settings.json").read_bytes().decode("utf-8"))
    assert settings["classes"] == report["classes"]

    # A resumed finished run reports again, now on an ASCII-only stdout.
    env["PYTHONIOENCODING"] = "ascii:strict"
    (out / "report.json").unlink()
    again = subprocess.run(args + ["--resume"], env=env, capture_output=True, timeout=300)
    assert again.returncode == 0, again.stderr.decode(errors="replace")
    assert json.loads((out / "report.json").read_text("utf-8"))["classes"] == report["classes"]
    assert "smile\\U0001f600" in again.stdout.decode("ascii")


# ---------------------------------------------------------------- budgets before allocation

def tar_gz_with_header(path, name, declared, body=b""):
    """A .tar.gz whose one member declares `declared` bytes and holds `body`."""
    info = tarfile.TarInfo(name)
    info.size = declared
    info.type = tarfile.REGTYPE if name != "pax" else tarfile.XHDTYPE
    raw = info.tobuf(format=tarfile.USTAR_FORMAT if declared < 8 ** 11 else tarfile.GNU_FORMAT)
    path.write_bytes(gzip.compress(raw + body + b"\0" * 1024))
    return path


@pytest.mark.parametrize("name, declared", [
    ("cifar-10-batches-bin/data_batch_1.bin", 10 ** 12),      # a terabyte, declared
    ("cifar-10-batches-bin/data_batch_1.bin", 30730000 + 3073),   # one record too many
    ("cifar-10-batches-py/data_batch_1", 10 ** 9),
    ("cifar-10-batches-bin/batches.meta.txt", 10 ** 7),
])
def test_a_tar_member_larger_than_the_format_is_refused_before_reading(tmp_path, name, declared):
    archive = tar_gz_with_header(tmp_path / "a.tar.gz", name, declared)
    with pytest.raises(DataError, match=r"more than a CIFAR-10 .* can hold .*bytes\): it is "
                                        r"corrupt or not a CIFAR-10 archive, so use the official"):
        data.load_dataset(archive)


def test_a_too_large_member_is_not_read_into_memory(tmp_path):
    body = b"\0" * 40_000_000                                    # real bytes, 40 kB gzipped
    archive = tar_gz_with_header(tmp_path / "a.tar.gz", "cifar-10-batches-bin/test_batch.bin",
                                 len(body), body)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="test_batch.bin of 40,000,000 bytes"):
            data.load_dataset(archive)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8_000_000


def test_a_forged_pax_header_is_refused_before_reading(tmp_path):
    archive = tar_gz_with_header(tmp_path / "a.tar.gz", "pax", 10 ** 10)
    with pytest.raises(DataError, match="tar entry of more than"):
        data.load_dataset(archive)


def test_an_extracted_batch_larger_than_the_format_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for name, raw in binary_files(fake_cifar(2)).items():
        (folder / name).write_bytes(raw)
    with open(folder / "data_batch_2.bin", "r+b") as f:
        f.truncate(10 ** 10)                                      # sparse: no disk used
    with pytest.raises(DataError, match=r"data_batch_2.bin of 10,000,000,000 bytes"):
        data.load_dataset(folder)


def test_official_sized_batches_pass_the_budget(tmp_path):
    """A full 10,000-record binary batch is exactly the budget."""
    files = binary_files(fake_cifar(2))
    files["data_batch_1.bin"] = bytes(30730000)
    archive = write_tar_gz(tmp_path / "c.tar.gz", "cifar-10-batches-bin", files)
    ds = data.load_dataset(archive)
    assert len(ds.x_train) == 10000 + 4 * 2


def python_batch_folder(tmp_path, replace):
    """An extracted cifar-10-batches-py/ whose data_batch_1 is replace(the good pickle)."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, raw in python_files(fake_cifar(2)).items():
        (folder / name).write_bytes(replace(raw) if name == "data_batch_1" else raw)
    return folder


@pytest.mark.parametrize("opcode", [b"\x8e", b"\x96", b"\x8d"])   # BINBYTES8, BYTEARRAY8, ...
def test_a_pickle_length_beyond_the_file_is_refused_before_allocating(tmp_path, opcode):
    forged = b"\x80\x04" + opcode + struct.pack("<Q", 2 ** 60) + b"xx."
    folder = python_batch_folder(tmp_path, lambda raw: forged)
    with pytest.raises(DataError, match=r"data_batch|cannot be unpickled"):
        data.load_dataset(folder)


def test_a_damaged_dtype_state_is_never_handed_to_numpy(tmp_path):
    """This one-byte change to the dtype's pickled state crashed the interpreter (SIGSEGV)
    when NumPy's dtype.__setstate__ read it; the loader reads the bytes, not the state."""
    def damage(raw):
        assert raw.count(b"U\x01|N") == 1
        return raw.replace(b"U\x01|N", b"U\x01|q")
    folder = python_batch_folder(tmp_path, damage)
    dataset = data.load_dataset(folder)            # a uint8 needs nothing from that state
    assert dataset.x_train.shape == (10, 3, 32, 32)


def test_a_label_without_a_class_name_is_refused(tmp_path):
    batches = fake_cifar(2)
    batches["data_batch_4"][1][1] = 200
    archive = write_tar_gz(tmp_path / "c.tar.gz", "cifar-10-batches-bin", binary_files(batches))
    with pytest.raises(DataError, match="labels up to 200 but 10 class names"):
        data.load_dataset(archive)


def huge_png(width, height):
    """A valid PNG header declaring width x height pixels, with almost no pixel data."""
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                               0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def test_the_pixel_budget_applies_before_decoding_in_every_path(tmp_path):
    root = tmp_path / "pets"
    save(root / "cat" / "a.png")
    save(root / "dog" / "b.png")
    (root / "dog" / "bomb.png").write_bytes(huge_png(40000, 40000))   # 4.8 GB if decoded
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="has more than"):
            data.decode_image(root / "dog" / "bomb.png")
        with pytest.warns(UserWarning, match="Skipped 1 unreadable or non-image"):
            assert len(data.load_image_folder(root, (8, 8)).x_train) == 2
        with pytest.warns(UserWarning, match="Skipped 1 unreadable image"):
            assert len(image_dataset_from_directory(root, image_size=(8, 8))[0]) == 2
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50_000_000
