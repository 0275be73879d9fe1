"""The backprop trace (minicnn.trace, minicnn.callbacks.BackpropTrace, --trace): its numbers
against values computed by hand on a tiny net, its rules of thumb, and the files it writes."""
import json
import math

import numpy as np
import pytest

from _data_helpers import make_folder
from minicnn.callbacks import BackpropTrace
from minicnn.nn import optim
from minicnn.nn.containers import Sequential
from minicnn.nn.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from minicnn.nn.losses import SoftmaxCrossEntropy
from minicnn.trace import cache_bytes, flags_of, read_trace, summarise
from minicnn.training import trainer as train

N = 5
X = np.random.default_rng(0).standard_normal((N, 4))                  # (N, 4), float64
Y = np.array([0, 1, 1, 0, 1])


def _tiny(b1=None):
    """Dense(4, 3) - ReLU - Dense(3, 2) in float64 with fixed weights; b1: the first bias."""
    rng = np.random.default_rng(1)
    first, last = Dense(4, 3, dtype=np.float64, rng=rng), Dense(3, 2, dtype=np.float64, rng=rng)
    if b1 is not None:
        first.params["bias"][...] = b1
    return Sequential([first, ReLU(), last])


def _trace_one_step(model, optimizer, **kwargs):
    """One whole-batch step of model traced -> (the step's record, the trace)."""
    model.compile(optimizer)
    trace = BackpropTrace(every=1, verbose=0, **kwargs)
    model.fit(X, Y, batch_size=N, epochs=1, shuffle=False, verbose=0, callbacks=[trace])
    assert len(trace.records) == 1
    return {row["name"]: row for row in trace.records[0]["layers"]}, trace


def _by_hand(model):
    """The forward and backward of _tiny's net, written out: activations and gradients."""
    w1, b1 = model[0].params["weight"], model[0].params["bias"]
    w2, b2 = model[2].params["weight"], model[2].params["bias"]
    h = X @ w1.T + b1                                                   # (N, 3)
    a = np.maximum(h, 0)
    z = a @ w2.T + b2                                                   # (N, 2)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dz = (p - np.eye(2)[Y]) / N                                         # d mean loss / dz
    da = dz @ w2                                                        # (N, 3)
    dh = da * (h > 0)
    return dict(h=h, a=a, z=z, dz=dz, da=da, dh=dh, dw2=dz.T @ a, dw1=dh.T @ X,
                loss=-np.log(p[np.arange(N), Y]).mean())


def test_gradients_arriving_activations_and_cache_bytes_are_the_ones_computed_by_hand(xp):
    model = _tiny()
    hand = _by_hand(model)                                  # lr 0: the weights stay put
    model.to("numpy" if xp is np else "cupy")               # the trace's numbers on each device
    rows, trace = _trace_one_step(model, optim.SGD(lr=0.0))
    norm = np.linalg.norm
    assert rows["2"]["grad_in"] == pytest.approx(norm(hand["dz"]), rel=1e-12)
    assert rows["1"]["grad_in"] == pytest.approx(norm(hand["da"]), rel=1e-12)
    assert rows["0"]["grad_in"] == pytest.approx(norm(hand["dh"]), rel=1e-12)
    assert rows["2"]["grad_weight"] == pytest.approx(norm(hand["dw2"]), rel=1e-12)
    assert rows["0"]["grad_weight"] == pytest.approx(norm(hand["dw1"]), rel=1e-12)
    for name, key in (("0", "h"), ("1", "a"), ("2", "z")):
        assert rows[name]["mean"] == pytest.approx(hand[key].mean(), rel=1e-12)
        assert rows[name]["std"] == pytest.approx(hand[key].std(), rel=1e-12)
        assert rows[name]["shape"] == list(hand[key].shape)
    assert trace.records[0]["loss"] == pytest.approx(hand["loss"], rel=1e-12)
    # Dense keeps its input and weight, ReLU its mask (a byte a value), all float64 but the mask
    assert rows["0"]["cache_bytes"] == X.nbytes + 3 * 4 * 8
    assert rows["1"]["cache_bytes"] == N * 3
    assert rows["2"]["cache_bytes"] == N * 3 * 8 + 2 * 3 * 8
    # the ReLU's dead share: its units that were never positive, counted by hand
    assert rows["1"]["dead"] == pytest.approx(1 - (hand["h"] > 0).any(axis=0).mean())
    assert "dead" not in rows["0"] and rows["1"]["grad_weight"] is None


