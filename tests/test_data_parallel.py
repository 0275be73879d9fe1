"""minicnn.parallel.data_parallel: a step with the batch split over whole-model copies gives what one
model on the whole batch gives (float64, so rounding cannot flip a ReLU or a max-pool winner),
BatchNorm's statistics included, with worker threads and with worker processes; and the
machinery under it (workers.together, workers.all_sum, minicnn.parallel.processes' pools) sums, falls
back, starts anew and fails cleanly."""
import contextlib
import multiprocessing
import os
import signal
import threading
import time
from unittest import mock

import numpy as np
import pytest

import minicnn

from minicnn.parallel import data_parallel
from minicnn.parallel import workers
from minicnn.parallel import processes
from minicnn.nn import BatchNorm1D, Conv2D, Dense, Dropout, Flatten, Layer, MaxPool2D, ReLU
from minicnn.nn.losses import SoftmaxCrossEntropy
from minicnn.nn.containers import Sequential
from minicnn.nn.zoo import keras_tutorial, resnet_small
from test_parallel import thread_workers


def _models():
    return {"keras-tutorial": lambda: keras_tutorial(rng=np.random.default_rng(1),
                                                     dtype=np.float64),
            "resnet-small": lambda: resnet_small(rng=np.random.default_rng(1), dtype=np.float64,
                                                 widths=(8, 8, 16)),
            "dropout-net": dropout_net}


def dropout_net():
    """A small CNN with Dropout on conv features (N, C, H, W) and on Dense features (N, F),
    float64, every generator seeded."""
    d = dict(rng=np.random.default_rng(1), dtype=np.float64)
    return Sequential([Conv2D(3, 8, 3, **d), ReLU(), MaxPool2D(2),               # (8, 15, 15)
                       Dropout(0.25, rng=np.random.default_rng(2)),
                       Conv2D(8, 16, 3, **d), ReLU(), MaxPool2D(2), Flatten(),  # (16 * 6 * 6,)
                       Dense(16 * 6 * 6, 32, **d), ReLU(),
                       Dropout(0.5, rng=np.random.default_rng(3)), Dense(32, 10, **d)])


@pytest.fixture(params=["processes", "threads"])
def kind(request, monkeypatch):
    """Each test that takes it runs with worker processes (where they can be forked) and with
    worker threads."""
    if request.param == "processes" and not processes.AVAILABLE:
        pytest.skip("worker processes need fork (Linux)")
    monkeypatch.setattr(data_parallel, "PROCESSES", request.param == "processes")
    yield request.param
    processes.close()


@contextlib.contextmanager
def split_calls():
    """Counts the steps split over worker threads (.together) and processes (.run)."""
    with mock.patch.object(workers, "together", wraps=workers.together) as together, \
            mock.patch.object(processes, "run", wraps=processes.run) as run:
        yield mock.Mock(together=together, run=run,
                        count=lambda: together.call_count + run.call_count)


def _plain_step(model, x, labels, loss_fn):
    logits = model.forward(x, training=True)
    loss, dlogits = loss_fn(logits, labels)
    model.backward(dlogits, input_grad=False)
    return loss, logits


@pytest.mark.parametrize("name", ["keras-tutorial", "resnet-small", "dropout-net"])
@pytest.mark.parametrize("k, n", [(2, 12), (3, 11)])     # 3 workers: parts of 4, 4 and 3
def test_split_step_equals_one_model_on_the_whole_batch(name, k, n, kind):
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((n, 3, 32, 32)), rng.integers(0, 10, n)
    loss_fn = SoftmaxCrossEntropy(label_smoothing=0.1)
    one, split = _models()[name](), _models()[name]()
    with thread_workers(1), minicnn.use("reference"):   # the textbook maths, one model, as written
        want = _plain_step(one, x, labels, loss_fn)
    with thread_workers(k), split_calls() as calls:
        got = data_parallel.train_step(split, x, labels, loss_fn)
        spy, parts = ((calls.run, calls.run.call_args[0][2]) if kind == "processes"
                      else (calls.together, calls.together.call_args[0][0]))
        assert calls.count() == spy.call_count == 1 and len(parts) == k
        predicted = data_parallel.predict(split, x)
    assert got[0] == pytest.approx(want[0], rel=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-10, atol=1e-12)
    assert set(split.grads) == set(one.grads)
    for key, g in one.grads.items():
        np.testing.assert_allclose(split.grads[key], g, rtol=1e-9, atol=1e-12, err_msg=key)
    for key, s in one.state.items():     # the running statistics: updated once, whole batch
        np.testing.assert_allclose(split.state[key], s, rtol=1e-12, atol=1e-14, err_msg=key)
    with minicnn.use("reference"):
        np.testing.assert_allclose(predicted, one.forward(x), rtol=1e-10, atol=1e-12)


