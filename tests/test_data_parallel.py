"""minicnn.data_parallel: a step with the batch split over whole-model replicas gives what one
model on the whole batch gives (float64, so rounding cannot flip a ReLU or a max-pool winner),
BatchNorm's statistics included; and the group machinery under it (parallel.together,
parallel.all_sum) sums, falls back and fails cleanly."""
import threading
from unittest import mock

import numpy as np
import pytest

from minicnn import data_parallel, parallel
from minicnn.layers import BatchNorm1D, Dense, Dropout, Flatten, Layer, ReLU
from minicnn.losses import SoftmaxCrossEntropy
from minicnn.model import Sequential
from minicnn.zoo import keras_tutorial, resnet_small
from test_parallel import workers


def _models():
    return {"keras-tutorial": lambda: keras_tutorial(rng=np.random.default_rng(1),
                                                     dtype=np.float64),
            "resnet-small": lambda: resnet_small(rng=np.random.default_rng(1), dtype=np.float64,
                                                 widths=(8, 8, 16))}


def _plain_step(model, x, labels, loss_fn):
    logits = model.forward(x, training=True)
    loss, dlogits = loss_fn(logits, labels)
    model.backward(dlogits, input_grad=False)
    return loss, logits


@pytest.mark.parametrize("name", ["keras-tutorial", "resnet-small"])
@pytest.mark.parametrize("k, n", [(2, 12), (3, 11)])     # 3 workers: parts of 4, 4 and 3
def test_split_step_equals_one_model_on_the_whole_batch(name, k, n):
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((n, 3, 32, 32)), rng.integers(0, 10, n)
    loss_fn = SoftmaxCrossEntropy(label_smoothing=0.1)
    one, split = _models()[name](), _models()[name]()
    with workers(1):
        want = _plain_step(one, x, labels, loss_fn)
    with workers(k), mock.patch.object(parallel, "together", wraps=parallel.together) as spy:
        got = data_parallel.train_step(split, x, labels, loss_fn)
        assert spy.call_count == 1 and len(spy.call_args[0][0]) == k
        predicted = data_parallel.predict(split, x)
    assert got[0] == pytest.approx(want[0], rel=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-10, atol=1e-12)
    assert set(split.grads) == set(one.grads)
    for key, g in one.grads.items():
        np.testing.assert_allclose(split.grads[key], g, rtol=1e-9, atol=1e-12, err_msg=key)
    for key, s in one.state.items():     # the running statistics: updated once, whole batch
        np.testing.assert_allclose(split.state[key], s, rtol=1e-12, atol=1e-14, err_msg=key)
    np.testing.assert_allclose(predicted, one.forward(x), rtol=1e-10, atol=1e-12)


def test_replicas_follow_the_models_arrays_when_they_are_replaced():
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((8, 3, 32, 32)), rng.integers(0, 10, 8)
    model = _models()["resnet-small"]()
    with workers(2):
        data_parallel.train_step(model, x, labels, SoftmaxCrossEntropy())
        for layer in [model[0], model[2]]:          # new arrays, as model.to() makes
            layer.params = {key: p * 0.5 for key, p in layer.params.items()}
            layer.state = {key: s + 1.0 for key, s in layer.state.items()}
        np.testing.assert_allclose(data_parallel.predict(model, x), model.forward(x),
                                   rtol=1e-10, atol=1e-12)


def _runs_plain(model, x, labels=None):
    with mock.patch.object(parallel, "together", wraps=parallel.together) as spy:
        if labels is None:
            data_parallel.predict(model, x)
        else:
            data_parallel.train_step(model, x, labels, SoftmaxCrossEntropy())
    return spy.call_count == 0


class Doubled(Layer):                    # a layer of the user's own: no config to rebuild from
    def forward(self, x, training=False):
        return 2 * x

    def backward(self, dy):
        return 2 * dy


