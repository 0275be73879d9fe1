"""Small CIFAR-10 archives in both official formats, and a local HTTP server, for test_data.py."""
import hashlib
import http.server
import io
import pickle
import tarfile
import threading

import numpy as np

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
    files["batches.meta.txt"] = ("\n".join(CLASSES) + "\n\n").encode()   # the real one ends in blank lines
    return files


def python_files(batches):
    """{file name: bytes} of cifar-10-batches-py/: protocol-3 pickles of dicts with bytes keys
    and a uint8 (n, 3072) array, like the Python 2 pickles of the official archive."""
    files = {name: pickle.dumps({b"batch_label": name.encode(),
                                 b"labels": [int(v) for v in labels],
                                 b"data": images.reshape(len(images), 3072),
                                 b"filenames": [b"x.png"] * len(images)}, protocol=3)
             for name, (images, labels) in batches.items()}
    files["batches.meta"] = pickle.dumps({b"label_names": [c.encode() for c in CLASSES],
                                          b"num_vis": 3072}, protocol=3)
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
