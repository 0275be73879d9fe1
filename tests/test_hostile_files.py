"""Hostile but valid model and checkpoint files: zips that zipfile and NumPy read without a
complaint, edited to claim 2e9 channels, to put a wrong type in any field, to nest deeply, to
name fewer classes than the model has outputs, to carry a 2 GiB member, a .npy header that
lies about its size, or a pickle that runs code. Each ends in one CheckpointError sentence that
names the file, before anything large is allocated: in-process, for hypothesis-drawn edits, and
through python -m minicnn.evaluate and predict under a 1.5 GiB address-space limit."""
import copy
import inspect
import io
import json
import os
import resource
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minicnn
from _data_helpers import SHAPES, make_folder
from minicnn.errors import CheckpointError
from minicnn.nn import (AvgPool2D, BatchNorm1D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten,
                        GlobalAveragePooling2D, MaxPool2D, ReLU, Residual, Softmax, optim, schema)
from minicnn.nn import serialization
from minicnn.nn.layers import LAYER_TYPES
from minicnn.nn.model import OPTIMIZER_BUFFERS, layer_config
from minicnn.nn.serialization import read_archive
from minicnn.nn.zoo import MODELS
from minicnn.training import checkpoint
from minicnn.training.checkpoint import (load_checkpoint, load_for_inference, predict_logits,
                                         save_checkpoint)

LOADERS = {"load": minicnn.load, "checkpoint": load_checkpoint,
           "resume": lambda path: load_checkpoint(path, resumable=True),
           "inference": load_for_inference}
ALL = tuple(LOADERS)
CHECKPOINT = ("checkpoint", "resume")              # what load_checkpoint checks
INFO = ("checkpoint", "resume", "inference")       # classes, norm, input_shape


# ---- files written by hand ---------------------------------------------------------------------
def every_layer(rng):
    """Every layer type but GlobalAveragePooling2D: 8x8 RGB images -> 3 class scores."""
    return minicnn.Sequential([
        Conv2D(3, 4, 3, padding=1, rng=rng), BatchNorm2D(4), ReLU(),            # 0-2  (4, 8, 8)
        Residual([Conv2D(4, 4, 3, padding="same", rng=rng), BatchNorm2D(4)],    # 3
                 shortcut=Conv2D(4, 4, 1, rng=rng)), ReLU(),                     # 4
        MaxPool2D(2), AvgPool2D(3, stride=2, padding=1), Flatten(),             # 5-7  (16,)
        Dense(16, 8, rng=rng), BatchNorm1D(8), ReLU(), Dropout(0.25, rng=rng),  # 8-11
        Dense(8, 3, rng=rng), Softmax()])                                       # 12-13 (3,)


def global_pool(rng):
    return minicnn.Sequential([Conv2D(3, 5, 3, stride=2, bias=False, rng=rng), ReLU(),
                               GlobalAveragePooling2D(), Dense(5, 3, rng=rng)])


def trainer_info():
    """A checkpoint's info as minicnn.train writes it, for 8x8 images of the shapes folder."""
    def state(seed):
        return np.random.default_rng(seed).bit_generator.state
    return {"epoch": 1, "step": 2, "history": {k: [1] for k in checkpoint.HISTORY_KEYS},
            "best_val_acc": 0.5, "bad_epochs": 0,
            "partial": {"loss_sum": 1.5, "correct": 3, "seen": 8},
            "rng": {"order": state(1), "augment": state(2), "dropout": [state(3)]},
            "schedule": {"base_lr": 0.01, "last_step": 1},
            "settings": {"model": "keras-tutorial", "epochs": 2, "lr": 0.01, "schedule": "cosine",
                         "optimizer": "adam", "data": None, "image_size": "8", "tta": False},
            "classes": list(SHAPES), "code_version": "test", "input_shape": [3, 8, 8],
            "norm": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.25]}}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """[(header, arrays)] of two real checkpoints (Adam, and SGD with momentum)."""
    root, out = tmp_path_factory.mktemp("bases"), []
    for build, make_optimizer in ((every_layer, optim.Adam),
                                  (global_pool, lambda m, lr: optim.SGD(m, lr, momentum=0.9))):
        model = build(np.random.default_rng(0))
        optimizer = make_optimizer(model, 0.01)
        optimizer.step()                               # creates the per-parameter buffers
        save_checkpoint(root / "base.npz", model, optimizer, trainer_info())
        out.append(read_archive(root / "base.npz"))
    return out


def npy(array, allow_pickle=False):
    f = io.BytesIO()
    np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=allow_pickle)
    return f.getvalue()


def npy_header(shape, dtype):
    """The .npy header alone of an array of shape and dtype."""
    f = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False,
                                             "shape": shape})
    return f.getvalue()


