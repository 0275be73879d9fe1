"""The kernel ladder: convolution passes on CIFAR-sized layers, every implementation side by side.

    python -m minicnn.bench kernels [--quick] [--json] [--tiny] [--batches 128 512]
    python -m minicnn.bench.kernels ...           (the same)

Layers (3x3 kernels, padding 1, stride 1), at batch 128 and 512:
    3->64 at 32x32, 64->64 at 32x32, 128->128 at 16x16, 256->256 at 8x8
Implementations:
    numpy         minicnn.ops on the CPU
    cupy-generic  minicnn.ops on CuPy arrays (the same code; cuBLAS does the GEMMs)
    raw           kernels/conv2d.cu through minicnn.cuda.kernels (implicit GEMM)
    cudnn-fp32    torch.nn.functional.conv2d and torch.nn.grad (cuDNN), TF32 off
    cudnn-tf32    the same with TF32 on (tensor cores, 10-bit mantissa: a looser check)
Passes: forward, backward_data, backward_weight, and backward (data + weight together, the only
split minicnn.ops has). Each row: median ms (CUDA events after a warm-up; perf_counter on the
CPU), GFLOP/s (2*N*F*C*KH*KW*OH*OW per pass), % of the GPU's FP32 peak, and time / cuDNN FP32's.
Every implementation is checked against the NumPy result first; a mismatch is reported as FAIL
and not timed. Then the memory-bound raw kernels (im2col, col2im, max-pool, bias+ReLU) against
minicnn.ops on CuPy, in GB/s.
"""
import argparse
import json
import math

import numpy as np

from minicnn import ops
from minicnn.cuda import kernels
from minicnn.backend import cuda_time, get_backend, gpu_available, to_numpy
from minicnn.training.cli import positive_int
from minicnn.errors import BackendError
from minicnn.ops.im2col import conv_output_size

LADDER = [(3, 64, 32), (64, 64, 32), (128, 128, 16), (256, 256, 8)]    # (C in, F out, H = W)
TINY = [(3, 4, 8), (5, 7, 6)]
KERNEL, STRIDE, PADDING = (3, 3), (1, 1), ((1, 1), (1, 1))
# FP32 (non-tensor-core) peak TFLOP/s by device-name fragment, from NVIDIA's data sheets;
# the longest fragment found in the device name wins.
FP32_PEAK_TFLOPS = {"H100 PCIe": 51.2, "H100 NVL": 60.0, "H100": 67.0, "H200": 67.0,
                    "GH200": 67.0, "A100": 19.5, "A10": 31.2, "L40S": 91.6, "L4": 30.3,
                    "RTX 4090": 82.6, "V100": 15.7, "T4": 8.1}
TOLERANCE = {"cudnn-tf32": 1e-2}          # relative to the result's largest magnitude
DEFAULT_TOLERANCE = 1e-3
GPU_NOTE = ("GPU rows (cupy-generic, raw, cudnn) need CuPy and a GPU: "
            "pip install -e \".[gpu]\" on a machine with an NVIDIA GPU.")


def conv_flops(n, c, f, h, w):
    oh = conv_output_size(h, KERNEL[0], STRIDE[0], *PADDING[0])
    ow = conv_output_size(w, KERNEL[1], STRIDE[1], *PADDING[1])
    return 2 * n * f * c * KERNEL[0] * KERNEL[1] * oh * ow


def mismatch(got, expected, tolerance):
    """None when got matches expected within tolerance * max|expected|, else a short reason."""
    got = to_numpy(got)
    if got.shape != expected.shape:
        return f"shape {got.shape} != {expected.shape}"
    err = float(np.abs(got.astype(np.float64) - expected).max(initial=0))
    scale = max(float(np.abs(expected).max(initial=0)), 1.0)
    return None if err <= tolerance * scale else f"max abs err {err:.2e} > {tolerance * scale:.2e}"


# ---- the implementations: {pass: fn() -> result or tuple of results} -------------------------
def generic_passes(x, w, b, dout):
    _, cache = ops.conv2d_forward(x, w, b, STRIDE, PADDING)
    return {"forward": lambda: ops.conv2d_forward(x, w, b, STRIDE, PADDING)[0],
            "backward": lambda: ops.conv2d_backward(dout, cache)[:2]}


