"""Hostile but valid data through the commands, drawn by hypothesis: CIFAR-10 archives (the
binary and the python version) whose gzip and tar structure is sound and whose contents are not
what CIFAR-10 holds, and image folders holding every kind of file and name a user's folder can.

Every file here is what it claims to be at the level of its container (a tar member, a pickle,
a PNG chunk, a TIFF tag) and wrong above it; test_hostile_data.py has the hand-written cases and
flipped bytes. python -m minicnn.train (1 epoch, batch 2, a small --limit) and
python -m minicnn.evaluate run on each as subprocesses under a 2 GiB address-space limit
(RLIMIT_AS, as test_hostile_files.py runs them) and must keep docs/errors.md's promise: exit 0,
or exit 2 with exactly one "error: " line; no other line on stderr but "warning: " ones; never
a traceback or a bug's status 70. The data are kilobytes, so running out of memory or a peak
RSS over 512 MiB (a normal run: about 100 MiB) means a size was trusted. A run that trains
must then evaluate its own checkpoint on its own data. What the drawn examples found is kept at
the end as fixed cases (FOUND), since eight examples a test rarely draw the same thing twice.

    HYPOTHESIS_PROFILE=thorough python -m pytest tests/test_hostile_inputs.py   (100 examples)
"""
import dataclasses
import gzip
import io
import json
import os
import pickle
import resource
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import unicodedata
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from PIL import Image

from _data_helpers import (BATCHES, CLASSES, SHAPES, binary_batch, binary_files, fake_cifar,
                           make_folder, python2_dumps, shape_image, write_tar_gz)

ADDRESS_SPACE = 2 * 2**30        # RLIMIT_AS of every command in this file
NORMAL_SPACE = ADDRESS_SPACE // 2  # the reference runs must fit in half of it (VmPeak ~330 MB)
RSS_BOUND = 512 * 2**20          # kilobytes of data: a run's peak RSS is about 100 MiB

EXAMPLES = settings(
    max_examples=8 if os.environ.get("HYPOTHESIS_PROFILE", "default") == "default" else 100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.large_base_example])


# ---- the commands, under the memory limit ----------------------------------------------------
@dataclasses.dataclass
class Done:
    args: list
    returncode: int
    stderr: str
    peak_rss: int                 # bytes: the command's own peak RSS and its children's


# python -m MODULE ARGS, reporting at exit its peak RSS to the file $PEAK_FILE: its own VmHWM
# (this process's memory since exec) or its children's (forked workers), the larger. Not wait4's
# ru_maxrss: a child forked from pytest counts pytest's pages until its exec, and pytest holds
# PyTorch, onnxruntime and the rest by the time these tests run (over 600 MiB).
MEASURED = """
import atexit, os, resource, runpy, sys
def report():
    with open("/proc/self/status") as status:
        own = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with open(os.environ["PEAK_FILE"], "w") as out:
        out.write(str(1024 * max(own, children)))
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_limited(args, cache, space=ADDRESS_SPACE, timeout=120):
    """python ARGS under RLIMIT_AS = space, with its own cache folder and one worker thread.
    ARGS -m MODULE ... run through MEASURED, which reports the peak RSS."""
    args = [os.fsdecode(a) for a in args]
    fd, peak_file = tempfile.mkstemp(prefix="peak-rss-")
    os.close(fd)
    peak_file = Path(peak_file)
    env = dict(os.environ, MINICNN_THREADS="1", MINICNN_DATA=str(cache), PEAK_FILE=str(peak_file))
    command = ["-c", MEASURED, *args[1:]] if args[0] == "-m" else args
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, *command], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=err, env=env,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (space, space)))
        timer = threading.Timer(timeout, proc.kill)          # a hang fails the test, in time
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        reported = peak_file.read_text()
        peak_file.unlink()
        peak = int(reported) if reported else usage.ru_maxrss * 1024
        return Done(args, proc.returncode, err.read().decode("utf-8", "replace"), peak)


def assert_promise(done):
    """Exit 0 and no error line, or exit 2 and exactly one; nothing on stderr but error: and
    warning: lines; no traceback; no running out of memory, and little RSS, on kilobytes."""
    said = f"python {' '.join(done.args)}\nexit {done.returncode}, stderr:\n{done.stderr}"
    text = done.stderr[:-1] if done.stderr.endswith("\n") else done.stderr
    lines = text.split("\n") if text else []
    assert "Traceback" not in done.stderr, said
    assert done.returncode in (0, 2), said
    assert all(line.startswith(("error: ", "warning: ")) for line in lines), said
    assert sum(line.startswith("error: ") for line in lines) == (done.returncode == 2), said
    assert "MemoryError" not in done.stderr and "Out of memory" not in done.stderr, said
    assert done.peak_rss < RSS_BOUND, f"{said}\npeak RSS {done.peak_rss:,} bytes"


def train_args(data, out, extra):
    return ["-m", "minicnn.train", "--data", data, "--epochs", "1", "--batch-size", "2",
            "--out", out, *extra]


def train_then_evaluate(data, work, reference, extra):
    """Train on data; evaluate the run's checkpoint on it (which must then succeed), or, when
    training refused the data, the reference checkpoint."""
    trained = run_limited(train_args(data, work / "run", extra), work / "cache")
    assert_promise(trained)
    checkpoint = work / "run" / "last.npz" if trained.returncode == 0 else reference
    evaluated = run_limited(["-m", "minicnn.evaluate", "--checkpoint", checkpoint,
                             "--data", data], work / "cache")
    assert_promise(evaluated)
    if trained.returncode == 0:
        assert evaluated.returncode == 0, (
            f"the run trained on {data} but its checkpoint does not evaluate on it:\n"
            f"{evaluated.stderr}")
    return trained, evaluated


CIFAR_TRAIN = ["--limit", "12"]
FOLDER_TRAIN = ["--limit", "8", "--val-split", "0.25"]


class Runs(dict):
    def __repr__(self):                   # hypothesis prints the fixtures of a failing example
        return "references"


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Checkpoints trained on sound data (a binary CIFAR-10 archive, a folder of SHAPES), in half
    the address space the hostile runs get: {name: (train Done, evaluate Done, checkpoint)}."""
    root = tmp_path_factory.mktemp("references")
    archive = write_tar_gz(root / "cifar.tar.gz", "cifar-10-batches-bin",
                           binary_files(fake_cifar(3)))
    folder = make_folder(root / "shapes", per_class=4)
    runs = Runs()
    for name, data, extra in [("cifar", archive, CIFAR_TRAIN), ("folder", folder, FOLDER_TRAIN)]:
        checkpoint = root / name / "last.npz"
        trained = run_limited(train_args(data, root / name, extra), root / "cache", NORMAL_SPACE)
        evaluated = run_limited(["-m", "minicnn.evaluate", "--checkpoint", checkpoint,
                                 "--data", data], root / "cache", NORMAL_SPACE)
        runs[name] = (trained, evaluated, checkpoint)
    return runs