def stored(name, data):
    """A zip member (name, payload, declared size, CRC, method) stored as it is."""
    return name, data, len(data), zlib.crc32(data), zipfile.ZIP_STORED


def write_zip(path, members):
    """A zip of members [(name, payload, declared size, CRC, method)] written by hand, so that
    a member can declare what zipfile would not write."""
    local, central = bytearray(), bytearray()
    for name, payload, size, crc, method in members:
        raw = name.encode()
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0x21, crc,
                               len(payload), size, len(raw), 0, 0, 0, 0, 0, len(local)) + raw
        local += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc,
                             len(payload), size, len(raw), 0) + raw + payload
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members),
                      len(central), len(local), 0)
    path.write_bytes(bytes(local + central + end))
    return path


def write_file(path, header, arrays, extra=()):
    """A minicnn file: header (a dict, or JSON text), arrays ({name: array or .npy bytes}) and
    extra members as write_zip takes them."""
    text = header if isinstance(header, str) else json.dumps(header)
    members = [stored("__minicnn__.npy", npy(np.frombuffer(text.encode(), np.uint8)))]
    members += [stored(f"{name}.npy", a if isinstance(a, bytes) else npy(a))
                for name, a in arrays.items()]
    return write_zip(path, members + list(extra))


def outcome(load, path):
    """None when load(path) succeeds, else its CheckpointError's message, checked to be one
    line that names the file; any other exception fails the test."""
    try:
        result = load(path)
    except CheckpointError as e:
        message = str(e)
        assert "\n" not in message and str(path) in message, message
        return message
    if load is load_for_inference:       # what it accepts, predict can run: one score a class
        x = np.zeros((2, 3) + result.size, np.uint8)
        logits = predict_logits(result.model, x, result.mean, result.std, result.xp)
        assert logits.shape == (2, len(result.classes))
    return None


def test_the_hand_written_base_files_load(bases, tmp_path):
    for header, arrays in bases:
        path = write_file(tmp_path / "base.npz", header, arrays)
        assert [outcome(load, path) for load in LOADERS.values()] == [None] * len(LOADERS)
        model, info, buffers = load_checkpoint(path)
        assert info == header["extra"] and buffers
        for name, value in model.params.items():
            np.testing.assert_array_equal(value, arrays[f"param:{name}"])


def test_a_checkpoint_of_any_info_loads_and_resume_needs_the_runs(bases, tmp_path):
    """save_checkpoint takes any info (tests/test_dropout_parallel.py keeps the Dropout states
    only): load_checkpoint checks what it holds; resumable=True asks for what --resume reads."""
    model = global_pool(np.random.default_rng(0))
    optimizer = optim.Adam(model)
    optimizer.step()
    state = np.random.default_rng(0).bit_generator.state
    save_checkpoint(tmp_path / "few.npz", model, optimizer, {"rng": {"dropout": [state]}})
    assert outcome(load_checkpoint, tmp_path / "few.npz") is None
    assert "it has no epoch, which a resumed run reads back" in outcome(
        LOADERS["resume"], tmp_path / "few.npz")
    save_checkpoint(tmp_path / "few.npz", model, optimizer, {"rng": {"dropout": [{}]}})
    assert "its rng must be" in outcome(load_checkpoint, tmp_path / "few.npz")


# ---- the schema -----------------------------------------------------------------------------
def test_the_schema_knows_every_layer_and_exactly_its_constructor_arguments():
    assert set(schema.FIELDS) == set(LAYER_TYPES)
    for name, cls in LAYER_TYPES.items():
        params = inspect.signature(cls.__init__).parameters
        arguments = {k: p for k, p in params.items()
                     if k not in ("self", "rng", "kernel_initializer")}
        assert set(arguments) == set(schema.FIELDS[name]), name
        for field, (_, required) in schema.FIELDS[name].items():
            assert required == (arguments[field].default is inspect.Parameter.empty), field


@pytest.mark.parametrize("build, size", [(every_layer, (8, 8)), (global_pool, (8, 8))]
                         + [(MODELS[name], (40, 36)) for name in MODELS])
def test_the_schema_computes_the_arrays_and_output_the_layers_have(build, size):
    model = (build(np.random.default_rng(0)) if build in (every_layer, global_pool)
             else build(rng=np.random.default_rng(0), image_size=size))
    specs = schema.check_model(layer_config(model))
    live = {f"{group}:{k}": (v.shape, v.dtype) for group, arrays in
            (("param", model.params), ("state", model.state)) for k, v in arrays.items()}
    assert {k: (s.shape, s.dtype) for k, s in specs.items()} == live
    out, peak = schema.output_shape(layer_config(model), (3,) + size)
    assert (1,) + out == model.forward(np.zeros((1, 3) + size, np.float32)).shape
    assert 0 < peak <= schema.MAX_ACTIVATION


