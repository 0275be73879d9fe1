"""One run at a time per --out: the trainer locks the folder (a flock on --out/.minicnn.lock)
from before it reads anything there until it exits, so a second run, --force or not, is refused
in one line naming the first one's pid, and a run killed with SIGKILL is resumed at once. And the
command-line wrapper: bad input is one line and status 2, a bug in minicnn is its traceback, a
line that says so, and status 70."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import minicnn
from minicnn.errors import FolderInUseError, MinicnnError, UsageError
from minicnn.training import cli, predict
from minicnn.training import trainer as train
from minicnn.training.checkpoint import load_checkpoint

TRAIN = [sys.executable, "-m", "minicnn.train"]
BUG_LINE = (f"error: this is a bug in minicnn {minicnn.__version__}, not a problem with your "
            f"input: please report it with the traceback above and the command you ran.")


def _args(folder, out, *extra):
    # 54 training images, batch 16: 4 steps an epoch
    return ["--data", str(folder), "--out", str(out), "--epochs", "3", "--batch-size", "16",
            "--val-split", "0.25", *extra]


def _env(tmp_path, **more):
    return dict(os.environ, MINICNN_DATA=str(tmp_path / "cache"), PYTHONUNBUFFERED="1", **more)


def _start(args, env, log):
    """A training process, its stderr (progress bars and all) going to the file log."""
    with open(log, "wb") as err:
        return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=err)


def _wait_until(ready, proc, what, timeout=180):
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before {what}")
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def _holds_lock(out, pid):
    try:
        return json.loads((out / train.LOCK_FILE).read_text())["pid"] == pid
    except (OSError, ValueError):              # not there yet, or half written
        return False


def _files(out):
    return {path.name: path.read_bytes() for path in sorted(out.iterdir()) if path.is_file()}


# ---- two real processes on one --out ---------------------------------------------------------
@pytest.mark.parametrize("moment, second", [
    ("loading data", []),                          # before the first's settings.json
    ("after epoch 1", ["--force"]),                # --force: the first's files must stay
    ("after epoch 1", ["--resume"]),               # --resume: it must not read last.npz
])
def test_a_second_run_on_a_held_out_is_refused_and_the_first_finishes_intact(
        folder, tmp_path, moment, second):
    """The first run is frozen (SIGSTOP) at that moment while it holds --out, so the second
    one certainly meets it there; then it goes on and finishes as if alone."""
    out, env = tmp_path / "run", _env(tmp_path)
    log = tmp_path / "first.log"
    first = _start(TRAIN + _args(folder, out, "--lr", "0.002", "--seed", "7"), env, log)
    try:
        if moment == "loading data":
            _wait_until(lambda: _holds_lock(out, first.pid), first, "it took the lock")
        else:
            _wait_until(lambda: (out / "history.json").exists(), first, "epoch 1 ended")
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None and _holds_lock(out, first.pid)
        before = _files(out)
        second_run = subprocess.run(TRAIN + _args(folder, out, "--lr", "0.01", *second),
                                    env=env, capture_output=True, text=True, timeout=180)
        assert _files(out) == before               # the second run read and wrote nothing
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, log.read_text()
    assert second_run.returncode == 2, second_run.stderr
    err = second_run.stderr.splitlines()
    assert len(err) == 1 and "Traceback" not in second_run.stderr
    assert err[0].startswith(f"error: {out} is in use by another training run (pid {first.pid}, "
                             f"started ")
    assert err[0].endswith(": wait for it to end or stop it, or choose another --out.")
    assert ("--force does not take a folder from a running run" in err[0]) == (second == ["--force"])
    # the first run's files are its own and agree with each other
    settings = json.loads((out / "settings.json").read_text())["settings"]
    assert (settings["lr"], settings["seed"], settings["epochs"]) == (0.002, 7, 3)
    assert json.loads((out / "history.json").read_text())["epoch"] == [1, 2, 3]
    _, info, _ = load_checkpoint(out / "last.npz")
    assert info["epoch"] == 3 and info["settings"] == settings
    assert json.loads((out / "report.json").read_text())["checkpoint"] == str(out / "last.npz")
    assert not (out / train.LOCK_FILE).exists()          # removed when the run ended
    assert not [p for p in out.iterdir() if p.suffix == ".tmp"]


def test_a_run_killed_with_sigkill_mid_epoch_is_resumed_at_once(folder, tmp_path):
    """The lock file stays behind, the lock does not: the kernel releases a flock with its
    process (and the worker processes hold no copy of it)."""
    out, env = tmp_path / "run", _env(tmp_path, MINICNN_THREADS="2")
    args = TRAIN + _args(folder, out, "--checkpoint-every", "1")
    proc = _start(args, env, tmp_path / "killed.log")
    try:
        _wait_until(lambda: (out / "last.npz").exists(), proc, "its first checkpoint")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    _, info, _ = load_checkpoint(out / "last.npz")
    assert info["epoch"] < 3
    assert _holds_lock(out, proc.pid)                    # the dead run's lock file
    resumed = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "history.json").read_text())["epoch"] == [1, 2, 3]
    assert not (out / train.LOCK_FILE).exists()


_HOLD_THEN_DIE = """
import os, signal, sys, time
from minicnn.training import trainer
with trainer.hold_out(sys.argv[1]):
    worker = os.fork()                          # as the data-parallel workers are forked
    if worker == 0:
        time.sleep(120)
        os._exit(0)
    print(worker, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)        # the trainer dies; its worker lives on
