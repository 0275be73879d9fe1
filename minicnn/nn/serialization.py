"""minicnn's file format: one zip (NumPy .npz) holding a JSON header and named arrays.

    __minicnn__.npy     uint8 bytes of a JSON object: {"format": "minicnn", "version": 1, ...}
    <name>.npy          one .npy per array (weights, running statistics, optimiser state)

Writing is atomic: a temporary file in the same directory is flushed, fsync'ed and renamed over
the target, so a crash never leaves a half-written file.

Reading (open_archive, read_archive) trusts nothing in the file before it is checked, and every
problem is a CheckpointError, one sentence naming the file. In this order:
  1. the zip's end record: a central directory of at most MAX_DIRECTORY_BYTES, at most
     MAX_MEMBERS members (read before zipfile parses the directory);
  2. each member's directory entry: a .npy, named once, stored or deflated, not encrypted, and
     declaring at most MAX_DEFLATE_RATIO times its compressed size; the declared sizes together
     at most max_file_bytes() ($MINICNN_MAX_FILE_BYTES, default 4 GiB);
  3. each .npy header (the first few hundred bytes of its member, nothing more inflated): at
     most MAX_NPY_HEADER_BYTES long, a plain numeric dtype (bool, int, float: never an object,
     so never a pickle) and a shape whose bytes, after the header, are exactly the member's
     declared size;
  4. the JSON header: at most MAX_HEADER_BYTES, nested at most MAX_JSON_DEPTH deep, format and
     version.
Only then is an array read: np.lib.format.read_array(allow_pickle=False) into an array of the
checked size, from a member zipfile never inflates past its declared size (nor accepts with a
wrong CRC).

Memory bound: opening a file holds its central directory (at most MAX_DIRECTORY_BYTES, and an
object of a few hundred bytes per member) and its parsed JSON header (at most about 25 times
MAX_HEADER_BYTES: 100 MB); each array read is at most its member's declared size, and all of
them together at most max_file_bytes(). An Archive reads an array when it is looked up, so a
caller that copies each into place (minicnn.nn.model.load) holds one at a time.
"""
import contextlib
import io
import json
import math
import os
import secrets
import struct
import zipfile
import zlib
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from minicnn.backend import to_numpy
from minicnn.errors import CheckpointError

FORMAT, VERSION = "minicnn", 1
_HEADER = "__minicnn__"

# Budgets of a file being read (the module docstring says what they bound).
MAX_FILE_BYTES = 4 * 2**30       # default of $MINICNN_MAX_FILE_BYTES: all members, uncompressed
MAX_MEMBERS = 10_000             # arrays in a file (resnet-small's checkpoint: 95)
MAX_DIRECTORY_BYTES = 2 * 2**20  # the zip's central directory (about 100 bytes a member)
MAX_HEADER_BYTES = 4 * 2**20     # the JSON header (a 1,000-epoch history is 150 kB)
MAX_JSON_DEPTH = 200             # JSON nesting (a model 64 layers deep needs 130)
MAX_NDIM = 32                    # dimensions of an array
MAX_NPY_HEADER_BYTES = 10_000    # a .npy header (NumPy's own max_header_size)
_NPY_HEADER_LENGTH = {(1, 0): "<H", (2, 0): "<I"}    # the header length field of each version
# Deflate codes at most 258 bytes in 2 bits: no stream inflates to more than 1032 times its size.
MAX_DEFLATE_RATIO = 1032
NUMERIC_KINDS = "biuf"           # bool, signed and unsigned int, float: dtypes a file may hold


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


def max_file_bytes():
    """The most bytes a file's members may declare, uncompressed, together:
    $MINICNN_MAX_FILE_BYTES, or MAX_FILE_BYTES (4 GiB)."""
    text = os.environ.get("MINICNN_MAX_FILE_BYTES", "").strip()
    if not text:
        return MAX_FILE_BYTES
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise CheckpointError(f"MINICNN_MAX_FILE_BYTES must be a whole number of bytes, at "
                              f"least 1, got {text[:40]!r}.")
    return value


