"""Crash safety: SIGKILL at random moments then --resume gives bitwise the uninterrupted result;
a kill during a checkpoint write keeps the previous one; signals save and exit; corrupt inputs
(archives, images, checkpoints) end in one of the documented errors, never anything else."""
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import minicnn
from _data_helpers import binary_files, fake_cifar, make_folder, write_tar_gz
from minicnn.datasets import loading as datasets
from minicnn.training import predict
from minicnn.training.checkpoint import load_checkpoint
from minicnn.errors import CheckpointError, DataError
from minicnn.nn.serialization import atomic_write, read_archive, write_archive
from minicnn.nn.zoo import keras_tutorial

TRAIN = [sys.executable, "-m", "minicnn.train"]


def _run_args(folder, out):
    # 54 training images, batch 16: 4 steps an epoch, a checkpoint after every step
    return ["--data", str(folder), "--out", str(out), "--epochs", "3", "--batch-size", "16",
            "--val-split", "0.25", "--augment", "crop+flip+cutout", "--optimizer", "sgd",
            "--lr", "0.02", "--schedule", "cosine", "--checkpoint-every", "1"]


def _env(tmp_path):
    return dict(os.environ, MINICNN_DATA=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")


def _final_state(out):
    model, info, buffers = load_checkpoint(out / "last.npz")
    history = json.loads((out / "history.json").read_text())
    history.pop("seconds")
    arrays = {**{f"p:{k}": v for k, v in model.params.items()},
              **{f"s:{k}": v for k, v in model.state.items()},
              **{f"o:{n}:{b}": v for n, bufs in buffers.items() for b, v in bufs.items()}}
    return arrays, history


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "shapes")


USER_MODEL = """
import numpy as np
from minicnn import Sequential
from minicnn.nn import Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU


def small_net(num_classes, image_size, rng):
    h, w = image_size
    return Sequential([Conv2D(3, 6, 3, padding=1, rng=rng), ReLU(), MaxPool2D(2), Flatten(),
                       Dropout(0.3, rng=np.random.default_rng(rng.integers(2**31))),
                       Dense(6 * (h // 2) * (w // 2), num_classes, rng=rng)])
"""


@pytest.mark.parametrize("model", ["preset", "user's file"])
def test_sigkill_at_random_moments_then_resume_is_bitwise_exact(folder, tmp_path, model):
    """The keras-tutorial preset, and a model with Dropout from the user's file (--model
    file.py:function): killed and resumed, each ends as its uninterrupted run."""
    env = _env(tmp_path)
    extra = []
    if model == "user's file":
        (tmp_path / "my_models.py").write_text(USER_MODEL)
        extra = ["--model", f"{tmp_path / 'my_models.py'}:small_net"]
    reference = tmp_path / "reference"
    started = time.monotonic()
    subprocess.run(TRAIN + _run_args(folder, reference) + extra, env=env, check=True,
                   timeout=300, capture_output=True)
    whole_run = time.monotonic() - started          # kill times scale with this machine's speed
    out = tmp_path / "killed"
    rng = np.random.default_rng(1234)
    kills, deadline = 0, time.monotonic() + 240
    while True:
        assert time.monotonic() < deadline, "the killed run did not finish in time"
        args = (TRAIN + _run_args(folder, out) + extra
                + (["--resume"] if (out / "last.npz").exists() else []))
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kills < 4:
            time.sleep(rng.uniform(0.3, 0.9) * whole_run)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        _, err = proc.communicate(timeout=200)
        if (out / "last.npz").exists():              # whatever moment it died, the file loads
            minicnn.load(out / "last.npz")
        if proc.returncode == 0 and kills == 0:
            # It finished before the first kill: the timed reference run also built the data
            # cache, so it can be slower than a whole run now. Start again, waiting less.
            shutil.rmtree(out)
            whole_run /= 2
            continue
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err.decode()
    assert kills >= 1
    ref_arrays, ref_history = _final_state(reference)
    arrays, history = _final_state(out)
    assert history == ref_history
    assert arrays.keys() == ref_arrays.keys()
    for name, value in ref_arrays.items():
        np.testing.assert_array_equal(arrays[name], value, err_msg=name)