def test_copies_follow_the_models_arrays_when_they_are_replaced(kind):
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((8, 3, 32, 32)), rng.integers(0, 10, 8)
    model = _models()["resnet-small"]()
    with thread_workers(2):
        data_parallel.train_step(model, x, labels, SoftmaxCrossEntropy())
        for layer in [model[0], model[2]]:          # new arrays, as model.to() makes
            layer.params = {key: p * 0.5 for key, p in layer.params.items()}
            layer.state = {key: s + 1.0 for key, s in layer.state.items()}
        np.testing.assert_allclose(data_parallel.predict(model, x), model.forward(x),
                                   rtol=1e-10, atol=1e-12)


def _runs_plain(model, x, labels=None):
    with split_calls() as calls:
        if labels is None:
            data_parallel.predict(model, x)
        else:
            data_parallel.train_step(model, x, labels, SoftmaxCrossEntropy())
    return calls.count() == 0


class Doubled(Layer):                    # a layer of the user's own: no config to rebuild from
    def forward(self, x, training=False):
        return 2 * x

    def backward(self, dy):
        return 2 * dy


def test_falls_back_to_the_plain_step_where_a_split_cannot_work(kind):
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((8, 12)), rng.integers(0, 4, 8)

    def net(*extra):
        return Sequential([Dense(12, 6, dtype=np.float64), *extra, ReLU(),
                           Dense(6, 4, dtype=np.float64)])

    with thread_workers(2):
        assert not _runs_plain(net(), x, labels)
        assert not _runs_plain(net(Dropout(0.5)), x, labels)  # each image's own mask: splits
        assert not _runs_plain(net(Dropout(0.5)), x)          # inference: Dropout is identity
        assert _runs_plain(net(Doubled()), x, labels)
        assert _runs_plain(net(), x[:3], labels[:3])           # under two images a worker
    with thread_workers(1):
        assert _runs_plain(net(), x, labels)


def test_batchnorm1d_over_a_split_batch_uses_the_whole_batchs_statistics(kind):
    rng = np.random.default_rng(3)
    x, labels = 5 + 3 * rng.standard_normal((9, 6)), rng.integers(0, 3, 9)
    make = lambda: Sequential([BatchNorm1D(6, dtype=np.float64), Flatten(),   # noqa: E731
                               Dense(6, 3, dtype=np.float64, rng=np.random.default_rng(0))])
    one, split = make(), make()
    with thread_workers(1):
        want = _plain_step(one, x, labels, SoftmaxCrossEntropy())
    with thread_workers(3):
        got = data_parallel.train_step(split, x, labels, SoftmaxCrossEntropy())
    np.testing.assert_allclose(got[1], want[1], rtol=1e-12)
    for key, g in one.grads.items():
        np.testing.assert_allclose(split.grads[key], g, rtol=1e-10, atol=1e-14, err_msg=key)
    for key, s in one.state.items():
        np.testing.assert_allclose(split.state[key], s, rtol=1e-12, err_msg=key)


def test_an_error_in_one_worker_is_raised_and_no_worker_waits_for_it(kind):
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((8, 3, 32, 32)), rng.integers(0, 10, 8)
    labels[6] = 12                           # only the second worker's part has a bad label
    model = _models()["resnet-small"]()      # its BatchNorm backward would wait for that part
    with thread_workers(2):
        with pytest.raises(ValueError, match="labels must lie in"):
            data_parallel.train_step(model, x, labels, SoftmaxCrossEntropy())
        labels[6] = 3                        # and the next step runs as usual
        loss, _ = data_parallel.train_step(model, x, labels, SoftmaxCrossEntropy())
    assert np.isfinite(loss)


def test_all_sum_adds_up_every_members_values_in_rank_order():
    with thread_workers(3):
        got = workers.together([lambda r=r: (workers.rank(),
                                              workers.all_sum(np.full(2, r + 1.0), 10 * r),
                                              workers.all_sum(r))
                                 for r in range(3)])
    for r, (rank, (array, number), (again,)) in enumerate(got):
        assert rank == r and number == 30 and again == 3
        np.testing.assert_array_equal(array, [6.0, 6.0])
    assert workers.all_sum(np.ones(2), 4)[1] == 4            # outside a group: as they are
    assert workers.rank() == 0


