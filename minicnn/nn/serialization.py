"""minicnn's file format: one zip (NumPy .npz) holding a JSON header and named arrays.

    __minicnn__     uint8 bytes of a JSON object: {"format": "minicnn", "version": 1, ...}
    <name>          one .npy per array (weights, running statistics, optimiser state)

Reading uses np.load(allow_pickle=False): a minicnn file is never unpickled, so loading a file
from elsewhere cannot run code. Writing is atomic: a temporary file in the same directory is
flushed, fsync'ed and renamed over the target, so a crash never leaves a half-written file.
"""
import json
import os
import secrets
import zipfile
import zlib

import numpy as np

from minicnn.backend import to_numpy
from minicnn.errors import CheckpointError

FORMAT, VERSION = "minicnn", 1
_HEADER = "__minicnn__"


def atomic_write(path, write):
    """Call write(file) on a temporary file beside path, then rename it over path.

    An OSError names path, not the temporary file (which the user never asked for)."""
    path = os.fspath(path)
    try:
        _atomic_write(path, write)
    except OSError as e:
        if e.errno is None or e.filename == path:
            raise
        raise OSError(e.errno, e.strerror, path) from e


def is_temporary_of(name, targets):
    """Whether the file name is the temporary file of an atomic_write to one of targets (file
    names): "<target>.<8 hex digits>.tmp", left behind when a process is killed mid-write."""
    stem, _, suffix = name.rpartition(".")
    target, _, token = stem.rpartition(".")
    return (suffix == "tmp" and target in targets and len(token) == 8
            and all(ch in "0123456789abcdef" for ch in token))


def _atomic_write(path, write):
    directory = os.path.dirname(os.path.abspath(path))
    # the name is_temporary_of recognises
    tmp = os.path.join(directory, f"{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    # mode 0o666 less the umask, as for any file the user creates (mkstemp would give 0o600)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)             # make the rename itself durable
    finally:
        os.close(dir_fd)


def write_archive(path, header, arrays):
    """Write header (a JSON-able dict) and arrays ({name: array}, NumPy or CuPy) to path."""
    meta = {"format": FORMAT, "version": VERSION, **header}
    blob = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    payload = {name: to_numpy(a) for name, a in arrays.items()}
    atomic_write(path, lambda f: np.savez(f, **{_HEADER: blob}, **payload))


def read_archive(path):
    """-> (header dict, {name: numpy array}). Raises CheckpointError with one clear sentence."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"Checkpoint {path} cannot be read: {e.strerror}.") from None
    if magic != b"PK\x03\x04":
        raise CheckpointError(f"{path} is not a minicnn file (it is not a zip archive).")
    try:
        with np.load(path, allow_pickle=False) as z:
            if _HEADER not in z.files:
                raise CheckpointError(f"{path} is not a minicnn file (it has no minicnn header).")
            header = json.loads(bytes(z[_HEADER]).decode("utf-8"))
            arrays = {name: z[name] for name in z.files if name != _HEADER}
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError,
            UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}).") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a minicnn file (its header names another format).")
    if header.get("version") != VERSION:
        raise CheckpointError(f"{path} is minicnn format version {header.get('version')}; this "
                              f"minicnn reads version {VERSION}.")
    return header, arrays
