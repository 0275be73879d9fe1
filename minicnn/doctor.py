"""What minicnn sees on this machine, and whether every path it has computes the right numbers.

    python -m minicnn.doctor [--json PATH] [--quick]

1. The machine: Python, NumPy and its BLAS, CPU count, minicnn's worker threads; CuPy, the CUDA
   runtime and driver, NVRTC/cuBLAS/cuRAND, the GPU's name, memory and FP32 peak (or one line
   saying why there is no GPU: no CuPy, no driver, no device, a missing library).
2. CPU checks: the fast conv2d (minicnn.ops) against minicnn.reference, forward and backward in
   float64 on a few shapes; the time of one keras-tutorial training step.
3. On a GPU: every conv pass and memory-bound kernel against NumPy (minicnn.bench.kernels'
   machinery: check first, then time), on the TINY shapes and (without --quick) the LADDER;
   a few keras-tutorial training steps under minicnn.use("fast") and use("raw") on CuPy against
   the same steps on the CPU; a timing table (CPU, CuPy generic, raw kernels, cuDNN TF32 off/on).
The report is printed and written as JSON to PATH (default minicnn-doctor.json); the exit
status is 1 when any check fails, 0 otherwise (skipped checks say why, and do not fail).
"""
import argparse
import copy
import json
import math
import os
import platform
import sys
import time

import numpy as np

import minicnn
from minicnn import backend, ops, reference
from minicnn.backend import cuda_time, to_numpy
from minicnn.bench import kernels as ladder
from minicnn.cuda import kernels as raw_kernels
from minicnn.nn import optim
from minicnn.nn.losses import SoftmaxCrossEntropy
from minicnn.nn.zoo import keras_tutorial
from minicnn.parallel import workers

# conv shapes for the CPU check: (N, C, H, W), (F, KH, KW), stride, padding
CPU_CONV_SHAPES = [((2, 3, 7, 7), (4, 3, 3), (1, 1), ((1, 1), (1, 1))),
                   ((3, 4, 9, 8), (5, 3, 3), (2, 2), ((1, 1), (1, 1))),
                   ((2, 2, 7, 6), (3, 2, 3), (2, 1), ((0, 1), (1, 1))),
                   ((2, 16, 6, 6), (8, 1, 1), (1, 1), ((0, 0), (0, 0)))]
CPU_TOLERANCE = 1e-10            # float64: the two paths differ only in summation order
STEP_TOLERANCE = 2e-3            # float32 on two BLAS libraries over a few SGD steps


class Report:
    """The checks (name, status "ok" / "FAIL: ..." / "skipped: ...", detail), printed as they
    come, and everything else the JSON report holds."""

    def __init__(self, out=print):
        self.data = {"machine": {}, "gpu": {}, "checks": [], "timings": []}
        self.out = out

    def check(self, name, status, **detail):
        self.data["checks"].append({"name": name, "status": status, **detail})
        self.out(f"  {status.split(':')[0]:<8}{name}"
                 + (f"  ({status.split(':', 1)[1].strip()})" if ":" in status else ""))

    def timing(self, where, what, ms, **extra):
        self.data["timings"].append({"where": where, "what": what, "ms": ms, **extra})

    @property
    def failed(self):
        return [c for c in self.data["checks"] if c["status"].startswith("FAIL")]


def relative_error(got, expected):
    """max |got - expected| / max(max |expected|, 1e-12), in float64."""
    got, expected = to_numpy(got).astype(np.float64), np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        return math.inf
    scale = max(float(np.abs(expected).max(initial=0)), 1e-12)
    return float(np.abs(got - expected).max(initial=0)) / scale


def status_of(err, tolerance):
    return "ok" if err <= tolerance else f"FAIL: max rel err {err:.1e} > {tolerance:.0e}"


# ---- 1. the machine -----------------------------------------------------------------------------
def blas_info():
    """NumPy's BLAS: threadpoolctl's view (library, version, threads) when it is installed,
    else what NumPy was built against."""
    try:
        import threadpoolctl
        libs = [i for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
        if libs:
            return ", ".join(f"{i.get('internal_api')} {i.get('version')} "
                             f"({i.get('num_threads')} threads)" for i in libs)
    except ImportError:
        pass
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version', '')}".strip() + " (NumPy's build config)"
    except Exception:            # NumPy < 1.25 has no mode="dicts"
        return "unknown (NumPy < 1.25 does not report it; pip install threadpoolctl)"


