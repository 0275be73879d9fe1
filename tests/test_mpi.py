"""Data-parallel training over MPI (minicnn.parallel.mpi): `mpiexec -n 2` training equals one
process on the same global batches, BatchNorm and Dropout included, in float64 to 1e-10 and in
float32 to FLOAT32_TOLERANCE; the command line under mpiexec writes rank 0's files only, equal
to the one-process run's; a signal to one rank stops every rank at the same step with a
checkpoint, and a rank killed mid-run ends the job with the last checkpoint loadable and
resumable. Also the pieces without MPI: the buckets, the packing, the NCCL group on a stand-in
communicator.

The MPI runs are subprocesses (`mpiexec -n 2 python tests/test_mpi.py fit ...`: this file is
also the script they run), skipped where mpi4py or mpiexec is missing; on a 2-core machine
two ranks use one core each.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import fake_cupy                                                          # noqa: E402
from minicnn.parallel import group                                       # noqa: E402

# float32: two ranks add the batch's gradients in another order than one process; after the
# 15 steps below the arrays measured up to 2.4e-6 apart (the largest about 1.5).
FLOAT32_TOLERANCE = 1e-5


# ---- the script the runs execute (under mpiexec, or as the one process) -----------------------
def _model(dtype):
    """Conv, BatchNorm2D, ReLU, pool, Dropout on feature maps, Dense, BatchNorm1D, Dropout on
    features, Dense: every kind of cross-image coupling the step has."""
    from minicnn.nn import (BatchNorm1D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten,
                            MaxPool2D, ReLU)
    from minicnn.nn.containers import Sequential
    d = dict(rng=np.random.default_rng(1), dtype=dtype)
    return Sequential([Conv2D(3, 6, 3, padding=1, **d), BatchNorm2D(6, dtype=dtype), ReLU(),
                       MaxPool2D(2), Dropout(0.25, rng=np.random.default_rng(2)), Flatten(),
                       Dense(6 * 4 * 4, 16, **d), BatchNorm1D(16, dtype=dtype), ReLU(),
                       Dropout(0.5, rng=np.random.default_rng(3)), Dense(16, 4, **d)])


def _data(dtype):
    rng = np.random.default_rng(7)
    return rng.standard_normal((72, 3, 8, 8)).astype(dtype), rng.integers(0, 4, 72)


def run_fit(out, dtype_name, backend="numpy"):
    """Three epochs of model.fit (batch 16: 5 steps an epoch, the last of 8 images), then rank
    0 (or the one process) saves every parameter and BatchNorm statistic to out. backend
    "cupy": on a GPU a rank, the sums through NCCL (what docs/distributed.md's check runs)."""
    from minicnn.backend import get_backend, to_numpy
    from minicnn.nn.optim import SGD
    if backend == "cupy":
        from minicnn.parallel import nccl
        nccl.use_local_gpu(get_backend("cupy"))
    dtype = np.dtype(dtype_name)
    model = _model(dtype).to(backend)
    model.compile(SGD(model, 0.1, momentum=0.9), "sparse_categorical_crossentropy", ["accuracy"])
    x, y = _data(dtype)
    history = model.fit(x, y, batch_size=16, epochs=3, seed=5, verbose=0)
    if group.is_root():
        arrays = {f"{i}.{kind}.{k}": to_numpy(v) for i, layer in enumerate(model.layers())
                  for kind in ("params", "state") for k, v in getattr(layer, kind).items()}
        np.savez(out, loss=np.array(history.history["loss"]), **arrays)


# ---- the tests ---------------------------------------------------------------------------------
def _have_mpi():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return shutil.which("mpiexec") is not None


needs_mpi = pytest.mark.skipif(not _have_mpi(), reason="needs mpi4py and mpiexec "
                                                        "(pip install \"minicnn[distributed]\")")


def test_mpi_is_here_where_it_must_be():
    """CI sets MINICNN_REQUIRE_MPI=1: there the MPI tests must run, not skip."""
    if os.environ.get("MINICNN_REQUIRE_MPI") == "1":
        assert _have_mpi(), "MINICNN_REQUIRE_MPI=1 but mpi4py or mpiexec is missing"


def _env(threads=1):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MPI_"))}
    env.update(MINICNN_THREADS=str(threads), PYTHONPATH=str(HERE.parent),
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return env


def _mpiexec(n):
    """mpiexec -n n: MPICH's runs more processes than cores as it is; Open MPI's needs
    --oversubscribe for that (a 1-core CI machine)."""
    version = subprocess.run(["mpiexec", "--version"], capture_output=True, text=True).stdout
    return ["mpiexec", "-n", str(n), *(["--oversubscribe"] if "Open MPI" in version else [])]


def _run(command, timeout=120, **kwargs):
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env=kwargs.pop("env", _env()), **kwargs)


def _fit(tmp_path, name, dtype, launcher=(), threads=1):
    out = tmp_path / f"{name}.npz"
    done = _run([*launcher, sys.executable, str(Path(__file__)), "fit", str(out), dtype],
                env=_env(threads))
    assert done.returncode == 0, done.stderr
    return dict(np.load(out))


def _max_difference(a, b):
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@needs_mpi
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_two_ranks_equal_one_process(tmp_path, dtype):
    """Parameters, BatchNorm running statistics and the epochs' losses after 15 steps (BatchNorm
    and Dropout in the model, an epoch's last batch of 8) equal one process's on the same
    global batches: to 1e-10 in float64, FLOAT32_TOLERANCE in float32 (the plain step adds the
    batch's gradients in another order). With the same split as the in-machine step over two
    workers, the same bits: both add rank 1's sums to rank 0's."""
    ranks = _fit(tmp_path, "ranks", dtype, _mpiexec(2))
    one = _fit(tmp_path, "one", dtype)
    assert _max_difference(ranks, one) < (1e-10 if dtype == "float64" else FLOAT32_TOLERANCE)
    assert _max_difference(ranks, one) > 0      # (the two runs did sum differently)
    if dtype == "float64":
        assert _max_difference(ranks, _fit(tmp_path, "pool", dtype, threads=2)) == 0.0


# ---- the command line under mpiexec ------------------------------------------------------------
NET = """
from minicnn.nn import BatchNorm2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU
from minicnn.nn.containers import Sequential

def net(num_classes, rng):
    return Sequential([Conv2D(3, 8, 3, padding=1, rng=rng), BatchNorm2D(8), ReLU(),
                       MaxPool2D(2), Dropout(0.25, rng=rng), Flatten(),
                       Dense(8 * 4 * 4, num_classes, rng=rng)])
"""


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """The image folder, the model file, the settings, and the one-process run's --out: what
    every command-line test compares with. (72 steps, each checkpointed: the signal tests'
    signal lands in the middle of the run.)"""
    from _data_helpers import make_folder
    root = tmp_path_factory.mktemp("mpi_cli")
    (root / "net.py").write_text(NET)
    make_folder(root / "data", per_class=40)
    args = ["-m", "minicnn.train", "--data", str(root / "data"), "--model",
            f"{root / 'net.py'}:net", "--image-size", "8", "--epochs", "6", "--batch-size", "8",
            "--val-split", "0.2", "--checkpoint-every", "1"]
    one = root / "one"
    done = _run([sys.executable, *args, "--out", str(one)], env=_env(threads=2))
    assert done.returncode == 0, done.stderr
    return args, one, root


def _weights(path):
    import minicnn
    return dict(minicnn.load(path).params)


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


@needs_mpi
def test_command_line_under_mpiexec_equals_one_process(cli_run, tmp_path):
    """mpiexec -n 2 python -m minicnn.train gives the one-process run's weights and history
    (float32: the same bits as the one process's split over two workers, both adding rank 1's
    sums to rank 0's); rank 0 alone writes the files (the same ones) and prints (one header)."""
    args, one, _ = cli_run
    out = tmp_path / "ranks"
    done = _run([*_mpiexec(2), sys.executable, *args, "--out", str(out)])
    assert done.returncode == 0, done.stderr
    assert _same_weights(out / "last.npz", one / "last.npz")
    mine, theirs = (json.loads((d / "history.json").read_text()) for d in (out, one))
    assert {k: v for k, v in mine.items() if k != "seconds"} == \
        {k: v for k, v in theirs.items() if k != "seconds"}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one.iterdir())
    assert done.stdout.count("minicnn ") == 1 and done.stdout.count("Evaluation on") == 1


