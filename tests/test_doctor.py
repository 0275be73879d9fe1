"""python -m minicnn.doctor: on this CPU-only machine (no GPU, CPU checks pass), a deliberate
mismatch (non-zero exit), and the GPU section run through fake_cupy (raw kernels skipped)."""
import json
import subprocess
import sys
from pathlib import Path

import fake_cupy
import numpy as np

from minicnn import backend, doctor, ops
from minicnn.bench import kernels as ladder

ROOT = Path(__file__).resolve().parent.parent


def test_doctor_on_this_machine_reports_no_gpu_and_passes_its_cpu_checks(tmp_path):
    if backend.gpu_available():
        import pytest
        pytest.skip("a GPU is here: the GPU run is checked by hand")
    report = tmp_path / "doctor.json"
    done = subprocess.run([sys.executable, "-m", "minicnn.doctor", "--json", str(report)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "GPU: none." in done.stdout
    data = json.loads(report.read_text())
    assert data["ok"] is True and data["gpu"]["present"] is False and data["gpu"]["why"]
    cpu = [c for c in data["checks"] if c["name"].startswith("cpu conv2d")]
    assert len(cpu) >= 3 and all(c["status"] == "ok" for c in cpu)
    assert any("training step" in t["what"] and t["where"] == "cpu" for t in data["timings"])
    assert data["seconds"] < 30


def test_a_mismatch_gives_a_nonzero_exit(tmp_path, monkeypatch):
    real = ops.conv2d_forward

    def off_by_a_little(*args):
        out, cache = real(*args)
        return out + 1e-6, cache
    monkeypatch.setattr(ops, "conv2d_forward", off_by_a_little)
    lines = []
    assert doctor.main(["--json", str(tmp_path / "d.json")], out=lines.append) == 1
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["ok"] is False
    assert any(c["status"].startswith("FAIL") for c in data["checks"])
    assert any(line.lstrip().startswith("FAIL") for line in lines)


def test_the_gpu_section_runs_on_fake_cupy_and_skips_the_raw_kernels(tmp_path, monkeypatch):
    monkeypatch.setattr(backend, "_cupy", fake_cupy.module)
    monkeypatch.setitem(ladder.FP32_PEAK_TFLOPS, "fake_cupy", 1.0)   # not a 4096^3 SGEMM on NumPy
    lines = []
    code = doctor.main(["--json", str(tmp_path / "d.json"), "--quick"], out=lines.append)
    text = "\n".join(lines)
    assert code == 0, text
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["gpu"]["present"] is True and "fake_cupy" in data["gpu"]["name"]
    assert data["gpu"]["libraries"] == {"NVRTC": "ok", "cuBLAS": "ok", "cuRAND": "ok"}
    names = {c["name"]: c["status"] for c in data["checks"]}
    generic = [n for n in names if n.startswith("gpu conv") and "cupy-generic" in n]
    assert generic and all(names[n] == "ok" for n in generic)
    assert names["gpu raw kernels"].startswith("skipped: the raw CUDA kernels do not run here")
    training = {n: s for n, s in names.items() if n.startswith("gpu training")}
    assert len(training) == 2
    assert [s.split(":")[0] for s in training.values()] == ["ok", "skipped"]
    assert "skipped" in text and any(t["impl"] == "fast" for t in data["timings"]
                                     if t["where"] == "gpu")


def test_a_broken_gpu_check_fails_the_doctor(tmp_path, monkeypatch):
    monkeypatch.setattr(backend, "_cupy", fake_cupy.module)
    monkeypatch.setitem(ladder.FP32_PEAK_TFLOPS, "fake_cupy", 1.0)   # not a 4096^3 SGEMM on NumPy
    real = ops.conv2d_backward

    def wrong_on_the_device(dout, cache, *rest):
        dx, dw, db = real(dout, cache, *rest)
        return (dx * 1.01 if backend.array_module(dx) is not np else dx), dw, db
    monkeypatch.setattr(ops, "conv2d_backward", wrong_on_the_device)
    assert doctor.main(["--json", str(tmp_path / "d.json"), "--quick"], out=lambda s: None) == 1
    failed = [c["name"] for c in json.loads((tmp_path / "d.json").read_text())["checks"]
              if c["status"].startswith("FAIL")]
    assert any(n.startswith("gpu conv backward") for n in failed)
    assert not any(n.startswith("cpu") for n in failed)