def machine_info():
    return {"python": platform.python_version(), "platform": platform.platform(),
            "numpy": np.__version__, "blas": blas_info(), "cpu_count": os.cpu_count(),
            "minicnn": minicnn.__version__, "worker_threads": workers.threads()}


def _safe(fn, default="unknown"):
    try:
        return fn()
    except Exception:
        return default


def _cuda_version(v):
    return f"{v // 1000}.{v % 1000 // 10}" if isinstance(v, int) else v


def gpu_info():
    """{"present": bool, "why": the one-line reason when not, and what CuPy reports}."""
    cupy = backend._cupy
    info = {"present": False, "cupy": "not installed"}
    if cupy is None:
        info["why"] = "no CuPy: " + backend.gpu_problem()
        return info
    runtime = cupy.cuda.runtime
    info.update(cupy=getattr(cupy, "__version__", "unknown"),
                cuda_runtime=_cuda_version(_safe(lambda: runtime.runtimeGetVersion())),
                cuda_driver=_cuda_version(_safe(lambda: runtime.driverGetVersion())))
    nvrtc = getattr(cupy.cuda, "nvrtc", None)
    if nvrtc is not None:
        info["nvrtc_version"] = ".".join(map(str, _safe(lambda: nvrtc.getVersion(), ("unknown",))))
    problem = backend.gpu_problem()
    libraries = {}
    for library, _, fn in backend.library_checks(cupy):
        try:
            fn()
            libraries[library] = "ok"
        except Exception as e:
            libraries[library] = f"FAIL: {backend._reason(e)}"
    info["libraries"] = libraries
    if problem is not None:
        kind = ("no device" if "none was found" in problem else
                "a CUDA library fails" if problem.startswith("CuPy cannot") else "no driver")
        info["why"] = f"{kind}: {problem}"
        return info
    props = runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    memory = props.get("totalGlobalMem")           # fake_cupy has a name only
    peak, source = ladder.fp32_peak(cupy)
    info.update(present=True, name=name, memory_gib=memory / 2**30 if memory else None,
                fp32_peak_tflops=peak, peak_source=source)
    return info


# ---- 2. the CPU ---------------------------------------------------------------------------------
def check_cpu_conv(report):
    """minicnn.ops.conv2d_forward/backward against minicnn.reference's, float64."""
    rng = np.random.default_rng(0)
    for xshape, (f, kh, kw), stride, padding in CPU_CONV_SHAPES:
        x = rng.standard_normal(xshape)
        w = rng.standard_normal((f, xshape[1], kh, kw))
        b = rng.standard_normal(f)
        out, cache = ops.conv2d_forward(x, w, b, stride, padding)
        ref_out, ref_cache = reference.conv2d_forward(x, w, b, stride, padding)
        dout = rng.standard_normal(np.shape(ref_out))
        grads = ops.conv2d_backward(dout, cache)
        ref_grads = reference.conv2d_backward(dout, ref_cache)
        errors = {"out": relative_error(out, ref_out)}
        errors.update({k: relative_error(g, r)
                       for k, g, r in zip(("dx", "dw", "db"), grads, ref_grads)})
        worst = max(errors.values())
        report.check(f"cpu conv2d fast vs reference x{xshape} w({f},{xshape[1]},{kh},{kw}) "
                     f"stride {stride} padding {padding}", status_of(worst, CPU_TOLERANCE),
                     errors=errors)


def training_steps(model, x, labels, steps):
    """-> (losses, {param: NumPy array} after steps SGD steps on the same batch)."""
    opt = optim.SGD(model, lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss, d = SoftmaxCrossEntropy()(model.forward(x, training=True), labels)
        model.backward(d)
        opt.step()
        losses.append(float(loss))
    return losses, {k: to_numpy(p) for k, p in model.params.items()}


def time_cpu_step(report, batch):
    rng = np.random.default_rng(1)
    model = keras_tutorial(rng=rng)
    x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, batch)
    ms = cuda_time(lambda: training_steps(model, x, labels, 1), np, repeats=3, warmup=1)
    report.timing("cpu", f"keras_tutorial training step, batch {batch}", ms)
    report.out(f"  time    keras_tutorial training step on the CPU, batch {batch}: {ms:.1f} ms")