def test_the_checkpoint_schema_matches_the_trainer_and_the_optimisers():
    from minicnn.training import trainer
    assert checkpoint.HISTORY_KEYS == trainer.HISTORY_KEYS
    assert set(checkpoint.SETTING_TYPES) == set(trainer.HYPERPARAMETERS)
    for name, (_, kind, _) in trainer.HYPERPARAMETERS.items():
        assert kind in checkpoint.SETTING_TYPES[name], name
    model = minicnn.Sequential([Dense(2, 2)])
    for optimizer in (optim.SGD(model, 0.1, momentum=0.9), optim.Adam(model), optim.AdamW(model)):
        optimizer.step()
        names = tuple(sorted(optimizer.state["0.weight"]))
        assert names in checkpoint.OPTIMIZER_BUFFER_SETS and set(names) <= set(OPTIMIZER_BUFFERS)


# ---- one field at a time --------------------------------------------------------------------
DELETE = object()
L = "model.layers."
EDITS = [   # (where in the header, the new value, the loaders that refuse it, what they say)
    (L + "0.out_channels", 2_000_000_000, ALL, "out_channels 2000000000, which must be a whole "
                                               "number from 1 to 16,777,216"),
    (L + "0.out_channels", 2e9, ALL, "out_channels 2000000000.0, which must be"),
    (L + "0.out_channels", 1000, ALL, "0.weight has shape (4, 3, 3, 3), expected (1000, 3, 3, 3)"),
    (L + "0.in_channels", "3", ALL, "in_channels '3', which must be a whole number"),
    (L + "0.in_channels", True, ALL, "in_channels True"),
    (L + "0.kernel_size", [3], ALL, "kernel_size [3], which must be"),
    (L + "0.kernel_size", DELETE, ALL, "layer 0 (Conv2D) lacks its 'kernel_size'"),
    (L + "0.stride", 0, ALL, "stride 0, which must be"),
    (L + "0.padding", "full", ALL, "padding 'full', which must be"),
    (L + "0.bias", "yes", ALL, "bias 'yes', which must be true or false"),
    (L + "0.dtype", "object", ALL, "dtype 'object', which must be 'float16' or 'float32'"),
    (L + "0.activation", "relu", ALL, "has the field 'activation', which Conv2D does not take"),
    (L + "0.type", "Evil", ALL, "layer 0 has type 'Evil', not one of minicnn's layers"),
    (L + "0.type", 7, ALL, "layer 0 has type 7"),
    (L + "0", [1], ALL, "layer 0 is [1], not a layer description"),
    ("model.layers", {}, ALL, "layers a JSON object of 0 field(s), which must be a list"),
    ("model", [], ALL, "the top layer is [], not a layer description"),
    ("model", DELETE, ALL, "is a minicnn file without a model"),
    (L + "3.body", [], ALL, "body [], which must be a layer description"),
    (L + "3.shortcut", "identity", ALL, "shortcut 'identity', which must be"),
    (L + "6.padding", [2, 2], ALL, "padding [2, 2], more than half its window [3, 3]"),
    (L + "1.eps", 0, ALL, "eps 0, which must be a finite number above 0"),
    (L + "1.momentum", None, ALL, "momentum None, which must be a number from 0 to 1"),
    (L + "11.p", "0.5", ALL, "p '0.5', which must be a number from 0 to 1"),
    (L + "8.in_features", 17, ALL, "8.weight has shape (8, 16), expected (8, 17)"),
    (L + "8.dtype", "float64", ALL, "8.weight is float32, expected float64"),
    (L + "7.type", "GlobalAveragePooling2D", INFO,
     "holds a model that cannot classify its own 8x8 images (layer 8 (Dense) cannot take the "
     "(4,) that reaches it per image: it takes 16 features)"),
    (L + "12.out_features", 2, ALL, "12.weight has shape (3, 8), expected (2, 8)"),
    ("extra", [], INFO, "its extra header must be a JSON object"),
    ("extra.kind", "model", CHECKPOINT, "holds a model but not a training checkpoint"),
    ("extra.classes", ["circle", "cross"], INFO,
     "names 2 classes, but its model gives (3,) outputs per image"),
    ("extra.classes", "abc", INFO, "its classes must be a list of 1 to"),
    ("extra.classes", [1, 2, 3], INFO,
     "its classes must be names of 1 to 1024 characters, got 1."),
    ("extra.classes", ["a", "a", "b"], INFO, "distinct names"),
    ("extra.norm", [1], INFO, 'its norm must be a JSON object of "mean"'),
    ("extra.norm.std", [0.2, 0, 0.2], INFO,
     "its norm std must be 3 finite numbers, each above 0, got [0.2, 0, 0.2]."),
    ("extra.norm.mean", [float("nan"), 0, 0], INFO,
     "its norm mean must be 3 finite numbers, got [nan, 0, 0]."),
    ("extra.input_shape", [1, 8, 8], INFO, "input_shape must be [3, H, W]"),
    ("extra.input_shape", [3, 0, 8], INFO, "input_shape must be [3, H, W]"),
    ("extra.input_shape", [3, 4, 4], INFO, "its own 4x4 images"),
    ("extra.epoch", -1, CHECKPOINT, "its epoch must be a whole number >= 0, got -1"),
    ("extra.step", 1.5, CHECKPOINT, "its step must be a whole number >= 0, got 1.5"),
    ("extra.best_val_acc", None, CHECKPOINT, "its best_val_acc must be a finite number"),
    ("extra.history.val_loss", DELETE, CHECKPOINT, "its history must be lists of numbers"),
    ("extra.history.lr", ["x"], CHECKPOINT, "its history must be lists of numbers"),
    ("extra.partial.seen", -3, CHECKPOINT, "its partial must be"),
    ("extra.rng.order", {}, CHECKPOINT, "its rng must be the states of numpy PCG64"),
    ("extra.rng.order.state.state", 2**130, CHECKPOINT, "its rng must be"),
    ("extra.rng.dropout", {}, CHECKPOINT, "its rng must be"),
    ("extra.optimizer.lr", "0.01", CHECKPOINT, "its optimizer must be an lr >= 0"),
    ("extra.optimizer", DELETE, ("resume",), "it has no optimizer, which a resumed run reads"),
    ("extra.rng.augment", DELETE, ("resume",), "its rng must be the states of numpy PCG64"),
    ("extra.settings.lr", DELETE, ("resume",), "its setting 'lr' must be a number above 0"),
    ("extra.settings", [], CHECKPOINT, "its settings must be a JSON object"),
    ("extra.settings.epochs", "10", CHECKPOINT, "its setting 'epochs' must be a whole number"),
    ("extra.settings.model", ["x"], CHECKPOINT, "its setting 'model' must be a string"),
    ("extra.settings.tta", "yes", CHECKPOINT, "its setting 'tta' must be true or false"),
    ("extra.settings.lr", 0, CHECKPOINT, "its setting 'lr' must be a number above 0"),
    ("extra.settings.schedule", "plateau", CHECKPOINT,
     "its schedule must be the state of the plateau schedule (best, bad_epochs, cooldown_left)"),
    ("extra.schedule", None, CHECKPOINT, "its schedule must be the state of the cosine"),
    ("extra.code_version", 3, CHECKPOINT, "its code_version must be a string, got 3"),
]