def test_a_normal_run_fits_in_half_the_memory_limit(references):
    """Within half the address space (NORMAL_SPACE) and under the RSS bound (forked workers'
    pages count too)."""
    for trained, evaluated, checkpoint in references.values():
        for done in (trained, evaluated):
            assert done.returncode == 0 and done.stderr == "", done.stderr
            assert done.peak_rss < RSS_BOUND
        assert checkpoint.exists()


def test_the_memory_limit_stops_an_allocation_of_its_size(tmp_path):
    done = run_limited(["-c", f"bytearray({ADDRESS_SPACE})"], tmp_path)
    assert done.returncode == 1 and "MemoryError" in done.stderr


# ---- values of the wrong type, for pickles ---------------------------------------------------
DEEP = "deep-nesting-goes-here!"  # replaced in the pickle by lists nested thousands deep


def deeply_nested(raw, depth):
    """raw with every pickled DEEP (any protocol's string opcodes) replaced by the opcodes of
    [[[...[None]...]]] nested depth levels: pickle.dumps itself would recurse that deep. A
    shorter nest is padded with NONE POP pairs, so a protocol-4 frame keeps its length."""
    text = DEEP.encode()
    nest = b"]" * depth + b"N" + b"a" * depth              # EMPTY_LIST x d, NONE, APPEND x d
    for form in (b"X" + struct.pack("<I", len(text)) + text, b"\x8c" + bytes([len(text)]) + text,
                 b"U" + bytes([len(text)]) + text, b"V" + text + b"\n"):
        raw = raw.replace(form, nest + b"N0" * max(0, (len(form) - len(nest)) // 2))
    return raw


class ForgedArray:
    """Pickles as an ndarray does (numpy's _reconstruct, then the state (version, shape, dtype,
    is_fortran, bytes)), with any values in that state: a shape of 10**12 rows over 10 bytes."""

    def __init__(self, shape, dtype, fortran, raw):
        self.state = (1, shape, np.dtype(dtype), fortran, raw)

    def __reduce__(self):
        core = getattr(np, "_core", None) or np.core                   # NumPy 2, NumPy 1
        return core.multiarray._reconstruct, (np.ndarray, (0,), b"b"), self.state


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.floats(),
    st.sampled_from([2**63, -2**70]),
    st.builds(pow, st.just(10), st.just(5000)),         # a 2 kB LONG4 opcode; str() refuses it
    st.text(max_size=6), st.binary(max_size=6), st.just(DEEP))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.sampled_from(["data", "labels", "label_names", "x"]), inner, max_size=3)),
    max_leaves=6)
SHAPES_2D = st.one_of(
    st.tuples(st.integers(0, 3), st.sampled_from([3072, 3071, 1024])),
    st.sampled_from([(3072,), (1, 3, 32, 32), (10**12, 3072), (-1, 3072), (2**64, 0), ()]),
    VALUES)


