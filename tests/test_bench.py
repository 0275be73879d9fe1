"""python -m minicnn.bench: its PyTorch twins compute what minicnn computes, and its report holds
every row it promises, with and without torch."""
import json

import numpy as np
import pytest

from minicnn.bench import models as bench
from minicnn.nn import zoo
from minicnn.nn import Conv2D, walk


def test_report_without_torch_has_rows_and_a_note(capsys):
    result = bench.run(models=["keras-tutorial"], batch=2, repeats=1, use_torch=False)
    convs = [r for r in result["layers"] if r["layer"].startswith("Conv2D")]
    assert len(convs) == 3 + len(bench.LADDER)          # the preset's three convs + the ladder
    assert all(r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["gflops"] > 0 for r in convs)
    assert all(r["gemm_ms"] > 0 and r["pct_gemm"] > 0 for r in convs)
    assert all(r["pct_gemm"] is None for r in result["layers"] if r not in convs)
    assert all("ratio" not in r and r["check"] == "-" for r in result["layers"])
    [model] = result["models"]
    assert model["model"] == "keras-tutorial" and model["params"] == 122570
    assert model["train_img_s"] > 0 and "train_ratio" not in model
    assert model["gemm_train_img_s"] > 0 and model["gemm_eval_img_s"] > 0
    bench.print_report(result)
    out = capsys.readouterr().out
    assert "PyTorch is not installed" in out and "keras-tutorial" in out and "%gemm" in out
    assert "bound" in out and "gemms" in out


