"""ONNX export (minicnn.export): every preset and hypothesis-drawn small nets written as ONNX,
checked by onnx.checker and run in onnxruntime, whose outputs must be minicnn's inference-mode
forward within 1e-4 of the largest output (float32); python -m minicnn.export on a checkpoint
of a real training run; the bad-input sentences."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _data_helpers import SHAPES, make_folder
from test_docs import _documented_commands
from minicnn import export
from minicnn.errors import BackendError, UsageError
from minicnn.nn.containers import Residual, Sequential
from minicnn.nn.layers import (AvgPool2D, BatchNorm1D, BatchNorm2D, Conv2D, Dense, Dropout,
                               Flatten, GlobalAveragePooling2D, LAYER_TYPES, MaxPool2D, ReLU,
                               Softmax, walk)
from minicnn.nn.zoo import MODELS, build_model
from minicnn.ops.im2col import conv_output_size
from minicnn.training import trainer
from minicnn.training.checkpoint import load_for_inference, predict_logits

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parent.parent


def randomize_batchnorm(model, rng):
    """Random affine parameters and running statistics in every BatchNorm of model, so the
    export of the inference form is checked on numbers that matter (not 0, 1, 1, 0)."""
    for layer in walk(model):
        if isinstance(layer, (BatchNorm1D, BatchNorm2D)):
            c = layer.num_features
            layer.params["weight"][...] = rng.normal(1.0, 0.5, c)
            layer.params["bias"][...] = rng.normal(0.0, 0.5, c)
            layer.state["running_mean"][...] = rng.normal(0.0, 0.5, c)
            layer.state["running_var"][...] = rng.uniform(0.3, 3.0, c)
    return model


def run_onnx(path, x):
    """onnxruntime's output of the ONNX file at path for the float32 batch x."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([export.OUTPUT], {export.INPUT: np.asarray(x, dtype=np.float32)})[0]


def assert_agrees(out, expected):
    """onnxruntime's out within 1e-4 of the largest |expected| everywhere (float32)."""
    assert out.shape == expected.shape and out.dtype == np.float32
    scale = float(np.abs(expected).max())
    assert np.abs(out - expected).max() <= export.TOLERANCE * max(scale, 1e-30), \
        (np.abs(out - expected).max(), scale)


def export_and_compare(model, path, x):
    """Export model for x's example shape, check the file, compare two batch sizes."""
    proto = model.export_onnx(path, x.shape[1:])
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    for batch in (x, x[:1]):                                # the batch dimension is free
        assert_agrees(run_onnx(path, batch), model.forward(batch, training=False))
    return proto


def test_every_layer_type_of_minicnn_has_a_writer():
    """A layer type added to minicnn without its ONNX form fails here, not in a user's export."""
    assert set(export.WRITERS) == set(LAYER_TYPES)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_preset_agrees_with_onnxruntime(name, tmp_path):
    rng = np.random.default_rng(0)
    model = randomize_batchnorm(build_model(name, num_classes=7, rng=rng, image_size=(32, 32)),
                                rng)
    x = rng.normal(size=(4, 3, 32, 32)).astype(np.float32)
    proto = export_and_compare(model, tmp_path / "model.onnx", x)
    assert proto.opset_import[0].version == export.OPSET
    graph = proto.graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, 32, 32]
    # every parameter and running statistic is in the file, under minicnn's (PyTorch's) name
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for key, value in {**model.params, **model.state}.items():
        np.testing.assert_array_equal(stored[key], value)
    ops = {node.op_type for node in graph.node}
    assert "Dropout" not in ops and ("BatchNormalization" in ops) == bool(model.state)