"""


def test_a_forked_worker_does_not_keep_a_killed_runs_lock(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_THEN_DIE, str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    worker = int(proc.stdout.readline())       # (the worker keeps the pipe open: no EOF)
    try:
        assert proc.wait(timeout=60) == -signal.SIGKILL
        os.kill(worker, 0)                     # the worker is alive
        with train.hold_out(out):              # FolderInUseError if the worker held the lock
            assert _holds_lock(out, os.getpid())
    finally:
        os.kill(worker, signal.SIGKILL)
        proc.stdout.close()


# ---- fit in Python, a lock held here ---------------------------------------------------------
def _hold(out, holder):
    """Take out's lock on a file of our own (another open file: flock refuses it to fit as it
    would to another process), with holder written in it."""
    import fcntl
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / train.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, holder.encode())
    return fd


def test_fit_refuses_a_held_out_force_or_not_and_deletes_nothing(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(_args(folder, out, "--epochs", "1")) == 0
    before = _files(out)
    holder = '{"pid": 4242, "host": "elsewhere", "started": "2025-01-02 03:04:05"}\n'
    fd = _hold(out, holder)
    try:
        with pytest.raises(FolderInUseError) as refused:
            train.fit(data=str(folder), out=str(out), epochs=1, batch_size=16, val_split=0.25,
                      force=True)
        assert isinstance(refused.value, MinicnnError)
        assert str(refused.value) == (
            f"{out} is in use by another training run (pid 4242 on elsewhere, started "
            f"2025-01-02 03:04:05), and --force does not take a folder from a running run: "
            f"wait for it to end or stop it, or choose another --out.")
        capsys.readouterr()
        assert train.main(_args(folder, out, "--resume")) == 2
        assert capsys.readouterr().err.startswith(f"error: {out} is in use by another training "
                                                  f"run (pid 4242 on elsewhere")
        assert _files(out) == {**before, train.LOCK_FILE: holder.encode()}
        os.ftruncate(fd, 0)                    # a holder that never wrote its pid: no pid
        assert train.main(_args(folder, out, "--force")) == 2
        assert capsys.readouterr().err == (f"error: {out} is in use by another training run, "
                                           f"and --force does not take a folder from a running "
                                           f"run: wait for it to end or stop it, or choose "
                                           f"another --out.\n")
    finally:
        os.close(fd)
    assert train.main(_args(folder, out, "--epochs", "1", "--force")) == 0   # free again


def test_a_dead_runs_lock_file_is_not_a_run(folder, tmp_path):
    """A run killed before its first checkpoint leaves settings.json and its lock file: a new
    run starts there without --force."""
    out = tmp_path / "run"
    out.mkdir()
    (out / train.LOCK_FILE).write_text('{"pid": 999999, "host": "x", "started": "then"}\n')
    (out / "settings.json").write_text("{}")
    assert train.main(_args(folder, out, "--epochs", "1")) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(set(train.RUN_FILES) -
                                                           set(train.TRACE_FILES))


def test_a_failed_run_leaves_no_folder_it_made_and_no_lock(folder, tmp_path, capsys):
    new = tmp_path / "a" / "b"
    assert train.main(["--data", "/no/such/dir", "--out", str(new)]) == 2
    assert not (tmp_path / "a").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    assert train.main(["--data", "/no/such/dir", "--out", str(mine)]) == 2
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert train.main(["--data", str(folder), "--out", str(mine / "notes.txt")]) == 2
    assert capsys.readouterr().err.endswith(f"error: --out {mine / 'notes.txt'} is a file, not "
                                            f"a directory.\n")


# ---- the command-line wrapper: the user's errors, and bugs -----------------------------------
def test_a_bug_inside_the_trainer_is_a_traceback_and_a_bug_line(folder, tmp_path, monkeypatch,
                                                                 capsys):
    def broken(settings):
        return {}["x_train"]                               # KeyError, as a slip in minicnn
    monkeypatch.setattr(train, "prepare_data", broken)
    out = tmp_path / "run"
    assert train.main(_args(folder, out)) == cli.EXIT_BUG == 70
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "Traceback (most recent call last):"
    assert err[-2] == "KeyError: 'x_train'" and err[-1] == BUG_LINE
    monkeypatch.undo()                                     # the lock went with the failed run
    monkeypatch.setenv("MINICNN_DATA", str(tmp_path / "cache"))
    assert train.main(_args(folder, out, "--epochs", "1")) == 0


def test_a_numpy_value_error_in_predict_is_a_bug_not_a_sentence(folder, tmp_path, monkeypatch,
                                                                 capsys):
    out = tmp_path / "run"
    assert train.main(_args(folder, out, "--epochs", "1")) == 0
    import numpy as np
    monkeypatch.setattr(predict, "softmax", lambda logits: np.reshape(logits, (7, -1)))
    image = next(folder.rglob("*.png"))
    capsys.readouterr()
    assert predict.main(["--checkpoint", str(out / "last.npz"), str(image)]) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: cannot reshape" in err
    assert err.endswith(BUG_LINE + "\n")


@pytest.mark.parametrize("error, status, expected", [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/last.npz"), 2,
     "error: /runs/x/last.npz: No space left on device\n"),
    (PermissionError(errno.EACCES, "Permission denied", "/data"), 2,
     "error: /data: Permission denied\n"),
    (MemoryError("Unable to allocate 1.96 TiB for an array with shape (72, 3, 100000, 100000) "
                 "and data type uint8"), 2,
     "error: Out of memory (Unable to allocate 1.96 TiB for an array with shape (72, 3, 100000, "
     "100000) and data type uint8): ask for less (a smaller batch or image size), or free "
     "memory.\n"),
    (UsageError("--lr must be a positive number, got 0."), 2,
     "error: --lr must be a positive number, got 0.\n"),
    (OSError(errno.EIO, "Input/output error"), 70, None),           # names no file
    (ValueError("operands could not be broadcast together"), 70, None),
    (TypeError("unsupported operand"), 70, None),
])
def test_the_wrapper_says_which_errors_are_the_users(error, status, expected, capsys):
    def main(argv):
        raise error
    assert cli.run(main, []) == status
    err = capsys.readouterr().err
    if expected is None:
        assert "Traceback" in err and f"{type(error).__name__}: " in err
        assert err.endswith(BUG_LINE + "\n")
    else:
        assert err == expected


@pytest.mark.parametrize("settings, message", [
    (dict(epochs=0), "--epochs must be at least 1, got 0."),
    (dict(model="vgg"), "Unknown model 'vgg'"),
    (dict(colour=True), "Unknown setting(s): colour."),
    (dict(augment="spin=3"), "--augment: Cannot read 'spin=3'"),
    (dict(image_size="big"), "--image-size takes H or HxW"),
])
def test_bad_settings_raise_usage_error_which_is_a_value_error(settings, message, tmp_path):
    with pytest.raises(ValueError) as raised:
        train.fit(out=str(tmp_path / "run"), **settings)
    assert isinstance(raised.value, UsageError) and message in str(raised.value)
    assert not (tmp_path / "run").exists()


def test_an_image_size_the_model_cannot_take_is_one_sentence(folder, tmp_path, capsys):
    assert train.main(_args(folder, tmp_path / "run", "--image-size", "8")) == 2
    assert capsys.readouterr().err == ("error: --image-size 8: keras-tutorial needs larger "
                                       "images than 8x8.\n")


def test_the_bug_line_comes_from_a_real_process_too(folder, tmp_path):
    """python -m minicnn.train with a slip planted in it: status 70, the traceback on stderr."""
    script = textwrap.dedent("""
        import sys
        from minicnn.training import trainer
        trainer.parse_image_size = lambda text: {}["height"]
        sys.exit(trainer.main(sys.argv[1:]))
    """)
    proc = subprocess.run([sys.executable, "-c", script] + _args(folder, tmp_path / "run"),
                          env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 70
    assert "Traceback" in proc.stderr and "KeyError: 'height'" in proc.stderr
    assert proc.stderr.splitlines()[-1] == BUG_LINE


def test_a_reader_that_went_away_is_no_error(capsys, monkeypatch):
    """predict ... | head: the pipe closes under the tool; it exits 141 (SIGPIPE) quietly."""
    from minicnn.training import cli
    monkeypatch.setattr(cli, "_quiet_stdout", lambda: None)     # keep pytest's stdout

    def main(argv):
        raise BrokenPipeError(32, "Broken pipe")
    assert cli.run(main, []) == 141
    assert capsys.readouterr().err == ""