@st.composite
def arrays(draw):
    """A real ndarray of a drawn shape and dtype, or a ForgedArray declaring what it likes."""
    if draw(st.booleans()):
        shape = draw(st.tuples(st.integers(0, 3), st.sampled_from([3072, 3071, 96])))
        if draw(st.booleans()):
            shape = shape[:1] + (3, 32, 32) if shape[1] == 3072 else shape[1:]
        dtype = draw(st.sampled_from(["u1", "i8", "f4", "?", ">u2", "u1"]))    # u1 more often
        return np.zeros(shape, dtype)
    shape = draw(SHAPES_2D)
    rows = shape[0] if isinstance(shape, tuple) and shape and type(shape[0]) is int else 1
    raw = draw(st.one_of(st.just(bytes(min(max(rows, 0), 4) * 3072)), st.binary(max_size=40),
                         VALUES))
    return ForgedArray(shape, draw(st.sampled_from(["u1", "i8", "f8", "O"])),
                       draw(st.one_of(st.booleans(), VALUES)), raw)


LABEL_LISTS = st.lists(st.one_of(st.integers(0, 9), st.integers(-2, 300), st.booleans(),
                                 st.sampled_from([1.0, 2**70]),
                                 st.builds(pow, st.just(10), st.just(5000))), max_size=5)
BATCH_OBJECTS = st.one_of(
    st.fixed_dictionaries({}, optional={
        "data": st.one_of(arrays(), VALUES), "labels": st.one_of(LABEL_LISTS, arrays(), VALUES),
        "batch_label": VALUES, "filenames": VALUES}),
    VALUES)
CLASS_TEXT = st.one_of(st.sampled_from(CLASSES), st.text(
    st.sampled_from(list("ab $\\\t\n\r\x00\x1b\x85\u0080\u00a0\u2028\u200b\ufeffé中😀\udc80")),
    max_size=5))
NAME_ITEMS = st.one_of(CLASS_TEXT, CLASS_TEXT.map(lambda s: s.encode("utf-8", "surrogatepass")),
                       VALUES)
NAME_LISTS = st.lists(NAME_ITEMS, max_size=12)
META_OBJECTS = st.one_of(
    st.fixed_dictionaries({"label_names": st.one_of(NAME_LISTS, VALUES)},
                          optional={"num_vis": VALUES}),
    VALUES)


def shown(obj):
    """repr(obj), cut short; str() of an int of more than 4300 digits is a ValueError."""
    try:
        return repr(obj)[:2000]
    except ValueError:
        return "(an object holding an int of more than 4300 digits)"


def dumps(obj, how):
    """obj pickled as Python 2 wrote the official archive, or with pickle protocol how; with
    protocol 2 where that cannot hold it (a str beyond latin-1 in Python 2's, an int of more
    than 4300 digits in the decimal text of protocols 0 and 1)."""
    try:
        return python2_dumps(obj) if how == "python2" else pickle.dumps(obj, protocol=how)
    except (UnicodeEncodeError, ValueError):
        return pickle.dumps(obj, protocol=2)


# ---- CIFAR-10 archives: a tar of members, each a little wrong ----------------------------------
@dataclasses.dataclass
class Member:
    name: str
    data: bytes = b""
    kind: bytes = tarfile.REGTYPE
    link: str = ""
    declared: int | None = None    # a size field other than len(data)
    pax_size: str | None = None    # a pax "size" record, which overrides the size field


TAR_KINDS = [tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE,
             tarfile.CHRTYPE, tarfile.CONTTYPE, tarfile.AREGTYPE, tarfile.GNUTYPE_SPARSE]
CARRIES_DATA = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE)


def tar_bytes(members):
    out = io.BytesIO()
    for m in members:
        info = tarfile.TarInfo(m.name)
        info.type, info.linkname = m.kind, m.link
        data = m.data if m.kind in CARRIES_DATA else b""
        info.size = len(data) if m.declared is None else m.declared
        fmt = tarfile.GNU_FORMAT                         # base-256 sizes, long names
        if m.pax_size is not None:
            info.pax_headers, fmt = {"size": m.pax_size}, tarfile.PAX_FORMAT
        out.write(info.tobuf(fmt, "utf-8", "surrogateescape"))
        out.write(data + b"\0" * (-len(data) % tarfile.BLOCKSIZE))
    return out.getvalue() + b"\0" * (2 * tarfile.BLOCKSIZE)


WRAPPINGS = ["gzip", "two gzip members", "gzip", "gzip, then junk", "gzip", "plain tar",
             "gzip of junk", "gzip of nothing", "gzip of a zip"]


def wrap(data, tar, files):
    """The tar as the .tar.gz file: gzip, mostly; sometimes valid gzip around the wrong thing."""
    how = data.draw(st.sampled_from(WRAPPINGS), label="wrapping")
    if how == "plain tar":
        return tar
    if how == "two gzip members":                        # valid gzip: members concatenate
        cut = data.draw(st.integers(0, len(tar)), label="cut")
        return gzip.compress(tar[:cut], mtime=0) + gzip.compress(tar[cut:], mtime=0)
    if how == "gzip, then junk":
        return gzip.compress(tar, mtime=0) + data.draw(st.binary(min_size=1, max_size=40))
    if how == "gzip of junk":
        return gzip.compress(data.draw(st.binary(max_size=2048)), mtime=0)
    if how == "gzip of nothing":
        return gzip.compress(b"", mtime=0)
    if how == "gzip of a zip":
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as z:
            for name, raw in files.items():
                z.writestr(name, raw)
        return gzip.compress(out.getvalue(), mtime=0)
    return gzip.compress(tar, mtime=0)