def test_json_output_parses(capsys):
    assert bench.main(["--json", "--quick", "--no-layers", "--no-torch",
                       "--models", "keras-tutorial"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["batch"] == 16 and result["layers"] == []
    assert result["machine"]["threads"] >= 1 and result["sgemm_gflops"] > 0


def test_percent_of_peak_uses_the_better_of_the_two_sgemm_measurements(monkeypatch):
    """The SGEMM peak is measured before the layers and again after them; the higher one is
    reported and every layer's % of peak is taken against it."""
    measured = iter([50.0, 200.0])
    monkeypatch.setattr(bench, "sgemm_peak", lambda repeats: next(measured))
    result = bench.run(models=["keras-tutorial"], batch=2, repeats=1, use_torch=False)
    assert result["sgemm_gflops"] == 200.0
    convs = [r for r in result["layers"] if r["gflops"]]
    assert convs and all(r["pct_peak"] == pytest.approx(r["gflops"] / 2) for r in convs)
    assert all(r["pct_peak"] is None for r in result["layers"] if not r["gflops"])


def test_percent_of_gemm_is_the_bare_gemms_time_over_the_layers(monkeypatch):
    """%gemm: the layer's three GEMMs alone, on the whole batch's rows, against the layer's
    forward + backward."""
    times = {"fwd": 0.010, "bwd": 0.030, "gemms": 0.005}
    monkeypatch.setattr(bench, "median_times", lambda fns, repeats: {n: times[n] for n in fns})
    conv = Conv2D(4, 8, 3, rng=np.random.default_rng(0))
    row = bench.bench_layer("conv", conv, (6, 4, 9, 9), 1, None, 1)
    assert row["gemm_ms"] == pytest.approx(5.0)
    assert row["pct_gemm"] == pytest.approx(100 * 0.005 / 0.040)


def _spy_matmul(monkeypatch):
    """The bare GEMMs' matmul calls (those into an out array), in order: one worker
    (parallel.map runs the parts one after another)."""
    monkeypatch.setattr(bench.workers, "_threads", 1)
    calls = []
    real = np.matmul
    monkeypatch.setattr(bench.np, "matmul", lambda a, b, out=None: (
        out is not None and calls.append((a.shape, b.shape, out.shape))) or real(a, b, out=out))
    return calls


def test_conv_gemms_run_the_layers_three_gemm_shapes(monkeypatch):
    """One GEMM per image where K and F are at most PER_IMAGE_GEMM_MAX_SIZE, as the engine."""
    calls = _spy_matmul(monkeypatch)
    small = Conv2D(4, 8, 3, rng=np.random.default_rng(0))     # K = 36, F = 8; 7x7 out of 9x9
    bench.conv_gemms(small, 5, (8, 7, 7), np.random.default_rng(1))()
    assert calls == [((5, 49, 36), (36, 8), (5, 49, 8)), ((5, 8, 49), (5, 49, 36), (5, 8, 36)),
                     ((5, 49, 8), (8, 36), (5, 49, 36))]
    calls.clear()
    big = Conv2D(8, 16, 3, rng=np.random.default_rng(0))      # K = 72: one GEMM for all rows
    bench.conv_gemms(big, 5, (16, 7, 7), np.random.default_rng(1))()
    m = 5 * 49
    assert calls == [((1, m, 72), (72, 16), (1, m, 16)), ((1, 16, m), (1, m, 72), (1, 16, 72)),
                     ((1, m, 16), (16, 72), (1, m, 72))]


def test_bare_gemms_run_a_batch_bigger_than_the_budget_in_chunks(monkeypatch):
    """Every one of the M rows goes through each pass, each part's images in chunks of at most
    GEMM_REFERENCE_BYTES / parts."""
    calls = _spy_matmul(monkeypatch)
    monkeypatch.setattr(bench, "GEMM_REFERENCE_BYTES", 100 * 72 * 4)    # 100 rows of K = 72
    bench.bare_gemms([(245, 1, 72, 8, ("fwd", "dx")), (7, 1, 80, 3, ("dw",))],
                     np.random.default_rng(0))()
    assert calls == [((1, 100, 72), (72, 8), (1, 100, 8)), ((1, 100, 8), (8, 72), (1, 100, 72))
                     ] * 2 + [((1, 45, 72), (72, 8), (1, 45, 8)),
                              ((1, 45, 8), (8, 72), (1, 45, 72)),
                              ((1, 3, 7), (1, 7, 80), (1, 3, 80))]
    calls.clear()                               # two parts: rows 0:122 and 122:245, 50 at once
    bench.bare_gemms([(245, 1, 72, 8, ("fwd",))], np.random.default_rng(0), parts=2)()
    assert [c[0][1] for c in calls] == [50, 50, 22, 50, 50, 23]
    calls.clear()                               # 10 images, 3 at once (per image: K, F <= 64)
    monkeypatch.setattr(bench, "GEMM_REFERENCE_BYTES", 3 * 49 * 36 * 4)
    bench.bare_gemms([(10, 49, 36, 8, ("fwd",))], np.random.default_rng(0))()
    assert [c[2] for c in calls] == [(3, 49, 8)] * 3 + [(1, 49, 8)]


def test_model_gemms_are_the_shapes_the_layers_really_get(monkeypatch):
    """keras-tutorial's forward reads only 30x30 of a 32x32 image (needed_input), so its convs
    give 28x28, 12x12 and 4x4; training skips the first conv's dx; inference runs forwards only;
    the layers' own forward is back in place afterwards."""
    model = zoo.build_model("keras-tutorial", rng=np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32), dtype=np.float32)
    calls = _spy_matmul(monkeypatch)
    train, infer = bench.model_gemms(model, x, np.random.default_rng(2))
    calls.clear()                                  # the forward that recorded the shapes
    infer()
    assert calls == [((3, 28 * 28, 27), (27, 32), (3, 28 * 28, 32)),      # one an image
                     ((1, 3 * 12 * 12, 288), (288, 64), (1, 3 * 12 * 12, 64)),
                     ((1, 3 * 4 * 4, 576), (576, 64), (1, 3 * 4 * 4, 64)),
                     ((1, 3, 1024), (1024, 64), (1, 3, 64)), ((1, 3, 64), (64, 10), (1, 3, 10))]
    calls.clear()
    train()
    assert [c[2] for c in calls[:2]] == [(3, 28 * 28, 32), (3, 32, 27)]     # no dx
    assert [c[2] for c in calls[2:5]] == [(1, 3 * 144, 64), (1, 64, 288), (1, 3 * 144, 288)]
    assert len(calls) == 2 + 3 * 4
    assert all("forward" not in vars(layer) for layer in walk(model))


def test_model_rows_have_the_gemm_rate_and_the_bound(monkeypatch):
    """x torch and bound against PyTorch's faster layout: channels_last for training here,
    NCHW for inference; both layouts' images/s in the row."""
    times = {"train": 0.040, "eval": 0.010, "gemms_train": 0.020, "gemms_eval": 0.004,
             "torch_train": 0.060, "torch_eval": 0.012, "torch_cl_train": 0.048,
             "torch_cl_eval": 0.015, "fwd": 0.008, "fwd+bwd": 0.030}
    monkeypatch.setattr(bench, "median_times", lambda fns, *a: {n: times[n] for n in fns})
    row = bench.bench_model("resnet-small", None, 4, 1)
    assert row["gemm_train_img_s"] == pytest.approx(4 / 0.020)
    assert row["gemm_eval_img_s"] == pytest.approx(4 / 0.004)
    assert "train_bound" not in row and "torch_cl_train_img_s" not in row
    torch = pytest.importorskip("torch")
    row = bench.bench_model("resnet-small", torch, 4, 1)
    assert row["torch_train_img_s"] == pytest.approx(4 / 0.060)
    assert row["torch_cl_train_img_s"] == pytest.approx(4 / 0.048)
    assert row["torch_eval_img_s"] == pytest.approx(4 / 0.012)
    assert row["torch_cl_eval_img_s"] == pytest.approx(4 / 0.015)
    assert row["torch_train_best"] == "channels_last" and row["torch_eval_best"] == "nchw"
    assert row["train_ratio"] == pytest.approx(1.2) and row["train_bound"] == pytest.approx(2.4)
    assert row["eval_ratio"] == pytest.approx(1.2) and row["eval_bound"] == pytest.approx(3.0)


def test_layer_rows_time_both_torch_layouts_and_compare_with_the_faster(monkeypatch):
    torch = pytest.importorskip("torch")
    times = {"fwd": 0.010, "bwd": 0.030, "gemms": 0.005, "torch_fwd": 0.030, "torch_bwd": 0.050,
             "torch_cl_fwd": 0.020, "torch_cl_bwd": 0.040}
    monkeypatch.setattr(bench, "median_times", lambda fns, repeats: {n: times[n] for n in fns})
    conv = Conv2D(4, 8, 3, rng=np.random.default_rng(0))
    row = bench.bench_layer("conv", conv, (6, 4, 9, 9), 1, torch, 1)
    assert row["torch_fwd_ms"] == pytest.approx(30) and row["torch_bwd_ms"] == pytest.approx(50)
    assert row["torch_cl_fwd_ms"] == pytest.approx(20)
    assert row["torch_cl_bwd_ms"] == pytest.approx(40)
    assert row["torch_best"] == "channels_last" and row["ratio"] == pytest.approx(0.060 / 0.040)
    assert row["check"] == "ok"


def test_the_channels_last_twins_run_in_channels_last(monkeypatch):
    """What the t-cl columns time: a module whose conv weights and input are channels_last
    (NHWC in memory), next to the NCHW one; each checked against minicnn."""
    torch = pytest.importorskip("torch")
    layouts = []
    real_twin = bench.torch_twin

    def recording_twin(layer, torch_):
        module = real_twin(layer, torch_)

        def record(mod, args):
            x = args[0]
            nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            convs = [m for m in mod.modules() if isinstance(m, torch.nn.Conv2d)]
            assert all(c.weight.is_contiguous(memory_format=torch.channels_last) == nhwc
                       for c in convs)
            layouts.append("channels_last" if nhwc else "nchw")
        module.register_forward_pre_hook(record)
        return module

    monkeypatch.setattr(bench, "torch_twin", recording_twin)
    row = bench.bench_layer("conv", Conv2D(4, 8, 3, rng=np.random.default_rng(0)),
                            (2, 4, 9, 9), 1, torch, 1)
    assert row["check"] == "ok" and set(layouts) == {"nchw", "channels_last"}
    layouts.clear()
    row = bench.bench_model("keras-tutorial", torch, 2, 1)
    assert row["check"] == "ok" and set(layouts) == {"nchw", "channels_last"}


def test_sgemm_peak_is_the_best_run(monkeypatch):
    ticks = iter([0.0, 4.0, 10.0, 11.0, 20.0, 22.0])     # three runs: 4 s, 1 s, 2 s
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks))
    assert bench.sgemm_peak(3, size=8) == pytest.approx(2 * 8 ** 3 / 1.0 / 1e9)


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_torch_twin_of_every_preset_matches(name):
    torch = pytest.importorskip("torch")
    model = zoo.build_model(name, rng=np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32), dtype=np.float32)
    twin = bench.torch_twin(model, torch).eval()
    with torch.no_grad():
        expected = twin(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.forward(x), expected, rtol=1e-4, atol=1e-4)
    assert bench._check(model.forward(x), expected) == "ok"
    assert bench._check(model.forward(x) + 1, expected).startswith("FAIL")