def test_a_relu_whose_inputs_are_all_negative_is_reported_all_dead():
    rows, trace = _trace_one_step(_tiny(b1=-100.0), optim.SGD(lr=0.0))
    assert rows["1"]["dead"] == 1.0
    assert rows["0"]["grad_in"] == 0.0                    # nothing flows back through it
    summary = summarise(trace.records)
    flags = " ".join(flags_of(summary, trace.records))
    assert "dead ReLUs at 1 ReLU (100%)" in flags
    assert "vanishing gradients at 0 Dense" in flags


def test_a_known_sgd_update_gives_its_exact_ratio():
    model = _tiny()
    w1, b1 = model[0].params["weight"].copy(), model[0].params["bias"].copy()
    lr = 0.05
    rows, _ = _trace_one_step(model, optim.SGD(lr=lr))
    g, gb = model[0].grads["weight"], model[0].grads["bias"]           # the step's gradients
    assert np.allclose(model[0].params["weight"], w1 - lr * g, rtol=0, atol=1e-15)
    ratio = rows["0"]["update_ratio"]
    assert ratio["weight"] == pytest.approx(lr * np.linalg.norm(g) / np.linalg.norm(w1), rel=1e-9)
    assert ratio["bias"] == pytest.approx(lr * np.linalg.norm(gb) / np.linalg.norm(b1), rel=1e-9)


def test_the_dead_share_counts_a_unit_positive_anywhere_in_the_window():
    """every=2: the second record's window is steps 1 and 2; a unit positive only in step 1
    is alive there. The first Dense's bias makes unit 0 positive, units 1 and 2 negative; the
    ReLU then sees the step's images."""
    model = _tiny(b1=np.array([100.0, -100.0, -100.0]))
    model.compile(optim.SGD(lr=0.0))
    trace = BackpropTrace(every=2, verbose=0)
    model.fit(np.tile(X, (3, 1)), np.tile(Y, 3), batch_size=N, epochs=1, shuffle=False,
              verbose=0, callbacks=[trace])
    assert [r["step"] for r in trace.records] == [0, 2]
    assert [r["layers"][1]["dead"] for r in trace.records] == [pytest.approx(2 / 3)] * 2


def test_cache_bytes_counts_each_array_once_through_nested_caches():
    x, mask = np.zeros((2, 3), np.float32), np.zeros(7, bool)
    assert cache_bytes((len, (x, 3, "label", (2, 3)), {"m": mask}, [x])) == 24 + 7
    assert cache_bytes(None) == 0


def _conv_net():
    rng = np.random.default_rng(0)
    return Sequential([Conv2D(3, 4, 3, rng=rng), ReLU(), MaxPool2D(2), Flatten(),
                       Dense(4 * 3 * 3, 10, rng=rng)])


def _flags_after(lr):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    model = _conv_net()
    model.compile(optim.SGD(lr=lr))
    trace = BackpropTrace(every=1, verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[trace], verbose=0, seed=0)
    return flags_of(summarise(trace.records), trace.records)


def test_a_learning_rate_100x_too_high_is_flagged_by_the_names_of_its_layers():
    """SGD at 0.002 moves this net's weights by about 1e-3 of their size a step, the rule of
    thumb; 100 times that is flagged, naming each layer with weights."""
    assert not [f for f in _flags_after(0.002) if "updates" in f]
    flags = [f for f in _flags_after(0.2) if f.startswith("updates too large")]
    assert len(flags) == 1 and "lower the learning rate" in flags[0]
    assert "0 Conv2D (" in flags[0] and "4 Dense (" in flags[0]


def test_a_loss_stuck_at_log_classes_is_flagged():
    """Zero weights give every class the same score: a loss of exactly log(10)."""
    model = _conv_net()
    for p in model.params.values():
        p[...] = 0
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((32, 3, 8, 8)).astype(np.float32), rng.integers(0, 10, 32)
    model.compile(optim.SGD(lr=0.0))
    trace = BackpropTrace(every=1, verbose=0)
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[trace], verbose=0)
    flags = flags_of(summarise(trace.records), trace.records)
    assert any(f.startswith(f"loss stuck at 2.303, log(10) = {math.log(10):.3f}") for f in flags)
    for record in trace.records:                       # a loss far from log(10) is not flagged
        record["loss"] = 1.5
    assert not [f for f in flags_of(summarise(trace.records), trace.records) if "stuck" in f]


def test_gradcheck_option_checks_each_layer_in_float64():
    rows, trace = _trace_one_step(_tiny(), optim.SGD(lr=0.01), gradcheck=True)
    assert all(row["gradcheck"] < 1e-7 for row in rows.values())
    assert not [f for f in flags_of(summarise(trace.records), trace.records) if "check" in f]


