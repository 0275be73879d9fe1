"""Frozen layers and fine-tuning: layer.trainable = False, freeze/unfreeze/replace_head, and
python -m minicnn.train --pretrained FILE --freeze-base --unfreeze-after N.

A frozen layer's params and BatchNorm statistics stay bitwise as they were through training
with every optimiser (momentum and weight decay included) and through the data-parallel step;
no weight gradient is computed for it; the flags survive save, load and --resume."""
import json
import os
import signal
from unittest import mock

import numpy as np
import pytest

import minicnn
from _data_helpers import make_folder
from minicnn import ops, reference
from minicnn.nn import (BatchNorm1D, BatchNorm2D, Conv2D, Dense, Flatten, MaxPool2D, ReLU,
                        Residual, Sequential, freeze, layer_config, replace_head, unfreeze)
from minicnn.nn.optim import SGD, Adam, AdamW
from minicnn.nn.schema import SchemaError, check_model
from minicnn.nn import zoo
from minicnn.nn.zoo import keras_tutorial
from minicnn.parallel import data_parallel, processes, workers
from minicnn.training import trainer as train
from minicnn.training.checkpoint import load_checkpoint
from test_parallel import thread_workers


def small_net(seed=0, dtype=np.float64):
    """Conv-BN-ReLU-pool, a padded conv, a residual block, and a two-Dense head: (N, 3, 8, 8)."""
    d = dict(rng=np.random.default_rng(seed), dtype=dtype)
    return Sequential([
        Conv2D(3, 8, 3, padding=1, **d), BatchNorm2D(8, dtype=dtype), ReLU(), MaxPool2D(2),
        Conv2D(8, 8, 3, padding=1, **d), ReLU(),                                # (8, 4, 4)
        Residual([Conv2D(8, 8, 3, padding=1, **d), BatchNorm2D(8, dtype=dtype), ReLU()]),
        Flatten(), Dense(128, 16, **d), BatchNorm1D(16, dtype=dtype), ReLU(),
        Dense(16, 3, **d)])


def _data(n=16, seed=1, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, 8, 8)).astype(dtype), rng.integers(0, 3, n)


@pytest.fixture(params=["one model", "processes", "threads"])
def step_kind(request, monkeypatch):
    """fit's steps on one model, or split over two worker processes or threads."""
    if request.param == "one model":
        monkeypatch.setattr(data_parallel, "_split_config", lambda model, x: None)
        yield request.param
        return
    if request.param == "processes" and not processes.AVAILABLE:
        pytest.skip("worker processes need fork (Linux)")
    monkeypatch.setattr(data_parallel, "PROCESSES", request.param == "processes")
    with thread_workers(2):
        yield request.param
    processes.close()


OPTIMIZERS = {"sgd-nesterov-wd": lambda: SGD(lr=0.05, momentum=0.9, nesterov=True,
                                             weight_decay=5e-3),
              "adam-l2": lambda: Adam(lr=1e-2, weight_decay=1e-2),
              "adamw": lambda: AdamW(lr=1e-2, weight_decay=0.1)}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_frozen_layers_stay_bitwise_unchanged_through_training(optimizer, step_kind):
    """Trained unfrozen first (so momentum and Adam's moments exist for every param), then
    with the first block, the residual block and the middle BatchNorm1D frozen: those params,
    their optimiser buffers and their BatchNorm statistics do not change by a bit; the rest
    learns."""
    model = small_net()
    model.compile(OPTIMIZERS[optimizer](), metrics=["accuracy"])
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, seed=0)
    for layer in (model[0], model[1], model[6], model[9]):
        layer.trainable = False
    names = [n for n in model.params if n.split(".")[0] in ("0", "1", "6", "9")]
    before = {n: model.params[n].copy() for n in names}
    stats = {n: s.copy() for n, s in model.state.items()}                 # all of them frozen
    buffers = {n: {b: v.copy() for b, v in model.optimizer.state[n].items()} for n in names}
    learning = {n: p.copy() for n, p in model.params.items() if n not in before}
    with mock.patch.object(workers, "together", wraps=workers.together) as together, \
            mock.patch.object(processes, "run", wraps=processes.run) as run:
        model.fit(x, y, batch_size=8, epochs=3, verbose=0, seed=1)
    assert (together.call_count, run.call_count) == {"one model": (0, 0), "threads": (6, 0),
                                                     "processes": (0, 6)}[step_kind]
    for n, value in before.items():
        np.testing.assert_array_equal(model.params[n], value, err_msg=n)
        assert not model.grads[n].any(), n                       # never computed: still zero
        for b, v in buffers[n].items():
            np.testing.assert_array_equal(model.optimizer.state[n][b], v, err_msg=f"{n} {b}")
    for n, value in stats.items():
        np.testing.assert_array_equal(model.state[n], value, err_msg=n)
    assert all(not np.array_equal(model.params[n], v) for n, v in learning.items())