def test_layer_and_model_rows_with_torch(capsys):
    pytest.importorskip("torch")
    result = bench.run(models=["keras-tutorial"], batch=2, repeats=1)
    assert result["machine"]["torch"] is not None
    assert result["layers"] and all(r["check"] == "ok" and r["ratio"] > 0 for r in result["layers"])
    assert all(r["torch_cl_fwd_ms"] > 0 and r["torch_fwd_ms"] > 0 for r in result["layers"])
    [model] = result["models"]
    assert model["check"] == "ok" and model["train_ratio"] > 0 and model["eval_ratio"] > 0
    assert model["torch_cl_train_img_s"] > 0 and model["torch_eval_img_s"] > 0
    best = {"nchw": "torch_", "channels_last": "torch_cl_"}[model["torch_train_best"]]
    assert model[best + "train_img_s"] == max(model["torch_train_img_s"],
                                              model["torch_cl_train_img_s"])
    bench.print_report(result)
    out = capsys.readouterr().out
    assert "t-cl ms" in out and "channels_last" in out and "the faster" in out


def test_conv_workspace_budget_chunks_without_changing_results(monkeypatch):
    """The engine work the bench times: a conv whose im2col matrix exceeds the workspace budget
    runs chunk by chunk (and rebuilds chunks in backward) with the same results and a correct
    gradient in float64."""
    import minicnn
    from minicnn.nn import Conv2D
    from minicnn.ops import conv
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 6, 7))
    dy = rng.standard_normal((5, 4, 3, 4))
    results = []
    for budget in (conv.CONV_WORKSPACE_BYTES, 2 * 3 * 4 * 27 * 8):   # whole batch; 2 images a chunk
        monkeypatch.setattr(conv, "CONV_WORKSPACE_BYTES", budget)
        layer = Conv2D(3, 4, 3, stride=2, padding=1, dtype=np.float64, rng=np.random.default_rng(1))
        y = layer.forward(x, training=True)
        results.append((y, layer.backward(dy), layer.grads["weight"].copy(), layer.grads["bias"].copy()))
    assert conv._images_per_chunk(5, 3 * 4, 27, 8, np) == 2
    gpu_like = object()                                  # any array module but NumPy's
    assert conv._images_per_chunk(512, 1024, 577, 4, gpu_like) == 2**30 // (1024 * 577 * 4)
    for whole, chunked in zip(*results):
        np.testing.assert_allclose(chunked, whole, rtol=1e-12, atol=1e-12)
    errors = minicnn.gradcheck(layer, x[:3], seed=0)
    assert errors and all(e < 1e-6 for e in errors.values()), errors