def edited(tree, where, value):
    tree = copy.deepcopy(tree)
    *parents, last = [int(k) if k.isdigit() else k for k in where.split(".")]
    node = tree
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return tree


@pytest.mark.parametrize("where, value, refused_by, message", EDITS,
                         ids=[f"{e[0]}={e[1]!r}"[:60] for e in EDITS])
def test_a_wrong_field_is_one_sentence_from_the_loaders_that_read_it(bases, tmp_path, where,
                                                                     value, refused_by, message):
    header, arrays = bases[0]
    path = write_file(tmp_path / "edited.npz", edited(header, where, value), arrays)
    for name, load in LOADERS.items():
        said = outcome(load, path)
        if name in refused_by:
            assert said is not None and message in said, (name, said)
        else:
            assert said is None, (name, said)


@pytest.mark.parametrize("change, refused_by, message", [
    (lambda a: a.pop("param:0.bias"), ALL, "it has no array 'param:0.bias'"),
    (lambda a: a.update(junk=np.zeros(3)), ALL, "holds an array 'junk' that its model does not"),
    (lambda a: a.update({"optim:0.weight:velocity": a["param:0.weight"]}), ALL,
     "holds an array 'optim:0.weight:velocity'"),
    (lambda a: a.update({"param:0.weight": a["param:0.weight"].astype(np.float64)}), ALL,
     "0.weight is float64, expected float32"),
    (lambda a: a.update({"param:0.weight": a["param:0.weight"].reshape(4, 27)}), ALL,
     "0.weight has shape (4, 27), expected (4, 3, 3, 3)"),
    (lambda a: a.update({"param:0.bias": npy(np.array([1, "x", None], dtype=object),
                                             allow_pickle=True)}), ALL, "of dtype 'object'"),
    (lambda a: a.update({"param:0.bias": np.array(["a", "b", "c", "d"])}), ALL,
     "of dtype '<U1'; minicnn files hold only numbers"),
    (lambda a: a.pop("optim:0.weight:exp_avg_sq"), CHECKPOINT,
     "its optimiser buffers must be the same for every parameter"),
])
def test_a_wrong_array_is_one_sentence(bases, tmp_path, change, refused_by, message):
    header, arrays = bases[0]
    arrays = dict(arrays)
    change(arrays)
    path = write_file(tmp_path / "edited.npz", header, arrays)
    for name, load in LOADERS.items():
        said = outcome(load, path)
        assert (said is not None and message in said) if name in refused_by else said is None, said