def test_falls_back_to_the_plain_step_where_a_split_cannot_work():
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((8, 12)), rng.integers(0, 4, 8)

    def net(*extra):
        return Sequential([Dense(12, 6, dtype=np.float64), *extra, ReLU(),
                           Dense(6, 4, dtype=np.float64)])

    with workers(2):
        assert not _runs_plain(net(), x, labels)
        assert _runs_plain(net(Dropout(0.5, rng=np.random.default_rng(0))), x, labels)
        assert not _runs_plain(net(Dropout(0.5)), x)          # inference: Dropout is identity
        assert _runs_plain(net(Doubled()), x, labels)
        assert _runs_plain(net(), x[:3], labels[:3])           # under two images a worker
    with workers(1):
        assert _runs_plain(net(), x, labels)


def test_batchnorm1d_over_a_split_batch_uses_the_whole_batchs_statistics():
    rng = np.random.default_rng(3)
    x, labels = 5 + 3 * rng.standard_normal((9, 6)), rng.integers(0, 3, 9)
    make = lambda: Sequential([BatchNorm1D(6, dtype=np.float64), Flatten(),   # noqa: E731
                               Dense(6, 3, dtype=np.float64, rng=np.random.default_rng(0))])
    one, split = make(), make()
    with workers(1):
        want = _plain_step(one, x, labels, SoftmaxCrossEntropy())
    with workers(3):
        got = data_parallel.train_step(split, x, labels, SoftmaxCrossEntropy())
    np.testing.assert_allclose(got[1], want[1], rtol=1e-12)
    for key, g in one.grads.items():
        np.testing.assert_allclose(split.grads[key], g, rtol=1e-10, atol=1e-14, err_msg=key)
    for key, s in one.state.items():
        np.testing.assert_allclose(split.state[key], s, rtol=1e-12, err_msg=key)


def test_an_error_in_one_worker_is_raised_and_no_worker_waits_for_it():
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((8, 3, 32, 32)), rng.integers(0, 10, 8)
    labels[6] = 12                           # only the second worker's part has a bad label
    model = _models()["resnet-small"]()      # its BatchNorm backward would wait for that part
    with workers(2):
        with pytest.raises(ValueError, match="labels must lie in"):
            data_parallel.train_step(model, x, labels, SoftmaxCrossEntropy())
        labels[6] = 3                        # and the next step runs as usual
        loss, _ = data_parallel.train_step(model, x, labels, SoftmaxCrossEntropy())
    assert np.isfinite(loss)


def test_all_sum_adds_up_every_members_values_in_rank_order():
    with workers(3):
        got = parallel.together([lambda r=r: (parallel.rank(),
                                              parallel.all_sum(np.full(2, r + 1.0), 10 * r),
                                              parallel.all_sum(r))
                                 for r in range(3)])
    for r, (rank, (array, number), (again,)) in enumerate(got):
        assert rank == r and number == 30 and again == 3
        np.testing.assert_array_equal(array, [6.0, 6.0])
    assert parallel.all_sum(np.ones(2), 4)[1] == 4            # outside a group: as they are
    assert parallel.rank() == 0


def test_together_refuses_more_tasks_than_workers_and_calls_from_inside_a_worker():
    with workers(2):
        with pytest.raises(ValueError, match="1 to 2 tasks"):
            parallel.together([lambda: 0] * 3)
        with pytest.raises(RuntimeError, match="inside a worker"):
            parallel.together([lambda: parallel.together([lambda: 0]), lambda: 1])
        names = parallel.together([lambda: threading.current_thread().name] * 2)
        assert len(set(names)) == 2


def test_the_trainer_and_its_evaluation_run_the_split_step(tmp_path, monkeypatch):
    from _data_helpers import make_folder
    from minicnn import train
    monkeypatch.setenv("MINICNN_DATA", str(tmp_path / "cache"))
    folder = make_folder(tmp_path / "shapes", per_class=24)     # 3 classes: 54 train, 18 val
    for name in ("train_step", "predict"):
        monkeypatch.setattr(data_parallel, name, mock.Mock(wraps=getattr(data_parallel, name)))
    with workers(2), mock.patch.object(parallel, "together", wraps=parallel.together) as spy:
        result = train.fit(data=str(folder), out=str(tmp_path / "run"), epochs=1, batch_size=16,
                           val_split=0.25)
    assert result["status"] == "finished"
    steps, evaluations = data_parallel.train_step.call_count, data_parallel.predict.call_count
    assert steps == 4 and evaluations > 0                        # ceil(54 / 16) steps
    assert spy.call_count == steps + evaluations   # every one of them split over the workers
