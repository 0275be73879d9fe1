"""The GPU columns of `python -m minicnn.bench --backend numpy,cupy`.

For every layer row and model row of the CPU bench: the same layer (same weights, same input) on
CuPy arrays, timed with CUDA events after a warm-up (median of repeats); GFLOP/s and % of the
GPU's FP32 peak for the convolutions; the speed-up over the CPU row; and cuDNN's time on the same
shapes through a CUDA-enabled PyTorch, with TF32 off (an FP32 comparison) and on (PyTorch's
default for cuDNN convolutions: tensor cores with a 10-bit mantissa, not FP32). Each GPU result
is checked against the CPU result first; a mismatch is reported as FAIL and not timed.
"""
import copy

import numpy as np

from minicnn import implementation
from minicnn.backend import cuda_time, get_backend, to_numpy
from minicnn.bench.kernels import fp32_peak, set_tf32, time_torch, torch_with_cuda
from minicnn.nn.losses import SoftmaxCrossEntropy
from minicnn.nn.optim import SGD


def gpu_setup():
    """{"cupy", "torch" (CUDA torch or None), "name", "peak_tflops", "peak_source"}; raises
    BackendError (one sentence) when CuPy or a GPU is missing."""
    cupy = get_backend("cupy")
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    peak, source = fp32_peak(cupy)
    return {"cupy": cupy, "torch": torch_with_cuda(), "name": name, "peak_tflops": peak,
            "peak_source": source}


def check(ours, theirs, tol=1e-3):
    """"ok" when ours (NumPy or CuPy) matches theirs to tol relative to theirs' largest
    magnitude (float32), else "FAIL (error)"."""
    scale = max(float(np.abs(theirs).max()), 1e-6)
    err = float(np.abs(to_numpy(ours) - theirs).max()) / scale
    return "ok" if err < tol else f"FAIL ({err:.1e})"


def torch_step_fns(torch, module, tx, tlabels):
    """(train, evaluate): PyTorch's training step (SGD momentum 0.9, cross-entropy) and its
    inference, the twins of the bench's minicnn step."""
    opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)

    def train():
        module.train()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(module(tx), tlabels).backward()
        opt.step()

    def evaluate():
        module.eval()
        with torch.no_grad():
            module(tx)
    return train, evaluate


def _on_gpu(cupy, a):
    """a copied to the GPU in a's memory order (cupy.asarray would make a channels-last NCHW
    view C-contiguous, so the GPU rows would time another layout than the CPU rows)."""
    order = sorted(range(a.ndim), key=lambda axis: -abs(a.strides[axis]))   # outermost first
    dense = cupy.asarray(np.ascontiguousarray(a.transpose(order)))
    return dense.transpose([order.index(axis) for axis in range(a.ndim)])


def layer_columns(row, layer, x, dy, gpu, repeats, torch_twin):
    """Add gpu_* and cudnn_* keys to a CPU layer row; x, dy: the CPU row's NumPy input and
    output gradient; torch_twin(layer, torch) builds the PyTorch module with the same weights."""
    cupy, torch = gpu["cupy"], gpu["torch"]
    y_cpu = layer.forward(x, training=True)
    dx_cpu = layer.backward(dy)
    g = copy.deepcopy(layer).to("cupy")
    gx, gdy = _on_gpu(cupy, x), _on_gpu(cupy, dy)
    row["gpu_check"] = check(g.forward(gx, training=True), y_cpu)
    if row["gpu_check"] == "ok":
        row["gpu_check"] = check(g.backward(gdy), dx_cpu)
    if row["gpu_check"] != "ok":
        return row
    fwd = cuda_time(lambda: g.forward(gx, training=True), cupy, repeats)
    bwd = cuda_time(lambda: g.backward(gdy), cupy, repeats)   # the cache of the last forward
    total = fwd + bwd
    row.update(gpu_fwd_ms=fwd, gpu_bwd_ms=bwd,
               gpu_speedup=(row["fwd_ms"] + row["bwd_ms"]) / total)
    if row["flops"]:
        row["gpu_gflops"] = row["flops"] / total / 1e6
        row["gpu_pct_peak"] = 100 * row["gpu_gflops"] / (gpu["peak_tflops"] * 1e3)
    if torch is not None:
        module = torch_twin(layer, torch).train().cuda()
        tx = torch.as_tensor(np.ascontiguousarray(x), device="cuda").requires_grad_(True)
        tdy = torch.as_tensor(np.ascontiguousarray(dy), device="cuda")

        def fwd_bwd():
            tx.grad = None
            module.zero_grad(set_to_none=True)
            module(tx).backward(tdy)

        for key, tf32 in (("cudnn_ms", False), ("cudnn_tf32_ms", True)):
            set_tf32(torch, tf32)
            row[key] = time_torch(torch, fwd_bwd, repeats, 3)
        set_tf32(torch, False)
        row["gpu_vs_cudnn"] = row["cudnn_ms"] / total
    return row


def _time_model_on_gpu(model, gx, glabels, expected, cupy, repeats):
    """(check, train ms, eval ms) of a GPU copy of model: one training step (forward, loss,
    backward, SGD momentum step) and inference, after checking its inference output against
    expected (no times when that fails). Runs with whichever minicnn.use(...) is active."""
    g = copy.deepcopy(model).to("cupy")
    status = check(g.forward(gx), expected)
    if status != "ok":
        return status, None, None
    loss_fn, opt = SoftmaxCrossEntropy(), SGD(g, lr=0.01, momentum=0.9)

    def train_step():
        _, dlogits = loss_fn(g.forward(gx, training=True), glabels)
        g.backward(dlogits, input_grad=False)
        opt.step()

    return status, cuda_time(train_step, cupy, repeats), cuda_time(lambda: g.forward(gx), cupy,
                                                                   repeats)