def raw_passes(x, w, b, dout):
    _, cache = kernels.conv2d_forward(x, w, b, STRIDE, PADDING)
    return {"forward": lambda: kernels.conv2d_forward(x, w, b, STRIDE, PADDING)[0],
            "backward_data": lambda: kernels.conv2d_backward_data(dout, cache),
            "backward_weight": lambda: kernels.conv2d_backward_weight(dout, cache),
            "backward": lambda: kernels.conv2d_backward(dout, cache)[:2]}


def torch_passes(torch, x, w, b, dout):
    tx, tw, tb, tdout = (torch.as_tensor(to_numpy(a), device="cuda") for a in (x, w, b, dout))
    pad = PADDING[0][0], PADDING[1][0]                   # symmetric in the ladder

    def data():
        return torch.nn.grad.conv2d_input(tx.shape, tw, tdout, STRIDE, pad)

    def weight():
        return torch.nn.grad.conv2d_weight(tx, tw.shape, tdout, STRIDE, pad)

    return {"forward": lambda: torch.nn.functional.conv2d(tx, tw, tb, STRIDE, pad),
            "backward_data": data, "backward_weight": weight,
            "backward": lambda: (data(), weight())}


def torch_with_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def set_tf32(torch, on):
    """cuDNN convolutions and cuBLAS matmuls in TF32 (on: tensor cores, PyTorch's default for
    convolutions) or in IEEE FP32 (off), with cuDNN's algorithm search on. PyTorch 2.9+ has
    fp32_precision and refuses to read the old flags once it is mixed with them; older versions
    have only allow_tf32."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(conv, "fp32_precision") and hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "tf32" if on else "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.benchmark = True


def time_torch(torch, fn, repeats, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def fp32_peak(cupy):
    """(TFLOP/s, where the number comes from): the data-sheet table, else a measured SGEMM."""
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    known = [k for k in FP32_PEAK_TFLOPS if k in name]
    if known:
        return FP32_PEAK_TFLOPS[max(known, key=len)], f"{name}: data sheet"
    a = cupy.ones((4096, 4096), dtype=cupy.float32)
    ms = cuda_time(lambda: a @ a, xp=cupy, repeats=10, warmup=2)
    return 2 * 4096**3 / ms / 1e9, f"{name}: measured SGEMM 4096^3"


# ---- the ladder ------------------------------------------------------------------------------
def run_shape(n, c, f, hw, settings, rows, gpu):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    w = (rng.standard_normal((f, c) + KERNEL) / math.sqrt(c * 9)).astype(np.float32)
    b = rng.standard_normal(f).astype(np.float32)
    out, cache = ops.conv2d_forward(x, w, b, STRIDE, PADDING)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dx, dw, _ = ops.conv2d_backward(dout, cache)
    reference = {"forward": np.ascontiguousarray(out), "backward_data": np.ascontiguousarray(dx),
                 "backward_weight": dw}
    reference["backward"] = (reference["backward_data"], dw)
    flops = conv_flops(n, c, f, hw, hw)
    shape = f"{c}->{f} {hw}x{hw} N={n}"

    impls = [("numpy", generic_passes(x, w, b, dout), np, settings["cpu_repeats"])]
    if gpu:
        cupy, torch = gpu["cupy"], gpu["torch"]
        gx, gw, gb, gdout = (cupy.asarray(a) for a in (x, w, b, dout))
        impls.append(("cupy-generic", generic_passes(gx, gw, gb, gdout), cupy, settings["repeats"]))
        impls.append(("raw", raw_passes(gx, gw, gb, gdout), cupy, settings["repeats"]))
        if torch is not None:
            for impl in ("cudnn-fp32", "cudnn-tf32"):
                impls.append((impl, torch_passes(torch, x, w, b, dout), torch, settings["repeats"]))

    shape_rows = []
    for impl, passes, xp, repeats in impls:
        if impl.startswith("cudnn"):
            set_tf32(xp, impl == "cudnn-tf32")
        for pass_name, fn in passes.items():
            row = {"shape": shape, "batch": n, "impl": impl, "pass": pass_name, "gflop": None,
                   "ms": None, "gflops": None, "pct_peak": None, "vs_cudnn": None}
            got = fn()
            got = got if isinstance(got, tuple) else (got,)
            expected = reference[pass_name]
            expected = expected if isinstance(expected, tuple) else (expected,)
            tol = TOLERANCE.get(impl, DEFAULT_TOLERANCE)
            bad = [m for g, e in zip(got, expected) if (m := mismatch(
                g.detach().cpu().numpy() if impl.startswith("cudnn") else g, e, tol))]
            if bad:
                row["status"] = "FAIL: " + "; ".join(bad)
            else:
                if impl.startswith("cudnn"):
                    ms = time_torch(xp, fn, repeats, settings["warmup"])
                else:
                    ms = cuda_time(fn, xp=xp, repeats=repeats, warmup=settings["warmup"])
                pass_flops = flops * (2 if pass_name == "backward" else 1)
                row.update(status="ok", ms=ms, gflop=pass_flops / 1e9,
                           gflops=pass_flops / ms / 1e6)
                if gpu and xp is not np:
                    row["pct_peak"] = 100 * row["gflops"] / (gpu["peak_tflops"] * 1e3)
            shape_rows.append(row)
    cudnn = {r["pass"]: r["ms"] for r in shape_rows if r["impl"] == "cudnn-fp32" and r["ms"]}
    for r in shape_rows:
        if r["ms"] and r["pass"] in cudnn:
            r["vs_cudnn"] = r["ms"] / cudnn[r["pass"]]
    rows.extend(shape_rows)
    print_rows(shape_rows, settings)
    if gpu:
        run_memory_bound(gx, settings, rows, gpu["cupy"], shape)


def run_memory_bound(x, settings, rows, xp, shape):
    """im2col, col2im, max-pool and bias+ReLU: raw kernel vs minicnn.ops on CuPy, in GB/s.

    x (N, C, H, W) on the device of xp (the tests run it on NumPy arrays through the CUDA
    emulation); the bias has C entries, as for a layer whose output x is."""
    n, c, h, w = x.shape
    b = xp.asarray(np.random.default_rng(1).standard_normal(c).astype(np.float32))
    cols = ops.im2col(x, KERNEL, STRIDE, PADDING)
    pool_out, pool_cache = ops.maxpool2d_forward(x, (2, 2), (2, 2))
    raw_pool_cache = kernels.maxpool2d_forward(x, (2, 2), (2, 2))[1]   # the raw op's own cache
    y, mask = kernels.bias_relu_forward_reference(x, b)
    cases = [  # (op, numpy reference, bytes moved, {impl: fn})
        ("im2col", to_numpy(cols), x.nbytes + cols.nbytes,
         {"cupy-generic": lambda: ops.im2col(x, KERNEL, STRIDE, PADDING),
          "raw": lambda: kernels.im2col(x, KERNEL, STRIDE, PADDING)}),
        ("col2im", ops.col2im(to_numpy(cols), x.shape, KERNEL, STRIDE, PADDING),
         cols.nbytes + x.nbytes,
         {"cupy-generic": lambda: ops.col2im(cols, x.shape, KERNEL, STRIDE, PADDING),
          "raw": lambda: kernels.col2im(cols, x.shape, KERNEL, STRIDE, PADDING)}),
        ("maxpool2d forward", to_numpy(pool_out), x.nbytes + pool_out.nbytes * 5 // 4,
         {"cupy-generic": lambda: ops.maxpool2d_forward(x, (2, 2), (2, 2))[0],
          "raw": lambda: kernels.maxpool2d_forward(x, (2, 2), (2, 2))[0]}),
        ("maxpool2d backward", to_numpy(ops.maxpool2d_backward(pool_out, pool_cache)),
         x.nbytes + pool_out.nbytes * 5 // 4,
         {"cupy-generic": lambda: ops.maxpool2d_backward(pool_out, pool_cache),
          "raw": lambda: kernels.maxpool2d_backward(pool_out, raw_pool_cache)}),
        ("bias_relu forward", to_numpy(y), x.nbytes * 9 // 4,
         {"cupy-generic": lambda: kernels.bias_relu_forward_reference(x, b)[0],
          "raw": lambda: kernels.bias_relu_forward(x, b)[0]}),
        ("bias_relu backward", to_numpy(x * mask), x.nbytes * 9 // 4,
         {"cupy-generic": lambda: kernels.bias_relu_backward_reference(x, mask)[0],
          "raw": lambda: kernels.bias_relu_backward(x, mask)[0]}),
    ]
    case_rows = []
    for op, expected, nbytes, impls in cases:
        for impl, fn in impls.items():
            row = {"shape": shape, "batch": n, "impl": impl, "pass": op, "ms": None,
                   "gbps": None, "vs_generic": None}
            bad = mismatch(fn(), expected, DEFAULT_TOLERANCE)
            if bad:
                row["status"] = "FAIL: " + bad
            else:
                ms = cuda_time(fn, xp=xp, repeats=settings["repeats"], warmup=settings["warmup"])
                row.update(status="ok", ms=ms, gbps=nbytes / ms / 1e6)
            case_rows.append(row)
        generic = case_rows[-2]["ms"]
        if generic and case_rows[-1]["ms"]:
            case_rows[-1]["vs_generic"] = case_rows[-1]["ms"] / generic
    rows.extend(case_rows)
    if not settings["json"]:
        for r in case_rows:
            ms = f"{r['ms']:10.3f}" if r["ms"] else f"{'-':>10}"
            gbps = f"{r['gbps']:9.1f}" if r["gbps"] else f"{'-':>9}"
            ratio = f"{r['vs_generic']:8.2f}x" if r["vs_generic"] else ""
            print(f"{r['shape']:<24}{r['pass']:<20}{r['impl']:<14}{ms}{gbps} GB/s {ratio} "
                  f"{'' if r['status'] == 'ok' else r['status']}")


def print_rows(rows, settings):
    if settings["json"]:
        return
    for r in rows:
        def cell(key, fmt, width):
            return format(r[key], fmt).rjust(width) if r[key] is not None else "-".rjust(width)
        print(f"{r['shape']:<24}{r['pass']:<17}{r['impl']:<14}{cell('ms', '.3f', 10)}"
              f"{cell('gflops', '.1f', 11)}{cell('pct_peak', '.1f', 8)}{cell('vs_cudnn', '.2f', 9)}"
              f"  {'' if r['status'] == 'ok' else r['status']}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minicnn.bench kernels",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (a smoke run)")
    parser.add_argument("--json", action="store_true", help="print one JSON object, no table")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (for tests)")
    parser.add_argument("--batches", type=positive_int, nargs="+", default=None,
                        help="batch sizes (default 128 512; --tiny: 2)")
    args = parser.parse_args(argv)
    settings = {"json": args.json, "warmup": 1 if args.quick else 3,
                "repeats": 3 if args.quick else 20, "cpu_repeats": 1 if args.quick else 3}
    batches = args.batches or ([2] if args.tiny else [128, 512])
    shapes = TINY if args.tiny else LADDER

    report = {"device": "CPU only", "peak_tflops": None, "rows": [], "note": ""}
    gpu = None
    if gpu_available():
        cupy = get_backend("cupy")
        peak, source = fp32_peak(cupy)
        torch = torch_with_cuda()
        gpu = {"cupy": cupy, "torch": torch, "peak_tflops": peak}
        report.update(device=source, peak_tflops=peak,
                      note="" if torch else "cuDNN rows need PyTorch with CUDA.")
    else:
        report["note"] = GPU_NOTE
    if not args.json:
        print(f"device: {report['device']}" + (f", FP32 peak {report['peak_tflops']:.1f} TFLOP/s"
                                               if gpu else ""))
        print(f"{'layer':<24}{'pass':<17}{'impl':<14}{'ms':>10}{'GFLOP/s':>11}{'%peak':>8}"
              f"{'/cuDNN':>9}")
    for n in batches:
        for c, f, hw in shapes:
            try:
                run_shape(n, c, f, hw, settings, report["rows"], gpu)
            except BackendError as e:             # a GPU that vanished mid-run: say so, go on
                report["note"] += f" {e}"
    if args.json:
        print(json.dumps(report, indent=1))
    elif report["note"]:
        print(report["note"])
    return report


if __name__ == "__main__":
    main()