SIZES_DECLARED = st.sampled_from([0, 1, 3072, 3074, 30_730_000, 30_730_001, 31_035_705,
                                  2**33, 10**15])
PAX_SIZES = st.sampled_from(["0", "1", "30730001", "99999999999999", "-1", "x", "1e3"])
PATHS = st.sampled_from(["", "a/b/", "./", "/", "../", "x" * 120 + "/", "é\n/", "\udcff/",
                         "cifar-10-batches-py/", "cifar-10-batches-bin/sub/"])
LINK_TARGETS = st.sampled_from(["cifar-10-batches-bin/data_batch_2.bin", "data_batch_2",
                                "nowhere", "/etc/passwd", "../../x", "cifar-10-batches-py/"])


def restructure(data, members, log):
    """One change to the tar's members: a kind, a size field, a path, a duplicate, the order."""
    change = data.draw(st.sampled_from(["kind", "size", "pax size", "path", "duplicate",
                                        "order", "trailing slash"]), label="tar change")
    if not members:
        return
    i = data.draw(st.integers(0, len(members) - 1))
    m = members[i]
    if change == "kind":
        m.kind, m.link = data.draw(st.sampled_from(TAR_KINDS)), data.draw(LINK_TARGETS)
    elif change == "size":
        m.declared = data.draw(SIZES_DECLARED)
    elif change == "pax size":
        m.pax_size = data.draw(PAX_SIZES)
    elif change == "path":
        m.name = data.draw(PATHS) + m.name.rsplit("/", 1)[-1]
    elif change == "duplicate":
        twin = dataclasses.replace(m, data=m.data[:data.draw(st.integers(0, len(m.data)))])
        members.insert(data.draw(st.integers(0, len(members))), twin)
    elif change == "order":
        members[:] = data.draw(st.permutations(members))
    else:
        m.name += "/"
    log.append(f"tar {change}: member {i} is now {m}"[:300])


@st.composite
def binary_contents(draw, log):
    """{name: bytes} of cifar-10-batches-bin/ with 0-3 hostile changes."""
    files = binary_files(fake_cifar(draw(st.integers(1, 3)), seed=draw(st.integers(0, 3))))
    batch_names = [b + ".bin" for b in BATCHES]
    for _ in range(draw(st.integers(0, 3))):
        change = draw(st.sampled_from(["records", "labels", "meta", "missing", "extra"]))
        if change == "records":                 # k whole records, the last cut short by `cut`
            names = draw(st.lists(st.sampled_from(batch_names), min_size=1, unique=True))
            k, cut = draw(st.integers(0, 4)), draw(st.one_of(st.just(0), st.integers(1, 3073)))
            images = np.zeros((k, 3, 32, 32), np.uint8)
            labels = draw(st.lists(st.integers(0, 9), min_size=k, max_size=k))
            raw = binary_batch(images, labels)
            for name in names:
                files[name] = raw[:max(len(raw) - cut, 0)]
            log.append(f"{names}: {k} records, less {cut} bytes")
        elif change == "labels":
            name = draw(st.sampled_from(batch_names))
            raw = bytearray(files.get(name, b""))
            for r, value in enumerate(draw(st.lists(st.integers(10, 255), min_size=1,
                                                    max_size=3))):
                if r * 3073 < len(raw):
                    raw[r * 3073] = value
            files[name] = bytes(raw)
            log.append(f"{name}: labels >= 10")
        elif change == "meta":
            names = draw(st.lists(CLASS_TEXT, max_size=12))
            text = "\n".join(names) + draw(st.sampled_from(["", "\n", "\n\n", "\r\n"]))
            files["batches.meta.txt"] = draw(st.one_of(
                st.just(text.encode("utf-8", "surrogatepass")), st.binary(max_size=40)))
            log.append(f"batches.meta.txt: {files['batches.meta.txt']!r}")
        elif change == "missing" and files:
            name = draw(st.sampled_from(sorted(files)))
            del files[name]
            log.append(f"no {name}")
        else:
            name = draw(st.sampled_from(["data_batch_6.bin", "data_batch_1", "batches.meta",
                                         "readme.html", ".data_batch_1.bin", "test_batch"]))
            files[name] = draw(st.one_of(st.binary(max_size=40), st.just(bytes(3073))))
            log.append(f"extra {name}")
    return files