def test_together_refuses_more_tasks_than_workers_and_calls_from_inside_a_worker():
    with thread_workers(2):
        with pytest.raises(ValueError, match="1 to 2 tasks"):
            workers.together([lambda: 0] * 3)
        with pytest.raises(RuntimeError, match="inside a worker"):
            workers.together([lambda: workers.together([lambda: 0]), lambda: 1])
        names = workers.together([lambda: threading.current_thread().name] * 2)
        assert len(set(names)) == 2


def test_the_trainer_and_its_evaluation_run_the_split_step(tmp_path, monkeypatch, kind):
    from _data_helpers import make_folder
    from minicnn.training import trainer as train
    monkeypatch.setenv("MINICNN_DATA", str(tmp_path / "cache"))
    folder = make_folder(tmp_path / "shapes", per_class=24)     # 3 classes: 54 train, 18 val
    for name in ("train_step", "predict"):
        monkeypatch.setattr(data_parallel, name, mock.Mock(wraps=getattr(data_parallel, name)))
    with thread_workers(2), split_calls() as calls:
        result = train.fit(data=str(folder), out=str(tmp_path / "run"), epochs=1, batch_size=16,
                           val_split=0.25)
    assert result["status"] == "finished"
    steps, evaluations = data_parallel.train_step.call_count, data_parallel.predict.call_count
    assert steps == 4 and evaluations > 0                        # ceil(54 / 16) steps
    assert calls.count() == steps + evaluations    # every one of them split over the workers


# ---- worker processes ------------------------------------------------------------------------
needs_fork = pytest.mark.skipif(not processes.AVAILABLE, reason="worker processes need fork")


def _workers_alive():
    return [p for p in multiprocessing.active_children() if p.name.startswith("minicnn-worker")]


def _step(model, x, labels):
    return data_parallel.train_step(model, x, labels, SoftmaxCrossEntropy())


@needs_fork
def test_a_pool_serves_its_model_until_the_model_or_a_bigger_batch_needs_another(monkeypatch):
    monkeypatch.setattr(data_parallel, "PROCESSES", True)
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((8, 3, 32, 32)), rng.integers(0, 10, 8)
    model = _models()["keras-tutorial"]()
    try:
        with thread_workers(2):
            _step(model, x, labels)
            pool = processes._pool
            _step(model, x, labels)
            data_parallel.predict(model, x[:6])             # smaller: fits the same pool
            assert processes._pool is pool and len(_workers_alive()) == 1
            data_parallel.predict(model, x[:1].repeat(16, axis=0))   # bigger: a new pool,
            bigger = processes._pool                                 # the old one ended
            assert bigger is not pool and not pool.procs and len(_workers_alive()) == 1
            _step(model, x, labels)                          # and it keeps its room
            assert processes._pool is bigger
            other = _models()["resnet-small"]()
            want = _plain_step(_models()["resnet-small"](), x, labels, SoftmaxCrossEntropy())
            got = _step(other, x, labels)
            assert processes._pool is not bigger and len(_workers_alive()) == 1
            np.testing.assert_allclose(got[1], want[1], rtol=1e-10, atol=1e-12)
    finally:
        processes.close()
    assert not _workers_alive()


@needs_fork
def test_a_running_pool_keeps_blas_on_one_thread_after_set_threads_gave_it_back(monkeypatch):
    """set_threads(1) then set_threads(2) keeps the pool, and its next step takes BLAS back to
    one thread in this process (else its threads spin on the worker's core)."""
    if workers._blas is None:
        pytest.skip("no OpenBLAS found in numpy.libs to query")
    monkeypatch.setattr(data_parallel, "PROCESSES", True)
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((4, 3, 32, 32)), rng.integers(0, 10, 4)
    model = _models()["keras-tutorial"]()
    own = None
    try:
        with thread_workers(2):
            _step(model, x, labels)
            pool = processes._pool
            workers.set_threads(1)
            own = workers._blas[0]()                 # BLAS's own count; at least 2 below, so
            workers._blas[1](max(own, 2))            # that the check can fail on any machine
            workers.set_threads(2)
            _step(model, x, labels)
            assert processes._pool is pool and workers._blas[0]() == 1
    finally:
        processes.close()
        if own is not None:
            workers._restore_blas_threads()          # minicnn lets go of BLAS, at its own count
            workers._blas[1](own)