# ---- 3. the GPU ---------------------------------------------------------------------------------
def raw_kernels_problem(cupy):
    """None when the hand-written CUDA kernels compile and run here, else why not."""
    try:
        x = cupy.asarray(np.ones((1, 1, 4, 4), np.float32))
        raw_kernels.conv2d_forward(x, cupy.asarray(np.ones((1, 1, 3, 3), np.float32)), None,
                                   ladder.STRIDE, ladder.PADDING)
    except Exception as e:
        return f"the raw CUDA kernels do not run here ({type(e).__name__}: {backend._reason(e)})"
    return None


def check_conv_ladder(report, gpu, shapes, batch, time_it):
    """Every conv pass of every GPU implementation against NumPy's (ladder.mismatch), then
    (time_it) its median time; the NumPy row too, for the table."""
    cupy, torch = gpu["cupy"], gpu["torch"]
    settings = {"json": True, "warmup": 1, "repeats": 5}
    for c, f, hw in shapes:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, c, hw, hw)).astype(np.float32)
        w = (rng.standard_normal((f, c) + ladder.KERNEL) / math.sqrt(c * 9)).astype(np.float32)
        b = rng.standard_normal(f).astype(np.float32)
        out, cache = ops.conv2d_forward(x, w, b, ladder.STRIDE, ladder.PADDING)
        dout = rng.standard_normal(out.shape).astype(np.float32)
        dx, dw, _ = ops.conv2d_backward(dout, cache)
        expected = {"forward": (np.ascontiguousarray(out),), "backward_data": (dx,),
                    "backward_weight": (dw,), "backward": (dx, dw)}
        shape = f"{c}->{f} {hw}x{hw} N={batch}"
        flops = ladder.conv_flops(batch, c, f, hw, hw)
        gx, gw, gb, gdout = (cupy.asarray(a) for a in (x, w, b, dout))
        impls = [("cupy-generic", ladder.generic_passes(gx, gw, gb, gdout), cupy)]
        if gpu["raw"]:
            impls.append(("raw", ladder.raw_passes(gx, gw, gb, gdout), cupy))
        if torch is not None:
            impls += [(impl, ladder.torch_passes(torch, x, w, b, dout), torch)
                      for impl in ("cudnn-fp32", "cudnn-tf32")]
        if time_it:
            for pass_name, fn in ladder.generic_passes(x, w, b, dout).items():
                ms = cuda_time(fn, np, repeats=1, warmup=1)
                report.timing("cpu", f"conv {pass_name} {shape}", ms, impl="numpy",
                              gflops=flops * (1 + (pass_name == "backward")) / ms / 1e6)
        for impl, passes, xp in impls:
            if impl.startswith("cudnn"):
                ladder.set_tf32(torch, impl == "cudnn-tf32")
            tolerance = ladder.TOLERANCE.get(impl, ladder.DEFAULT_TOLERANCE)
            for pass_name, fn in passes.items():
                got = fn()
                got = got if isinstance(got, tuple) else (got,)
                if impl.startswith("cudnn"):
                    got = tuple(g.detach().cpu().numpy() for g in got)
                bad = [m for g, e in zip(got, expected[pass_name])
                       if (m := ladder.mismatch(g, e, tolerance))]
                report.check(f"gpu conv {pass_name} {impl} {shape}",
                             "FAIL: " + "; ".join(bad) if bad else "ok")
                if time_it and not bad:
                    ms = (ladder.time_torch(torch, fn, settings["repeats"], settings["warmup"])
                          if impl.startswith("cudnn") else
                          cuda_time(fn, cupy, settings["repeats"], settings["warmup"]))
                    report.timing("gpu", f"conv {pass_name} {shape}", ms, impl=impl,
                                  gflops=flops * (1 + (pass_name == "backward")) / ms / 1e6)
        if gpu["raw"]:                          # im2col, col2im, max-pool, bias+ReLU
            rows = []
            ladder.run_memory_bound(gx, settings, rows, cupy, shape)
            for r in rows:
                report.check(f"gpu {r['pass']} {r['impl']} {shape}", r["status"])
                if time_it and r["ms"]:
                    report.timing("gpu", f"{r['pass']} {shape}", r["ms"], impl=r["impl"],
                                  gbps=r["gbps"])