# The trainer, its worker process slowed down so that a signal finds it in the middle of a step
_SLOW_WORKER = """
import sys, time
from minicnn.parallel import workers
from minicnn.training import trainer as train
from minicnn.nn.losses import SoftmaxCrossEntropy

class SlowInWorker(SoftmaxCrossEntropy):
    def __call__(self, logits, labels):
        if workers.rank() == 1:
            time.sleep(0.3)
        return super().__call__(logits, labels)

train.SoftmaxCrossEntropy = SlowInWorker
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("to", ["trainer", "group"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_save_a_checkpoint_and_say_how_to_resume(folder, tmp_path, sig, to):
    """The signal sent to the trainer alone (kill PID), or to its whole process group, worker
    processes included (a terminal's Ctrl-C, `timeout`, kill -TERM -PGID, a batch system)."""
    out = tmp_path / "run"
    args = [sys.executable, "-c", _SLOW_WORKER] + _run_args(folder, out)[:-2] + ["--epochs", "200"]
    env = dict(_env(tmp_path), MINICNN_THREADS="2")      # a worker process beside the trainer
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "history.json").exists():           # wait until epoch 1 has ended
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    time.sleep(0.5)                                       # into epoch 2's steps, 0.3 s each
    if to == "group":
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    message = err.decode()
    assert proc.returncode == 128 + sig, message
    assert f"{signal.Signals(sig).name} received: saved" in message
    assert "python -m minicnn.train --resume" in message and "Traceback" not in message
    model, info, _ = load_checkpoint(out / "last.npz")
    assert info["epoch"] >= 1 and isinstance(model, minicnn.Sequential)
    deadline = time.monotonic() + 10
    while _group_alive(proc.pid):                         # the workers end with the trainer
        assert time.monotonic() < deadline, "a worker process outlived the trainer"
        time.sleep(0.05)


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


_WRITER = """
import sys, numpy as np
from minicnn.nn.serialization import write_archive
path, i = sys.argv[1], 0
print("ready", flush=True)
while True:                                   # rewrite a ~24 MB archive until killed
    i += 1
    write_archive(path, {"i": i}, {"a": np.full(6_000_000, i, dtype=np.float32)})
"""


def test_kill_during_checkpoint_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "ckpt.npz"
    rng = np.random.default_rng(0)
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE)
        proc.stdout.readline()
        time.sleep(rng.uniform(0.3, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if path.exists():
            header, arrays = read_archive(path)
            assert np.all(arrays["a"] == header["i"])      # complete, never a mix of two writes
    assert path.exists()


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    """A write that fails part-way (here: a full disk while the arrays go out) raises, removes
    its temporary file and leaves the previous checkpoint as it was."""
    path = tmp_path / "ckpt.npz"
    write_archive(path, {"i": 1}, {"a": np.ones(1000)})
    before = path.read_bytes()

    def fill_disk(f):
        f.write(b"PK\x03\x04 part of an archive")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, fill_disk)
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]


# ---- corrupt inputs end in the documented errors --------------------------------------------
def _mutate(blob, data):
    """Truncate, overwrite a span, or insert junk: what a bad disk or download does."""
    kind = data.draw(st.sampled_from(["truncate", "overwrite", "insert"]))
    at = data.draw(st.integers(0, max(len(blob) - 1, 0)))
    if kind == "truncate":
        return blob[:at]
    junk = data.draw(st.binary(min_size=1, max_size=64))
    if kind == "overwrite":
        return blob[:at] + junk + blob[at + len(junk):]
    return blob[:at] + junk + blob[at:]


FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.npz"
    keras_tutorial(rng=np.random.default_rng(0)).save(path)
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_corrupt_checkpoints_raise_checkpoint_error(good_checkpoint, tmp_path, data):
    path = tmp_path / "bad.npz"
    path.write_bytes(_mutate(good_checkpoint, data))
    try:
        minicnn.load(path)                 # a harmless change (e.g. zip padding) may still load
    except CheckpointError:
        pass


@pytest.fixture(scope="module")
def good_archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch")
    return write_tar_gz(root / "cifar.tar.gz", "cifar-10-batches-bin",
                        binary_files(fake_cifar(4))).read_bytes()


@FUZZ
@given(data=st.data())
def test_corrupt_archives_raise_data_error(good_archive, tmp_path, monkeypatch, data):
    monkeypatch.setenv("MINICNN_DATA", str(tmp_path / "cache"))
    path = tmp_path / f"bad-{data.draw(st.integers(0, 10**9))}.tar.gz"
    path.write_bytes(_mutate(good_archive, data))
    try:
        datasets.load_dataset(path)
    except DataError:
        pass


@FUZZ
@given(data=st.data())
def test_corrupt_images_are_skipped_or_raise_data_error(tmp_path, data):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(
        buf, format=data.draw(st.sampled_from(["PNG", "JPEG", "BMP"])))
    path = tmp_path / f"img-{data.draw(st.integers(0, 10**9))}"
    path.write_bytes(_mutate(buf.getvalue(), data))
    try:
        image = datasets.decode_image(path)
        assert image.shape == (3, 32, 32) and image.dtype == np.uint8
    except DataError:
        pass


# ---- the CLIs on bad files -------------------------------------------------------------------
def test_cli_reports_bad_checkpoints_in_one_sentence(tmp_path, capsys):
    keras_tutorial(rng=np.random.default_rng(0)).save(tmp_path / "model.npz")
    blob = (tmp_path / "model.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(blob[: len(blob) // 3])
    (tmp_path / "text.npz").write_text("hello")
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    cases = [
        (["--checkpoint", str(tmp_path / "truncated.npz"), str(image)], "truncated or corrupt"),
        (["--checkpoint", str(tmp_path / "text.npz"), str(image)], "not a minicnn file"),
        (["--checkpoint", str(tmp_path / "model.npz"), str(image)], "no class names"),
        (["--checkpoint", str(tmp_path / "none.npz"), str(image)], "does not exist"),
    ]
    for argv, message in cases:
        assert predict.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_resume_from_a_checkpoint_of_another_model_is_refused(folder, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    keras_tutorial(rng=np.random.default_rng(0)).save(out / "last.npz")    # a model, not a run
    from minicnn.training import trainer as train
    assert train.main(["--data", str(folder), "--out", str(out), "--resume"]) == 2
    assert "not a training checkpoint" in capsys.readouterr().err


def test_an_os_error_is_one_sentence_too(tmp_path, capsys, monkeypatch):
    """An unreadable folder (simulated: the tests may run as root) gives the system's reason."""
    from minicnn.training import trainer as train

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(datasets.os, "scandir", unreadable)
    folder = make_folder(tmp_path / "shapes", per_class=2)
    assert train.main(["--data", str(folder), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {folder}: Permission denied\n"


def test_a_failed_write_names_the_file_asked_for_not_its_temporary(tmp_path):
    target = tmp_path / "missing-dir" / "last.npz"
    with pytest.raises(OSError) as info:
        atomic_write(target, lambda f: f.write(b"x"))
    assert info.value.filename == str(target) and ".tmp" not in str(info.value)


def test_a_warning_is_one_line_on_the_command_line(capsys):
    import warnings
    from minicnn.training.cli import run

    def main(argv):
        warnings.warn("Skipped 2 unreadable files under x.")
        return 0
    assert run(main, []) == 0
    assert capsys.readouterr().err == "warning: Skipped 2 unreadable files under x.\n"