@needs_fork
def test_a_worker_that_died_between_steps_is_replaced(monkeypatch):
    monkeypatch.setattr(data_parallel, "PROCESSES", True)
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((8, 3, 32, 32)), rng.integers(0, 10, 8)
    model, one = _models()["keras-tutorial"](), _models()["keras-tutorial"]()
    try:
        with thread_workers(2):
            _step(model, x, labels)
            [proc] = processes._pool.procs
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
            got = _step(model, x, labels)
            assert processes._pool.alive()
    finally:
        processes.close()
    np.testing.assert_allclose(got[1], _plain_step(one, x, labels, SoftmaxCrossEntropy())[1],
                               rtol=1e-10, atol=1e-12)


def _dies_in_worker(copy, x):            # a step function that kills worker 1 halfway
    if workers.rank() == 1:
        os._exit(3)
    return workers.all_sum(x.sum())[0]


def _interrupted_here(copy, x):          # ... and one that rank 0 leaves by Ctrl-C
    if workers.rank() == 0:
        raise KeyboardInterrupt
    return workers.all_sum(x.sum())[0]


class _Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("no pickling")


def _raises_unpicklable(copy, x):
    if workers.rank() == 1:
        raise _Unpicklable("the worker's own words")
    return workers.all_sum(x.sum())[0]


@needs_fork
@pytest.mark.parametrize("fn, error, message", [
    (_dies_in_worker, processes.WorkerError, "stopped in the middle of a step"),
    (_interrupted_here, KeyboardInterrupt, None),
    (_raises_unpicklable, processes.WorkerError, "_Unpicklable: the worker's own words")])
def test_a_step_that_fails_anywhere_ends_its_pool_and_leaves_no_worker_waiting(fn, error,
                                                                                message):
    model = _models()["keras-tutorial"]()
    parts = [((np.ones(3),), ()), ((np.ones(3),), ())]
    try:
        with thread_workers(2):
            with pytest.raises(error, match=message):
                processes.run(model, fn, parts)
            assert processes._pool is None or not processes._pool.procs
            assert not _workers_alive()
            _, sums = processes.run(model, _sums, parts)    # the next one starts anew
            assert sums == [6.0, 6.0]
    finally:
        processes.close()


def _sums(copy, x):
    return workers.all_sum(x.sum())[0]


