"""minicnn.compare: a layer perturbed by a small amount in one implementation is named as the
place where it parts from the others; unperturbed implementations agree to rounding, in
float64 down to ~0 ulps (PyTorch's twin too, over several SGD steps); the GPU runners on
fake_cupy and the CUDA emulation; the command's output, drift plot and errors."""
import shlex
from pathlib import Path

import numpy as np
import pytest

from minicnn import backend, compare as mc, ops
from minicnn.errors import BackendError, UsageError
from minicnn.nn import (BatchNorm2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU, Residual,
                        Sequential)
from minicnn.nn.zoo import keras_tutorial

import fake_cupy


def small_net(rng, dtype=np.float32):
    """Conv - ReLU - MaxPool - Conv - ReLU - Flatten - Dense on 8x8 images: one MaxPool2D and one
    Dense, two ReLUs."""
    d = dict(dtype=dtype, rng=rng)
    return Sequential([Conv2D(3, 4, 3, padding=1, **d), ReLU(), MaxPool2D(2),
                       Conv2D(4, 6, 3, **d), ReLU(), Flatten(), Dense(6 * 2 * 2, 5, **d)])


def residual_net(rng):
    """Every layer torch_twin mirrors that the trainer's presets use, a Residual block among them."""
    d = dict(dtype=np.float32, rng=rng)
    return Sequential([Conv2D(3, 4, 3, padding=1, **d), BatchNorm2D(4), ReLU(),
                       Residual([Conv2D(4, 4, 3, padding=1, **d), ReLU(),
                                 Conv2D(4, 4, 3, padding=1, **d)]),
                       ReLU(), MaxPool2D(2), Flatten(), Dropout(0.5, rng=rng),
                       Dense(4 * 4 * 4, 5, **d)])


def batch(rng, n=3, size=8):
    return rng.standard_normal((n, 3, size, size)).astype(np.float32), rng.integers(0, 5, n)


def _scaled(fn, which, factor=1 + 1e-4):
    """fn with its output (which=None) or its output's element `which` times factor."""
    def perturbed(*args, **kwargs):
        out = fn(*args, **kwargs)
        if which is None:
            return out * factor
        return tuple(o * factor if i == which else o for i, o in enumerate(out))
    return perturbed


@pytest.mark.parametrize("op,which,parts_at", [
    ("maxpool2d_forward", 0, ("2", "MaxPool2D", "out")),  # -> (out, cache)
    ("maxpool2d_backward", None, ("2", "MaxPool2D", "dx")),
    ("dense_backward", 1, ("6", "Dense", "dweight")),     # dense_backward -> (dx, dw, db)
    ("relu_backward", None, ("4", "ReLU", "dx")),         # both ReLUs: the later one comes first
])
def test_a_layer_perturbed_in_one_implementation_is_named_where_they_part(monkeypatch, op, which,
                                                                           parts_at):
    """A relative change of 1e-4 (840 ulps of float32) in minicnn.ops (fast) only."""
    rng = np.random.default_rng(0)
    model, (x, labels) = small_net(rng), batch(rng)
    monkeypatch.setattr(ops, op, _scaled(getattr(ops, op), which))
    c = mc.compare(model, x, labels, ["reference", "fast", "torch"], dtype=np.float64)
    assert c.parting == {"fast": parts_at, "torch": None}
    before = [row[3]["fast"][2] for row in c.rows[:[r[:3] for r in c.rows].index(parts_at)]]
    assert max(before) < 1e-3                            # float64: nothing before it parts
    lines = []
    mc.print_comparison(c, lines.append)
    assert f"fast parts from reference at {' '.join(parts_at)} (" in "\n".join(lines)
    assert "torch and reference agree" in "\n".join(lines)


def test_unperturbed_implementations_agree_and_none_is_named():
    rng = np.random.default_rng(0)
    model, (x, labels) = residual_net(rng), batch(rng)
    c = mc.compare(model, x, labels, ["reference", "fast", "torch"], dtype=np.float64)
    assert c.parting == {"fast": None, "torch": None}
    labels_seen = [row[:3] for row in c.rows]
    assert labels_seen[:4] == [("0", "Conv2D", "out"), ("1", "BatchNorm2D", "out"),
                               ("2", "ReLU", "out"), ("3.body.0", "Conv2D", "out")]
    assert ("3", "Residual", "dx") in labels_seen and labels_seen[-1] == ("0", "Conv2D", "dx")
    assert ("1", "BatchNorm2D", "dweight") in labels_seen
    assert ("3", "Residual", "dbody.0.weight") not in labels_seen     # once, at 3.body.0
    for *_, errs, zero in c.rows:
        for abs_err, rel, ulps in errs.values():
            assert ulps < 1e-3 and rel < 1e-9                 # float64 against float64
    c32 = mc.compare(model, x, labels, ["reference", "fast", "torch"])    # float32: rounding
    assert c32.parting == {"fast": None, "torch": None}
    judged = [row[3]["torch"][2] for row in c32.rows if not row[4]]
    assert 0 < max(judged) < mc.THRESHOLD
    # the bias before BatchNorm: its gradient is 0 in exact arithmetic, rounding noise here
    assert [row[:3] for row in c32.rows if row[4]] == [("0", "Conv2D", "dbias")]


def test_errors_are_the_documented_abs_rel_and_ulps():
    b = np.array([2.0, -1.0, 1e-4, 0.0])
    a = b + np.array([2e-6, 0.0, 1e-6, 3e-7])
    abs_err, rel, ulps = mc.errors(a, b)
    assert abs_err == pytest.approx(2e-6)
    assert rel == pytest.approx(1e-6)                   # 1e-4 and 0 are below 1e-3 * max|b|
    assert ulps == pytest.approx(2e-6 / (2.0 * 2.0 ** -23))


