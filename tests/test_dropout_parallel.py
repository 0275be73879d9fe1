"""Dropout in the data-parallel step: each image's mask comes from its own generator, seeded from
one draw of the layer's generator and the image's index in the whole batch
(minicnn.reference.activations.image_generators). So a batch split in parts (each part passing
its first image's index) drops what the whole batch drops, with any number of workers; the split
step runs for a model with Dropout and equals the one-model step; and a run checkpointed and
resumed (new worker processes, new model copies) is bitwise the one that was not stopped."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minicnn
from minicnn import ops, reference as R
from minicnn.nn import Dense, Dropout
from minicnn.nn.containers import Sequential
from minicnn.nn.losses import SoftmaxCrossEntropy
from minicnn.nn.optim import SGD
from minicnn.parallel import data_parallel, processes, workers
from minicnn.reference.activations import image_generators
from minicnn.training.checkpoint import load_checkpoint, save_checkpoint
import test_data_parallel
from test_data_parallel import dropout_net, split_calls
from test_parallel import thread_workers

kind = test_data_parallel.kind      # the fixture: a test that takes it runs on processes, threads


# ---- the maths: each image's mask from its place in the batch ---------------------------------
@pytest.mark.parametrize("impl", [R, ops], ids=["reference", "fast"])
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 7), shape=st.sampled_from([(), (5,), (2, 3, 4)]),
       p=st.sampled_from([0.0, 0.3, 0.5, 1.0]), data=st.data())
def test_parts_of_a_batch_draw_the_whole_batchs_masks(impl, n, shape, p, data):
    """Any split of the batch (each part with a copy of the generator and its first index)
    gives the whole batch's mask, bitwise, in both implementations, which agree."""
    x = np.random.default_rng(0).standard_normal((n,) + shape)
    cut = data.draw(st.integers(0, n))
    y, mask = impl.dropout_forward(x, p, np.random.default_rng(9))
    parts = [impl.dropout_forward(x[lo:hi], p, np.random.default_rng(9), first=lo)
             for lo, hi in [(0, cut), (cut, n)]]
    np.testing.assert_array_equal(np.concatenate([m for _, m in parts]), mask)
    np.testing.assert_array_equal(np.concatenate([out for out, _ in parts]), y)
    ry, rmask = R.dropout_forward(x, p, np.random.default_rng(9))
    np.testing.assert_array_equal(mask, rmask)
    np.testing.assert_array_equal(y, ry)


def test_image_generators_follow_the_rule_and_draw_one_seed_a_call():
    rng, twin = np.random.default_rng(4), np.random.default_rng(4)
    gens = image_generators(rng, 3, first=5)
    seed = int(twin.integers(2**63))
    assert rng.bit_generator.state == twin.bit_generator.state      # one draw, no more
    for i, g in enumerate(gens):
        assert g.random() == np.random.default_rng([seed, 5 + i]).random()
    philox = [np.random.Generator(np.random.Philox(7)) for _ in range(2)]     # another kind
    x = np.ones((3, 4))
    np.testing.assert_array_equal(ops.dropout_forward(x, 0.5, philox[0])[1],
                                  R.dropout_forward(x, 0.5, philox[1])[1])


def test_masks_keep_one_minus_p_and_differ_between_images_and_calls():
    x = np.ones((200, 500))
    rng = np.random.default_rng(1)
    _, mask = ops.dropout_forward(x, 0.3, rng)
    _, again = ops.dropout_forward(x, 0.3, rng)
    assert abs((mask > 0).mean() - 0.7) < 0.005                       # 100,000 draws
    np.testing.assert_allclose(mask[mask > 0], 1 / 0.7)
    assert len({row.tobytes() for row in mask}) == 200                # no two images alike
    assert not np.array_equal(mask, again)                            # the generator moved on


# ---- the layer, by hand (no fit, no data-parallel step) ---------------------------------------
def test_a_dropout_layer_used_by_hand_keeps_its_api_and_both_implementations_agree():
    x = np.random.default_rng(0).standard_normal((6, 4, 5, 5))
    dy = np.random.default_rng(1).standard_normal(x.shape)
    runs = {}
    for name in ("reference", "fast"):
        layer = Dropout(0.4, rng=np.random.default_rng(3))
        with minicnn.use(name):
            first = layer.forward(x, training=True)
            dx = layer.backward(dy)
            second = layer.forward(x, training=True)
        runs[name] = first, dx, second
        np.testing.assert_array_equal(dx, dy * ((first != 0) * (1.0 / (1.0 - 0.4))))
        assert not np.array_equal(first == 0, second == 0)            # a new mask each step
        np.testing.assert_array_equal(layer.forward(x), x)            # inference: identity
    for want, got in zip(runs["reference"], runs["fast"]):
        np.testing.assert_array_equal(got, want)