def _many_sums(copy, x):                 # sums of every kind, in shared memory and through pipes
    r = workers.rank()
    big = np.full(processes._SharedSums.SLOT_BYTES // 8 + 1, r + 1.0)     # one slot too big
    return [workers.all_sum(x[:2].astype(np.float32) * (i + r), i + r, 0.5 * r, np.int8(r))
            for i in range(5)] + [workers.all_sum(big, r)] + [workers.all_sum(x.sum() * r)]


@needs_fork
@pytest.mark.parametrize("shared", [True, False])
def test_all_sum_in_worker_processes_adds_every_members_values_in_rank_order(shared,
                                                                            monkeypatch):
    """Through shared memory (x86) and through the pipes (elsewhere, or values too big for a
    slot), in one step: the same sums, types and dtypes in every member, sums after sums."""
    monkeypatch.setattr(processes._SharedSums, "ORDERED_STORES", shared)
    model = _models()["keras-tutorial"]()
    parts = [((np.arange(1.0, 4.0),), ())] * 3
    try:
        with thread_workers(3):
            processes.close()                       # a new pool, forked with the setting
            _, results = processes.run(model, _many_sums, parts)
    finally:
        processes.close()
    for got in results:
        assert len(got) == 7
        for i, (array, count, half, tiny) in enumerate(got[:5]):
            assert array.dtype == np.float32 and type(count) is int and type(half) is float
            np.testing.assert_array_equal(array, np.array([1, 2], np.float32) * (3 * i + 3))
            assert count == 3 * i + 3 and half == 1.5 and tiny == 3 and tiny.dtype == np.int8
        big, count = got[5]
        assert big.shape == (processes._SharedSums.SLOT_BYTES // 8 + 1,) and count == 3
        np.testing.assert_array_equal(big, 6.0)
        assert got[6] == [18.0]


def _last_sum_late(copy, x):             # worker 2 comes to the step's only sum 20 ms late
    if workers.rank() == 2:
        time.sleep(0.02)
    return workers.all_sum(x.sum())[0]


@needs_fork
def test_a_worker_done_while_rank_0_looks_at_its_pipes_is_not_an_error(monkeypatch):
    """Rank 0, waiting long at the last sum, looks at the workers' pipes for an error; by then
    the sum may be complete and a worker done: its "done" message is no error."""
    monkeypatch.setattr(processes, "SPIN_SECONDS", 0.0)          # rank 0 looks at once ...
    check = processes._Hub._check

    def slow_check(self, met):                                   # ... and slowly: the workers
        time.sleep(0.05)                                         # finish meanwhile
        return check(self, met)

    monkeypatch.setattr(processes._Hub, "_check", slow_check)
    model = _models()["keras-tutorial"]()
    parts = [((np.ones(3),), ())] * 3
    try:
        with thread_workers(3):
            processes.close()
            _, sums = processes.run(model, _last_sum_late, parts)
    finally:
        processes.close()
    assert sums == [9.0, 9.0, 9.0]


@needs_fork
def test_a_loss_function_that_cannot_be_sent_runs_on_worker_threads(monkeypatch):
    monkeypatch.setattr(data_parallel, "PROCESSES", True)
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((8, 3, 32, 32)), rng.integers(0, 10, 8)
    loss = SoftmaxCrossEntropy()
    model, one = _models()["keras-tutorial"](), _models()["keras-tutorial"]()
    with thread_workers(2), split_calls() as calls:
        got = data_parallel.train_step(model, x, labels, lambda z, y: loss(z, y))
    assert calls.together.call_count == 1 and calls.run.call_count == 0
    np.testing.assert_allclose(got[1], _plain_step(one, x, labels, loss)[1], rtol=1e-10,
                               atol=1e-12)


@needs_fork
def test_a_process_that_cannot_fork_splits_its_steps_over_threads(monkeypatch):
    monkeypatch.setattr(data_parallel, "PROCESSES", True)
    monkeypatch.setattr(processes, "_fork_works", True)
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((8, 3, 32, 32)), rng.integers(0, 10, 8)
    model, one = _models()["resnet-small"](), _models()["resnet-small"]()
    processes.close()
    with thread_workers(2), split_calls() as calls, \
            mock.patch("os.fork", side_effect=OSError(11, "Resource temporarily unavailable")):
        got = _step(model, x, labels)
        again = _step(model, x, labels)             # no second try at forking
    assert calls.together.call_count == 2 and not processes.can_start()
    assert processes._pool is None and not _workers_alive()
    want = _plain_step(one, x, labels, SoftmaxCrossEntropy())
    np.testing.assert_allclose(got[1], want[1], rtol=1e-10, atol=1e-12)
    assert np.isfinite(again[0])


def _batch():
    """8 random images and labels, the same on every call (in any process)."""
    rng = np.random.default_rng(0)
    return rng.standard_normal((8, 3, 32, 32)), rng.integers(0, 10, 8)


def _split_step_in_child(queue):
    """(Run in a child process) a split keras-tutorial step on 2 workers -> queue: ("ok", its
    logits, whether it ran on a worker pool of this process's own), or ("error", the error)."""
    try:
        data_parallel.PROCESSES = True
        x, labels = _batch()
        with thread_workers(2):
            _, logits = _step(_models()["keras-tutorial"](), x, labels)
        pool = processes._pool
        queue.put(("ok", logits, pool is not None and pool.owner == os.getpid()))
    except BaseException as e:
        queue.put(("error", repr(e)))


def _in_child(daemon):
    """_split_step_in_child's report from a forked child, which must then exit, and cleanly."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_split_step_in_child, args=(queue,), daemon=daemon)
    child.start()
    report = queue.get(timeout=120)
    child.join(timeout=60)                 # its workers end with it (not: it waits for them)
    assert child.exitcode == 0, "the child process hung at its exit, or failed"
    assert report[0] == "ok", report[1]
    x, labels = _batch()
    want = _plain_step(_models()["keras-tutorial"](), x, labels, SoftmaxCrossEntropy())[1]
    np.testing.assert_allclose(report[1], want, rtol=1e-10, atol=1e-12)
    return report[2]


@needs_fork
def test_a_daemonic_process_which_may_not_fork_splits_its_steps_over_threads():
    """(A multiprocessing.Pool's workers are daemonic: train.fit in one, a sweep's.)"""
    assert _in_child(daemon=True) is False


@needs_fork
def test_a_process_forked_from_one_with_a_pool_starts_its_own_and_leaves_its_parents(
        monkeypatch):
    monkeypatch.setattr(data_parallel, "PROCESSES", True)
    x, labels = _batch()
    model = _models()["keras-tutorial"]()
    try:
        with thread_workers(2):
            _step(model, x, labels)
            pool = processes._pool
            assert _in_child(daemon=False) is True
            assert processes._pool is pool and pool.alive()
            _step(model, x, labels)
            assert processes._pool is pool
    finally:
        processes.close()