def _rank_pid(marker, rank, timeout=60):
    """The pid of rank `rank` of the mpiexec job whose environment holds marker, once it runs
    Python (mpiexec may start a launcher script first)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for proc in Path("/proc").iterdir():
            try:
                env = (proc / "environ").read_bytes().split(b"\0")
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if (marker.encode() in env and f"PMI_RANK={rank}".encode() in env
                    and b"minicnn.train" in cmd and os.path.samefile(
                        os.readlink(proc / "exe"), os.path.realpath(sys.executable))):
                return int(proc.name)
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} of the job never started")


def _start_and_hit(args, out, how, tmp_path):
    """Start mpiexec -n 2 ... --out out; once training has written a checkpoint, send signal
    `how` to rank 1 only -> the finished process."""
    marker = f"MINICNN_TEST_JOB={tmp_path.name}"
    env = dict(_env(), MINICNN_TEST_JOB=tmp_path.name)
    job = subprocess.Popen([*_mpiexec(2), sys.executable, *args,
                            "--out", str(out)], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        pids = [_rank_pid(marker, rank) for rank in (0, 1)]
        end = time.monotonic() + 60
        while not (out / "last.npz").exists() and time.monotonic() < end:
            time.sleep(0.005)
        # Both ranks held still while the signal is sent, so that it lands mid-run even when
        # the machine is slow to schedule this test and quick to run the job's tiny steps.
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        os.kill(pids[1], how)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        stdout, stderr = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    return job.returncode, stdout, stderr


@needs_mpi
def test_a_signal_to_one_rank_stops_every_rank_with_a_checkpoint(cli_run, tmp_path):
    """SIGTERM to rank 1 alone: every rank stops after the same step, rank 0 saves and says so
    once, the job exits 128 + 15; --resume in one process (the checkpoint does not depend on
    the number of ranks) then ends where the one-process run did."""
    args, one, _ = cli_run
    out = tmp_path / "run"
    status, _, stderr = _start_and_hit(args, out, signal.SIGTERM, tmp_path)
    assert status == 128 + signal.SIGTERM, stderr
    assert stderr.count("SIGTERM received: saved") == 1 and "Traceback" not in stderr
    resumed = _run([sys.executable, *args, "--out", str(out), "--resume"], env=_env(threads=2))
    assert resumed.returncode == 0, resumed.stderr
    assert _same_weights(out / "last.npz", one / "last.npz")


@needs_mpi
def test_a_killed_rank_ends_the_job_and_leaves_the_checkpoint(cli_run, tmp_path):
    """SIGKILL to rank 1 mid-run: the launcher ends rank 0 too (no hang, no traceback); the last
    checkpoint loads, and --resume from it ends where the one-process run did."""
    args, one, _ = cli_run
    out = tmp_path / "run"
    status, _, stderr = _start_and_hit(args, out, signal.SIGKILL, tmp_path)
    assert status != 0 and "Traceback" not in stderr
    _weights(out / "last.npz")                                    # loads
    resumed = _run([*_mpiexec(2), sys.executable, *args, "--out", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert _same_weights(out / "last.npz", one / "last.npz")


@needs_mpi
def test_a_setup_error_is_said_once(cli_run, tmp_path):
    """An error in the setup, the same in every process (no such data; a batch too small to
    share), is printed by rank 0 alone, and every process exits 2."""
    args, _, root = cli_run
    missing = [a if a != str(root / "data") else str(root / "nothing") for a in args]
    done = _run([*_mpiexec(2), sys.executable, *missing, "--out", str(tmp_path / "a")])
    assert done.returncode == 2 and done.stderr.count("error:") == 1, done.stderr
    lone = _run([*_mpiexec(2), sys.executable, *args, "--batch-size", "95",
                 "--out", str(tmp_path / "b")])         # 96 images: a last batch of 1
    assert lone.returncode == 2 and lone.stderr.count("error:") == 1, lone.stderr
    assert "fewer images than the 2 processes" in lone.stderr


@needs_mpi
@pytest.mark.parametrize("where", ["setup", "step"])
def test_an_error_in_one_rank_ends_every_rank(cli_run, tmp_path, where):
    """Rank 1 alone fails (a stand-in for a file it cannot read, a lost device, a full memory):
    in the setup, rank 0 says what rank 1 found, once, and every rank exits 2; in a step, rank 1
    says it once and the job exits 2 at once, not waiting for rank 1 in the next sum."""
    args, _, _ = cli_run
    done = _run([*_mpiexec(2), sys.executable, str(Path(__file__)), "fail-on-rank-1", where,
                 *args[2:], "--out", str(tmp_path / "run")], timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("error:") == 1, done.stderr
    assert ("rank 1 failed at step 3" if where == "step"
            else "error: Process 1 of 2: rank 1 cannot read the data.") in done.stderr


# ---- the pieces, without MPI --------------------------------------------------------------------
def test_buckets_keep_order_dtype_and_size():
    arrays = [np.zeros(10, np.float32), np.zeros(3, np.float32), np.zeros(4, np.float64),
              np.zeros(2000, np.float64), np.zeros(5, np.float64)]
    assert group.buckets(arrays, bucket_bytes=64) == [[0, 1], [2], [3], [4]]
    assert group.buckets(arrays) == [[0, 1], [2, 3, 4]]


def test_pack_pads_to_whole_pieces_and_unpack_inverts_it():
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((2, 3)), rng.standard_normal(5)]
    flat = group.pack(arrays, pieces=4)
    assert flat.shape == (12,) and np.all(flat[11:] == 0)
    copies = [np.empty_like(a) for a in arrays]
    group.unpack(flat, copies)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, copies))


def test_pack_values_round_trips_types_exactly():
    values = [np.float32(1.1), 7, np.arange(3, dtype=np.float32) / 3, 2.5, np.int64(2**52 + 1)]
    flat, specs = group.pack_values(values)
    back = group.unpack_values(flat, specs)
    assert [type(v) for v in back] == [type(v) for v in values]
    assert back[2].dtype == np.float32 and np.array_equal(back[2], values[2])
    assert back[0] == values[0] and back[4] == values[4]


class _Rendezvous:
    """Members on threads that meet in each collective: each hands in its array, waits for all,
    and gets the result of fn(every member's arrays)."""

    def __init__(self, size):
        self.size, self.barrier, self.slots = size, threading.Barrier(size), [None] * size

    def meet(self, rank, value, fn):
        self.slots[rank] = value
        self.barrier.wait()
        result = fn(list(self.slots))
        self.barrier.wait()
        return result


def _on_threads(size, fn):
    """[fn(rank) for each rank], the ranks on threads at once."""
    results = [None] * size
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, fn(r)))
               for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_sum_pieces_in_place_gives_every_member_the_sum():
    """Three members, two buckets, a length that leaves padding: each member ends with the sum."""
    meet = _Rendezvous(3)
    rng = np.random.default_rng(1)
    grads = [[rng.standard_normal(7), rng.standard_normal((2, 2)).astype(np.float32)]
             for _ in range(3)]
    expected = [sum(g[i] for g in grads) for i in range(2)]

    def member(rank):
        def reduce_scatter(flat, piece):
            piece[...] = meet.meet(rank, flat.copy(), lambda every: sum(every))[
                rank * len(piece):(rank + 1) * len(piece)]

        def all_gather(piece, flat):
            flat[...] = meet.meet(rank, piece.copy(), np.concatenate)

        group.sum_pieces_in_place(grads[rank], 3, reduce_scatter, all_gather)
        return grads[rank]

    for result in _on_threads(3, member):
        assert np.allclose(result[0], expected[0]) and np.allclose(result[1], expected[1])
        assert result[1].dtype == np.float32