def check_training(report, gpu, batch, steps):
    """steps SGD steps of keras_tutorial on the GPU (fast, and raw where it runs) against the
    same steps on the CPU from the same weights and batch: every loss and every parameter."""
    cupy = gpu["cupy"]
    rng = np.random.default_rng(2)
    cpu_model = keras_tutorial(rng=rng)
    start = copy.deepcopy(cpu_model)
    x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, batch)
    cpu_losses, cpu_params = training_steps(cpu_model, x, labels, steps)
    for impl in ("fast", "raw"):
        name = f"gpu training, {steps} SGD steps of keras_tutorial batch {batch}, use({impl!r})"
        if impl == "raw" and not gpu["raw"]:
            report.check(name, f"skipped: {gpu['raw_problem']}")
            continue
        model = copy.deepcopy(start).to("cupy")
        gx, glabels = cupy.asarray(x), cupy.asarray(labels)
        with minicnn.use(impl):
            losses, params = training_steps(model, gx, glabels, steps)
            errors = {"loss": relative_error(np.array(losses), np.array(cpu_losses))}
            errors.update({k: relative_error(params[k], v) for k, v in cpu_params.items()})
            worst = max(errors, key=errors.get)
            status = status_of(errors[worst], STEP_TOLERANCE)
            report.check(name, status if status == "ok" else f"{status} in {worst}",
                         errors=errors)
            ms = cuda_time(lambda: training_steps(model, gx, glabels, 1), cupy, repeats=5,
                           warmup=1)
        report.timing("gpu", f"keras_tutorial training step, batch {batch}", ms, impl=impl)


def print_timings(report):
    rows = report.data["timings"]
    if not rows:
        return
    report.out("\ntimings (median ms):")
    report.out(f"  {'where':<5} {'impl':<14}{'what':<44}{'ms':>10}{'GFLOP/s':>10}")
    for r in rows:
        rate = f"{r['gflops']:10.1f}" if r.get("gflops") else (
            f"{r['gbps']:7.1f}GB/s" if r.get("gbps") else "")
        report.out(f"  {r['where']:<5} {r.get('impl', 'numpy'):<14}{r['what']:<44}"
                   f"{r['ms']:10.3f}{rate}")


# ---- the command --------------------------------------------------------------------------------
def main(argv=None, out=print):
    parser = argparse.ArgumentParser(prog="python -m minicnn.doctor",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--json", default="minicnn-doctor.json", metavar="PATH",
                        help="where to write the JSON report (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="GPU: tiny shapes only, no LADDER timings (a smoke run)")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    report = Report(out)

    report.data["machine"] = machine = machine_info()
    out("minicnn doctor")
    out(f"  Python {machine['python']}, NumPy {machine['numpy']} (BLAS: {machine['blas']}), "
        f"{machine['cpu_count']} CPUs, {machine['worker_threads']} minicnn worker threads")
    report.data["gpu"] = info = gpu_info()
    if info["present"]:
        out(f"  GPU: {info['name']}, {info['memory_gib'] or 0:.1f} GiB, FP32 peak "
            f"{info['fp32_peak_tflops']:.1f} TFLOP/s ({info['peak_source']}); CuPy "
            f"{info['cupy']}, CUDA runtime {info['cuda_runtime']}, driver {info['cuda_driver']}; "
            + ", ".join(f"{k} {v}" for k, v in info["libraries"].items()))
    else:
        out(f"  GPU: none. {info['why']}")

    out("\nCPU checks:")
    check_cpu_conv(report)
    time_cpu_step(report, batch=32)

    if info["present"]:
        cupy = backend.get_backend("cupy")
        problem = raw_kernels_problem(cupy)
        gpu = {"cupy": cupy, "torch": ladder.torch_with_cuda(), "raw": problem is None,
               "raw_problem": problem, "peak_tflops": info["fp32_peak_tflops"]}
        out("\nGPU checks:")
        if problem:
            report.check("gpu raw kernels", f"skipped: {problem}")
        if gpu["torch"] is None:
            report.check("gpu cuDNN rows", "skipped: they need PyTorch with CUDA")
        check_conv_ladder(report, gpu, ladder.TINY, batch=2, time_it=False)
        check_training(report, gpu, batch=2 if args.quick else 16, steps=2)
        if not args.quick:
            check_conv_ladder(report, gpu, ladder.LADDER, batch=128, time_it=True)
    print_timings(report)

    failed = report.failed
    report.data.update(ok=not failed, seconds=time.perf_counter() - began)
    with open(args.json, "w") as fh:
        json.dump(report.data, fh, indent=1, default=str)
    skipped = sum(c["status"].startswith("skipped") for c in report.data["checks"])
    out(f"\n{len(report.data['checks'])} checks: {len(failed)} failed, {skipped} skipped "
        f"({report.data['seconds']:.1f} s); report written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