def test_2e9_channels_are_refused_before_anything_is_allocated(bases, tmp_path):
    header, arrays = bases[0]
    huge = edited(header, L + "0.out_channels", 2_000_000_000)
    within = edited(edited(header, L + "0.out_channels", 2**24), L + "0.in_channels", 2**10)
    for config, message in [(huge, "out_channels 2000000000"),
                            (within, "more than 2,147,483,648 parameter values (at layer 0, "
                                     "Conv2D of shape (16777216, 1024, 3, 3))")]:
        path = write_file(tmp_path / "huge.npz", config, arrays)
        tracemalloc.start()
        for load in LOADERS.values():
            assert message in outcome(load, path)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 16 * 2**20, peak


def nested(depth, innermost=None):
    return innermost if depth == 0 else [nested(depth - 1, innermost)]


def test_deep_nesting_is_refused(bases, tmp_path):
    header, arrays = bases[0]
    model = header["model"]
    for _ in range(70):                                      # 70 Sequentials, one inside another
        model = {"type": "Sequential", "layers": [model]}
    prefix = "0." * 64
    deep_arrays = {f"{k.split(':')[0]}:{prefix}{k.split(':', 1)[1]}": v for k, v in arrays.items()}
    cases = [(dict(header, model=model), deep_arrays, "layers nest more than 64 deep at layer 0."),
             (dict(header, extra=dict(header["extra"], notes=nested(300))), arrays,
              "has a header nested more than 200 levels deep")]
    text = json.dumps(dict(header, extra={"notes": "NESTED"}))
    text = text.replace('"NESTED"', "[" * 100_000 + "]" * 100_000)      # json's own limit
    cases.append((text, arrays, "has a header nested more than 200 levels deep"))
    for config, members, message in cases:
        path = write_file(tmp_path / "deep.npz", config, members)
        for load in LOADERS.values():
            assert message in outcome(load, path)