class _FakeNccl:
    """A stand-in for cupy.cuda.nccl: communicators of ranks on threads, whose calls take the
    arrays themselves where NCCL takes device pointers (nccl._pointer is the identity here),
    and check the counts and dtypes they are given."""
    NCCL_SUM, NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64, NCCL_INT32, NCCL_INT64 = range(6)
    TYPES = {1: "float16", 2: "float32", 3: "float64", 4: "int32", 5: "int64"}

    def __init__(self, size):
        self.meet, self.calls = _Rendezvous(size), []

    def get_unique_id(self):
        return b"id-of-this-clique"

    def NcclCommunicator(self, size, uid, rank):          # noqa: N802 (NCCL's name)
        assert uid == b"id-of-this-clique"
        fake = self

        class Communicator:
            def reduceScatter(self, send, recv, count, dtype, op, stream):   # noqa: N802
                assert op == fake.NCCL_SUM and send.size == count * size
                assert recv.size == count and send.dtype.name == fake.TYPES[dtype]
                fake.calls.append("reduceScatter")
                recv[...] = fake.meet.meet(rank, send.copy(), lambda every: sum(every))[
                    rank * count:(rank + 1) * count]

            def allGather(self, send, recv, count, dtype, stream):            # noqa: N802
                assert send.size == count and recv.size == count * size
                assert recv.dtype.name == fake.TYPES[dtype]
                fake.calls.append("allGather")
                recv[...] = fake.meet.meet(rank, send.copy(),
                                           lambda every: fake_cupy.module.concatenate(every)
                                           ).reshape(recv.shape)
        return Communicator()