@st.composite
def python_contents(draw, log):
    """{name: bytes} of cifar-10-batches-py/: valid pickles, 0-3 of them holding the wrong
    things: one field of a batch or one class name of the wrong type, shape or value, or a
    whole object replaced."""
    n = draw(st.integers(1, 3))
    # Protocols 0-2 write bytes through _codecs.encode and 5 an ndarray through _frombuffer,
    # which the loader refuses: the ones that can load come first, and more often.
    how = draw(st.sampled_from(["python2", 3, 4, "python2", 2, 0, 5]), label="pickle protocol")
    objects, memo_at = python_objects(n, draw(st.integers(0, 3))), {}
    for _ in range(draw(st.integers(0, 3))):
        change = draw(st.sampled_from(["field", "class name", "memo", "batch", "meta",
                                       "missing", "extra"]))
        name = draw(st.sampled_from(sorted(objects) or ["batches.meta"]))
        if change == "field" and isinstance(objects.get(name), dict):
            key = draw(st.sampled_from(["data", "labels", "batch_label", "filenames"]))
            objects[name][key] = draw({"data": st.one_of(arrays(), VALUES),
                                       "labels": st.one_of(LABEL_LISTS, arrays(), VALUES)}
                                      .get(key, VALUES))
            if draw(st.booleans()):
                del objects[name][key]
            name += f"[{key!r}]"
        elif change == "class name" and isinstance(objects.get("batches.meta"), dict):
            names = objects["batches.meta"].setdefault("label_names", [])
            if isinstance(names, list):
                at = draw(st.integers(0, len(names)))
                names[at:at + draw(st.integers(0, 1))] = [draw(NAME_ITEMS)]
        elif change == "batch":
            objects[name] = draw(BATCH_OBJECTS)
        elif change == "meta":
            objects["batches.meta"] = draw(META_OBJECTS)
        elif change == "missing":
            objects.pop(name, None)
        elif change == "memo":        # a valid PUT to a memo index far beyond the pickle's size
            memo_at[name] = draw(st.one_of(st.integers(0, 1000), st.integers(0, 2**32 - 1)))
        else:
            name = draw(st.sampled_from(["data_batch_6", "data_batch_1.bin", "batches.meta.txt"]))
            objects[name] = draw(VALUES)
        log.append(f"{change} {name}")
    depth = draw(st.sampled_from([3, 5000]), label="nesting depth")
    log.append(f"objects: {shown(objects)}, memo {memo_at}")
    return python_pickles(objects, how, depth, memo_at)


def python_objects(n, seed):
    """{file name: object} of a sound cifar-10-batches-py/ with n images a batch."""
    objects = {name: {"batch_label": name, "labels": [int(v) for v in labels],
                      "data": images.reshape(len(images), 3072), "filenames": ["x.png"] * n}
               for name, (images, labels) in fake_cifar(n, seed).items()}
    objects["batches.meta"] = {"label_names": list(CLASSES), "num_vis": 3072}
    return objects


def python_pickles(objects, how, depth, memo_at):
    """{file name: bytes}: each object pickled (dumps), DEEP nested depth lists deep, and a PUT
    to memo index memo_at[name] first in the files memo_at names."""
    files = {}
    for name, obj in objects.items():
        raw = deeply_nested(dumps(obj, how), depth)
        if name in memo_at:
            put = b"N" + b"r" + struct.pack("<I", memo_at[name]) + b"0"   # NONE LONG_BINPUT POP
            raw = raw[:2] + put + raw[2:] if raw[:1] == b"\x80" else put + raw
        files[name] = raw
    return files


def write_archive(data, work, folder, files, log):
    members = [Member(f"{folder}/{name}", raw) for name, raw in files.items()]
    for _ in range(data.draw(st.sampled_from([0, 1, 0, 2]), label="tar changes")):
        restructure(data, members, log)
    path = work / data.draw(st.sampled_from(["hostile.tar.gz", "hostile.tgz"]))
    path.write_bytes(wrap(data, tar_bytes(members), files))
    return path


def train_on_a_hostile_archive(references, tmp_path, data, contents, folder):
    """Draw an archive's files from contents(log), packed under folder; train and evaluate."""
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    log = []
    files = data.draw(contents(log))
    archive = write_archive(data, work, folder, files, log)
    note("\n".join(log))
    train_then_evaluate(archive, work, references["cifar"][2], CIFAR_TRAIN)


@EXAMPLES
@given(data=st.data())
def test_hostile_binary_archives_train_and_evaluate_or_say_one_sentence(
        references, tmp_path, data):
    train_on_a_hostile_archive(references, tmp_path, data, binary_contents,
                               "cifar-10-batches-bin")


@EXAMPLES
@given(data=st.data())
def test_hostile_python_archives_train_and_evaluate_or_say_one_sentence(
        references, tmp_path, data):
    train_on_a_hostile_archive(references, tmp_path, data, python_contents,
                               "cifar-10-batches-py")


# ---- images: every mode, size and format Pillow writes, and hand-made PNG and TIFF headers -----
MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "HSV", "LAB",
         "I;16", "I", "F"]
FORMATS = ["PNG", "GIF", "BMP", "TIFF", "JPEG", "WEBP", "TGA", "PPM", "ICO", "PCX", "SGI", "QOI"]
IMAGE_SIZES = [(1, 1), (2, 3), (32, 32), (33, 7), (700, 1), (1, 700)]
DECLARED_SIZES = IMAGE_SIZES + [(9400, 9400), (10000, 10000), (65535, 65535), (2**31 - 1, 1)]


