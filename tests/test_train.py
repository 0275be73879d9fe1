"""The training tool end to end on tiny synthetic data: train, evaluate, predict, resume, errors."""
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import minicnn
from _data_helpers import SHAPES as CLASSES, make_folder, shape_image as _image
from minicnn.backend import gpu_available
from minicnn.parallel import data_parallel
from minicnn.training import evaluate
from minicnn.parallel import workers
from minicnn.training import predict
from minicnn.parallel import processes
from minicnn.training import trainer as train
from minicnn.training.checkpoint import load_checkpoint
from minicnn.nn.losses import SoftmaxCrossEntropy
from test_parallel import thread_workers

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-train-jpeg.tar.gz"


def _train_args(folder, out, *extra):
    return ["--data", str(folder), "--out", str(out), "--epochs", "2", "--batch-size", "16",
            "--val-split", "0.25", *extra]


def test_train_cli_writes_checkpoints_history_report_and_pictures(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(_train_args(folder, out, "--augment", "crop+flip")) == 0
    printed = capsys.readouterr().out
    assert train.TABLE_HEADER in printed and "top-1 accuracy" in printed
    for name in ("last.npz", "best.npz", "history.json", "history.csv", "settings.json",
                 "curves.png", "report.json", "confusion.png", "predictions.png"):
        assert (out / name).is_file(), name
    for name in ("curves.png", "confusion.png", "predictions.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((out / "history.json").read_text())
    assert history["epoch"] == [1, 2] and len(history["val_acc"]) == 2
    assert (out / "history.csv").read_text().splitlines()[0].startswith("epoch,train_loss")
    report = json.loads((out / "report.json").read_text())
    assert {"top1", "top5", "per_class", "confusion"} <= report.keys()
    assert set(report["per_class"]) == set(CLASSES)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["settings"]["batch_size"] == 16 and settings["code_version"]
    model = minicnn.load(out / "last.npz")
    assert isinstance(model, minicnn.Sequential)
    assert not list(out.glob("*.tmp"))


def test_training_learns_the_synthetic_classes(folder, tmp_path):
    result = train.fit(data=str(folder), out=str(tmp_path / "run"), epochs=6, batch_size=16,
                       val_split=0.25, lr=3e-3)
    assert result["status"] == "finished"
    assert result["history"]["val_acc"][-1] >= 0.9       # chance is 1/3


def test_early_stopping_ends_the_run_when_val_accuracy_stalls(folder, tmp_path, capsys):
    """A learning rate too small to change any prediction: epoch 2 does not beat epoch 1, so
    --early-stopping 1 ends the run there, and the run still writes its report."""
    out = tmp_path / "run"
    result = train.fit(data=str(folder), out=str(out), epochs=5, batch_size=16, val_split=0.25,
                       optimizer="sgd", lr=1e-12, early_stopping=1)
    assert result["status"] == "early-stopped"
    assert result["history"]["epoch"] == [1, 2]
    assert result["history"]["val_acc"][0] == result["history"]["val_acc"][1]
    assert "Early stopping: no val-accuracy gain for 1 epoch (" in capsys.readouterr().out
    assert (out / "report.json").is_file() and minicnn.load(out / "best.npz")


def test_plateau_schedule_cuts_the_lr_after_three_epochs_without_val_loss_gain(folder, tmp_path):
    """Val loss that cannot improve (a learning rate of 1e-9): epochs 2, 3 and 4 are bad, so
    the rate is cut x0.1 after epoch 4 and epoch 5 runs at 1e-10 (the history logs each
    epoch's rate)."""
    result = train.fit(data=str(folder), out=str(tmp_path / "run"), epochs=5, batch_size=16,
                       val_split=0.25, optimizer="sgd", lr=1e-9, schedule="plateau")
    np.testing.assert_allclose(result["history"]["lr"], [1e-9] * 4 + [1e-10], rtol=1e-6)


def test_evaluate_json_and_predict(folder, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(_train_args(folder, out))
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(out / "best.npz"), "--data", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"top1", "top5", "per_class", "confusion"} <= report.keys()
    assert report["num_samples"] == 72 and np.array(report["confusion"]).sum() == 72
    # a grayscale image of another size is converted and resized, and says so
    gray = tmp_path / "gray.png"
    Image.fromarray(_image("circle", np.random.default_rng(1), 48)[..., 0]).save(gray)
    assert predict.main(["--checkpoint", str(out / "best.npz"), "--top", "2", str(gray)]) == 0
    line = capsys.readouterr().out.strip()
    assert "converted L to RGB" in line and "resized 48x48 to 32x32" in line
    assert sum(name in line for name in CLASSES) == 2


def test_train_resume_evaluate_and_predict_with_the_cupy_backend(gpu_xp, folder, tmp_path,
                                                                  capsys):
    """--backend cupy end to end, on a GPU and on fake_cupy everywhere: training with every
    augmentation, a resume on the CPU and one back on the GPU, evaluate and predict. The
    checkpoints hold NumPy arrays, and the GPU's predictions are the CPU's."""
    out = tmp_path / "run"
    args = _train_args(folder, out, "--augment", "crop+flip+cutout", "--epochs", "1")
    assert train.main(args + ["--backend", "cupy"]) == 0
    assert train.main(["--resume", "--out", str(out), "--backend", "numpy", "--epochs", "2",
                       "--force"]) == 0
    assert train.main(["--resume", "--out", str(out), "--backend", "cupy", "--epochs", "3",
                       "--force"]) == 0
    assert json.loads((out / "history.json").read_text())["epoch"] == [1, 2, 3]
    model = minicnn.load(out / "last.npz")
    assert all(type(p) is np.ndarray for p in model.params.values())
    capsys.readouterr()
    reports = {}
    for backend in ("numpy", "cupy"):
        assert evaluate.main(["--checkpoint", str(out / "best.npz"), "--data", str(folder),
                              "--backend", backend, "--json"]) == 0
        reports[backend] = json.loads(capsys.readouterr().out)
    assert reports["cupy"]["num_samples"] == reports["numpy"]["num_samples"] == 72
    assert abs(reports["cupy"]["top1"] - reports["numpy"]["top1"]) <= 1 / 72   # float32 ties
    image = next(folder.rglob("*.png"))
    lines = {}
    for backend in ("numpy", "cupy"):
        assert predict.main(["--checkpoint", str(out / "best.npz"), "--backend", backend,
                             str(image)]) == 0
        lines[backend] = capsys.readouterr().out.split(":", 1)[1].split("|")[0].split()[0]
    assert lines["cupy"] == lines["numpy"]                     # the same most likely class


def test_implementation_raw_trains_through_the_raw_kernels(gpu_xp, folder, tmp_path, monkeypatch):
    """--implementation raw: every conv and max-pool of the run goes through the raw pairs
    (counted here; on fake_cupy, which runs no CUDA C, the counted pairs are minicnn.ops's)."""
    import types

    import fake_cupy
    from minicnn import implementation, ops
    from minicnn.cuda import kernels
    source = ops if gpu_xp is fake_cupy.module else kernels
    calls = []

    def counted(op, forward):
        def wrapped(*args, **kwargs):
            calls.append(op)
            return forward(*args, **kwargs)
        return wrapped
    raw = types.SimpleNamespace(**vars(implementation._RAW))
    for op in ("conv2d", "maxpool2d"):
        setattr(raw, f"{op}_forward", counted(op, getattr(source, f"{op}_forward")))
        setattr(raw, f"{op}_backward", getattr(source, f"{op}_backward"))
    monkeypatch.setattr(implementation, "_RAW", raw)
    out = tmp_path / "run"
    assert train.main(_train_args(folder, out, "--backend", "cupy", "--implementation", "raw",
                                  "--epochs", "1")) == 0
    assert calls.count("conv2d") >= 3 * 4 and calls.count("maxpool2d") >= 2 * 4   # 4 steps


def test_evaluate_rejects_unknown_class_folders(folder, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(_train_args(folder, out))
    other = make_folder(tmp_path / "other", per_class=2, classes=["circle", "zebra"])
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(out / "best.npz"), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "zebra" in err and "Traceback" not in err


@pytest.mark.parametrize("tool,argv", [(evaluate, ["--batch-size", "0"]),
                                       (predict, ["--top", "0", "image.png"])])
def test_counts_below_one_are_refused_before_any_work(tool, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--checkpoint", "model.npz"] + argv)
    assert exit_info.value.code == 2
    assert "must be at least 1, got 0" in capsys.readouterr().err.splitlines()[-1]


def test_resume_refuses_other_settings_unless_forced(folder, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(_train_args(folder, out, "--epochs", "1"))
    capsys.readouterr()
    assert train.main(_train_args(folder, out, "--resume", "--lr", "0.01")) == 2
    err = capsys.readouterr().err
    assert "--lr was 0.001, now 0.01" in err and "--epochs was 1, now 2" in err and "--force" in err
    assert train.main(_train_args(folder, out, "--resume", "--lr", "0.01", "--force")) == 0
    assert json.loads((out / "history.json").read_text())["epoch"] == [1, 2]


def _sigterm_after(calls, monkeypatch, module, name):
    """Wrap module.name so that its calls-th call sends this process SIGTERM."""
    original, count = getattr(module, name), {"n": 0}

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        count["n"] += 1
        if count["n"] == calls:
            os.kill(os.getpid(), signal.SIGTERM)
        return result
    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize("where", ["epoch end", "mid-epoch"])
def test_sigterm_saves_and_resume_continues_exactly(folder, tmp_path, monkeypatch, capsys, where):
    """A run stopped by SIGTERM and resumed ends bitwise equal to an uninterrupted run."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = dict(data=str(folder), batch_size=16, val_split=0.25, augment="crop+flip+cutout",
                  epochs=3, schedule="cosine", optimizer="sgd", lr=0.02, model="keras-tutorial")
    train.fit(out=str(whole), **common)
    if where == "epoch end":
        _sigterm_after(1, monkeypatch, train, "_end_of_epoch")
    else:
        _sigterm_after(5, monkeypatch, train.datasets, "augment")      # during epoch 2
    stopped = train.fit(out=str(split), **common)
    assert stopped["status"] == "interrupted"
    err = capsys.readouterr().err
    assert "SIGTERM received" in err and "--resume" in err
    monkeypatch.undo()
    train.fit(out=str(split), resume=True, **common)
    a, b = (minicnn.load(d / "last.npz") for d in (whole, split))
    for name, value in a.params.items():
        np.testing.assert_array_equal(value, b.params[name])
    ha, hb = (json.loads((d / "history.json").read_text()) for d in (whole, split))
    ha.pop("seconds"), hb.pop("seconds")
    assert ha == hb


def test_fit_runs_in_a_thread_other_than_the_main_one(folder, tmp_path):
    """(Python sets signal handlers in the main thread only: fit leaves them alone there.)"""
    result = {}
    thread = threading.Thread(target=lambda: result.update(train.fit(
        data=str(folder), out=str(tmp_path / "run"), epochs=1, batch_size=16, val_split=0.25)))
    thread.start()
    thread.join()
    assert result["status"] == "finished" and (tmp_path / "run" / "last.npz").is_file()


class _LossThatKillsWorker1(SoftmaxCrossEntropy):
    """SoftmaxCrossEntropy that ends worker process 1 (os._exit, as the OOM killer would) at
    its third step, in the middle of it; rank 0 and threads compute the loss as usual."""
    worker_steps = 0

    def __call__(self, logits, labels):
        if workers.rank() == 1 and os.getpid() != _TEST_PID:
            type(self).worker_steps += 1            # (the worker's copy of the class)
            if type(self).worker_steps == 3:
                os._exit(1)
        return super().__call__(logits, labels)


_TEST_PID = os.getpid()


@pytest.mark.skipif(not processes.AVAILABLE, reason="worker processes need fork")
def test_a_worker_lost_mid_step_stops_training_in_one_sentence_and_resume_goes_on(
        folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(data_parallel, "PROCESSES", True)
    monkeypatch.setattr(train, "SoftmaxCrossEntropy", _LossThatKillsWorker1)
    args = _train_args(folder, out, "--checkpoint-every", "1")
    try:
        with thread_workers(2):
            assert train.main(args) == 2
    finally:
        processes.close()
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert err == (f"error: A minicnn worker process stopped in the middle of a step (killed, or "
                   f"out of memory?). Training stopped in epoch 1; the last checkpoint, "
                   f"{out / 'last.npz'} (saved at epoch 1, step 2), is intact: continue from it "
                   f"with python -m minicnn.train --resume --out {out}")
    _, info, _ = load_checkpoint(out / "last.npz")
    assert (info["epoch"], info["step"]) == (0, 2)
    monkeypatch.undo()
    monkeypatch.setenv("MINICNN_DATA", str(tmp_path / "cache"))
    assert train.main(args + ["--resume"]) == 0
    assert json.loads((out / "history.json").read_text())["epoch"] == [1, 2]


@pytest.mark.parametrize("args,message", [
    (["--data", "/no/such/dir"], "Data path /no/such/dir does not exist."),
    (["--batch-size", "1000"], "larger than the training split"),
    (["--backend", "cupy"], "cupy backend needs"),
    (["--optimizer", "rmsprop"], "--optimizer must be sgd, adam or adamw"),
    (["--augment", "rotate"], "--augment: Cannot read 'rotate'"),
    (["--resume"], "no checkpoint to resume from"),
    (["--seed", "-5"], "--seed must be >= 0, got -5."),
    (["--val-split", "0"], "There is no data to validate on; give --val-split > 0."),
    (["--lr", "inf"], "--lr must be a positive number, got inf."),
    (["--weight-decay", "inf"], "--weight-decay must be a number >= 0, got inf."),
    (["--data", ""], "--data is empty"),
    (["--val-split", "0.01"], "--val-split 0.01 of 72 images leaves no class an image"),
    (["--implementation", "raw"], "--implementation raw needs --backend cupy"),
    (["--implementation", "generic", "--backend", "cupy"],
     "--implementation must be reference, fast or raw, got 'generic'."),
])
def test_bad_input_is_one_sentence_and_exit_2(folder, tmp_path, capsys, args, message):
    if args == ["--backend", "cupy"] and gpu_available():
        pytest.skip("CuPy and a GPU are here, so --backend cupy is good input "
                    "(test_train_resume_evaluate_and_predict_with_the_cupy_backend runs it)")
    assert train.main(_train_args(folder, tmp_path / "run", *args)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_nan_loss_stops_with_a_suggestion(folder, tmp_path, capsys):
    args = _train_args(folder, tmp_path / "run", "--optimizer", "sgd", "--lr", "1e12")
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "The loss became" in err and "before any checkpoint was written" in err
    assert "lower learning rate" in err
    # as it says: start again (no --force needed, there was no checkpoint to keep)
    assert train.main(_train_args(folder, tmp_path / "run", "--epochs", "1")) == 0


def test_cli_runs_as_a_module(folder, tmp_path):
    env = dict(os.environ, MINICNN_DATA=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "minicnn.train", "--data", "/no/such/dir"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: Data path /no/such/dir does not exist."


@pytest.mark.skipif(not SHARED.exists(), reason="the shared CIFAR-10 JPEG archive is absent")
def test_brief_training_on_a_slice_of_real_cifar10(tmp_path, monkeypatch):
    """2,000 real CIFAR-10 images (200 per class): a few epochs land far above chance (10%)."""
    monkeypatch.setenv("MINICNN_DATA", str(tmp_path / "cache"))
    root = tmp_path / "cifar-slice"
    with tarfile.open(SHARED) as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and int(Path(m.name).stem) < 200]
        tar.extractall(root, members=members, filter="data")
    folder = next(p.parent.parent for p in root.rglob("*.jpg"))
    result = train.fit(data=str(folder), out=str(tmp_path / "run"), epochs=4, batch_size=32,
                       val_split=0.2, seed=0)
    assert len(result["history"]["val_acc"]) == 4
    assert result["history"]["val_acc"][-1] > 0.3


# ---- resume, re-runs and divergence ----------------------------------------------------------
def test_a_twice_resumed_run_ends_as_the_uninterrupted_one(folder, tmp_path, monkeypatch):
    """Each resume writes the live optimiser state (lr, step count) into later checkpoints, not
    the state it read from the checkpoint it started from."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = dict(data=str(folder), batch_size=16, val_split=0.25, epochs=3, schedule="cosine",
                  optimizer="adam", lr=0.01)
    train.fit(out=str(whole), **common)
    for _ in range(2):                                # stop after epoch 1, then after epoch 2
        _sigterm_after(1, monkeypatch, train, "_end_of_epoch")
        assert train.fit(out=str(split), resume=(split / "last.npz").exists(),
                         **common)["status"] == "interrupted"
        monkeypatch.undo()
    train.fit(out=str(split), resume=True, **common)
    (a, info_a, _), (b, info_b, _) = (load_checkpoint(d / "last.npz") for d in (whole, split))
    assert info_b["optimizer"] == info_a["optimizer"] and info_b["optimizer"]["steps"] == 3 * 4
    for name, value in a.params.items():
        np.testing.assert_array_equal(value, b.params[name])


def test_resume_takes_the_runs_own_settings(folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _sigterm_after(1, monkeypatch, train, "_end_of_epoch")
    assert train.main(_train_args(folder, out, "--lr", "0.002", "--optimizer", "sgd")) == 143
    monkeypatch.undo()
    assert train.main(["--resume", "--out", str(out)]) == 0     # no --data, --lr, --batch-size
    settings = json.loads((out / "settings.json").read_text())["settings"]
    assert (settings["lr"], settings["batch_size"], settings["data"]) == (0.002, 16, str(folder))
    assert json.loads((out / "history.json").read_text())["epoch"] == [1, 2]


def test_resume_with_force_and_another_lr_goes_on_at_that_lr(folder, tmp_path):
    out = tmp_path / "run"
    assert train.main(_train_args(folder, out, "--epochs", "1", "--schedule", "none")) == 0
    assert train.main(["--out", str(out), "--resume", "--force", "--epochs", "2",
                       "--lr", "0.01"]) == 0
    assert json.loads((out / "history.json").read_text())["lr"] == [0.001, 0.01]


def test_resume_with_force_scales_the_schedule_by_the_new_lr(folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _sigterm_after(1, monkeypatch, train, "_end_of_epoch")
    train.main(_train_args(folder, out, "--epochs", "3", "--schedule", "cosine"))
    monkeypatch.undo()
    assert train.main(["--out", str(out), "--resume", "--force", "--lr", "0.01"]) == 0
    lrs = json.loads((out / "history.json").read_text())["lr"]
    assert lrs[0] == 0.001 and lrs[1:] == pytest.approx([0.01 * 0.75, 0.01 * 0.25])


def test_resume_refuses_another_model_or_other_classes(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(_train_args(folder, out, "--epochs", "1")) == 0
    capsys.readouterr()
    assert train.main(["--out", str(out), "--resume", "--force", "--model", "resnet-small"]) == 2
    assert "holds a keras-tutorial run, not resnet-small" in capsys.readouterr().err
    other = make_folder(tmp_path / "other", classes=CLASSES[:2])
    assert train.main(["--out", str(out), "--resume", "--force", "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert "was trained on 3 classes" in err and f"has 2 classes ({', '.join(CLASSES[:2])})" in err


def test_a_new_run_refuses_an_out_that_holds_a_run_unless_forced(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(_train_args(folder, out, "--epochs", "1")) == 0
    first = (out / "last.npz").read_bytes()
    capsys.readouterr()
    assert train.main(_train_args(folder, out, "--epochs", "1", "--lr", "0.01")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "last.npz").read_bytes() == first
    # the user's own .tmp files stay; a killed write's temporary file goes
    for name in ("notes.tmp", "a.b.tmp", "history.json.0123abcd.tmp"):
        (out / name).write_text("x")
    assert train.main(_train_args(folder, out, "--epochs", "1", "--lr", "0.01", "--force")) == 0
    assert (out / "notes.tmp").exists() and (out / "a.b.tmp").exists()
    assert not (out / "history.json.0123abcd.tmp").exists()
    assert json.loads((out / "history.json").read_text())["lr"] == [0.01]


def test_resuming_a_finished_run_rewrites_its_history(folder, tmp_path):
    """A run killed after its last checkpoint but before history.json was rewritten."""
    out = tmp_path / "run"
    assert train.main(_train_args(folder, out)) == 0
    history = json.loads((out / "history.json").read_text())
    (out / "history.json").write_text(json.dumps({k: v[:1] for k, v in history.items()}))
    assert train.main(["--out", str(out), "--resume"]) == 0
    assert json.loads((out / "history.json").read_text()) == history
    assert len((out / "history.csv").read_text().splitlines()) == 3


def test_divergence_names_the_checkpoint_to_go_on_from(folder, tmp_path, capsys):
    args = _train_args(folder, tmp_path / "run", "--optimizer", "sgd", "--lr", "1e4",
                       "--checkpoint-every", "1")
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "The loss became" in err and "The last checkpoint" in err and err.count("\n") == 1
    assert "still gives a finite loss" in err or "diverges on this batch too" in err


def test_predict_and_evaluate_refuse_a_checkpoint_whose_outputs_are_not_finite(folder, tmp_path,
                                                                              capsys):
    from minicnn.nn.serialization import read_archive, write_archive
    out = tmp_path / "run"
    assert train.main(_train_args(folder, out, "--epochs", "1")) == 0
    header, arrays = read_archive(out / "last.npz")
    first = next(k for k in arrays if k.endswith("weight"))
    arrays[first] = np.full_like(arrays[first], np.inf)
    write_archive(out / "broken.npz", header, arrays)
    image = tmp_path / "a.png"
    Image.fromarray(_image(CLASSES[0], np.random.default_rng(0))).save(image)
    capsys.readouterr()
    assert predict.main(["--checkpoint", str(out / "broken.npz"), str(image)]) == 2
    assert "gives non-finite outputs" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(out / "broken.npz"), "--data", str(folder)]) == 2
    assert "gives non-finite outputs" in capsys.readouterr().err


def test_predict_says_which_image_is_missing_or_too_large(folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert train.main(_train_args(folder, out, "--epochs", "1")) == 0
    capsys.readouterr()
    checkpoint = ["--checkpoint", str(out / "last.npz")]
    assert predict.main(checkpoint + [str(tmp_path / "nope.png")]) == 2
    assert f"Image {tmp_path / 'nope.png'} does not exist." in capsys.readouterr().err
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)     # Pillow warns above, errors at 2x
    for side in (12, 40):
        Image.new("RGB", (side, side)).save(tmp_path / f"{side}.png")
        assert predict.main(checkpoint + [str(tmp_path / f"{side}.png")]) == 2
        err = capsys.readouterr().err
        assert "has more than 100 pixels" in err and err.count("\n") == 1


def test_predict_runs_long_lists_in_batches(folder, tmp_path):
    out = tmp_path / "run"
    assert train.main(_train_args(folder, out, "--epochs", "1")) == 0
    paths = sorted(str(p) for p in folder.rglob("*.png"))[:7]
    whole = predict.predict(out / "last.npz", paths)
    batched = predict.predict(out / "last.npz", paths, batch_size=3)
    assert [r[0] for r in batched] == paths
    for (_, _, a), (_, _, b) in zip(whole, batched):
        assert [name for name, _ in a] == [name for name, _ in b]
        np.testing.assert_allclose([p for _, p in a], [p for _, p in b], rtol=1e-5)


def test_implementation_reference_trains_with_the_textbook_maths(folder, tmp_path, capsys,
                                                                monkeypatch):
    """--implementation reference: the layers call minicnn.reference (counted here), the header
    says so, the run's settings record it, and the setting is undone when fit returns."""
    from minicnn import implementation, reference
    calls = []
    real = reference.conv2d_forward

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(reference, "conv2d_forward", counted)
    out = tmp_path / "run"
    assert train.main(_train_args(folder, out, "--implementation", "reference",
                                  "--epochs", "1")) == 0
    assert len(calls) >= 3 * 4                        # 3 convs, 4 steps (and the evaluation)
    assert "(reference maths: slow)" in capsys.readouterr().out
    settings = json.loads((out / "settings.json").read_text())["settings"]
    assert settings["implementation"] == "reference"
    assert implementation.active() == "fast"


def test_augment_takes_image_data_generator_transforms(folder, tmp_path, monkeypatch):
    """--augment crop+rotation=20+zoom=0.1+hflip: each batch is warped by per-image random
    transforms (counted here), and a resumed run draws the same ones (the run's generator)."""
    from minicnn import augment
    warped = []
    real = augment.apply_transforms

    def counted(x, params, *args):
        warped.append(len(params))
        assert all(-20 <= p["theta"] <= 20 and 0.9 <= p["zx"] <= 1.1 for p in params)
        return real(x, params, *args)
    monkeypatch.setattr(augment, "apply_transforms", counted)
    out = tmp_path / "run"
    assert train.main(_train_args(folder, out, "--augment", "crop+rotation=20+zoom=0.1+hflip",
                                  "--epochs", "1")) == 0
    assert len(warped) == 4 and sum(warped) == 54              # 4 batches of 16, 16, 16, 6


@pytest.mark.parametrize("spec, message", [("spin=3", "spin"), ("rotation=x", "rotation")])
def test_a_bad_augment_spec_is_one_sentence(folder, tmp_path, capsys, spec, message):
    assert train.main(_train_args(folder, tmp_path / "run", "--augment", spec)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --augment") and message in err[0]


def test_the_dropout_net_trains_on_bigger_folder_images_and_predict_resizes(tmp_path, capsys,
                                                                           monkeypatch):
    """--model keras-dropout --image-size 48x40: the folder's images are resized to 48x40, the
    net's Dense layer is sized for them, the checkpoint keeps the size, and predict resizes a
    32x32 image to it."""
    monkeypatch.setenv("MINICNN_DATA", str(tmp_path / "cache"))
    folder = make_folder(tmp_path / "shapes", per_class=8)
    out = tmp_path / "run"
    assert train.main(["--data", str(folder), "--out", str(out), "--model", "keras-dropout",
                       "--image-size", "48x40", "--epochs", "1", "--batch-size", "8",
                       "--val-split", "0.25"]) == 0
    model = minicnn.load(out / "last.npz")
    assert model.forward(np.zeros((1, 3, 48, 40), np.float32)).shape == (1, 3)
    capsys.readouterr()
    image = next(folder.rglob("*.png"))
    assert predict.main(["--checkpoint", str(out / "last.npz"), str(image)]) == 0
    assert image.name in capsys.readouterr().out
    assert train.main(["--data", str(folder), "--out", str(tmp_path / "bad"),
                       "--image-size", "48y40"]) == 2
    assert "--image-size takes H or HxW" in capsys.readouterr().err


USER_MODEL = '''
import numpy as np
from minicnn import Sequential
from minicnn.nn import Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU


def small_net(num_classes, image_size, rng):
    h, w = image_size
    return Sequential([Conv2D(3, 6, 3, padding=1, rng=rng), ReLU(), MaxPool2D(2),
                       Flatten(), Dropout(0.3, rng=np.random.default_rng(rng.integers(2**31))),
                       Dense(6 * (h // 2) * (w // 2), num_classes, rng=rng)])


def not_a_model():
    return "a string"
'''


def test_a_model_from_the_users_file_trains_and_resumes_bitwise_equal(folder, tmp_path,
                                                                      monkeypatch, capsys):
    """--model file.py:function: the user's Sequential (with Dropout) trains; a run stopped by
    SIGTERM mid-epoch and resumed (without the file: the checkpoint holds the architecture)
    ends bitwise equal to an uninterrupted one."""
    source = tmp_path / "my_models.py"
    source.write_text(USER_MODEL)
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = dict(data=str(folder), batch_size=16, val_split=0.25, epochs=2,
                  model=f"{source}:small_net")
    assert train.fit(out=str(whole), **common)["status"] == "finished"
    _sigterm_after(6, monkeypatch, train.datasets, "augment")          # in epoch 2
    assert train.fit(out=str(split), **common)["status"] == "interrupted"
    monkeypatch.undo()
    source.unlink()                                    # resume needs only the checkpoint
    train.fit(out=str(split), resume=True, **common)
    a, b = (minicnn.load(d / "last.npz") for d in (whole, split))
    assert any(type(layer).__name__ == "Dropout" for layer in a)
    for name, value in a.params.items():
        np.testing.assert_array_equal(value, b.params[name])
    capsys.readouterr()
    source.write_text(USER_MODEL)
    for spec, message in [(f"{source}:not_a_model", "returned str, not a model"),
                          (f"{source}:missing", "has no function missing"),
                          (f"{tmp_path / 'nope.py'}:small_net", "there is no file")]:
        assert train.main(_train_args(folder, tmp_path / "bad", "--model", spec)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