class _Host:
    """An MpiGroup's part for NcclGroup: rank, size, broadcast (rank 0's value)."""

    def __init__(self, rank, size, meet):
        self.rank, self.size, self.meet = rank, size, meet

    def broadcast(self, obj):
        return self.meet.meet(self.rank, obj, lambda every: every[0])


def test_nccl_group_on_a_stand_in_communicator(monkeypatch):
    """NcclGroup on fake_cupy arrays and _FakeNccl: the gradients' buckets go through
    reduceScatter then allGather with the right counts and dtypes, and BatchNorm's sums through
    one allGather, every rank getting the sums (its values' types kept)."""
    from minicnn.parallel import nccl
    monkeypatch.setattr(nccl, "_pointer", lambda a: a)
    monkeypatch.setattr(nccl, "_stream", lambda xp: 0)
    cp, size = fake_cupy.module, 2
    fake, meet = _FakeNccl(size), _Rendezvous(size)
    rng = np.random.default_rng(2)
    grads = [[rng.standard_normal((3, 3)).astype(np.float32), rng.standard_normal(5)]
             for _ in range(size)]
    expected = [sum(g[i] for g in grads) for i in range(2)]

    def rank(r):
        g = nccl.NcclGroup(_Host(r, size, meet), cp, nccl=fake)
        mine = [cp.asarray(a) for a in grads[r]]
        g.sum_in_place(mine)
        sums = g.sum([cp.asarray(np.full(4, r + 1.0, np.float32)), 10 * (r + 1)])
        return [a.get() for a in mine], sums

    for mine, (vector, count) in _on_threads(size, rank):
        assert np.allclose(mine[0], expected[0]) and mine[0].dtype == np.float32
        assert np.allclose(mine[1], expected[1])
        assert np.array_equal(vector.get(), np.full(4, 3.0, np.float32)) and count == 30
        assert isinstance(count, int)
    assert fake.calls.count("reduceScatter") == 2 * size          # a bucket a dtype, a rank