class ArraySpec(NamedTuple):
    """What a .npy header declares: the shape and dtype of the array, before it is read."""
    shape: tuple
    dtype: np.dtype

    @property
    def nbytes(self):
        return math.prod(self.shape) * self.dtype.itemsize


def array_specs(arrays):
    """{name: ArraySpec} of an Archive (from the .npy headers, nothing read) or of a dict of
    arrays."""
    if isinstance(arrays, Archive):
        return dict(arrays.specs)
    return {name: ArraySpec(tuple(a.shape), np.dtype(a.dtype)) for name, a in arrays.items()}


def show(value, limit=40):
    """A short, one-line description of a value read from a file, for an error message: its
    repr up to limit characters, or what it is (a list of 5 items)."""
    if isinstance(value, list) and len(value) <= 4 and not any(
            isinstance(v, (list, dict)) for v in value):
        text = "[" + ", ".join(show(v, limit) for v in value) + "]"
        if len(text) <= limit:
            return text
    if isinstance(value, (list, dict)):
        return (f"a JSON object of {len(value)} field(s)" if isinstance(value, dict)
                else f"a list of {len(value)} item(s)")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        return f"a {len(str(abs(value)))}-digit number"
    text = repr(value[:limit] if isinstance(value, str) else value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Archive(Mapping):
    """An opened minicnn file that passed every check of the module docstring: .path, .header
    (the JSON dict), .specs ({name: ArraySpec}), and a read-only mapping {name: array} that
    reads an array (allow_pickle=False) when it is looked up. Close it, or use it in a with."""

    def __init__(self, path, zip_file, members, header):
        self.path, self.header = path, header
        self._zip, self._members = zip_file, members          # {name: (ZipInfo, ArraySpec)}
        self.specs = {name: spec for name, (_, spec) in members.items() if name != _HEADER}

    def __getitem__(self, name):
        if name not in self.specs:
            raise KeyError(name)
        return _read_array(self.path, self._zip, *self._members[name])

    def __iter__(self):
        return iter(self.specs)

    def __len__(self):
        return len(self.specs)

    def close(self):
        self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_archive(path):
    """-> an Archive of the minicnn file at path, every member checked and none read but the
    header. Raises CheckpointError with one clear sentence."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    if not os.path.isfile(path):          # a directory, or a pipe or device that open() waits on
        raise CheckpointError(f"Checkpoint {path} is not a file.")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
            with _reading(path):
                _check_end_record(path, f)
    except OSError as e:
        raise CheckpointError(f"Checkpoint {path} cannot be read: {e.strerror}.") from None
    if magic != b"PK\x03\x04":
        raise CheckpointError(f"{path} is not a minicnn file (it is not a zip archive).")
    with _reading(path):
        zip_file = zipfile.ZipFile(path)
    try:
        with _reading(path):
            members = _check_directory(path, zip_file)
            header = _read_header(path, zip_file, members)
        return Archive(path, zip_file, members, header)
    except BaseException:
        zip_file.close()
        raise


def read_archive(path):
    """-> (header dict, {name: numpy array}): every array of the file at path, read after the
    checks of open_archive. Raises CheckpointError with one clear sentence."""
    with open_archive(path) as archive:
        return archive.header, {name: archive[name] for name in archive}


@contextlib.contextmanager
def _reading(path):
    """Turn what zipfile, zlib, json and numpy raise on a damaged file into one sentence."""
    try:
        yield
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError,
            UnicodeDecodeError, struct.error, NotImplementedError) as e:
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:200]      # one line, short
        raise CheckpointError(f"{path} is truncated or corrupt ({detail}).") from None


_END = struct.Struct("<4s4H2LH")            # end of central directory record
_END64_LOCATOR = struct.Struct("<4sLQL")    # zip64 end record locator, just before it
_END64 = struct.Struct("<4sQ2H2L4Q")        # zip64 end record, just before the locator


def _check_end_record(path, f):
    """Refuse a central directory larger than MAX_DIRECTORY_BYTES or holding more than
    MAX_MEMBERS members, from the end record found where zipfile looks for it (last 22
    bytes, else the last signature in the final 64 kB), before zipfile reads the directory."""
    size = f.seek(0, os.SEEK_END)
    tail_at = max(size - _END.size - 0xFFFF, 0)
    f.seek(tail_at)
    tail = f.read()
    at = len(tail) - _END.size
    if not (at >= 0 and tail[at:at + 4] == b"PK\x05\x06" and tail[-2:] == b"\0\0"):
        at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _END.size:
        return                                   # no end record: zipfile says it is no zip
    members, directory = _END.unpack_from(tail, at)[4:6]
    record_at = tail_at + at - _END64_LOCATOR.size - _END64.size
    if record_at >= 0:
        f.seek(record_at)
        raw = f.read(_END64.size + _END64_LOCATOR.size)
        if raw[_END64.size:_END64.size + 4] == b"PK\x06\x07" and raw[:4] == b"PK\x06\x06":
            members, directory = _END64.unpack_from(raw)[7:9]
    if directory > MAX_DIRECTORY_BYTES or members > MAX_MEMBERS:
        raise CheckpointError(f"{path} has a zip directory of {members:,} members in "
                              f"{directory:,} bytes; a minicnn file has at most "
                              f"{MAX_MEMBERS:,} members in {MAX_DIRECTORY_BYTES:,} bytes.")


def _check_directory(path, zip_file):
    """-> {name: (ZipInfo, ArraySpec)} of the members, each checked (steps 2 and 3 of the module
    docstring); only the .npy headers are inflated."""
    infos = zip_file.infolist()
    if len(infos) > MAX_MEMBERS:
        raise CheckpointError(f"{path} has {len(infos):,} members; a minicnn file has at most "
                              f"{MAX_MEMBERS:,}.")
    seen, total, budget = set(), 0, max_file_bytes()
    for info in infos:
        name = info.filename[:-4]
        if not info.filename.endswith(".npy") or info.is_dir():
            raise CheckpointError(f"{path} has a member {show(info.filename)} that is not a "
                                  f".npy array, which is all a minicnn file holds.")
        if name in seen:
            raise CheckpointError(f"{path} has two members named {show(info.filename)}.")
        seen.add(name)
        if info.flag_bits & 0x1:
            raise CheckpointError(f"{path} has an encrypted member {show(info.filename)}; "
                                  f"minicnn files are not encrypted.")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CheckpointError(f"{path} has a member {show(info.filename)} compressed with "
                                  f"zip method {info.compress_type}; minicnn files are stored "
                                  f"or deflated.")
        stored = info.compress_type == zipfile.ZIP_STORED
        if (info.file_size != info.compress_size if stored
                else info.file_size > MAX_DEFLATE_RATIO * info.compress_size):
            raise CheckpointError(f"{path} has a member {show(info.filename)} that declares "
                                  f"{info.file_size:,} bytes from {info.compress_size:,} "
                                  f"{'stored' if stored else 'deflated'} bytes, which no zip "
                                  f"writer produces: the file is crafted or corrupt.")
        total += info.file_size
    if total > budget:
        raise CheckpointError(f"{path} declares {total:,} bytes of arrays, more than the "
                              f"{budget:,} that minicnn reads (MINICNN_MAX_FILE_BYTES).")
    if _HEADER not in seen:
        raise CheckpointError(f"{path} is not a minicnn file (it has no minicnn header).")
    return {info.filename[:-4]: (info, _npy_spec(path, zip_file, info)) for info in infos}


def _npy_spec(path, zip_file, info):
    """The ArraySpec the member's .npy header declares, checked: a plain numeric dtype, and
    exactly the member's declared size. Inflates the header only."""
    name = show(info.filename[:-4])
    with zip_file.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in _NPY_HEADER_LENGTH:
            raise CheckpointError(f"{path} has an array {name} in .npy format version "
                                  f"{version[0]}.{version[1]}; minicnn reads 1.0 and 2.0.")
        # NumPy reads as many header bytes as the header says (4 GiB in version 2.0) before it
        # compares them with its max_header_size: the length is checked here first.
        length_field = f.read(struct.calcsize(_NPY_HEADER_LENGTH[version]))
        (length,) = struct.unpack(_NPY_HEADER_LENGTH[version], length_field)
        if length > MAX_NPY_HEADER_BYTES:
            raise CheckpointError(f"{path} has an array {name} whose .npy header is {length:,} "
                                  f"bytes long; NumPy writes at most {MAX_NPY_HEADER_BYTES:,}.")
        header = io.BytesIO(length_field + f.read(length))
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(header)
        offset = f.tell()
    if (dtype.kind not in NUMERIC_KINDS or dtype.fields is not None
            or dtype.subdtype is not None or dtype.itemsize == 0):
        raise CheckpointError(f"{path} has an array {name} of dtype {show(str(dtype))}; "
                              f"minicnn files hold only numbers (bool, int, float), never "
                              f"Python objects.")
    if len(shape) > MAX_NDIM or any(n < 0 for n in shape):
        raise CheckpointError(f"{path} has an array {name} of shape {show(shape)}, which is "
                              f"not an array shape of at most {MAX_NDIM} dimensions.")
    spec = ArraySpec(tuple(int(n) for n in shape), dtype)
    if offset + spec.nbytes != info.file_size:
        raise CheckpointError(f"{path} has an array {name} whose header declares "
                              f"{spec.nbytes:,} bytes ({dtype} {show(spec.shape)}) in a member "
                              f"of {info.file_size - offset:,}: the file is crafted or corrupt.")
    return spec


def _read_array(path, zip_file, info, spec):
    """The member's array, of the checked spec."""
    with _reading(path), zip_file.open(info) as f:
        array = np.lib.format.read_array(f, allow_pickle=False)
    if array.shape != spec.shape or array.dtype != spec.dtype:    # the header read twice
        raise CheckpointError(f"{path} is truncated or corrupt (array {show(info.filename)} "
                              f"changed while it was read).")
    return array


def _read_header(path, zip_file, members):
    """The JSON header, checked: size, nesting, format and version."""
    info, spec = members[_HEADER]
    if spec.dtype != np.uint8 or len(spec.shape) != 1:
        raise CheckpointError(f"{path} is not a minicnn file (its header is not JSON bytes).")
    if spec.nbytes > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path} has a header of {spec.nbytes:,} bytes; a minicnn "
                              f"header has at most {MAX_HEADER_BYTES:,}.")
    text = _read_array(path, zip_file, info, spec).tobytes().decode("utf-8")
    try:
        header = json.loads(text)
        too_deep = _depth(header) > MAX_JSON_DEPTH
    except RecursionError:                       # json's own limit (about 1,000 levels)
        too_deep = True
    if too_deep:
        raise CheckpointError(f"{path} has a header nested more than {MAX_JSON_DEPTH} levels "
                              f"deep, more than any model minicnn writes.")
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a minicnn file (its header names another format).")
    if header.get("version") != VERSION:
        raise CheckpointError(f"{path} is minicnn format version {show(header.get('version'))}; "
                              f"this minicnn reads version {VERSION}.")
    return header


def _depth(value):
    """How deep JSON lists and objects nest in value (0 for a number or a string)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth + 1)
            if deepest > MAX_JSON_DEPTH:
                return deepest
            items = value.values() if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
    return deepest