@pytest.mark.parametrize("implementation", ["fast", "raw"])
def test_frozen_layers_stay_unchanged_on_the_gpu(gpu_xp, implementation):
    """The same on CuPy arrays (a GPU, or fake_cupy for the fast path), float32."""
    import fake_cupy
    if implementation == "raw" and gpu_xp is fake_cupy.module:
        pytest.skip("fake_cupy runs no CUDA C (the raw kernels' weight_grad=False is checked on "
                    "the CPU emulation below)")
    model = small_net(dtype=np.float32).to("cupy")
    model.compile(SGD(lr=0.05, momentum=0.9, weight_decay=5e-3), metrics=["accuracy"])
    freeze(model, up_to=1)
    model[4].trainable = model[9].trainable = False
    x, y = _data(dtype=np.float32)
    before = {n: gpu_xp.asnumpy(a).copy() for n, a in {**model.params, **model.state}.items()
              if n.split(".")[0] in ("0", "1", "4", "9")}
    with minicnn.use(implementation):
        model.fit(x, y, batch_size=8, epochs=2, verbose=0, seed=0)
    for n, value in before.items():
        live = {**model.params, **model.state}[n]
        np.testing.assert_array_equal(gpu_xp.asnumpy(live), value, err_msg=n)
    assert not np.array_equal(gpu_xp.asnumpy(model.params["8.weight"]),
                              small_net(dtype=np.float32).params["8.weight"])


def test_the_raw_conv_kernels_skip_the_weight_gradient(emulator):
    """kernels.conv2d_backward(weight_grad=False): the same dx, no dw or db (the .cu kernels
    run on the CPU emulation)."""
    from minicnn.cuda import kernels
    rng = np.random.default_rng(8)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in [(2, 3, 7, 7), (4, 3, 3, 3),
                                                                     (4,)])
    with emulator.active():
        out, cache = kernels.conv2d_forward(emulator.asarray(x), emulator.asarray(w),
                                            emulator.asarray(b), (1, 1), ((1, 1), (1, 1)))
        dout = emulator.asarray(rng.standard_normal(out.shape).astype(np.float32))
        dx, dw, db = kernels.conv2d_backward(dout, cache)
        frozen = kernels.conv2d_backward(dout, cache, weight_grad=False)
    np.testing.assert_array_equal(frozen[0], dx)
    assert frozen[1:] == (None, None) and dw is not None and db is not None


def _spy(module, name, calls):
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append((name, args[2] if len(args) > 2 else kwargs.get("input_grad", True),
                      kwargs.get("weight_grad", True)))
        return original(*args, **kwargs)
    return mock.patch.object(module, name, spy)