def test_launcher_variables_decide_the_world(monkeypatch):
    """No launcher variables: rank 0 of 1, no group; PMI_SIZE=1 (mpiexec -n 1): still a plain
    run; Open MPI's variables read as well."""
    for name in ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                 "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)
    from minicnn.parallel import mpi
    monkeypatch.setattr(mpi, "_world", None)
    assert group.launched() == (0, 1) and mpi.world() is None and group.is_root()
    monkeypatch.setenv("PMI_SIZE", "1")
    assert mpi.world() is None
    monkeypatch.delenv("PMI_SIZE")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "2")
    assert group.launched() == (2, 4) and not group.is_root()


@pytest.mark.parametrize("rank", [0, 1])
def test_mpiexec_without_mpi4py_is_one_sentence(cli_run, tmp_path, rank):
    """Started by a launcher (its variables) where mpi4py is missing: rank 0 says which extra
    to install, the others say nothing; both exit 2."""
    args, _, _ = cli_run
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "from minicnn.training.trainer import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    env = dict(_env(), PMI_SIZE="2", PMI_RANK=str(rank))
    done = _run([sys.executable, "-c", code, *args[2:], "--out", str(tmp_path / "run")], env=env)
    assert done.returncode == 2
    if rank == 0:
        assert done.stderr.count("error:") == 1, done.stderr
        assert 'pip install "minicnn[distributed]"' in done.stderr
    else:
        assert done.stderr == ""


def test_a_plain_run_never_imports_mpi4py():
    """fit without mpiexec (its in-machine split over two workers) loads no MPI."""
    code = ("import sys, numpy as np, minicnn\n"
            "from minicnn.nn.zoo import keras_tutorial\n"
            "m = keras_tutorial(rng=np.random.default_rng(0))\n"
            "m.compile('sgd', 'sparse_categorical_crossentropy')\n"
            "m.fit(np.zeros((8, 3, 32, 32), np.float32), np.zeros(8, int), verbose=0)\n"
            "assert 'mpi4py' not in sys.modules, 'mpi4py was imported'\n")
    done = _run([sys.executable, "-c", code], env=_env(threads=2))
    assert done.returncode == 0, done.stderr


# ---- what the runs execute ---------------------------------------------------------------------
def run_fail_on_rank_1(where, *args):
    """python -m minicnn.train args, with rank 1 alone failing (MinicnnError) in its third
    step (where="step") or in reading the data (where="setup")."""
    from minicnn.errors import DataError, MinicnnError
    from minicnn.parallel import data_parallel
    from minicnn.training import trainer
    step, part_step, prepare_data = [0], data_parallel._part_step, trainer.prepare_data

    def failing_step(*a, **k):
        step[0] += 1
        if group.launched()[0] == 1 and step[0] == 3:
            raise MinicnnError("rank 1 failed at step 3.")
        return part_step(*a, **k)

    def failing_setup(settings):
        if group.launched()[0] == 1:
            raise DataError("rank 1 cannot read the data.")
        return prepare_data(settings)

    if where == "step":
        data_parallel._part_step = failing_step
    else:
        trainer.prepare_data = failing_setup
    sys.exit(trainer.main(list(args)))


if __name__ == "__main__":
    {"fit": run_fit, "fail-on-rank-1": run_fail_on_rank_1}[sys.argv[1]](*sys.argv[2:])