def model_columns(row, model, x, labels, gpu, repeats, torch_twin):
    """Add gpu_*, gpu_raw_* and cudnn_* keys to a CPU model row: a training step and inference
    on the GPU in images/s, with minicnn.ops on CuPy (generic) and with the raw CUDA kernels."""
    cupy, torch = gpu["cupy"], gpu["torch"]
    batch = len(x)
    expected = model.forward(x)
    gx, glabels = cupy.asarray(x), cupy.asarray(labels)
    row["gpu_check"], train, evaluate = _time_model_on_gpu(model, gx, glabels, expected, cupy,
                                                           repeats)
    if row["gpu_check"] != "ok":
        return row
    row.update(gpu_train_img_s=batch / train * 1e3,
               gpu_eval_img_s=batch / evaluate * 1e3,
               gpu_train_speedup=row["train_ms"] / train)
    with implementation.use("raw"):
        row["gpu_raw_check"], raw_train, raw_eval = _time_model_on_gpu(
            model, gx, glabels, expected, cupy, repeats)
    if row["gpu_raw_check"] == "ok":
        row.update(gpu_raw_train_img_s=batch / raw_train * 1e3,
                   gpu_raw_eval_img_s=batch / raw_eval * 1e3,
                   gpu_raw_vs_generic_train=train / raw_train)
    if torch is not None:
        module = torch_twin(model, torch).cuda()
        tx = torch.as_tensor(x, device="cuda")
        tlabels = torch.as_tensor(labels, device="cuda")
        torch_train, torch_eval = torch_step_fns(torch, module, tx, tlabels)

        for suffix, tf32 in (("", False), ("_tf32", True)):
            set_tf32(torch, tf32)
            row[f"cudnn{suffix}_train_img_s"] = batch / time_torch(torch, torch_train, repeats, 3) * 1e3
            row[f"cudnn{suffix}_eval_img_s"] = batch / time_torch(torch, torch_eval, repeats, 3) * 1e3
        set_tf32(torch, False)
    return row


def fmt(v, spec):
    """A number formatted by spec, or "-" when there is none."""
    return "-" if v is None else format(v, spec)


def print_table(head, lines, print_fn=print):
    """A blank line, the header, a rule as wide as the header, the lines."""
    for line in ["", head, "-" * len(head)] + list(lines):
        print_fn(line)


def print_tables(result, print_fn=print):
    """The GPU tables, after the CPU ones."""
    gpu = result["gpu"]
    print_fn("")
    print_fn(f"GPU: {gpu['name']}  FP32 peak {gpu['peak_tflops']:.1f} TFLOP/s "
             f"({gpu['peak_source']})  PyTorch {gpu['torch'] or 'without CUDA: no torch columns'}"
             "  CUDA events, median")
    if result["layers"]:
        head = (f"{'layer':<42}{'fwd ms':>8}{'bwd ms':>8}{'GFLOP/s':>9}{'%peak':>7}{'x CPU':>7}"
                f"{'torch ms':>10}{'x torch':>9}{'TF32 ms':>9}  check")
        print_table(head, [
            f"{r['layer']:<42}{fmt(r.get('gpu_fwd_ms'), '8.3f'):>8}"
            f"{fmt(r.get('gpu_bwd_ms'), '8.3f'):>8}{fmt(r.get('gpu_gflops'), '9.0f'):>9}"
            f"{fmt(r.get('gpu_pct_peak'), '6.1f'):>7}{fmt(r.get('gpu_speedup'), '7.0f'):>7}"
            f"{fmt(r.get('cudnn_ms'), '10.3f'):>10}{fmt(r.get('gpu_vs_cudnn'), '9.2f'):>9}"
            f"{fmt(r.get('cudnn_tf32_ms'), '9.3f'):>9}  {r.get('gpu_check', '-')}"
            for r in result["layers"]], print_fn)
    if result["models"]:
        head = (f"{'model':<16}{'train img/s':>13}{'raw':>8}{'x CPU':>7}{'torch':>9}{'TF32':>9}"
                f"{'eval img/s':>12}{'raw':>8}{'torch':>9}{'TF32':>9}  check (raw)")
        print_table(head, [
            f"{r['model']:<16}{fmt(r.get('gpu_train_img_s'), '13.0f'):>13}"
            f"{fmt(r.get('gpu_raw_train_img_s'), '8.0f'):>8}"
            f"{fmt(r.get('gpu_train_speedup'), '7.1f'):>7}"
            f"{fmt(r.get('cudnn_train_img_s'), '9.0f'):>9}"
            f"{fmt(r.get('cudnn_tf32_train_img_s'), '9.0f'):>9}"
            f"{fmt(r.get('gpu_eval_img_s'), '12.0f'):>12}"
            f"{fmt(r.get('gpu_raw_eval_img_s'), '8.0f'):>8}"
            f"{fmt(r.get('cudnn_eval_img_s'), '9.0f'):>9}"
            f"{fmt(r.get('cudnn_tf32_eval_img_s'), '9.0f'):>9}  {r.get('gpu_check', '-')}"
            f" ({r.get('gpu_raw_check', '-')})"
            for r in result["models"]], print_fn)
    print_fn("raw: the same model with minicnn.use(\"raw\") (the CUDA kernels of kernels/*.cu "
             "for its convs and max-pools). x CPU: the CPU row's time / the GPU's. torch: PyTorch "
             "on the GPU (cuDNN for the convolutions) with TF32 off, an FP32 comparison; x torch: "
             "its time / minicnn's (above 1: minicnn is faster). TF32: the same with PyTorch's "
             "default TF32 (tensor cores).")