@pytest.mark.parametrize("implementation", ["reference", "fast"])
def test_a_frozen_start_runs_no_backward_and_a_frozen_middle_layer_computes_no_weight_gradient(
        implementation):
    """Backward calls (name, input_grad, weight_grad): none for the frozen layers before the
    first trainable one; dx only for a frozen layer with trainable ones before it."""
    model = small_net()
    x, _ = _data(4)
    dy = np.random.default_rng(2).standard_normal((4, 3))
    fns = reference if implementation == "reference" else ops

    def backward_calls():
        calls = []
        with minicnn.use(implementation), _spy(fns, "conv2d_backward", calls), \
                _spy(fns, "batchnorm_backward", calls):
            model.forward(x, training=True)
            assert model.backward(dy, input_grad=False) is None
        return calls
    freeze(model, up_to=4)                   # conv-BN-ReLU-pool and the next conv
    assert backward_calls() == [("batchnorm_backward", True, True),          # 9
                                ("batchnorm_backward", True, True),          # 6.body.1
                                ("conv2d_backward", True, True)]             # 6.body.0
    unfreeze(model)
    model[1].trainable = model[4].trainable = False          # between trainable layers
    assert backward_calls() == [("batchnorm_backward", True, True), ("batchnorm_backward", True, True),
                                ("conv2d_backward", True, True),             # 6.body.0
                                ("conv2d_backward", True, False),            # 4: dx only
                                ("conv2d_backward", False, True)]            # 0: dW only
    for name in ("1.weight", "1.bias", "4.weight", "4.bias"):
        assert not model.grads[name].any(), name