# ---- sizes: declared, inflated, allocated ---------------------------------------------------
@pytest.fixture(scope="module")
def two_gib_member():
    """A zip member "junk.npy" that inflates to a 2 GiB .npy of float32 zeros: a real deflate
    stream of 2 MB (each 16 MiB of zeros ends in a full flush, so all of them compress to the
    same bytes), with the right size and CRC."""
    count, chunk = 128, bytes(16 * 2**20)
    head = npy_header((count * len(chunk) // 4,), np.float32)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = deflate.compress(head) + deflate.flush(zlib.Z_FULL_FLUSH)
    zeros = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    assert deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH) == zeros
    crc = zlib.crc32(head)
    for _ in range(count):
        crc = zlib.crc32(chunk, crc)
    stream += zeros * count + deflate.flush()
    return "junk.npy", stream, len(head) + count * len(chunk), crc, zipfile.ZIP_DEFLATED


def test_the_2_gib_member_is_real(tmp_path, two_gib_member):
    """zipfile inflates all of it, CRC checked: a loader that read it would hold 2 GiB."""
    path = write_zip(tmp_path / "big.zip", [two_gib_member])
    assert path.stat().st_size < 3 * 2**20
    total = 0
    with zipfile.ZipFile(path) as z, z.open("junk.npy") as f:
        while block := f.read(2**26):
            total += len(block)
    assert total == two_gib_member[2] > 2**31


@pytest.mark.parametrize("name, message", [
    ("junk", "holds an array 'junk' that its model does not have"),
    ("param:0.weight", "has two members named 'param:0.weight.npy'"),
    ("optim:0.weight:exp_avg", "0.weight:exp_avg has shape (536870912,), expected (4, 3, 3, 3)"),
])
def test_an_extra_2_gib_member_is_refused_without_being_inflated(bases, tmp_path, two_gib_member,
                                                                 name, message):
    header, arrays = bases[0]
    if name.startswith("optim:"):                      # in its place: no second member
        arrays = {k: v for k, v in arrays.items() if k != name}
    path = write_file(tmp_path / "extra.npz", header, arrays,
                      [(f"{name}.npy",) + two_gib_member[1:]])
    tracemalloc.start()
    started = time.perf_counter()
    for load in LOADERS.values():
        assert message in outcome(load, path)
    seconds, peak = time.perf_counter() - started, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 5 and peak < 16 * 2**20, (seconds, peak)


def test_the_budget_refuses_what_declares_more(bases, tmp_path, two_gib_member, monkeypatch):
    header, arrays = bases[0]
    path = write_file(tmp_path / "extra.npz", header, arrays, [two_gib_member])
    monkeypatch.setenv("MINICNN_MAX_FILE_BYTES", str(2**30))
    for load in LOADERS.values():
        said = outcome(load, path)
        assert "bytes of arrays, more than the 1,073,741,824 that minicnn reads" in said, said
    monkeypatch.setenv("MINICNN_MAX_FILE_BYTES", "lots")
    with pytest.raises(CheckpointError, match="MINICNN_MAX_FILE_BYTES must be a whole number"):
        minicnn.load(path)


def test_sizes_that_lie_are_refused_before_allocation(bases, tmp_path):
    header, arrays = bases[0]
    weight = npy(arrays["param:0.weight"])
    huge = npy_header((2**40,), np.float32)
    small = zlib.compressobj(9, zlib.DEFLATED, -15)
    small = small.compress(huge) + small.flush()
    cases = [   # (the member param:0.weight.npy as (payload, size, crc, method), message)
        ((huge + bytes(16), len(huge) + 16, zlib.crc32(huge + bytes(16)), zipfile.ZIP_STORED),
         "has an array 'param:0.weight' whose header declares 4,398,046,511,104 bytes"),
        ((weight + bytes(1000), len(weight) + 1000, zlib.crc32(weight + bytes(1000)),
          zipfile.ZIP_STORED), "whose header declares 432 bytes (float32 (4, 3, 3, 3)) in a "
                               "member of 1,432"),
        ((small, 2**31, 0, zipfile.ZIP_DEFLATED),
         f"declares 2,147,483,648 bytes from {len(small)} deflated bytes, which no zip writer"),
        ((weight, len(weight) + 10, zlib.crc32(weight), zipfile.ZIP_STORED),
         f"declares {len(weight) + 10:,} bytes from {len(weight)} stored bytes"),
        ((zlib.compress(weight), len(weight), zlib.crc32(weight), zipfile.ZIP_BZIP2),
         "compressed with zip method 12; minicnn files are stored or deflated"),
    ]
    rest = {k: v for k, v in arrays.items() if k != "param:0.weight"}
    for member, message in cases:
        path = write_file(tmp_path / "lies.npz", header, rest, [("param:0.weight.npy",) + member])
        tracemalloc.start()
        for load in LOADERS.values():
            said = outcome(load, path)
            assert said is not None and message in said, said
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 16 * 2**20


def test_a_npy_header_length_that_lies_is_refused_before_numpy_reads_it(bases, tmp_path):
    """A version 2.0 .npy whose header claims 100 MB: a real deflated member of that size,
    which NumPy's read_array_header_2_0 would read into memory before any check."""
    header, arrays = bases[0]
    chunk, count = b" " * 2**20, 100
    head = np.lib.format.magic(2, 0) + struct.pack("<I", count * len(chunk))
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = deflate.compress(head) + deflate.flush(zlib.Z_FULL_FLUSH)
    stream += (deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)) * count + deflate.flush()
    crc = zlib.crc32(head)
    for _ in range(count):
        crc = zlib.crc32(chunk, crc)
    member = ("param:0.bias.npy", stream, len(head) + count * len(chunk), crc, zipfile.ZIP_DEFLATED)
    path = write_file(tmp_path / "long.npz", header,
                      {k: v for k, v in arrays.items() if k != "param:0.bias"}, [member])
    tracemalloc.start()
    for load in LOADERS.values():
        assert "'param:0.bias' whose .npy header is 104,857,600 bytes long" in outcome(load, path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * 2**20, peak


def test_the_zip_directory_is_bounded_before_zipfile_reads_it(bases, tmp_path, monkeypatch):
    header, arrays = bases[0]
    path = write_file(tmp_path / "many.npz", header, arrays)
    (directory,) = struct.unpack("<L", path.read_bytes()[-10:-6])    # from the end record

    def never(*args, **kwargs):
        raise AssertionError("zipfile read the directory")
    monkeypatch.setattr(zipfile, "ZipFile", never)
    for limit, value in (("MAX_MEMBERS", 5), ("MAX_DIRECTORY_BYTES", 1000)):
        with monkeypatch.context() as patch:
            patch.setattr(serialization, limit, value)
            with pytest.raises(CheckpointError, match=rf"has a zip directory of "
                                                      rf"{len(arrays) + 1} members in "
                                                      rf"{directory:,} bytes; a minicnn"):
                minicnn.load(path)
    monkeypatch.undo()
    write_zip(path, [stored("__minicnn__.npy", b"x"), stored("notes.txt", b"hello")])
    with pytest.raises(CheckpointError, match="has a member 'notes.txt' that is not a .npy"):
        minicnn.load(path)


def test_a_pipe_is_refused_unopened_and_odd_but_valid_arrays_load(bases, tmp_path):
    os.mkfifo(tmp_path / "pipe.npz")                 # open() would wait for a writer forever
    for load in LOADERS.values():
        assert outcome(load, tmp_path / "pipe.npz").endswith("pipe.npz is not a file.")
    header, arrays = bases[0]
    odd = {k: np.asfortranarray(v).astype(v.dtype.newbyteorder(">")) for k, v in arrays.items()}
    path = write_file(tmp_path / "odd.npz", header, odd)         # big-endian, Fortran order
    model, _, _ = load_checkpoint(path)
    for name, value in model.params.items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, arrays[f"param:{name}"])


