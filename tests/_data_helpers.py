"""Small CIFAR-10 archives in both official formats, and a local HTTP server, for test_data.py."""
import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading

import numpy as np
from PIL import Image

CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck"]
BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def fake_cifar(records_per_batch, seed=0):
    """{batch name: (images uint8 (n, 3, 32, 32), labels int64 (n,))} with random content."""
    rng = np.random.default_rng(seed)
    return {name: (rng.integers(0, 256, size=(records_per_batch, 3, 32, 32), dtype=np.uint8),
                   rng.integers(0, 10, size=records_per_batch).astype(np.int64))
            for name in BATCHES}


def binary_batch(images, labels):
    """The official binary record layout: label byte, then the R, G and B planes row-major."""
    return b"".join(bytes([int(label)]) + image.tobytes() for image, label in zip(images, labels))


def binary_files(batches):
    """{file name: bytes} of cifar-10-batches-bin/."""
    files = {name + ".bin": binary_batch(*batches[name]) for name in BATCHES}
    # The real batches.meta.txt ends in blank lines.
    files["batches.meta.txt"] = ("\n".join(CLASSES) + "\n\n").encode()
    return files


class _Python2Pickler(pickle._Pickler):
    """Pickles as Python 2 did for the official archive: protocol 2, strings as BINSTRING
    opcodes (read back as bytes with encoding="bytes"), numpy.core.multiarray._reconstruct."""
    dispatch = pickle._Pickler.dispatch.copy()

    def save_binstring(self, obj):                  # no memo entry: every string is written out
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)

    dispatch[bytes] = save_binstring
    dispatch[str] = save_binstring


def python2_dumps(obj):
    out = io.BytesIO()
    _Python2Pickler(out, protocol=2).dump(obj)
    return out.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def numpy2_dumps(obj):
    """A pickle as Python 3 and NumPy 2 write it (numpy._core.multiarray._reconstruct)."""
    return pickle.dumps(obj, protocol=3)


def python_files(batches, dumps=python2_dumps):
    """{file name: bytes} of cifar-10-batches-py/: pickled dicts with a uint8 (n, 3072) array."""
    files = {name: dumps({"batch_label": name,
                          "labels": [int(v) for v in labels],
                          "data": images.reshape(len(images), 3072),
                          "filenames": ["x.png"] * len(images)})
             for name, (images, labels) in batches.items()}
    files["batches.meta"] = dumps({"label_names": CLASSES, "num_vis": 3072})
    return files


def write_tar_gz(path, folder, files):
    """Write files ({name: bytes}) as folder/<name> into the gzip tar archive at path."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def md5_of(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


class LocalServer:
    """A ThreadingHTTPServer on 127.0.0.1 that serves self.files at /<name>, answers 404 for
    unknown names, and at /short promises 100,000 bytes but sends 100 and hangs up.
    self.hits counts requests per path."""

    def __init__(self):
        self.files, self.hits = {}, {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                server.hits[name] = server.hits.get(name, 0) + 1
                if name == "short":
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.write(b"x" * 100)
                    self.close_connection = True
                elif name in server.files:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(server.files[name])))
                    self.end_headers()
                    self.wfile.write(server.files[name])
                else:
                    self.send_error(404)

            def log_message(self, *args):          # keep test output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ---- a tiny image-folder dataset the models can learn in seconds ----------------------------
SHAPES = ["circle", "cross", "stripes"]


def shape_image(kind, rng, size=32):
    """A noisy 32x32 RGB picture whose class is visible: a colour and a shape."""
    img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    r, c = np.mgrid[:size, :size]
    if kind == "circle":
        img[(r - 16) ** 2 + (c - 16) ** 2 < 80] = (220, 40, 40)
    elif kind == "cross":
        img[(abs(r - c) < 3) | (abs(r + c - 31) < 3)] = (40, 220, 40)
    else:
        img[(c // 4) % 2 == 0] = (40, 40, 220)
    return img


def make_folder(root, per_class=24, seed=0, classes=SHAPES):
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(shape_image(name, rng)).save(root / name / f"{i:03d}.png")
    return root