@pytest.mark.parametrize("implementation", ["reference", "fast"])
@pytest.mark.parametrize("c, stride, padding, more", [
    (3, 1, 1, {}),      # a channels-first (RGB) conv in the fast path
    (8, 1, 1, {}),      # channels last, dx as a convolution
    (8, 1, 0, {}),      # channels last, dx tap by tap
    (8, 2, 1, {}),      # channels last, dx by dcols + col2im
    (8, 1, 2, dict(dilation=2, groups=4)),
])
def test_a_frozen_layers_input_gradient_is_the_trainable_ones(implementation, c, stride,
                                                              padding, more):
    """weight_grad=False changes nothing but the weight gradient: the same dx, to the bit."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, c, 9, 9))
    layers = [Conv2D(c, 8, 3, stride=stride, padding=padding, rng=np.random.default_rng(4),
                     dtype=np.float64, **more) for _ in range(2)]
    layers[1].trainable = False
    dxs = []
    with minicnn.use(implementation):
        for layer in layers:
            y = layer.forward(x, training=True)
            dxs.append(layer.backward(np.random.default_rng(5).standard_normal(y.shape)))
    np.testing.assert_array_equal(dxs[0], dxs[1])
    assert layers[0].grads["weight"].any() and not layers[1].grads["weight"].any()
    dense = [Dense(6, 4, rng=np.random.default_rng(6), dtype=np.float64) for _ in range(2)]
    dense[1].trainable = False
    x2, dy2 = rng.standard_normal((5, 6)), rng.standard_normal((5, 4))
    with minicnn.use(implementation):
        dxs = [layer.backward(dy2) for layer in dense if layer.forward(x2, True) is not None]
    np.testing.assert_array_equal(dxs[0], dxs[1])


@pytest.mark.parametrize("bn, shape", [(BatchNorm2D, (6, 4, 5, 5)), (BatchNorm1D, (6, 4))])
def test_a_frozen_batchnorm_normalises_with_and_keeps_its_running_statistics(bn, shape):
    rng = np.random.default_rng(7)
    layer = bn(4, dtype=np.float64)
    layer.state["running_mean"][...] = rng.standard_normal(4)
    layer.state["running_var"][...] = rng.uniform(0.5, 2.0, 4)
    layer.params["weight"][...] = rng.uniform(0.5, 1.5, 4)
    layer.params["bias"][...] = rng.standard_normal(4)
    stats = {k: v.copy() for k, v in layer.state.items()}
    layer.trainable = False
    x = rng.standard_normal(shape) * 3 + 1
    y = layer.forward(x, training=True)
    np.testing.assert_array_equal(y, layer.forward(x, training=False))   # inference maths
    for k, v in stats.items():
        np.testing.assert_array_equal(layer.state[k], v)
    # dx of y = scale * x + shift against centred differences of <y, dy>
    dy = rng.standard_normal(shape)
    layer.forward(x, training=True)
    dx = layer.backward(dy)
    numeric, h = np.zeros_like(x), 1e-6
    for i in np.ndindex(x.shape):
        xp_, xm = x.copy(), x.copy()
        xp_[i] += h
        xm[i] -= h
        numeric[i] = ((layer.forward(xp_) * dy).sum() - (layer.forward(xm) * dy).sum()) / (2 * h)
    np.testing.assert_allclose(dx, numeric, rtol=1e-6, atol=1e-8)
    assert not layer.grads["weight"].any() and not layer.grads["bias"].any()


def test_freeze_up_to_a_layer_unfreeze_and_the_container_flag():
    model = small_net()
    assert model.trainable
    for up_to in (3, "3", model[3], 3 - len(model)):
        unfreeze(model)
        assert freeze(model, up_to=up_to) is model
        assert [layer.trainable for layer in model.layers()] == [False] * 4 + [True] * 8
    freeze(model)
    assert not model.trainable and not model[6].body[0].trainable
    assert model.trainable_params == {}
    model[6].trainable = True                               # a container sets its layers
    assert model.trainable and model[6].body[2].trainable
    assert set(model.trainable_params) == {k for k in model.params if k.startswith("6.")}
    unfreeze(model)
    assert model.trainable_params.keys() == model.params.keys()
    lines = []
    model.summary((3, 8, 8), print_fn=lines.append)
    assert not any("Trainable" in line for line in lines)
    freeze(model, up_to=10)
    model.summary((3, 8, 8), print_fn=lines.append)
    assert lines[-2:] == ["Trainable params: 51", "Non-trainable params: 3,520 (frozen)"]
    for bad in (12, "x", Dense(2, 2)):
        with pytest.raises(ValueError, match="up_to"):
            freeze(model, up_to=bad)
    with pytest.raises(TypeError, match="True or False"):
        model[0].trainable = 0


def test_replace_head_puts_a_fresh_dense_for_the_new_classes():
    model = small_net()
    old = model[11]
    head = replace_head(model, 5, rng=np.random.default_rng(0))
    assert model[11] is head and head is not old
    assert (head.in_features, head.out_features, head.dtype) == (16, 5, np.float64)
    assert model.forward(_data(2)[0]).shape == (2, 5)
    with pytest.raises(ValueError, match="no Dense"):
        replace_head(Sequential([Conv2D(3, 2, 3), Flatten()]), 2)


def test_save_and_load_keep_the_trainable_flags(tmp_path):
    model = small_net()
    freeze(model, up_to=5)
    model[6].body[1].trainable = True
    model.save(tmp_path / "m.npz")
    loaded = minicnn.load(tmp_path / "m.npz")
    flags = [layer.trainable for layer in minicnn.nn.walk(model)]
    assert [layer.trainable for layer in minicnn.nn.walk(loaded)] == flags
    assert layer_config(model)["layers"][0]["trainable"] is False
    assert "trainable" not in layer_config(model)["layers"][7]        # trainable: not written
    config = layer_config(model)
    config["layers"][0]["trainable"] = "no"
    with pytest.raises(SchemaError, match="trainable"):
        check_model(config)
    config["layers"][0]["trainable"] = False
    config["trainable"] = False                                       # not on a container
    with pytest.raises(SchemaError, match="trainable"):
        check_model(config)


# ---- the command line -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A base trained on three classes of shapes, and a new task of two other-named classes
    (made once for the module's tests, which only read them)."""
    root = tmp_path_factory.mktemp("transfer")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINICNN_DATA", str(root / "cache"))
        base = make_folder(root / "base", per_class=16)
        new = make_folder(root / "new", per_class=12, seed=1, classes=["cross", "stripes"])
        assert train.main(["--data", str(base), "--out", str(root / "base-run"), "--epochs",
                           "1", "--batch-size", "16", "--val-split", "0.25"]) == 0
    return root / "base-run" / "best.npz", new