def test_a_layer_on_part_of_a_batch_drops_what_it_drops_on_the_whole_batch():
    x = np.random.default_rng(0).standard_normal((7, 12))
    whole = Dropout(0.5, rng=np.random.default_rng(2)).forward(x, training=True)
    with workers.batch_part(3):
        assert workers.first_image() == 3
        with workers.batch_part(5):
            assert workers.first_image() == 5
        assert workers.first_image() == 3
        part = Dropout(0.5, rng=np.random.default_rng(2)).forward(x[3:], training=True)
    assert workers.first_image() == 0
    np.testing.assert_array_equal(part, whole[3:])


def test_batch_part_belongs_to_the_thread_that_entered_it():
    with thread_workers(2), workers.batch_part(4):
        seen = workers.together([workers.first_image, workers.first_image])
    assert seen == [4, 0]             # member 0 is the calling thread; member 1 another thread


# ---- the data-parallel step ------------------------------------------------------------------
def _batch(n=12):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 3, 32, 32)), rng.integers(0, 10, n)


def _dropout_states(model):
    return [layer.rng.bit_generator.state for layer in data_parallel._dropout_layers(model)]


@pytest.mark.parametrize("k", [2, 3])
def test_the_split_step_runs_for_a_dropout_model_and_equals_the_one_model_step(k, kind):
    x, labels = _batch(11)
    loss_fn = SoftmaxCrossEntropy()
    one, split = dropout_net(), dropout_net()
    with thread_workers(1), split_calls() as calls:                   # the one-model step
        want = data_parallel.train_step(one, x, labels, loss_fn)
        assert calls.count() == 0
    with thread_workers(k), split_calls() as calls:
        got = data_parallel.train_step(split, x, labels, loss_fn)
        assert calls.count() == 1
        assert (calls.run if kind == "processes" else calls.together).call_count == 1
    assert got[0] == pytest.approx(want[0], rel=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-12, atol=1e-14)
    for key, g in one.grads.items():
        np.testing.assert_allclose(split.grads[key], g, rtol=1e-10, atol=1e-14, err_msg=key)
    assert _dropout_states(split) == _dropout_states(one)   # advanced as the one-model step's


def test_dropout_as_the_last_layer_drops_the_same_logits_with_any_number_of_workers(kind):
    """The logits are the Dropout's output: its zeros are the masks, compared exactly."""
    x, labels = np.random.default_rng(0).standard_normal((12, 20)), np.arange(12) % 6

    def net():
        return Sequential([Dense(20, 6, dtype=np.float64, rng=np.random.default_rng(1)),
                           Dropout(0.5, rng=np.random.default_rng(2))])

    runs = []
    for k in (1, 2, 3):
        with thread_workers(k), split_calls() as calls:
            runs.append(data_parallel.train_step(net(), x, labels, SoftmaxCrossEntropy())[1])
            assert calls.count() == (k > 1)
    assert 0 < (runs[0] == 0).sum() < runs[0].size
    for logits in runs[1:]:
        np.testing.assert_array_equal(logits == 0, runs[0] == 0)
        np.testing.assert_allclose(logits, runs[0], rtol=1e-13)


def _train(model, optimizer, steps, x, labels):
    for _ in range(steps):
        model.zero_grad()
        data_parallel.train_step(model, x, labels, SoftmaxCrossEntropy())
        optimizer.step()


def test_a_dropout_run_checkpointed_and_resumed_is_bitwise_the_uninterrupted_one(tmp_path,
                                                                                 kind):
    """2 steps, a checkpoint (the Dropout generators' states in it, as the trainer keeps them),
    new worker processes and a new model from the file, 2 more steps == 4 steps, bitwise."""
    x, labels = _batch()
    with thread_workers(2), split_calls() as calls:
        whole = dropout_net()
        _train(whole, SGD(whole, lr=0.05, momentum=0.9), 4, x, labels)

        first = dropout_net()
        optimizer = SGD(first, lr=0.05, momentum=0.9)
        _train(first, optimizer, 2, x, labels)
        save_checkpoint(str(tmp_path / "last.npz"), first, optimizer,
                        {"rng": {"dropout": _dropout_states(first)}})
        processes.close()                          # the resumed run forks new workers
        resumed, info, buffers = load_checkpoint(str(tmp_path / "last.npz"))
        for layer, state in zip(data_parallel._dropout_layers(resumed), info["rng"]["dropout"]):
            layer.rng.bit_generator.state = state
        optimizer = SGD(resumed, lr=0.05, momentum=0.9)
        optimizer.load_state_dict({**info["optimizer"], "state": buffers})
        _train(resumed, optimizer, 2, x, labels)
        assert calls.count() == 8                  # every step split over the workers
    assert set(resumed.params) == set(whole.params)
    for name, value in whole.params.items():
        np.testing.assert_array_equal(resumed.params[name], value, err_msg=name)
    assert _dropout_states(resumed) == _dropout_states(whole)