def test_backend_option_errors_are_one_sentence(capsys, monkeypatch):
    assert bench.main(["--quick", "--backend", "numpy,tpu"]) == 2
    assert "Unknown backend 'tpu'" in capsys.readouterr().err
    from minicnn.errors import BackendError

    def no_gpu(name):
        raise BackendError("The cupy backend needs an NVIDIA GPU, and none was found.")
    monkeypatch.setattr(bench.bench_gpu, "get_backend", no_gpu)
    assert bench.main(["--quick", "--no-layers", "--backend", "numpy,cupy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs an NVIDIA GPU" in err


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--repeats", "-2"], ["--batch", "x"],
                                  ["kernels", "--batches", "0"]])
def test_counts_below_one_are_refused_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "must be at least 1" in err[-1] or "expected a whole number" in err[-1]


def test_gpu_columns(gpu_xp, capsys, monkeypatch):
    """Every layer and model row gets checked GPU columns, the model rows with the raw kernels
    too, and the table prints: on a GPU, and on fake_cupy everywhere (its SGEMM-measured peak
    replaced by a stated one, to save the time)."""
    import fake_cupy
    from minicnn.bench import kernels as bench_kernels
    from minicnn import implementation, ops
    monkeypatch.setitem(bench_kernels.FP32_PEAK_TFLOPS, "fake_cupy", 0.1)
    if gpu_xp is fake_cupy.module:       # it runs no CUDA C: "raw" hands out minicnn.ops here
        monkeypatch.setattr(implementation, "_RAW", ops)
    result = bench.run(models=["keras-tutorial"], batch=4, repeats=1, use_torch=False,
                       backends=("numpy", "cupy"))
    assert result["gpu"]["peak_tflops"] > 0
    assert all(r["gpu_check"] == "ok" and r["gpu_fwd_ms"] > 0 for r in result["layers"])
    convs = [r for r in result["layers"] if r["layer"].startswith("Conv2D")]
    assert convs and all(r["gpu_pct_peak"] > 0 for r in convs)
    [model] = result["models"]
    assert model["gpu_check"] == "ok" and model["gpu_train_img_s"] > 0
    assert model["gpu_raw_check"] == "ok" and model["gpu_raw_train_img_s"] > 0
    assert model["gpu_raw_vs_generic_train"] > 0
    bench.print_report(result)
    printed = capsys.readouterr().out
    assert "GPU:" in printed and "ok (ok)" in printed


