"""state_dict / load_state_dict under PyTorch's names, the containers' names (a Sequential of
named layers, a Residual's names, a sub-layer named "" lending its names), and
minicnn.load_weights / save_weights on .safetensors and PyTorch files, hostile ones included:
each loads or is one sentence (a minicnn error), and a failed load leaves the model as it was."""
import os
import re
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minicnn
from minicnn.errors import CheckpointError, MinicnnError, StateDictError, UsageError
from minicnn.nn import (BatchNorm1D, BatchNorm2D, Conv2D, Dense, Flatten, MaxPool2D, ReLU,
                        Residual, Sequential, layer_config, schema)


def _small(rng=None, dtype=np.float32):
    """Conv - BN - ReLU - pool - a residual block - Flatten - Dense - BN1d - Dense."""
    rng = rng if rng is not None else np.random.default_rng(0)
    d = dict(rng=rng, dtype=dtype)
    return Sequential([
        Conv2D(3, 4, 3, padding=1, **d), BatchNorm2D(4, dtype=dtype), ReLU(), MaxPool2D(2),
        Residual([Conv2D(4, 4, 3, padding=1, bias=False, **d), BatchNorm2D(4, dtype=dtype)],
                 [Conv2D(4, 4, 1, bias=False, **d)]),
        Flatten(), Dense(4 * 4 * 4, 6, **d), BatchNorm1D(6, dtype=dtype), Dense(6, 3, **d)])


def _randomise(model, seed):
    """Random weights and running statistics (positive variances)."""
    rng = np.random.default_rng(seed)
    for name, array in {**model.params, **model.state}.items():
        values = rng.standard_normal(array.shape)
        array[...] = np.abs(values) + 0.5 if name.endswith("running_var") else values
    return model