@st.composite
def small_nets(draw):
    """(model, x): a few image layers (conv with stride, padding, dilation and groups; max and
    average pools with padding; batch norm; ReLU; dropout; residual blocks, identity or
    projection) on a small image, then a head (flatten or global average
    pooling, dense, batch norm, softmax), BatchNorms with random statistics."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    d = dict(rng=rng)
    c, h, w = draw(st.integers(1, 4)), draw(st.integers(5, 11)), draw(st.integers(5, 11))
    shape = input_shape = (c, h, w)
    layers = []
    for kind in draw(st.lists(st.sampled_from(["conv", "pool", "batchnorm", "relu", "dropout",
                                               "residual"]), min_size=1, max_size=4)):
        c, h, w = shape
        if kind == "conv":
            groups = draw(st.sampled_from([g for g in (1, 2, c) if c % g == 0]))  # c: depthwise
            f = groups * draw(st.integers(1, 3))
            k, s = draw(st.integers(1, 3)), draw(st.integers(1, 2))
            dilation = draw(st.integers(1, 2))
            pad = draw(st.sampled_from([0, 1, (1, 0), "valid", "same"]))
            sizes = _window_outputs((h, w), dilation * (k - 1) + 1, s, pad)
            if sizes is None:
                continue
            layers.append(Conv2D(c, f, k, stride=s, padding=pad, bias=draw(st.booleans()),
                                 dilation=dilation, groups=groups, **d))
            shape = (f, *sizes)
        elif kind == "pool":
            k = draw(st.integers(1, 3))
            s = draw(st.integers(1, 3))
            pad = draw(st.sampled_from([0, "valid", "same"] + ([1, (1, 0)] if k > 1 else [])))
            sizes = _window_outputs((h, w), k, s, pad)
            if sizes is None:
                continue
            layers.append(draw(st.sampled_from([MaxPool2D, AvgPool2D]))(k, stride=s, padding=pad))
            shape = (c, *sizes)
        elif kind == "batchnorm":
            layers.append(BatchNorm2D(c))
        elif kind == "relu":
            layers.append(ReLU())
        elif kind == "dropout":
            layers.append(Dropout(0.5, rng=rng))
        elif draw(st.booleans()):                           # identity shortcut
            layers.append(Residual([Conv2D(c, c, 3, padding=1, **d), BatchNorm2D(c), ReLU()]))
        else:                                               # projection, stride 2
            f = draw(st.integers(1, 4))
            layers.append(Residual([Conv2D(c, f, 3, stride=2, padding=1, **d), BatchNorm2D(f)],
                                   Conv2D(c, f, 1, stride=2, **d)))
            shape = (f, (h - 1) // 2 + 1, (w - 1) // 2 + 1)
    c, h, w = shape
    if draw(st.booleans()):
        layers += [GlobalAveragePooling2D()]
        features = c
    else:
        layers += [Flatten()]
        features = c * h * w
    k = draw(st.integers(1, 5))
    head = [Dropout(0.3, rng=rng), Dense(features, k, bias=draw(st.booleans()), **d)]
    if draw(st.booleans()):
        head += [BatchNorm1D(k), ReLU(), Dense(k, k, **d)]
    if draw(st.booleans()):
        head += [Softmax()]
    model = randomize_batchnorm(Sequential(layers + head), rng)
    x = rng.normal(size=(draw(st.integers(1, 3)),) + input_shape).astype(np.float32)
    return model, x


def _window_outputs(size, span, stride, padding):
    """(OH, OW) of a window of span taps with stride and padding (minicnn's forms) on an
    input of size (H, W), or None when the window does not fit."""
    if padding == "same":
        return tuple(-(-n // stride) for n in size)
    pads = (0, 0) if padding == "valid" else (padding if isinstance(padding, tuple)
                                              else (padding, padding))
    out = tuple(conv_output_size(n, span, stride, p, p) for n, p in zip(size, pads))
    return out if min(out) >= 1 else None


@settings(deadline=None)
@given(small_nets())
def test_small_random_nets_agree_with_onnxruntime(tmp_path_factory, net):
    model, x = net
    export_and_compare(model, tmp_path_factory.mktemp("net") / "net.onnx", x)


def test_bad_arguments_are_one_sentence_and_nothing_is_written(tmp_path, monkeypatch):
    model = Sequential([Conv2D(3, 4, 3), ReLU(), Flatten(), Dense(4 * 6 * 6, 2)])
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the user's file")
    with pytest.raises(UsageError, match=r"Conv2D expects 3 input channels"):
        model.export_onnx(out, (1, 8, 8))
    with pytest.raises(UsageError, match=r"input_shape must be one example's shape"):
        model.export_onnx(out, "3x8x8")
    with pytest.raises(UsageError, match=r"outputs of shape \(2,\) per example for 3 class"):
        model.export_onnx(out, (3, 8, 8), class_names=["a", "b", "c"])
    with pytest.raises(UsageError, match=r"normalization must be"):
        model.export_onnx(out, (3, 8, 8), normalization={"mean": [0.5] * 3, "std": [0, 1, 1]})

    class Swish(ReLU):                  # a user's layer, whatever its base: not written
        def forward(self, x, training=False):
            return x / (1 + np.exp(-x))
    with pytest.raises(UsageError, match=r"Swish layers cannot be exported to ONNX yet"):
        Sequential([Swish()]).export_onnx(out, (3, 8, 8))
    monkeypatch.setattr(export, "MAX_BYTES", 4 * 100)            # 2 GiB, made small
    with pytest.raises(UsageError, match=r"more than one ONNX file holds"):
        model.export_onnx(out, (3, 8, 8))                          # 402 parameters
    monkeypatch.undo()
    assert out.read_bytes() == b"the user's file"
    model.export_onnx(out, (3, 8, 8), class_names=["yes", "no"])
    assert onnx.load(str(out)).graph.output[0].name == export.OUTPUT
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]      # no temporary file left


def test_without_onnx_the_sentence_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)                 # import onnx fails
    with pytest.raises(BackendError, match=re.escape('pip install "minicnn[export]"')):
        Sequential([Flatten()]).export_onnx(tmp_path / "m.onnx", (3, 2, 2))
    assert export.main([str(tmp_path / "run.npz"), str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "minicnn[export]"' in err
    assert not (tmp_path / "m.onnx").exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """best.npz of a one-epoch python -m minicnn.train run on 18 small shape images."""
    root = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("MINICNN_DATA", str(root / "cache"))
        folder = make_folder(root / "shapes", per_class=6)
        assert trainer.main(["--data", str(folder), "--out", str(root / "run"), "--epochs", "1",
                             "--batch-size", "8", "--val-split", "0.25"]) == 0
    return root / "run" / "best.npz"


@pytest.mark.parametrize("fold", [True, False])
def test_the_command_exports_a_checkpoint_with_its_classes_and_normalisation(checkpoint,
                                                                             tmp_path, capsys,
                                                                             fold):
    out = tmp_path / "model.onnx"
    argv = [str(checkpoint), str(out)] + ([] if fold else ["--no-fold-normalization"])
    assert export.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (ONNX opset {export.OPSET}" in printed
    assert "onnx.checker: the file is valid" in printed
    error = float(re.search(r"max \|difference\| (\S+)", printed).group(1))
    assert error < 1e-4
    net = load_for_inference(checkpoint)
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["classes"]) == net.classes == SHAPES
    assert meta["input_layout"] == "NCHW"
    norm = json.loads(meta["normalization"])
    np.testing.assert_allclose(norm["mean"], net.mean)
    np.testing.assert_allclose(norm["std"], net.std)
    assert norm["in_graph"] is fold and norm["pixel_scale"] == 255
    assert [n.op_type for n in proto.graph.node[:2]] == (["Sub", "Div"] if fold else
                                                         ["Conv", "Relu"])
    # what a user of the file gives it: pixels 0-255, or the normalised images
    pixels = np.random.default_rng(1).integers(0, 256, size=(5, 3, 32, 32), dtype=np.uint8)
    expected = predict_logits(net.model, pixels, net.mean, net.std, np)
    mean, std = np.array(norm["mean"]), np.array(norm["std"])
    x = (pixels if fold else (pixels / 255 - mean[:, None, None]) / std[:, None, None])
    assert_agrees(run_onnx(out, x), expected)


@pytest.mark.parametrize("make, message", [
    (lambda path: None, "does not exist"),
    (lambda path: path.write_bytes(b"not a checkpoint"), "is not a minicnn file"),
    (lambda path: Sequential([Flatten(), Dense(3 * 32 * 32, 3)]).save(path),
     "has no class names or normalisation statistics"),
])
def test_bad_checkpoints_are_one_sentence_and_exit_2(tmp_path, capsys, make, message):
    path = tmp_path / "run.npz"
    make(path)
    assert export.main([str(path), str(tmp_path / "model.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "model.onnx").exists()


def test_an_unwritable_out_is_one_sentence(checkpoint, tmp_path, capsys):
    assert export.main([str(checkpoint), str(tmp_path / "no" / "such" / "model.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.onnx" in err


def test_without_onnxruntime_the_file_is_written_and_checked_only(checkpoint, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert export.main([str(checkpoint), str(tmp_path / "model.onnx")]) == 0
    printed = capsys.readouterr().out
    assert "onnx.checker: the file is valid" in printed and "were not compared" in printed
    assert "max |difference|" not in printed


def test_a_disagreement_with_onnxruntime_is_status_1(checkpoint, tmp_path, monkeypatch, capsys):
    """The check has teeth: minicnn's outputs made to differ are reported."""
    shifted = lambda *args, **kwargs: predict_logits(*args, **kwargs) + 1.0
    monkeypatch.setattr(export, "predict_logits", shifted)
    assert export.main([str(checkpoint), str(tmp_path / "model.onnx")]) == 1
    assert "differ from minicnn's" in capsys.readouterr().err


def test_the_command_runs_as_a_module(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "minicnn.export", str(tmp_path / "no.npz"),
                           str(tmp_path / "model.onnx")], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "does not exist" in proc.stderr


def test_the_docs_show_commands_the_tool_accepts():
    """Every python -m minicnn.export command in the README and docs/ parses."""
    commands = _documented_commands("export")
    assert any(name == "docs/deploy.md" for name, _ in commands)
    for name, args in commands:
        try:
            export.build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{name}: python -m minicnn.export {shlex.join(args)}")


def test_a_model_on_the_gpu_exports_the_same_graph(gpu_xp, tmp_path):
    """The arrays come back to the host for the file (fake_cupy everywhere, CuPy on a GPU)."""
    rng = np.random.default_rng(0)
    model = randomize_batchnorm(build_model("resnet-small", rng=rng), rng)
    on_cpu = model.export_onnx(tmp_path / "cpu.onnx", (3, 32, 32))
    on_gpu = model.to("cupy").export_onnx(tmp_path / "gpu.onnx", (3, 32, 32))
    assert on_gpu.SerializeToString() == on_cpu.SerializeToString()