class RunsCode:
    """Unpickling this opens (creates) the file marker: a pickle that runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def live_pickle(marker):
    """The .npy of an object array whose unpickling creates marker, proved live here."""
    payload = np.empty(1, dtype=object)
    payload[0] = RunsCode(str(marker))
    data = npy(payload, allow_pickle=True)
    np.load(io.BytesIO(data), allow_pickle=True)[0].close()       # what a careless loader does
    assert marker.exists()
    marker.unlink()
    return data


@pytest.mark.parametrize("member", ["__minicnn__", "param:0.weight", "optim:0.weight:exp_avg"])
def test_an_object_array_that_would_run_code_is_never_unpickled(bases, tmp_path, member):
    header, arrays = bases[0]
    marker = tmp_path / "pwned"
    arrays = {**arrays, member: live_pickle(marker)}
    path = write_file(tmp_path / "evil.npz", header, arrays)
    if member == "__minicnn__":               # the payload in the header's own place
        write_zip(path, [stored("__minicnn__.npy", arrays.pop(member))]
                  + [stored(f"{k}.npy", npy(v)) for k, v in arrays.items()])
    for load in LOADERS.values():
        said = outcome(load, path)
        assert f"has an array '{member}' of dtype 'object'" in said, said
    assert not marker.exists()


def test_predict_takes_fewer_images_a_batch_for_a_model_large_per_image(monkeypatch):
    """The same logits, in batches whose largest layer holds at most FORWARD_VALUES values."""
    model = every_layer(np.random.default_rng(0))
    x = np.random.default_rng(1).integers(0, 256, (10, 3, 8, 8), dtype=np.uint8)
    mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
    whole = predict_logits(model, x, mean, std, np)
    _, peak = schema.output_shape(layer_config(model), (3, 8, 8))
    monkeypatch.setattr(checkpoint, "FORWARD_VALUES", 3 * peak + 1)
    batches, forward = [], checkpoint.data_parallel.predict
    monkeypatch.setattr(checkpoint.data_parallel, "predict",
                        lambda m, xb: batches.append(len(xb)) or forward(m, xb))
    np.testing.assert_allclose(predict_logits(model, x, mean, std, np), whole, rtol=1e-5, atol=1e-6)
    assert batches == [3, 3, 3, 1]


# ---- any edit at all --------------------------------------------------------------------------
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.floats(),
    st.sampled_from([0, 1, 2, 3, 16, -1, 2**24, 2**24 + 1, 2**31, 2_000_000_000, 10**30, 2**130,
                     2e9, 0.5, 1e-300, 1e308]),
    st.sampled_from(["", "same", "valid", "float32", "float64", "float16", "object", "int64",
                     "Conv2D", "Dense", "Sequential", "Residual", "Flatten", "PCG64", "cosine",
                     "plateau", "none", "checkpoint", "x\ny"]),
    st.text(max_size=6))
VALUES = st.one_of(
    st.recursive(SCALARS, lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(["type", "layers", "body", "shortcut", "in_channels",
                                         "kernel_size", "mean", "std", "state", "x"]),
                        inner, max_size=4)), max_leaves=8),
    st.builds(nested, st.integers(150, 250)))
ARRAY_NAMES = ["junk", "param:0.junk", "state:0.weight", "param:0.weight", "param:12.bias",
               "optim:0.weight:exp_avg", "optim:0.weight:momentum", "optim:9.bias:exp_avg"]
ARRAYS = st.one_of(
    st.builds(lambda shape, dtype: np.zeros(shape, dtype),
              st.lists(st.integers(0, 5), max_size=4).map(tuple),
              st.sampled_from([np.float32, np.float64, np.int64, np.bool_, np.uint8])),
    st.just(npy(np.array([1, "x"], dtype=object), allow_pickle=True)))


def paths(tree, at=()):
    """Every place in a JSON tree, as key paths."""
    yield at
    items = (tree.items() if isinstance(tree, dict)
             else enumerate(tree) if isinstance(tree, list) else ())
    for key, value in items:
        yield from paths(value, at + (key,))


def hostile_edit(data, header, arrays):
    """One edit drawn by hypothesis: a value replaced (by a drawn one, or one from elsewhere
    in the header), a field deleted or added, or an array removed, added or replaced."""
    kind = data.draw(st.sampled_from(["replace", "transplant", "delete", "add", "array"]))
    if kind == "array":
        name = data.draw(st.sampled_from(ARRAY_NAMES + sorted(arrays)))
        if data.draw(st.booleans()) and name in arrays:
            del arrays[name]
        else:
            arrays[name] = data.draw(ARRAYS)
        return header
    # the model's fields first: hypothesis tries the first choices most
    places = sorted(list(paths(header))[1:], key=lambda at: at[:1] != ("model",))
    where = data.draw(st.sampled_from(places))
    *parents, last = where
    node = header
    for key in parents:
        node = node[key]
    if kind == "delete":
        del node[last]
    elif kind == "add" and isinstance(node[last], dict):
        node[last][data.draw(st.sampled_from(["type", "x", "padding", "classes", "dtype"]))] = \
            data.draw(VALUES)
    elif kind == "transplant":
        source = data.draw(st.sampled_from(list(paths(header))))
        value = header
        for key in source:
            value = value[key]
        node[last] = copy.deepcopy(value)
    else:
        node[last] = data.draw(VALUES)
    return header


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_any_hostile_edit_loads_or_is_one_sentence(bases, tmp_path, data):
    header, arrays = bases[data.draw(st.sampled_from([0, 1]))]
    header, arrays = copy.deepcopy(header), dict(arrays)
    for _ in range(data.draw(st.integers(1, 3))):
        header = hostile_edit(data, header, arrays)
    path = write_file(tmp_path / "hostile.npz", header, arrays)
    for load in LOADERS.values():
        outcome(load, path)                       # succeeds, or one sentence naming the file


# ---- through the commands, under a memory limit -----------------------------------------------
ADDRESS_SPACE = 3 * 2**29            # 1.5 GiB: less than the 2 GiB member would take


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_limited(args, tmp_path):
    env = dict(os.environ, MINICNN_THREADS="1", MINICNN_DATA=str(tmp_path / "cache"))
    return subprocess.run([sys.executable] + args, capture_output=True, text=True, timeout=120,
                          env=env, preexec_fn=_limit_memory)


@pytest.fixture(scope="module")
def command_files(bases, two_gib_member, tmp_path_factory):
    root = tmp_path_factory.mktemp("commands")
    header, arrays = bases[0]
    folder = make_folder(root / "shapes", per_class=2)
    files = {
        "good": write_file(root / "good.npz", header, arrays),
        "channels": write_file(root / "channels.npz",
                               edited(header, L + "0.out_channels", 2_000_000_000), arrays),
        "member": write_file(root / "member.npz", header, arrays, [two_gib_member]),
        "classes": write_file(root / "classes.npz",
                              edited(header, "extra.classes", ["circle", "cross"]), arrays),
        "pickle": write_file(root / "pickle.npz", header,
                             {**arrays, "param:0.weight": live_pickle(root / "pwned")}),
        "deep": write_file(root / "deep.npz", dict(header, extra=nested(300)), arrays),
    }
    return root, folder, files


def test_the_memory_limit_is_one_the_2_gib_member_breaks(command_files, tmp_path):
    _, _, files = command_files
    read = run_limited(["-c", f"import zipfile; zipfile.ZipFile({str(files['member'])!r})"
                              f".read('junk.npy')"], tmp_path)
    assert read.returncode == 1 and "MemoryError" in read.stderr


@pytest.mark.parametrize("name, command, message", [
    ("good", "predict", None),
    ("good", "evaluate", None),
    ("channels", "predict", "out_channels 2000000000, which must be"),
    ("member", "predict", "holds an array 'junk' that its model does not have"),
    ("member", "evaluate", "holds an array 'junk' that its model does not have"),
    ("classes", "predict", "names 2 classes, but its model gives (3,) outputs per image"),
    ("classes", "evaluate", "names 2 classes, but its model gives (3,) outputs per image"),
    ("pickle", "predict", "has an array 'param:0.weight' of dtype 'object'"),
    ("deep", "predict", "has a header nested more than 200 levels deep"),
])
def test_the_commands_succeed_or_say_one_sentence_within_the_memory_limit(
        command_files, tmp_path, name, command, message):
    root, folder, files = command_files
    path = files[name]
    args = (["-m", "minicnn.predict", "--checkpoint", str(path), str(next(folder.rglob("*.png")))]
            if command == "predict" else
            ["-m", "minicnn.evaluate", "--checkpoint", str(path), "--data", str(folder)])
    done = run_limited(args, tmp_path)
    assert "Traceback" not in done.stderr, done.stderr
    if message is None:
        assert done.returncode == 0, done.stderr
        assert "circle" in done.stdout
    else:
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert lines[0].startswith("error: ") and str(path) in lines[0] and message in lines[0]
    assert not (root / "pwned").exists()