def _torch_twin(torch):
    """_small as torch modules, torch's own names (no weights copied)."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(4))
            self.shortcut = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False))

        def forward(self, x):
            return self.body(x) + self.shortcut(x)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), Block(), nn.Flatten(), nn.Linear(64, 6),
                         nn.BatchNorm1d(6), nn.Linear(6, 3))


# ---- names ------------------------------------------------------------------------------------
def test_the_keys_are_torchs_and_the_state_dict_moves_both_ways():
    """The same keys, in the same order, with the same shapes as torch's state_dict (the
    counter num_batches_tracked an int64 scalar), and weights moved either way give the same
    outputs in eval mode."""
    torch = pytest.importorskip("torch")
    model = _randomise(_small(dtype=np.float64), 1)
    twin = _torch_twin(torch).double().eval()
    ours, theirs = model.state_dict(), twin.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == tuple(v.shape) for k, v in theirs.items())
    assert ours["1.num_batches_tracked"].dtype == np.int64
    assert ours["1.num_batches_tracked"].shape == ()
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in ours.items()}, strict=True)
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8))
    with torch.no_grad():
        want = twin(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.forward(x), want, rtol=1e-10, atol=1e-10)
    other = _small(np.random.default_rng(5), dtype=np.float64)
    assert other.load_state_dict(twin.state_dict()) == ([], [])           # torch tensors in
    np.testing.assert_allclose(other.forward(x), want, rtol=1e-10, atol=1e-10)


def test_a_single_layer_has_torchs_keys_too():
    torch = pytest.importorskip("torch")
    for ours, theirs in ((Conv2D(2, 3, 3, groups=1), torch.nn.Conv2d(2, 3, 3)),
                         (Conv2D(4, 4, 3, bias=False, groups=4),
                          torch.nn.Conv2d(4, 4, 3, bias=False, groups=4)),
                         (BatchNorm2D(3), torch.nn.BatchNorm2d(3)),
                         (Dense(2, 5), torch.nn.Linear(2, 5))):
        assert {k: v.shape for k, v in ours.state_dict().items()} == \
            {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
        assert ours.load_state_dict(theirs.state_dict()) == ([], [])
        for key, value in theirs.state_dict().items():
            if key != "num_batches_tracked":
                np.testing.assert_array_equal(ours.state_dict()[key], value.detach().numpy())


def test_state_dict_arrays_are_host_copies():
    model = _small()
    sd = model.state_dict()
    sd["0.weight"][...] = 7
    assert not np.any(model.params["0.weight"] == 7)
    assert all(type(v) is np.ndarray for v in sd.values())


def test_named_sequential_and_residual_names():
    """A dict of layers names them (PyTorch's Sequential(OrderedDict)); a Residual's names
    replace "body" and "shortcut"; a layer named "" lends its names to its container."""
    model = Sequential({"features": Sequential([Conv2D(1, 2, 3), ReLU()]),
                        "block": Residual(Sequential({"conv": Conv2D(2, 2, 1)}),
                                          Conv2D(2, 2, 1), names=("", "downsample")),
                        "flat": Flatten(), "fc": Dense(2, 3)})
    assert list(model.state_dict()) == [
        "features.0.weight", "features.0.bias", "block.conv.weight", "block.conv.bias",
        "block.downsample.weight", "block.downsample.bias", "fc.weight", "fc.bias"]
    assert model["fc"] is model[3] and "(fc) Dense" in repr(model)
    assert Sequential([ReLU()], names=["act"]).named_layers()[0][0] == "act"


@pytest.mark.parametrize("build, message", [
    (lambda: Sequential({"a.b": ReLU()}),
     "Sequential names must be 1 distinct strings without dots"),
    (lambda: Sequential([ReLU(), ReLU()], names=["a", "a"]), "distinct strings"),
    (lambda: Sequential([ReLU()], names=["a", "b"]), "must be 1 distinct"),
    (lambda: Residual(Dense(2, 2), Dense(2, 2), names=("", "")), "Residual names must be 2"),
    (lambda: Sequential({"": Sequential({"fc": Dense(2, 2)}), "fc": Dense(2, 2)}),
     "two arrays would be named 'fc.weight'"),
])
def test_bad_names_are_one_sentence(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_named_containers_save_load_and_the_schema(tmp_path):
    model = Sequential({"conv": Conv2D(1, 2, 3, rng=np.random.default_rng(0)),
                        "block": Residual([Conv2D(2, 2, 1)], None, names=("", "shortcut")),
                        "flat": Flatten()})
    config = layer_config(model)
    assert config["names"] == ["conv", "block", "flat"] and config["layers"][1]["names"] == [
        "", "shortcut"]
    assert "names" not in layer_config(Sequential([ReLU()]))            # older files as before
    assert "names" not in layer_config(Residual([ReLU()]))
    specs = schema.check_model(config)
    assert set(specs) == {f"param:{k}" for k in model.params}
    model.save(tmp_path / "m.npz")
    loaded = minicnn.load(tmp_path / "m.npz")
    assert list(loaded.state_dict()) == list(model.state_dict())
    x = np.random.default_rng(1).standard_normal((1, 1, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))
    bad = dict(config, names=["conv", "conv", "flat"])
    with pytest.raises(schema.SchemaError, match="names"):
        schema.check_model(bad)
    with pytest.raises(schema.SchemaError, match="has 2 names for its 3 layers"):
        schema.check_model(dict(config, names=["conv", "block"]))
    twice = {"type": "Sequential", "names": ["", "fc"], "layers": [
        {"type": "Sequential", "names": ["fc"], "layers": [
            {"type": "Dense", "in_features": 2, "out_features": 2}]},
        {"type": "Dense", "in_features": 2, "out_features": 2}]}
    with pytest.raises(schema.SchemaError, match="two arrays of the model are named 'fc.weight'"):
        schema.check_model(twice)


# ---- load_state_dict: strictness, one sentence, nothing half-copied ---------------------------
def test_strict_load_lists_missing_unexpected_and_misshaped_keys_and_changes_nothing():
    model = _randomise(_small(), 1)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    sd = _randomise(_small(), 2).state_dict()
    del sd["0.bias"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    sd["8.weight"] = np.zeros((4, 6), np.float32)
    with pytest.raises(StateDictError) as caught:
        model.load_state_dict(sd)
    message = str(caught.value)
    assert message == ("The weights do not fit the model: missing '0.bias'; unexpected "
                       "'extra.weight'; mis-shaped '8.weight' is (4, 6), expected (3, 6).")
    assert caught.value.missing == ["0.bias"] and caught.value.unexpected == ["extra.weight"]
    assert caught.value.mismatched == [("8.weight", "(4, 6)", (3, 6))]
    assert isinstance(caught.value, CheckpointError)
    assert all(np.array_equal(v, before[k]) for k, v in model.state_dict().items())


def test_non_strict_load_copies_what_fits_but_never_a_wrong_shape():
    model, source = _small(), _randomise(_small(), 3)
    sd = {k: v for k, v in source.state_dict().items() if not k.startswith("8.")}
    sd["head.weight"] = np.zeros(2, np.float32)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert missing == ["8.weight", "8.bias"] and unexpected == ["head.weight"]
    np.testing.assert_array_equal(model.params["0.weight"], source.params["0.weight"])
    sd["0.weight"] = np.zeros((1, 2))
    with pytest.raises(StateDictError, match=r"mis-shaped '0.weight' is \(1, 2\)"):
        model.load_state_dict(sd, strict=False)


def test_long_lists_are_cut_in_the_sentence_not_in_the_exception():
    with pytest.raises(StateDictError) as caught:
        _small().load_state_dict({})
    assert str(caught.value).endswith("'1.running_mean' (and 15 more).")
    assert len(caught.value.missing) == 20                 # num_batches_tracked not among them


@pytest.mark.parametrize("value, shown", [
    ("text", "not an array of numbers"), (np.zeros((4, 3, 3, 3), complex), "complex128"),
    (np.zeros((4, 3, 3, 3), bool), "bool"), (np.array([object()]), "not an array of numbers"),
    (None, "not an array of numbers")])
def test_values_that_are_not_real_numbers_are_refused(value, shown):
    sd = _small().state_dict()
    sd["0.weight"] = value
    with pytest.raises(StateDictError, match=f"'0.weight' is {shown}"):
        _small().load_state_dict(sd)


def test_num_batches_tracked_is_optional_but_must_be_an_integer_scalar():
    model, sd = _small(), _small().state_dict()
    sd.pop("1.num_batches_tracked")
    assert model.load_state_dict(sd) == ([], [])
    sd["1.num_batches_tracked"] = np.array(3.5)
    with pytest.raises(StateDictError, match=r"'1.num_batches_tracked' is float64 \(\), "
                                             r"expected an integer scalar"):
        model.load_state_dict(sd)


def test_values_are_cast_to_the_parameter_dtype_and_device(monkeypatch):
    """float64 and integer values go into float32 parameters as float32, on the model's device
    (CuPy, here its stand-in)."""
    import fake_cupy
    from minicnn import backend
    monkeypatch.setattr(backend, "_cupy", fake_cupy.module)
    model = _small().to("cupy")
    sd = {k: v.astype(np.float64) if v.dtype == np.float32 else v
          for k, v in _randomise(_small(), 4).state_dict().items()}
    sd["0.bias"] = np.arange(4)
    model.load_state_dict(sd)
    weight = model.params["0.weight"]
    assert isinstance(weight, fake_cupy.ndarray) and weight.dtype == np.float32
    np.testing.assert_array_equal(model.state_dict()["0.bias"], np.arange(4, dtype=np.float32))
    np.testing.assert_allclose(model.state_dict()["0.weight"], sd["0.weight"], rtol=1e-6)


def test_a_mapping_is_required():
    with pytest.raises(StateDictError, match="takes a mapping of names to arrays, got list"):
        _small().load_state_dict([("0.weight", np.zeros(1))])


# ---- files: safetensors and PyTorch --------------------------------------------------------------
def test_save_and_load_weights_with_safetensors(tmp_path):
    source, model = _randomise(_small(), 6), _small()
    path = tmp_path / "w.safetensors"
    minicnn.save_weights(source, path)
    assert not list(tmp_path.glob("*.tmp"))
    assert minicnn.load_weights(model, path) == ([], [])
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(model.forward(x), source.forward(x))
    from safetensors.numpy import load_file
    assert load_file(path)["1.num_batches_tracked"].dtype == np.int64
    os.rename(path, tmp_path / "noext")                    # recognised by its first bytes
    assert minicnn.load_weights(_small(), tmp_path / "noext") == ([], [])


def test_save_weights_is_torch_loadable_and_atomic(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file
    path = tmp_path / "w.safetensors"
    minicnn.save_weights(_randomise(_small(dtype=np.float64), 7), path)
    twin = _torch_twin(torch).double()
    twin.load_state_dict(load_file(path), strict=True)
    old = path.read_bytes()
    import safetensors.numpy

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.numpy, "save", broken)
    with pytest.raises(OSError):
        minicnn.save_weights(_small(), path)
    assert path.read_bytes() == old and not list(tmp_path.glob("*.tmp"))


def test_load_weights_from_a_torch_file(tmp_path):
    torch = pytest.importorskip("torch")
    twin = _torch_twin(torch)
    for p in twin.state_dict().values():
        p.copy_(torch.rand_like(p.float()).to(p.dtype) + 0.5)
    for suffix in (".pth", ".pt", ".bin"):
        torch.save(twin.state_dict(), tmp_path / f"w{suffix}")
        model = _small()
        assert minicnn.load_weights(model, tmp_path / f"w{suffix}") == ([], [])
        np.testing.assert_array_equal(model.params["6.weight"], twin[6].weight.detach().numpy())
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
            for k, v in twin.state_dict().items()}
    torch.save(half, tmp_path / "bf16.pth")                 # bfloat16 read as float32
    model = _small()
    minicnn.load_weights(model, tmp_path / "bf16.pth")
    np.testing.assert_array_equal(model.params["6.weight"],
                                  half["6.weight"].float().numpy())


def _hostile_torch_files(torch, tmp_path):
    """{name: (file, what the sentence says)}."""
    good = tmp_path / "good.pth"
    torch.save(_torch_twin(torch).state_dict(), good)
    files = {}

    def saved(name, obj):
        torch.save(obj, tmp_path / name)
        return tmp_path / name
    (tmp_path / "truncated.pth").write_bytes(good.read_bytes()[:3000])
    files["truncated"] = (tmp_path / "truncated.pth", re.escape(
        "is not a PyTorch state dict that torch.load(weights_only=True) can read"))
    (tmp_path / "text.pth").write_text("hello")
    files["text"] = (tmp_path / "text.pth", "can read")
    files["list"] = (saved("list.pth", [torch.zeros(2)]), re.escape(
        "does not hold a state dict (a dict of names to tensors) but list."))
    files["int keys"] = (saved("ints.pth", {1: torch.zeros(2)}), "but a dict with the key 1")
    files["checkpoint"] = (saved("ckpt.pth", {"model": _torch_twin(torch).state_dict(),
                                              "epoch": 3}),
                           "is a training checkpoint, not a state dict: its 'model' entry")
    files["complex"] = (saved("complex.pth", {**_torch_twin(torch).state_dict(),
                                              "0.weight": torch.zeros(4, 3, 3, 3,
                                                                      dtype=torch.complex64)}),
                        "'0.weight' is not an array of numbers")
    files["huge"] = (saved("huge.pth", {**_torch_twin(torch).state_dict(),
                                        "0.weight": torch.zeros(1).expand(2**20, 2**20)}),
                     r"'0.weight' is \(1048576, 1048576\), expected \(4, 3, 3, 3\)")
    return files


class Unpicklable:
    """Any class at all: torch.load(weights_only=True) refuses to build it."""


def test_hostile_torch_files_are_one_sentence(tmp_path):
    torch = pytest.importorskip("torch")
    files = _hostile_torch_files(torch, tmp_path)
    torch.save({"0.weight": Unpicklable()}, tmp_path / "code.pth")
    files["a class"] = (tmp_path / "code.pth", re.escape("torch.load(weights_only=True) can "
                                                         "read (Weights only load failed"))
    for name, (path, says) in files.items():
        model = _randomise(_small(), 1)
        before = model.state_dict()
        with pytest.raises(CheckpointError, match=says) as caught:
            minicnn.load_weights(model, path)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value), name
        assert all(np.array_equal(v, before[k]) for k, v in model.state_dict().items()), name


def test_hostile_safetensors_files_are_one_sentence(tmp_path):
    import json
    import struct
    good = tmp_path / "good.safetensors"
    minicnn.save_weights(_small(), good)
    data = good.read_bytes()
    cases = {"truncated.safetensors": (data[:len(data) // 2], "is not a readable .safetensors"),
             "empty.safetensors": (b"", "is not a readable .safetensors")}
    header = {"0.weight": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 16]}}
    blob = json.dumps(header).encode()
    cases["huge.safetensors"] = (struct.pack("<Q", len(blob)) + blob + bytes(16),
                                 "is not a readable .safetensors")
    header = {"0.weight": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}
    blob = json.dumps(header).encode()
    cases["bf16.safetensors"] = (struct.pack("<Q", len(blob)) + blob + bytes(4),
                                 "holds '0.weight' \\(BF16\\) arrays, a dtype NumPy cannot read")
    for name, (content, says) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=says):
            minicnn.load_weights(_small(), tmp_path / name)


def test_a_safetensors_header_is_checked_before_any_array_is_read(tmp_path, monkeypatch):
    """A file for another model is refused from its header alone."""
    from safetensors import safe_open
    minicnn.save_weights(Sequential([Dense(3, 2)]), tmp_path / "w.safetensors")
    read = []
    original = safe_open.get_tensor if hasattr(safe_open, "get_tensor") else None
    with safe_open(tmp_path / "w.safetensors", framework="numpy") as f:
        assert original is None or f.get_tensor            # the reader's API as used
    import minicnn.weights as weights
    real = weights._safetensors_numpy

    def counting(doing):
        module, opener, error = real(doing)

        class Counting:
            def __init__(self, *args, **kwargs):
                self.inner = opener(*args, **kwargs)

            def __enter__(self):
                self.f = self.inner.__enter__()
                return self

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_slice(self, key):
                return self.f.get_slice(key)

            def get_tensor(self, key):
                read.append(key)
                return self.f.get_tensor(key)
        return module, Counting, error
    monkeypatch.setattr(weights, "_safetensors_numpy", counting)
    with pytest.raises(StateDictError, match="in .*w.safetensors do not fit the model"):
        minicnn.load_weights(_small(), tmp_path / "w.safetensors")
    assert read == []
    minicnn.load_weights(Sequential([Dense(3, 2)]), tmp_path / "w.safetensors")
    assert read == ["0.bias", "0.weight"]


@settings(max_examples=30)
@given(st.data())
def test_any_edit_of_a_weights_file_loads_or_is_one_sentence(tmp_path_factory, data):
    """Random byte edits and cuts of a .safetensors and a .pth file: the load succeeds or
    raises a minicnn error, never anything else."""
    torch = pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("edits")
    minicnn.save_weights(_small(), folder / "w.safetensors")
    torch.save(_torch_twin(torch).state_dict(), folder / "w.pth")
    name = data.draw(st.sampled_from(["w.safetensors", "w.pth"]))
    content = bytearray((folder / name).read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        content[data.draw(st.integers(0, len(content) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(content)))
    (folder / f"edited-{name}").write_bytes(bytes(content[:cut]))
    try:
        minicnn.load_weights(_small(), folder / f"edited-{name}")
    except MinicnnError as e:
        assert "\n" not in str(e)


def test_missing_files_readers_and_size_limits_are_one_sentence(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="Weights file .*nothing.pth does not exist."):
        minicnn.load_weights(_small(), tmp_path / "nothing.pth")
    with pytest.raises(CheckpointError, match="is not a regular file"):
        minicnn.load_weights(_small(), tmp_path)
    _small().save(tmp_path / "m.npz")
    with pytest.raises(CheckpointError, match=r"m.npz is a minicnn file, .* minicnn.load\(path\) "
                                              r"reads it"):
        minicnn.load_weights(_small(), tmp_path / "m.npz")
    minicnn.save_weights(_small(), tmp_path / "w.safetensors")
    (tmp_path / "w.pth").write_bytes(b"\x80\x02}q\x00.")
    monkeypatch.setenv("MINICNN_MAX_FILE_BYTES", "100")
    with pytest.raises(CheckpointError, match=r"holds [\d,]+ bytes, more than "
                                              r"MINICNN_MAX_FILE_BYTES \(100\) allows"):
        minicnn.load_weights(_small(), tmp_path / "w.safetensors")
    monkeypatch.delenv("MINICNN_MAX_FILE_BYTES")
    monkeypatch.setitem(sys.modules, "torch", None)                    # torch not installed
    with pytest.raises(UsageError, match="is a PyTorch file, and reading it needs torch"):
        minicnn.load_weights(_small(), tmp_path / "w.pth")
    monkeypatch.setitem(sys.modules, "safetensors", None)              # nor safetensors
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(UsageError, match='Reading .safetensors files needs the safetensors '
                                         'package: pip install "minicnn\\[weights\\]".'):
        minicnn.load_weights(_small(), tmp_path / "w.safetensors")
    with pytest.raises(UsageError, match="Writing .safetensors files needs"):
        minicnn.save_weights(_small(), tmp_path / "x.safetensors")