class _WrongDense(Dense):
    """A Dense layer whose backward sends back twice the input gradient."""

    def backward(self, dy, input_grad=True):
        return 2 * super().backward(dy, input_grad)


def test_gradcheck_option_names_a_layer_whose_backward_is_wrong():
    model = _tiny()
    rng = np.random.default_rng(3)
    wrong = _WrongDense(3, 3, dtype=np.float64, rng=rng)            # float64: checked in place
    model = Sequential([model[0], ReLU(), wrong, ReLU(), model[2]])
    rows, trace = _trace_one_step(model, optim.SGD(lr=0.01), gradcheck=True)
    assert rows["2"]["gradcheck"] > 0.1 and rows["4"]["gradcheck"] < 1e-7
    flags = [f for f in flags_of(summarise(trace.records), trace.records) if "check" in f]
    assert len(flags) == 1 and flags[0].startswith("gradient check failed at 2 _WrongDense (")


def test_the_probes_are_removed_and_the_step_split_again_after_a_traced_step():
    model = _tiny()
    _trace_one_step(model, optim.SGD(lr=0.01))
    assert all("forward" not in vars(layer) and "backward" not in vars(layer)
               for layer in model.layers())
    assert model.whole_batch_step is False and isinstance(model.loss, SoftmaxCrossEntropy)


def test_train_trace_flag_writes_the_trace_and_prints_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINICNN_DATA", str(tmp_path / "cache"))
    folder = make_folder(tmp_path / "shapes")
    out = tmp_path / "run"
    args = ["--data", str(folder), "--out", str(out), "--epochs", "1", "--batch-size", "16",
            "--val-split", "0.25", "--trace", "2"]
    assert train.main(args) == 0
    printed = capsys.readouterr().out
    assert "trace, epoch 1: median of" in printed and "0 Conv2D" in printed
    assert "predictions.png trace.jsonl trace.png" in printed
    records, flags = read_trace(out / "trace.jsonl")
    train_images = json.loads((out / "settings.json").read_text())["train_images"]
    steps = -(-train_images // 16)
    assert [r["step"] for r in records] == list(range(0, steps, 2))
    assert [e for e, _ in flags] == [0]
    names = [row["name"] + " " + row["type"] for row in records[0]["layers"]]
    assert names[:3] == ["0 Conv2D", "1 ReLU", "2 MaxPool2D"] and names[-1] == "11 Dense"
    assert (out / "trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp"))


def test_train_trace_alone_means_every_50_steps_and_bad_values_are_one_sentence(capsys):
    assert train.build_parser().parse_args(["--trace"]).trace == 50
    assert train.build_parser().parse_args(["--trace", "7"]).trace == 7
    assert train.main(["--trace", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --trace must be >= 0 (0: off), got -1."


def test_every_must_be_a_positive_int():
    with pytest.raises(ValueError, match="every must be a positive int"):
        BackpropTrace(every=0)


def test_a_frozen_layer_is_not_flagged_for_updates_it_is_not_meant_to_make():
    """At lr 0 every trained weight's update is 0 (flagged as too small); a frozen one's is
    not an update the optimizer should make."""
    model = _tiny()
    model[0].trainable = False
    rows, trace = _trace_one_step(model, optim.SGD(lr=0.0))
    assert rows["0"]["update_ratio"] == {} and rows["0"]["grad_weight"] is None
    flags = [f for f in flags_of(summarise(trace.records), trace.records) if "updates" in f]
    assert len(flags) == 1 and flags[0].startswith("updates too small at 2 Dense (0.0e+00):")


def test_a_resumed_trace_keeps_the_steps_before_the_resume_and_drops_those_after(tmp_path):
    """A killed run may have traced steps past its last checkpoint: the resumed run traces
    them again, once."""
    x, y = np.tile(X, (4, 1)), np.tile(Y, 4)                   # 4 steps an epoch
    model = _tiny()
    model.compile(optim.SGD(lr=0.01))
    model.fit(x, y, batch_size=N, epochs=2, shuffle=False, verbose=0,
              callbacks=[BackpropTrace(every=1, log_dir=tmp_path, verbose=0)])
    resumed = BackpropTrace(every=1, log_dir=tmp_path, append=True, verbose=0)
    model.fit(x, y, batch_size=N, epochs=2, shuffle=False, verbose=0, initial_epoch=1,
              initial_state={"step": 2, "seen": 2 * N, "sums": {"loss": 0.0}},
              callbacks=[resumed])
    records, flags = read_trace(tmp_path / "trace.jsonl")
    assert [r["step"] for r in records] == list(range(8))
    assert [r["epoch"] for r in records] == [0] * 4 + [1] * 4
    assert [e for e, _ in flags] == [0, 1]