def test_bench_kernels_exits_0_when_every_check_passes(capsys, monkeypatch):
    """bench kernels: the CPU rows only without a GPU, the GPU rows too with one; its report is
    not the exit status, and it prints the device the run found."""
    from minicnn.backend import gpu_available
    from minicnn.bench import kernels as bench_kernels
    reports, run = [], bench_kernels.main

    def keep_the_report(argv):
        reports.append(run(argv))
        return reports[-1]

    monkeypatch.setattr(bench_kernels, "main", keep_the_report)
    assert bench.main(["kernels", "--tiny", "--quick", "--batches", "1"]) == 0
    [report] = reports
    assert (report["device"] == "CPU only") == (not gpu_available())
    assert f"device: {report['device']}" in capsys.readouterr().out


def test_quick_keeps_a_batch_given_with_it(capsys):
    assert bench.main(["--json", "--quick", "--batch", "4", "--no-layers", "--no-torch",
                       "--models", "keras-tutorial"]) == 0
    assert json.loads(capsys.readouterr().out)["batch"] == 4


def test_set_tf32_uses_fp32_precision_where_torch_has_it_and_allow_tf32_before():
    from types import SimpleNamespace

    from minicnn.bench.kernels import set_tf32
    old = SimpleNamespace(backends=SimpleNamespace(     # a PyTorch before 2.9: the flags only
        cudnn=SimpleNamespace(allow_tf32=True, benchmark=False),
        cuda=SimpleNamespace(matmul=SimpleNamespace(allow_tf32=True))))
    set_tf32(old, False)
    assert not old.backends.cudnn.allow_tf32 and not old.backends.cuda.matmul.allow_tf32
    assert old.backends.cudnn.benchmark
    torch = pytest.importorskip("torch")
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    if not hasattr(conv, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} predates fp32_precision")
    saved = conv.fp32_precision, matmul.fp32_precision, torch.backends.cudnn.benchmark
    try:
        set_tf32(torch, False)
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
        set_tf32(torch, True)
        assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
    finally:
        conv.fp32_precision, matmul.fp32_precision, torch.backends.cudnn.benchmark = saved