def test_drift_of_torch_and_fast_sgd_stays_at_float64_rounding(monkeypatch):
    rng = np.random.default_rng(0)
    model = residual_net(rng)
    batches = [batch(rng) for _ in range(3)]
    distances = mc.drift(model, batches, ["reference", "fast", "torch"], np.float64, lr=0.1)
    assert list(distances) == ["fast", "torch"] and all(len(d) == 3 for d in distances.values())
    assert max(max(d) for d in distances.values()) < 1e-3
    monkeypatch.setattr(ops, "dense_backward", _scaled(ops.dense_backward, 1, 1 + 1e-3))
    drifted = mc.drift(model, batches, ["reference", "fast"], np.float64, lr=0.1)
    assert min(drifted["fast"]) > 100                   # a perturbed fast path drifts away


# ---- the GPU implementations, as far as this machine can run them ------------------------------
def test_cupy_and_raw_on_fake_cupy_and_the_cuda_emulation(monkeypatch, emulator):
    """fake_cupy stands in for CuPy (its generic path is NumPy's maths behind CuPy's device
    boundary) and the CUDA emulation runs the raw kernels; on a GPU these are the real ones."""
    monkeypatch.setattr(backend, "_cupy", fake_cupy.module)
    rng = np.random.default_rng(0)
    model, (x, labels) = small_net(rng), batch(rng, n=2)
    assert mc.available()[:5] == ["reference", "fast", "torch", "cupy", "raw"]
    with emulator.active():
        c = mc.compare(model, x, labels, ["fast", "cupy", "raw"])
    assert c.parting == {"cupy": None, "raw": None}
    assert max(row[3]["raw"][2] for row in c.rows) > 0            # the kernels ran: rounding
    with pytest.raises(UsageError, match="raw CUDA kernels are float32 only"):
        mc.compare(model, x, labels, ["fast", "raw"], dtype=np.float64)


def test_tf32_is_set_as_the_runner_says_and_restored():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    r = mc.TorchRunner("torch", small_net(rng), np.float32)
    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    before = [f.allow_tf32 for f in flags]
    for r.tf32 in (True, False):
        with r._precision():
            assert [f.allow_tf32 for f in flags] == [r.tf32, r.tf32]
        assert [f.allow_tf32 for f in flags] == before
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="torch-cuda-tf32 needs PyTorch built with CUDA"):
            mc.check_implementations(["torch", "torch-cuda-tf32"], np.float32)


# ---- the command ---------------------------------------------------------------------------------
def test_the_command_prints_the_tables_and_plots_the_drift(tmp_path, capsys):
    assert mc.main(["--implementations", "reference,fast", "--batch", "2", "--steps", "2",
                    "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fast against reference" in out and "0 Conv2D dx" in out and "11 Dense out" in out
    assert "fast and reference agree: no tensor above 100 ulps" in out
    assert (tmp_path / "compare_drift.png").stat().st_size > 1000


def test_a_checkpoint_is_compared_on_images_of_its_own_size(tmp_path, capsys):
    model = keras_tutorial(num_classes=3, rng=np.random.default_rng(0), image_size=18)
    model.save(tmp_path / "best.npz", kind="checkpoint", input_shape=[3, 18, 18])
    assert mc.main(["--checkpoint", str(tmp_path / "best.npz"), "--implementations",
                    "reference,fast", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "fast and reference agree" in out and "6 Conv2D out" in out


@pytest.mark.parametrize("args,message", [
    (["--implementations", "reference,numpy"], "Unknown implementation 'numpy'"),
    (["--implementations", "fast,fast"], "two or more different implementations"),
    (["--implementations", "fast,raw", "--dtype", "float64"], "float32 only"),
    (["--model", "vgg"], "Unknown model 'vgg'"),
    (["--implementations", "reference,fast", "--lr", "-1"], "--lr must be a number >= 0"),
    (["--checkpoint", "/nonexistent/model.npz", "--implementations", "reference,fast"],
     "/nonexistent/model.npz"),
])
def test_bad_input_is_one_sentence_and_exit_status_2(capsys, args, message):
    assert mc.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_a_gpu_implementation_without_a_gpu_says_what_to_install(capsys):
    if backend.gpu_available():
        pytest.skip("this machine has a GPU")
    assert mc.main(["--implementations", "fast,cupy"]) == 2
    assert "The cupy backend needs CuPy" in capsys.readouterr().err


@pytest.mark.parametrize("output_ulps,noted", [(3.0, True), (500.0, False)])
def test_a_max_pool_gradient_parting_after_agreeing_outputs_is_explained(output_ulps, noted):
    """A near tie: outputs a few ulps apart, then a MaxPool2D's dx entirely elsewhere."""
    rows = [("2", "MaxPool2D", "out", {"torch": (1e-7, 1e-6, output_ulps)}, False),
            ("", "loss", "loss", {"torch": (0.0, 0.0, 0.0)}, False),
            ("2", "MaxPool2D", "dx", {"torch": (3e-4, 1.0, 9e4)}, False)]
    parts = rows[0][:3] if output_ulps > 100 else rows[2][:3]
    lines = []
    mc.print_comparison(mc.Comparison("reference", rows, {"torch": parts}, 100.0), lines.append)
    assert ("at a near tie (two values of a window a few ulps apart)" in lines[-1]) == noted


def test_the_commands_docs_inspect_md_shows_are_ones_the_tool_accepts():
    text = (Path(__file__).resolve().parent.parent / "docs" / "inspect.md").read_text()
    commands = [shlex.split(line)[3:] for line in text.splitlines()
                if line.startswith("python -m minicnn.compare ")]
    assert len(commands) == 3
    for args in commands:
        mc.build_parser().parse_args(args)                 # SystemExit(2) on a wrong flag