def pillow_image(mode, size, fmt, frames, seed):
    """Bytes of a random image of mode and size (W, H) saved as fmt, animated when frames > 1;
    a PNG of it in RGB where Pillow cannot write that mode in that format."""
    rng = np.random.default_rng(seed)
    w, h = size
    images = []
    for _ in range(frames):
        if mode in ("I;16", "I", "F"):
            dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
            values = rng.integers(-5, 70000, (h, w)).astype(dtype)
            if mode == "F":
                values = values / 60000 - 0.1                  # around 0..1, some outside
                values.flat[0] = np.nan
            images.append(Image.fromarray(values.astype(dtype)))
        else:
            rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
            images.append(rgba.convert(mode))
    out = io.BytesIO()
    try:
        extra = {"save_all": True, "append_images": images[1:]} if frames > 1 else {}
        images[0].save(out, fmt, **extra)
    except (OSError, ValueError, KeyError, TypeError):
        out = io.BytesIO()
        images[0].convert("RGB").save(out, "PNG")
    return out.getvalue()


def png_chunk(kind, body):
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))


def raw_png(size, depth, colour, interlace, palette, transparency, seed):
    """A PNG made chunk by chunk from a drawn header (any bit depth and colour type, valid
    together or not), palette and tRNS; at most 64 kB of rows: a huge image is cut short."""
    w, h = size
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 1)
    row = 1 + (w * channels * depth + 7) // 8
    pixels = np.random.default_rng(seed).integers(0, 256, min(h * row, 1 << 16), dtype=np.uint8)
    pixels[::row] = 0                                              # filter type None
    body = png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, interlace))
    if palette is not None:
        body += png_chunk(b"PLTE", bytes(3 * palette))
    if transparency is not None:
        body += png_chunk(b"tRNS", transparency)
    body += png_chunk(b"IDAT", zlib.compress(pixels.tobytes())) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def raw_tiff(size, samples, bits, photometric, sample_format, compression, seed):
    """A little-endian TIFF made tag by tag from drawn values: samples per pixel, bits per
    sample, photometric interpretation, sample format and compression, valid together or not;
    one strip of random bytes, deflated for compression 8 (Adobe deflate), as they are for the
    others (a damaged LZW, PackBits or JPEG stream, which Pillow hands to libtiff)."""
    w, h = size
    pixels = np.random.default_rng(seed).integers(
        0, 256, min(w * h * samples * bits // 8 + 1, 1 << 16), dtype=np.uint8).tobytes()
    if compression == 8:
        pixels = zlib.compress(pixels)
    nbytes = len(pixels)
    tags = {256: (4, [w]), 257: (4, [h]), 258: (3, [bits] * samples), 259: (3, [compression]),
            262: (3, [photometric]), 273: (4, [0]), 277: (3, [samples]), 278: (4, [h]),
            279: (4, [nbytes]), 339: (3, [sample_format] * samples)}
    start = 8 + 2 + 12 * len(tags) + 4
    entries, extra = b"", b""
    for tag, (kind, values) in sorted(tags.items()):
        packed = struct.pack("<%d%s" % (len(values), "H" if kind == 3 else "I"), *values)
        if len(packed) <= 4:
            entries += struct.pack("<HHI", tag, kind, len(values)) + packed.ljust(4, b"\0")
        else:
            entries += struct.pack("<HHII", tag, kind, len(values), start + len(extra))
            extra += packed + b"\0" * (len(packed) % 2)
    pixels_at = start + len(extra)
    at = entries.index(struct.pack("<HHI", 273, 4, 1)) + 8
    entries = entries[:at] + struct.pack("<I", pixels_at) + entries[at + 4:]
    return (b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", len(tags)) + entries
            + b"\0\0\0\0" + extra + pixels)


IMAGES = st.one_of(
    st.builds(pillow_image, st.sampled_from(MODES), st.sampled_from(IMAGE_SIZES),
              st.sampled_from(FORMATS), st.sampled_from([1, 1, 3]), st.integers(0, 9)),
    st.builds(raw_png, st.sampled_from(DECLARED_SIZES), st.sampled_from([1, 2, 4, 8, 16]),
              st.sampled_from([0, 2, 3, 4, 6, 5]), st.sampled_from([0, 1]),
              st.one_of(st.none(), st.integers(0, 300)),
              st.one_of(st.none(), st.binary(max_size=300)), st.integers(0, 9)),
    st.builds(raw_tiff, st.sampled_from(IMAGE_SIZES + [(9400, 9400), (65535, 65535)]),
              st.sampled_from([1, 3, 4, 2, 5, 7, 200]), st.sampled_from([8, 1, 16, 32, 64, 12]),
              st.sampled_from([1, 0, 2, 3, 5, 6, 8]), st.sampled_from([1, 2, 3]),
              st.sampled_from([1, 8, 5, 32773, 7]), st.integers(0, 9)))


# ---- image folders ---------------------------------------------------------------------------
NAME_PIECES = [b"a", b"B", b" ", b"\n", b"\t", b"\r", b"\xff", b"\x80", "\u0080".encode(),
               "é".encode(), "e\u0301".encode(), "😀".encode(), b"\\", b"$", b"-", b"\x1b",
               b"~", b"train", b"test", b"."]
NAMES = st.lists(st.sampled_from(NAME_PIECES), min_size=1, max_size=4).map(b"".join).filter(
    lambda n: n not in (b".", b".."))
# The same name as an undecodable byte and as a character, or in NFC and NFD: folders copied
# from a Latin-1 system beside UTF-8 ones.
LOOKALIKES = [(b"x\x85", "x\u0085".encode()), (b"caf\xe9", "café".encode()),
              (unicodedata.normalize("NFC", "café").encode(),
               unicodedata.normalize("NFD", "café").encode()),
              (b"\xa0", "\u00a0".encode()), (b"\x80", "\u0080".encode())]
EXTENSIONS = [b".png", b".jpg", b".gif", b".PNG", b".tif", b"", b".txt"]
ENTRIES = ["image", "zero-byte .png", "truncated image", "lying extension", "text file",
           "hidden image", "subfolder", "link loop", "dangling link", "link to its folder",
           "link to a file", "fifo"]
# One class folder that is empty or holds no image refuses the whole folder: they come rarer.
CLASS_KINDS = ["images", "images", "images", "link to another class", "hidden", "images",
               "empty", "only non-images"]


def write(path, raw):
    with open(path, "wb") as f:
        f.write(raw)


@st.composite
def entry(draw, folder, rng, log):
    """One drawn thing in a class folder (a bytes path), beside its sound images."""
    kind = draw(st.sampled_from(ENTRIES))
    name = draw(NAMES) + draw(st.sampled_from(EXTENSIONS))
    path = os.path.join(folder, name)
    if os.path.lexists(path):
        return
    log.append(f"{kind}: {path!r}")
    try:
        make_entry(draw, kind, folder, name, path, rng)
    except OSError as error:            # a name taken already, a file where a folder goes
        log.append(f"  not made: {error}")


def make_entry(draw, kind, folder, name, path, rng):
    """Make the entry of that kind at path (bytes) in folder."""
    if kind == "image":
        write(path, draw(IMAGES))
    elif kind == "zero-byte .png":
        write(path + b".png", b"")
    elif kind == "truncated image":
        raw = draw(IMAGES)
        write(path, raw[:draw(st.integers(0, len(raw) - 1))])
    elif kind == "lying extension":
        fmt, ext = draw(st.sampled_from([("JPEG", b".png"), ("PNG", b".jpg"), ("GIF", b".png"),
                                         ("TIFF", b".gif"), ("BMP", b".txt")]))
        write(path + ext, pillow_image("RGB", (32, 32), fmt, 1, int(rng.integers(9))))
    elif kind == "text file":
        write(path, b"not an image\n")
    elif kind == "hidden image":
        write(os.path.join(folder, b"." + name), draw(IMAGES))
    elif kind == "subfolder":
        sub = os.path.join(folder, *draw(st.lists(NAMES, min_size=1, max_size=3)))
        os.makedirs(sub, exist_ok=True)
        write(os.path.join(sub, b"nested.png"), png_of(shape_image("circle", rng)))
    elif kind == "link loop":
        os.symlink(name, path)
    elif kind == "dangling link":
        os.symlink(b"nowhere.png", path)
    elif kind == "link to its folder":
        os.symlink(b".", path)
    elif kind == "link to a file":
        os.symlink(b"0.png", path)
    else:
        os.mkfifo(path)


def png_of(array):
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


@st.composite
def image_folder(draw, root, log):
    """A folder of class folders, flat or root/train + root/test, drawn; -> the --data path."""
    rng = np.random.default_rng(draw(st.integers(0, 9)))
    names = draw(st.lists(st.one_of(st.sampled_from([s.encode() for s in SHAPES]), NAMES),
                          min_size=1, max_size=4, unique=True))
    if draw(st.booleans()):
        names += list(draw(st.sampled_from(LOOKALIKES)))
    split = draw(st.booleans())
    train = os.path.join(root, b"train") if split else root
    os.makedirs(train)
    for i, name in enumerate(dict.fromkeys(names)):
        kind = draw(st.sampled_from(CLASS_KINDS))
        folder = os.path.join(train, name)
        if os.path.lexists(folder):               # made already as another class's ".name"
            continue
        log.append(f"class {name!r}: {kind}")
        if kind == "link to another class" and i > 0:
            os.symlink(names[0], folder)
            continue
        if kind == "hidden":
            folder = os.path.join(train, b"." + name)
        os.makedirs(folder, exist_ok=True)
        if kind == "empty":
            continue
        if kind == "only non-images":
            write(os.path.join(folder, b"readme.txt"), b"hello\n")
            write(os.path.join(folder, b"empty.png"), b"")
            continue
        for j in range(draw(st.integers(1, 3))):
            write(os.path.join(folder, b"%d.png" % j),
                  png_of(shape_image(SHAPES[i % 3], rng)))
        for _ in range(draw(st.integers(0, 3))):
            draw(entry(folder, rng, log))
    top = draw(st.sampled_from([None, "a file", "a link loop", "a dangling link"]))
    if top == "a file":
        write(os.path.join(train, b"README.txt"), b"classes below\n")
    elif top is not None:
        os.symlink(b"loop" if top == "a link loop" else b"nowhere", os.path.join(train, b"loop"))
    if split:                     # test/: some of train's classes, or one that train lacks
        for name in draw(st.lists(st.sampled_from(names + [b"unknown"]), max_size=2,
                                  unique=True)):
            folder = os.path.join(root, b"test", name)
            os.makedirs(folder)
            write(os.path.join(folder, b"t.png"), png_of(shape_image("cross", rng)))
            log.append(f"test class {name!r}")
    return root


@EXAMPLES
@given(data=st.data())
def test_hostile_image_folders_train_and_evaluate_or_say_one_sentence(
        references, tmp_path, data):
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    log = []
    root = data.draw(image_folder(os.path.join(os.fsencode(work), b"images"), log))
    size = data.draw(st.sampled_from([None, None, "40x24", "8"]), label="--image-size")
    note("\n".join(log))
    extra = FOLDER_TRAIN + (["--image-size", size] if size else [])
    train_then_evaluate(root, work, references["folder"][2], extra)


# ---- what the drawn examples found, kept as fixed cases ----------------------------------------
def python_archive(work, label_names=CLASSES, depth=3, memo_at=None):
    """A python-version .tar.gz of one image a batch, with these class names and DEEP nested
    depth lists deep, and a PUT to memo_at[name] first in the pickles it names."""
    objects = python_objects(1, 0)
    objects["batches.meta"]["label_names"] = list(label_names)
    files = python_pickles(objects, "python2", depth, memo_at or {})
    return write_tar_gz(work / "found.tar.gz", "cifar-10-batches-py", files)


def folder_with(work, classes=(b"circle", b"cross"), extra=None):
    """Class folders of three sound PNGs each, and extra = (file name, bytes) in the first."""
    rng = np.random.default_rng(0)
    root = os.path.join(os.fsencode(work), b"images")
    for i, name in enumerate(classes):
        os.makedirs(os.path.join(root, name))
        for j in range(3):
            write(os.path.join(root, name, b"%d.png" % j), png_of(shape_image(SHAPES[i], rng)))
    if extra:
        write(os.path.join(root, classes[0], extra[0]), extra[1])
    return root


NOT_TEXT = "has class names that are not text (batches.meta)"
SKIPPED = "warning: Skipped 1 unreadable or non-image files under"
# case: (the data, the training run's exit status, a line its stderr must hold)
FOUND = {
    # str() of an int of more than 4300 digits was a ValueError: exit 70, a traceback
    "a class name of 10**5000":
        (lambda work: python_archive(work, CLASSES[:9] + [10**5000]), 2, NOT_TEXT),
    # str() of it was a RecursionError: exit 70, a traceback
    "a class name nested 5000 lists deep":
        (lambda work: python_archive(work, CLASSES[:9] + [DEEP], depth=5000), 2, NOT_TEXT),
    # 7 bytes that made the Unpickler allocate and zero 16 x 2**31 bytes: MemoryError under
    # the limit; on a machine without one, swapping or the out-of-memory killer
    "a PUT to memo index 2**31 - 1":
        (lambda work: python_archive(work, memo_at={"data_batch_1": 2**31 - 1}), 2,
         "The pickle stores memo index 2,147,483,647 after 2 opcodes"),
    # both were shown as x\x85: training wrote a checkpoint that evaluate refused
    "class folders named b'x\\x85' and 'x\\u0085'":
        (lambda work: folder_with(work, (b"x\x85", "x\u0085".encode())), 0, ""),
    # TiffImagePlugin logged "More samples per pixel than can be decoded: 7": a bare line
    "a TIFF of 7 samples per pixel":
        (lambda work: folder_with(work, extra=(b"a.tif", raw_tiff((4, 4), 7, 8, 2, 1, 1, 0))),
         0, SKIPPED),
    # libtiff printed "tempfile.tif: Using code not yet in table." on fd 2 itself
    "a TIFF whose LZW stream is damaged":
        (lambda work: folder_with(work, extra=(b"a.tif", raw_tiff((8, 8), 3, 8, 2, 1, 5, 0))),
         0, SKIPPED),
    # ... and "ZIPDecode: ..."
    "a TIFF whose deflate stream is cut short":
        (lambda work: folder_with(work, extra=(b"a.tif",
                                               raw_tiff((32, 32), 3, 8, 2, 1, 8, 0)[:-200])),
         0, SKIPPED),
}


@pytest.mark.parametrize("case", FOUND)
def test_what_the_drawn_examples_found(references, tmp_path, case):
    build, status, line = FOUND[case]
    data = build(tmp_path)
    kind = "folder" if os.path.isdir(data) else "cifar"
    trained, evaluated = train_then_evaluate(data, tmp_path, references[kind][2],
                                             FOLDER_TRAIN if kind == "folder" else CIFAR_TRAIN)
    assert trained.returncode == status and line in trained.stderr, trained.stderr
    if case.startswith("class folders"):                     # two classes, told apart
        classes = json.loads((tmp_path / "run" / "report.json").read_text())["classes"]
        assert classes == ["x\\u0085", "x\\x85"]