@pytest.fixture
def folders(base_run, tmp_path, monkeypatch):
    monkeypatch.setenv("MINICNN_DATA", str(tmp_path / "cache"))
    return base_run


def _transfer_args(pretrained, new, out, *extra):
    return ["--data", str(new), "--out", str(out), "--pretrained", str(pretrained),
            "--batch-size", "8", "--val-split", "0.25", "--schedule", "none", *extra]


def test_cli_trains_a_new_head_on_a_frozen_base_then_fine_tunes_and_resumes_exactly(
        folders, tmp_path, monkeypatch, capsys):
    pretrained, new = folders
    base = minicnn.load(pretrained)
    flags = ["--freeze-base", "--unfreeze-after", "2", "--epochs", "3", "--lr", "0.002"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train.main(_transfer_args(pretrained, new, whole, *flags)) == 0
    assert "frozen" in capsys.readouterr().out
    # stopped after the head's first epoch: its checkpoint has the base as it was, frozen
    original = train._end_of_epoch

    def stop_after(*args):
        result = original(*args)
        os.kill(os.getpid(), signal.SIGTERM)
        return result
    monkeypatch.setattr(train, "_end_of_epoch", stop_after)
    assert train.main(_transfer_args(pretrained, new, split, *flags)) == 128 + signal.SIGTERM
    monkeypatch.undo()
    head_phase, info, buffers = load_checkpoint(split / "last.npz")
    assert head_phase[11].out_features == 2 and base[11].out_features == 3
    assert [layer.trainable for layer in head_phase.layers()] == [False] * 11 + [True]
    assert set(buffers) == {"11.weight", "11.bias"}                    # Adam's, for the head
    for name, value in base.params.items():
        if not name.startswith("11."):
            np.testing.assert_array_equal(head_phase.params[name], value, err_msg=name)
    assert info["norm"] == load_checkpoint(pretrained)[1]["norm"]      # the base's statistics
    # resumed (a head epoch, then the fine-tuning one), it ends as the run that was not stopped,
    # its base file needed no more
    moved = pretrained.with_name("moved.npz")
    pretrained.rename(moved)
    try:
        assert train.main(["--resume", "--out", str(split)]) == 0
    finally:
        moved.rename(pretrained)
    a, b = minicnn.load(whole / "last.npz"), minicnn.load(split / "last.npz")
    assert all(layer.trainable for layer in a.layers())
    for name, value in a.params.items():
        np.testing.assert_array_equal(b.params[name], value, err_msg=name)
        if not name.startswith("11."):
            assert not np.array_equal(value, base.params[name]), name   # fine-tuned
    history = json.loads((whole / "history.json").read_text())
    assert history["lr"] == [0.002, 0.002, 0.0002]                    # --lr, then --lr / 10


def test_cli_pretrained_without_freezing_fine_tunes_everything_with_the_new_head(folders,
                                                                                 tmp_path):
    pretrained, new = folders
    out = tmp_path / "run"
    assert train.main(_transfer_args(pretrained, new, out, "--epochs", "1")) == 0
    model, info, buffers = load_checkpoint(out / "last.npz")
    assert model[11].out_features == 2 and info["classes"] == ["cross", "stripes"]
    assert set(buffers) == set(model.params)
    assert all(layer.trainable for layer in model.layers())


def test_cli_takes_a_weights_file_of_a_preset(folders, tmp_path):
    """--pretrained FILE.safetensors --model PRESET: the preset as published (10 classes for
    keras-tutorial), its weights from the file, a new head, the rest frozen."""
    pytest.importorskip("safetensors")
    pretrained, new = folders
    published = keras_tutorial(num_classes=10, rng=np.random.default_rng(5))
    minicnn.save_weights(published, tmp_path / "w.safetensors")
    out = tmp_path / "run"
    assert train.main(_transfer_args(tmp_path / "w.safetensors", new, out, "--model",
                                     "keras-tutorial", "--freeze-base", "--epochs", "1")) == 0
    model = minicnn.load(out / "last.npz")
    assert model[-1].out_features == 2 and not model[0].trainable and model[-1].trainable
    for name, value in published.params.items():
        if not name.startswith(f"{len(model) - 1}."):
            np.testing.assert_array_equal(model.params[name], value, err_msg=name)


def test_cli_takes_torchvisions_resnet18_weights_with_imagenets_normalisation(folders, tmp_path):
    """The flow of docs/transfer.md for resnet18-f37072fd.pth, with random weights in its place
    (saved as torchvision's state dict is: 1000 classes, torchvision's keys) and 32x32 images."""
    torch = pytest.importorskip("torch")
    pretrained, new = folders
    published = zoo.resnet18(rng=np.random.default_rng(5))
    torch.save({k: torch.from_numpy(v) for k, v in published.state_dict().items()},
               tmp_path / "resnet18.pth")
    out = tmp_path / "run"
    assert train.main(_transfer_args(tmp_path / "resnet18.pth", new, out, "--model", "resnet18",
                                     "--freeze-base", "--epochs", "1", "--augment", "none")) == 0
    model, info, buffers = load_checkpoint(out / "last.npz")
    assert model["fc"].out_features == 2 and set(buffers) == {"fc.weight", "fc.bias"}
    assert not model["layer4"].trainable and model["fc"].trainable
    np.testing.assert_array_equal(model.params["layer4.1.conv2.weight"],
                                  published.params["layer4.1.conv2.weight"])
    assert info["norm"] == {"mean": pytest.approx([0.485, 0.456, 0.406]),
                            "std": pytest.approx([0.229, 0.224, 0.225])}


@pytest.mark.parametrize("args, message", [
    (["--freeze-base"], "--freeze-base needs --pretrained"),
    (["--pretrained", "PRE", "--unfreeze-after", "1", "--epochs", "2"], "needs --freeze-base"),
    (["--pretrained", "PRE", "--freeze-base", "--unfreeze-after", "2", "--epochs", "2"],
     "leaves no epoch"),
    (["--pretrained", "PRE", "--freeze-base", "--fine-tune-lr", "0.1"], "--unfreeze-after N"),
    (["--pretrained", "PRE", "--freeze-base", "--unfreeze-after", "1", "--epochs", "2",
      "--fine-tune-lr", "-1"], "--fine-tune-lr must be a positive"),
    (["--pretrained", "MISSING"], "there is no such file"),
    (["--pretrained", "NOTMINICNN"], "NOTMINICNN"),
    (["--pretrained", "PRE", "--image-size", "40"], "trained on 32x32 images"),
    (["--pretrained", "SAVED", "--image-size", "40"], "cannot take the data's 40x40 images"),
    (["--pretrained", "WEIGHTS", "--model", "resnet-small"], "do not fit the model"),
])
def test_cli_transfer_errors_are_one_sentence_and_exit_2(folders, tmp_path, capsys, args,
                                                         message):
    pretrained, new = folders
    saved = tmp_path / "saved.npz"
    minicnn.load(pretrained).save(saved)            # a model file: no image size recorded
    (tmp_path / "notminicnn.npz").write_bytes(b"not a zip")
    torch = pytest.importorskip("torch") if "WEIGHTS" in args else None
    if torch is not None:                          # keras-tutorial's, given as resnet-small's
        torch.save({k: torch.from_numpy(v) for k, v in minicnn.load(pretrained).params.items()},
                   tmp_path / "weights.pth")
    names = {"PRE": str(pretrained), "MISSING": str(tmp_path / "missing.npz"),
             "NOTMINICNN": str(tmp_path / "notminicnn.npz"), "SAVED": str(saved),
             "WEIGHTS": str(tmp_path / "weights.pth")}
    argv = ["--data", str(new), "--out", str(tmp_path / "run"), "--val-split", "0.25",
            "--batch-size", "8"] + [names.get(a, a) for a in args]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert message.replace("NOTMINICNN", names["NOTMINICNN"]) in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
