"""How fast is minicnn's NumPy engine, next to PyTorch on the same CPU, in the same run?

    python -m minicnn.bench [--json] [--batch 128] [--repeats 5] [--models NAME ...] [--quick]
    python -m minicnn.bench --backend numpy,cupy    adds GPU columns (minicnn.bench.gpu)
    python -m minicnn.bench kernels ...      the GPU kernel ladder (minicnn.bench.kernels)

Three tables, each row timed side by side with PyTorch (interleaved, so machine noise hits both):
  1. SGEMM: a 2048^2 float32 matmul through NumPy's BLAS, the machine's measured peak (the
     best of the repeats, measured before the layers and again after them; the higher counts).
  2. Layers: the conv shapes of every preset benched (DEFAULT_MODELS: all but resnet18, unless
     --models names it) plus the CIFAR ladder
     (3->64 @32, 64->64 @32, 128->128 @16, 256->256 @8), and the pools, BatchNorm and ReLU the
     presets use: forward ms, backward ms, GFLOP/s (forward + backward, 2*N*F*C*KH*KW*OH*OW per
     GEMM-pass, three passes), % of the SGEMM peak, % of the BLAS on the layer's own GEMM shapes
     (conv_gemms: the time of its three bare GEMMs / the layer's), and PyTorch's time / ours
     (> 1: we're faster).
  3. Models: every preset; one training step (forward, loss, backward, SGD momentum step) and
     inference, in images/s, ours and PyTorch's, and the ratio. Ours as the trainer and
     `evaluate` run them: the batch split over the cores, a whole model copy a worker
     (minicnn.parallel.data_parallel); the fwd ms and bwd ms columns are model.forward and
     model.backward on the whole batch, each op split over the cores (minicnn.parallel).
     Beside each, "gemms": the images/s of the step's conv and dense GEMMs alone (model_gemms,
     the shapes the layers really get), and "bound": PyTorch's time / theirs, the ratio an
     engine whose layers cost nothing but those GEMMs would reach on this BLAS.
PyTorch is timed in both its memory layouts, its default NCHW and channels_last (module and input
.to(memory_format=torch.channels_last), its faster path on a CPU for most convolutions), both
shown; the ratios ("x torch", "bound") are against the faster of the two, PyTorch's best path.
Each case is checked against PyTorch first (same weights, same input), then warmed up, then timed
`repeats` times (the model rows' train and eval columns MODEL_REPEATS times as many); the median
is reported. PyTorch runs with as many threads as minicnn's workers
(minicnn.parallel: one per core, each with a single-threaded BLAS), and the count is printed; the
SGEMM peak is NumPy's BLAS on its own threads. Without torch the tables still print, with a
note instead of the ratios.
"""
import argparse
import functools
import json
import platform
import sys
import time

import numpy as np

from minicnn.bench import gpu as bench_gpu
from minicnn.parallel import data_parallel
from minicnn.parallel import workers
from minicnn.nn import zoo
from minicnn.training.cli import positive_int
from minicnn.errors import BackendError
from minicnn.nn import (AvgPool2D, BatchNorm1D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten,
                            GlobalAveragePooling2D, MaxPool2D, ReLU, Residual, Softmax, walk)
from minicnn.nn.losses import SoftmaxCrossEntropy
from minicnn.nn.containers import Sequential
from minicnn.ops import conv as conv_ops
from minicnn.nn.optim import SGD

LADDER = [(3, 64, 32), (64, 64, 32), (128, 128, 16), (256, 256, 8)]   # (C in, F out, H = W)
SGEMM_SIZE = 2048
IMAGE_SHAPE = (3, 32, 32)
# The model rows' training and inference columns (the goal's ratios) are timed this many times
# `repeats`: on a noisy machine a median of 5 moves those ratios a lot between runs of the same
# code, and 15 still keeps the whole bench short (docs/performance.md#bench-repeats).
MODEL_REPEATS = 3


# ---- the machine ----------------------------------------------------------------------------
def import_torch(threads):
    """torch with `threads` intra-op threads, or None when it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


def median_times(fns, repeats, warmup=2, settle=True):
    """{name: median seconds}, the callables run interleaved (round-robin) after a warm-up.

    settle: run each callable once untimed before its timed run in every round. Both OpenBLAS
    and PyTorch's OpenMP keep their worker threads spinning for a while after a call; on a
    2-core machine that steals a core from whatever runs next, so the first call after a
    switch of library measures the hand-over, not the library.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if settle:
                fn()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def sgemm_peak(repeats, size=SGEMM_SIZE):
    """The best GFLOP/s of `repeats` size x size float32 matmuls into a reused output, after
    one warm-up, BLAS on its own threads. The best, not the median: a peak is what the machine
    can reach, and on a shared machine a median of a few runs can fall below the rate the
    layers themselves reach (docs/performance.md#sgemm-peak)."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    out = np.empty((size, size), dtype=np.float32)
    best = float("inf")
    with workers.blas_with_own_threads():
        np.matmul(a, b, out=out)
        for _ in range(repeats):
            start = time.perf_counter()
            np.matmul(a, b, out=out)
            best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


# ---- minicnn layers as torch modules (weights copied) ---------------------------------------
def torch_twin(layer, torch):
    """A torch.nn module computing what `layer` computes, with its weights and running stats."""
    nn = torch.nn
    if isinstance(layer, Sequential):
        module = nn.Sequential(*[torch_twin(sub, torch) for sub in layer])
    elif isinstance(layer, Residual):
        module = _torch_residual_class(torch)(
            torch_twin(layer.body, torch),
            torch_twin(layer.shortcut, torch) if layer.shortcut is not None else None)
    elif isinstance(layer, Conv2D):
        module = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                           layer.stride, _torch_padding(layer), layer.dilation, layer.groups,
                           bias="bias" in layer.params)
    elif isinstance(layer, MaxPool2D):
        module = nn.MaxPool2d(layer.kernel_size, layer.stride, _torch_padding(layer))
    elif isinstance(layer, AvgPool2D):
        module = nn.AvgPool2d(layer.kernel_size, layer.stride, _torch_padding(layer),
                              count_include_pad=False)
    elif isinstance(layer, (BatchNorm2D, BatchNorm1D)):
        cls = nn.BatchNorm2d if isinstance(layer, BatchNorm2D) else nn.BatchNorm1d
        module = cls(layer.num_features, eps=layer.eps, momentum=layer.momentum)
    elif isinstance(layer, Dense):
        module = nn.Linear(layer.in_features, layer.out_features, bias="bias" in layer.params)
    else:
        simple = {ReLU: nn.ReLU, Flatten: nn.Flatten, Softmax: lambda: nn.Softmax(dim=1),
                  Dropout: lambda: nn.Dropout(layer.p),
                  GlobalAveragePooling2D: lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                                                nn.Flatten())}
        if type(layer) not in simple:
            raise ValueError(f"minicnn.bench has no PyTorch twin for {type(layer).__name__}.")
        module = simple[type(layer)]()
    if not isinstance(layer, (Sequential, Residual)):
        arrays = {**layer.params, **layer.state}
        with torch.no_grad():
            for name, tensor in module.state_dict().items():
                if name in arrays:
                    tensor.copy_(torch.from_numpy(np.asarray(arrays[name])))
    return module.float()


def _torch_padding(conv):
    """A Conv2D's or pool's padding as torch takes it (symmetric pairs only; "same" is stride 1
    in torch, and conv only)."""
    if conv.padding == "valid":
        return 0
    if conv.padding == "same":
        if conv.stride != (1, 1):
            raise ValueError("minicnn.bench: PyTorch has no padding='same' with stride > 1.")
        return "same"
    return tuple(conv.padding)


@functools.lru_cache(maxsize=None)
def _torch_residual_class(torch):
    """nn.Module twin of Residual, defined on first use so importing this module needs no torch."""
    class TorchResidual(torch.nn.Module):
        """y = body(x) + shortcut(x), the shortcut the identity when None."""

        def __init__(self, body, shortcut):
            super().__init__()
            self.body, self.shortcut = body, shortcut

        def forward(self, x):
            return self.body(x) + (x if self.shortcut is None else self.shortcut(x))
    return TorchResidual


# ---- layer rows -----------------------------------------------------------------------------
# The bare GEMMs (the %gemm column, the model rows' gemms columns) run on at most this many bytes
# of im2col rows at a time (all the workers' together), a batch's rows in chunks of it, each
# worker in views of its own set of buffers: not a 302 MB matrix for the ladder's 64->64 @32x32
# at batch 128 (a GEMM's rate barely changes with M at these sizes).
GEMM_REFERENCE_BYTES = 64 * 2**20


def bare_gemms(shapes, rng, parts=None):
    """fn: the GEMMs of conv and dense layers alone, with nothing around them (no im2col,
    col2im, activation, ...), called as the engine calls its own: the images split over `parts`
    (default: minicnn.parallel's workers, one a core) that run at once, each with a
    single-threaded BLAS (BLAS on its own threads when there is one worker), and one GEMM per
    image where K and F are both at most minicnn.ops.conv.PER_IMAGE_GEMM_MAX_SIZE (an RGB first
    layer's): called any other way, the same GEMMs take measurably longer
    (docs/performance.md#bare-gemms).

    shapes: [(N, P, K, F, passes)]: N images of P rows each (OH*OW for a conv, 1 for a dense
    layer), K = C*KH*KW (or the inputs), F outputs; passes: some of "fwd" (M, K) @ (K, F),
    "dw" (F, M) @ (M, K) and "dx" (M, F) @ (F, K) over the M = N*P rows. A worker's images go
    through in chunks of at most GEMM_REFERENCE_BYTES / parts of (rows, K). The engine splits
    some GEMMs further (a valid conv's dx tap by tap, a padded one's as a conv, whose GEMM is
    (M, F*KH*KW) @ (F*KH*KW, C)), so its layers can run their GEMMs a little faster or slower
    than these."""
    parts = workers.threads() if parts is None else parts
    images = {(p, k, f): max(1, GEMM_REFERENCE_BYTES // parts // (4 * p * max(k, f)))
              for _, p, k, f, _ in shapes}                     # a chunk's
    chunks = [(min(-(-n // parts), images[p, k, f]), p, k, f) for n, p, k, f, _ in shapes]
    size = {"cols": max(i * p * k for i, p, k, _ in chunks),
            "dy": max(i * p * f for i, p, _, f in chunks),
            "w": max(k * f for _, _, k, f in chunks),
            "dw": max((i if _per_image(p, k, f) else 1) * k * f for i, p, k, f in chunks)}
    buffers = [{name: rng.standard_normal(size[name], dtype=np.float32)
                for name in ("cols", "dy", "w")}
               | {name: np.empty(size[like], dtype=np.float32)
                  for name, like in (("out", "dy"), ("dcols", "cols"), ("dw", "dw"))}
               for _ in range(parts)]

    def work(lo, hi):                                    # parts lo:hi, one worker
        for part in range(lo, hi):
            b = buffers[part]
            for n, p, k, f, passes in shapes:
                stack = (-1, p) if _per_image(p, k, f) else (1, -1)   # (GEMMs, rows each)
                w = b["w"][:k * f].reshape(k, f)
                first, last = n * part // parts, n * (part + 1) // parts
                for start in range(first, last, images[p, k, f]):
                    r = min(images[p, k, f], last - start) * p
                    cols = b["cols"][:r * k].reshape(stack + (k,))
                    dy = b["dy"][:r * f].reshape(stack + (f,))
                    if "fwd" in passes:
                        np.matmul(cols, w, out=b["out"][:r * f].reshape(stack + (f,)))
                    if "dw" in passes:
                        np.matmul(dy.transpose(0, 2, 1), cols,
                                  out=b["dw"][:len(cols) * f * k].reshape(-1, f, k))
                    if "dx" in passes:
                        np.matmul(dy, w.T, out=b["dcols"][:r * k].reshape(stack + (k,)))
    return lambda: workers.map(work, parts)


def _per_image(rows_per_image, k, f):
    """Whether the engine runs a GEMM of these sizes one image at a time (its own rule,
    minicnn.ops.conv._per_image; a dense layer's rows are images already)."""
    return rows_per_image > 1 and conv_ops._per_image(k, f)


def _gemm_shape(layer, n, out_shape):
    """(N, P, K, F) of a Conv2D's or Dense layer's GEMMs (bare_gemms) on n images whose output
    per image has out_shape: P = OH*OW rows an image and K = C*KH*KW for a conv, 1 and the
    inputs for a dense layer."""
    if isinstance(layer, Conv2D):
        kh, kw = layer.kernel_size
        return n, out_shape[1] * out_shape[2], layer.in_channels * kh * kw, layer.out_channels
    return n, 1, layer.in_features, layer.out_features


def conv_gemms(layer, n, out_shape, rng):
    """fn: the three GEMMs of a conv layer's training step on n images, with the layer's
    K = C*KH*KW and F and M = n*OH*OW rows: forward (M, K) @ (K, F), dW (F, M) @ (M, K) and
    dcols (M, F) @ (F, K), alone (bare_gemms)."""
    return bare_gemms([_gemm_shape(layer, n, out_shape) + (("fwd", "dw", "dx"),)], rng)


def conv_flops(n, c, f, kh, kw, oh, ow):
    """FLOPs of one GEMM pass of a convolution (forward; backward is two such passes)."""
    return 2 * n * f * c * kh * kw * oh * ow


def layer_cases(models, batch):
    """(label, layer, input shape, layer FLOPs fwd+bwd or 0) for every distinct layer shape of the
    presets (walking them with a zero batch), then the CIFAR ladder convs."""
    cases, seen = [], set()

    def visit(layer, x):
        if isinstance(layer, Sequential):
            for sub in layer:
                x = visit(sub, x)
            return x
        if isinstance(layer, Residual):
            visit(layer.body, x)
            return layer.forward(x)
        y = layer.forward(x)
        key = (layer.__class__.__name__, repr(layer), x.shape[1:])
        if isinstance(layer, (Conv2D, MaxPool2D, BatchNorm2D, ReLU)) and x.ndim == 4 \
                and key not in seen:
            seen.add(key)
            cases.append(_case(layer, (batch,) + x.shape[1:], y.shape[1:]))
        return y

    for name in models:
        model = zoo.build_model(name, rng=np.random.default_rng(0))
        visit(model, np.zeros((1,) + IMAGE_SHAPE, dtype=np.float32))
    for c, f, hw in LADDER:
        conv = Conv2D(c, f, 3, padding=1, rng=np.random.default_rng(0))
        if ("Conv2D", repr(conv), (c, hw, hw)) not in seen:
            cases.append(_case(conv, (batch, c, hw, hw), (f, hw, hw)))
    return cases


def _case(layer, in_shape, out_shape):
    n = in_shape[0]
    if isinstance(layer, Conv2D):
        kh, kw = layer.kernel_size
        flops = 3 * conv_flops(n, layer.in_channels, layer.out_channels, kh, kw, *out_shape[1:])
        label = (f"Conv2D {layer.in_channels}->{layer.out_channels} {kh}x{kw} "
                 f"@{in_shape[2]}x{in_shape[3]} pad={layer.padding}")
    else:
        flops = 0
        extra = f" {layer.kernel_size[0]}x{layer.kernel_size[1]}" if hasattr(layer, "kernel_size") else ""
        label = f"{type(layer).__name__}{extra} {in_shape[1]}ch @{in_shape[2]}x{in_shape[3]}"
    return label, layer, tuple(in_shape), flops


def channels_last(x):
    """The NCHW array x stored NHWC, as activations are inside a minicnn net (after its first conv)."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def bench_layer(label, layer, in_shape, flops, torch, repeats, gpu=None):
    """A layer's row: forward and backward ms, GFLOP/s, and PyTorch's time beside it (run()
    adds % of the SGEMM peak once the run is over and the peak measured again)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(in_shape, dtype=np.float32)
    if in_shape[1] > 3:
        x = channels_last(x)
    y = layer.forward(x, training=True)
    dy = rng.standard_normal(y.shape, dtype=np.float32)
    if dy.ndim == 4:
        dy = channels_last(dy)        # as the gradient arrives inside a net
    fns = {"fwd": lambda: layer.forward(x, training=True), "bwd": lambda: layer.backward(dy)}
    if isinstance(layer, Conv2D):
        fns["gemms"] = conv_gemms(layer, in_shape[0], y.shape[1:], rng)
    row = {"layer": label, "input": list(in_shape), "flops": flops, "check": "-"}
    if torch is not None:
        checks = []
        for prefix, layout in TORCH_LAYOUTS.items():
            layout_fns, ty = _torch_layer_fns(layer, x, dy, torch, layout)
            checks.append(_check(y, ty))
            fns.update({prefix + name: fn for name, fn in layout_fns.items()})
        row["check"] = _first_failure(checks)
    t = median_times(fns, repeats)
    # backward timings need a forward before them: the interleaved order fwd, bwd guarantees it
    row.update(fwd_ms=t["fwd"] * 1e3, bwd_ms=t["bwd"] * 1e3)
    total = t["fwd"] + t["bwd"]
    row["gflops"] = flops / total / 1e9 if flops else None
    row["gemm_ms"] = t["gemms"] * 1e3 if "gemms" in t else None
    row["pct_gemm"] = 100 * t["gemms"] / total if "gemms" in t else None
    if torch is not None:
        for prefix in TORCH_LAYOUTS:
            row.update({f"{prefix}fwd_ms": t[prefix + "fwd"] * 1e3,
                        f"{prefix}bwd_ms": t[prefix + "bwd"] * 1e3})
        times = {prefix: t[prefix + "fwd"] + t[prefix + "bwd"] for prefix in TORCH_LAYOUTS}
        best = min(times, key=times.get)
        row.update(torch_best=TORCH_LAYOUTS[best], ratio=times[best] / total)
    if gpu is not None:
        bench_gpu.layer_columns(row, layer, x, dy, gpu, repeats, torch_twin)
    return row


# PyTorch's two memory layouts, by the prefix of their timings' keys: its default (NCHW), and
# channels_last (NHWC in memory behind NCHW sizes), which its CPU convolutions (oneDNN) prefer.
TORCH_LAYOUTS = {"torch_": "nchw", "torch_cl_": "channels_last"}


def _torch_layout(torch, layout):
    """The memory format that torch calls layout."""
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def _torch_layer_fns(layer, x, dy, torch, layout):
    """({"fwd": fn, "bwd": fn}, its output as NumPy): PyTorch's twin of layer in the
    layout "nchw" or "channels_last", module and tensors converted to it. bwd needs a fwd first
    (median_times' interleaved order runs fwd before bwd)."""
    memory_format = _torch_layout(torch, layout)
    module = torch_twin(layer, torch).train().to(memory_format=memory_format)
    tx = torch.from_numpy(np.ascontiguousarray(x)).contiguous(memory_format=memory_format)
    tx.requires_grad_(True)
    tdy = torch.from_numpy(np.ascontiguousarray(dy)).contiguous(memory_format=memory_format)
    ty = {}

    def fwd():
        ty["y"] = module(tx)

    def bwd():
        tx.grad = None
        module.zero_grad(set_to_none=True)
        ty["y"].backward(tdy, retain_graph=True)
    fwd()
    return {"fwd": fwd, "bwd": bwd}, ty["y"].detach().numpy()


def _first_failure(checks):
    """The first check that is not "ok" (the twins in both layouts must match), else "ok"."""
    return next((c for c in checks if c != "ok"), "ok")


_check = bench_gpu.check


# ---- model rows -----------------------------------------------------------------------------
def model_gemms(model, x, rng):
    """(train_fn, eval_fn): the bare GEMMs (bare_gemms) of a training step and of inference on
    the batch x, with the shapes the model's Conv2D and Dense layers really get (recorded from
    a forward of one image, so after Sequential's needed_input crop). Training: forward, dW and
    dx, but no dx for the model's first layer (the trainer skips it); inference: forward only.
    Their time is that of a step that did nothing but these GEMMs: a reference for the engine's
    steps, not a hard floor (see bare_gemms)."""
    layers = [layer for layer in walk(model) if isinstance(layer, (Conv2D, Dense))]
    seen = []                                            # (layer, output shape) in call order

    def spy(layer):
        def forward(inp, training=False):
            y = type(layer).forward(layer, inp, training)
            seen.append((layer, y.shape))
            return y
        return forward
    for layer in layers:
        layer.forward = spy(layer)                       # an instance attribute, deleted below
    try:
        model.forward(x[:1])
    finally:
        for layer in layers:
            del layer.forward
    first = model[model.schedule()[0]] if isinstance(model, Sequential) and len(model) else None
    train, infer = [], []
    for layer, out_shape in seen:
        shape = _gemm_shape(layer, len(x), out_shape[1:])
        train.append(shape + (("fwd", "dw") if layer is first else ("fwd", "dw", "dx"),))
        infer.append(shape + (("fwd",),))
    return bare_gemms(train, rng), bare_gemms(infer, rng)


def bench_model(name, torch, batch, repeats, gpu=None):
    rng = np.random.default_rng(0)
    model = zoo.build_model(name, rng=rng)
    x = rng.standard_normal((batch,) + IMAGE_SHAPE, dtype=np.float32)
    labels = rng.integers(0, 10, batch)
    loss_fn, opt = SoftmaxCrossEntropy(), SGD(model, lr=0.01, momentum=0.9)
    row = {"model": name, "batch": batch, "params": int(sum(p.size for p in model.params.values())),
           "check": "-"}
    twins = {}                # PyTorch's layout -> (module, input), compared before any step
    if torch is not None:
        tlabels, checks = torch.from_numpy(labels), []
        for prefix, layout in TORCH_LAYOUTS.items():
            memory_format = _torch_layout(torch, layout)
            module = torch_twin(model, torch).eval().to(memory_format=memory_format)
            tx = torch.from_numpy(x).contiguous(memory_format=memory_format)
            with torch.no_grad():
                checks.append(_check(model.forward(x), module(tx).numpy()))
            twins[prefix] = module, tx
        row["check"] = _first_failure(checks)

    def forward():
        return model.forward(x, training=True)

    # as the trainer (and PyTorch, whose input has no requires_grad): no gradient for the images
    def backward():
        model.backward(loss_fn(model.forward(x, training=True), labels)[1], input_grad=False)

    def train_step():                  # as the trainer: the batch split over the cores
        data_parallel.train_step(model, x, labels, loss_fn)
        opt.step()

    gemms_train, gemms_eval = model_gemms(model, x, rng)
    fns = {"train": train_step, "eval": lambda: data_parallel.predict(model, x),
           "gemms_train": gemms_train, "gemms_eval": gemms_eval}
    for prefix, (module, tx) in twins.items():
        torch_train, torch_eval = bench_gpu.torch_step_fns(torch, module, tx, tlabels)
        fns.update({prefix + "train": torch_train, prefix + "eval": torch_eval})
    t = median_times(fns, MODEL_REPEATS * repeats)
    parts = median_times({"fwd": forward, "fwd+bwd": backward}, repeats, 1, False)
    row.update(fwd_ms=parts["fwd"] * 1e3, bwd_ms=(parts["fwd+bwd"] - parts["fwd"]) * 1e3,
               train_ms=t["train"] * 1e3, train_img_s=batch / t["train"],
               eval_img_s=batch / t["eval"], gemm_train_img_s=batch / t["gemms_train"],
               gemm_eval_img_s=batch / t["gemms_eval"])
    for part in ("train", "eval") if twins else ():
        times = {prefix: t[prefix + part] for prefix in twins}
        best = min(times, key=times.get)                 # PyTorch's faster layout
        row.update({f"{prefix}{part}_img_s": batch / times[prefix] for prefix in twins})
        row.update({f"torch_{part}_best": TORCH_LAYOUTS[best],
                    f"{part}_ratio": times[best] / t[part],
                    f"{part}_bound": times[best] / t["gemms_" + part]})
    if gpu is not None:
        bench_gpu.model_columns(row, model, x, labels, gpu, repeats, torch_twin)
    return row


# ---- the report -----------------------------------------------------------------------------
_fmt = bench_gpu.fmt


def print_report(result, print_fn=print):
    m = result["machine"]
    print_fn(f"minicnn.bench  numpy {m['numpy']}  torch {m['torch'] or 'not installed'}  "
             f"threads {m['threads']} (minicnn and torch)  batch {result['batch']}  "
             f"median of {result['repeats']} (models: {MODEL_REPEATS * result['repeats']})  "
             f"{m['cpu']}")
    print_fn(f"SGEMM peak ({SGEMM_SIZE}^2 float32 matmul): {result['sgemm_gflops']:.1f} GFLOP/s")
    if m["torch"] is None:
        print_fn("note: PyTorch is not installed, so there are no ratios "
                 "(pip install torch to compare).")
    if result["layers"]:
        head = (f"{'layer':<42}{'fwd ms':>8}{'bwd ms':>8}{'GFLOP/s':>9}{'%peak':>7}{'%gemm':>7}"
                f"{'torch ms':>10}{'t-cl ms':>9}{'x torch':>8}  check")
        lines = []
        for r in result["layers"]:
            torch_ms = [r[f"{p}fwd_ms"] + r[f"{p}bwd_ms"] if "ratio" in r else None
                        for p in TORCH_LAYOUTS]
            lines.append(f"{r['layer']:<42}{r['fwd_ms']:>8.2f}{r['bwd_ms']:>8.2f}"
                         f"{_fmt(r['gflops'], '9.1f'):>9}{_fmt(r['pct_peak'], '6.0f'):>7}"
                         f"{_fmt(r['pct_gemm'], '6.0f'):>7}{_fmt(torch_ms[0], '10.2f'):>10}"
                         f"{_fmt(torch_ms[1], '9.2f'):>9}{_fmt(r.get('ratio'), '8.2f'):>8}"
                         f"  {r['check']}")
        bench_gpu.print_table(head, lines, print_fn)
    if result["models"]:
        head = (f"{'model':<15}{'fwd ms':>7}{'bwd ms':>7}{'train img/s':>12}{'gemms':>7}"
                f"{'torch':>6}{'t-cl':>6}{'x torch':>8}{'bound':>6}{'eval img/s':>11}{'gemms':>7}"
                f"{'torch':>6}{'t-cl':>6}{'x torch':>8}{'bound':>6}  check")
        lines = [f"{r['model']:<15}{r['fwd_ms']:>7.1f}{r['bwd_ms']:>7.1f}"
                 + "".join(f"{r[part + '_img_s']:>{12 if part == 'train' else 11}.0f}"
                           f"{r[f'gemm_{part}_img_s']:>7.0f}"
                           + "".join(f"{_fmt(r.get(f'{p}{part}_img_s'), '6.0f'):>6}"
                                     for p in TORCH_LAYOUTS)
                           + f"{_fmt(r.get(f'{part}_ratio'), '8.2f'):>8}"
                             f"{_fmt(r.get(f'{part}_bound'), '6.2f'):>6}"
                           for part in ("train", "eval"))
                 + f"  {r['check']}" for r in result["models"]]
        bench_gpu.print_table(head, lines, print_fn)
    print_fn("torch: PyTorch in its default NCHW layout; t-cl: with channels_last (module and "
             "input); x torch: the faster\nof the two's time / minicnn's (above 1: minicnn is "
             "faster). GFLOP/s counts forward + both backward GEMM passes.")
    if result["models"]:
        print_fn("gemms: images/s if a step took only its conv and dense GEMMs (the model's "
                 "shapes, split over the workers as the layers run them);\nbound: PyTorch's "
                 "best time / those GEMMs' (x torch for an engine whose layers cost only their "
                 "GEMMs).")
    if result["layers"]:
        print_fn("%gemm: the layer's three GEMMs alone (the same shapes, split over the workers "
                 "as the layer runs them) / the layer's time.")
    if result.get("gpu"):
        bench_gpu.print_tables(result, print_fn)


# The CIFAR-sized presets; resnet18 (an ImageNet net, minutes a run on 2 cores) only when named.
DEFAULT_MODELS = [name for name in zoo.MODELS if name != "resnet18"]


def run(models=None, batch=128, repeats=5, layers=True, use_torch=True, backends=("numpy",)):
    """Run the benchmark; returns the result dict that --json prints.

    backends: "numpy" (always run: the CPU rows) and optionally "cupy" (GPU columns; raises
    BackendError when CuPy or a GPU is missing).
    """
    unknown = sorted(set(backends) - {"numpy", "cupy"})
    if unknown:
        raise BackendError(f"Unknown backend {unknown[0]!r}; choose numpy, cupy or numpy,cupy.")
    gpu = bench_gpu.gpu_setup() if "cupy" in backends else None
    models = DEFAULT_MODELS if models is None else list(models)
    threads = workers.threads()
    torch = import_torch(threads) if use_torch else None
    peak = sgemm_peak(max(3, repeats))                  # and again at the end: the best of both
    result = {"machine": {"cpu": platform.processor() or platform.machine(),
                          "numpy": np.__version__,
                          "torch": torch.__version__ if torch is not None else None,
                          "threads": threads},
              "batch": batch, "repeats": repeats, "sgemm_gflops": peak,
              "layers": [], "models": []}
    if gpu is not None:
        result["gpu"] = {"name": gpu["name"], "peak_tflops": gpu["peak_tflops"],
                         "peak_source": gpu["peak_source"],
                         "torch": gpu["torch"].__version__ if gpu["torch"] is not None else None}
    if layers:
        for case in layer_cases(models, batch):
            result["layers"].append(bench_layer(*case, torch, repeats, gpu))
    for name in models:
        result["models"].append(bench_model(name, torch, batch, repeats, gpu))
    if layers:
        peak = result["sgemm_gflops"] = max(peak, sgemm_peak(max(3, repeats)))
        for row in result["layers"]:
            row["pct_peak"] = 100 * row["gflops"] / peak if row["gflops"] else None
    return result


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["kernels"]:
        from minicnn.bench import kernels as bench_kernels
        report = bench_kernels.main(argv[1:])
        # a kernel that did not match the NumPy reference makes the run fail
        return 1 if any(row.get("status", "").startswith("FAIL") for row in report["rows"]) else 0
    parser = argparse.ArgumentParser(
        prog="python -m minicnn.bench", description=__doc__.split("\n")[0],
        epilog="python -m minicnn.bench kernels [--quick] [--json] [--batches N ...] runs the GPU "
               "kernel ladder instead (see python -m minicnn.bench kernels --help).")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="images per batch (default 128; 16 with --quick)")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed runs per case, the median reported (default 5; 3 with --quick)")
    parser.add_argument("--models", nargs="+", choices=list(zoo.MODELS), default=None,
                        help=f"presets to time (default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--no-layers", action="store_true", help="only the model rows")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    parser.add_argument("--quick", action="store_true",
                        help="batch 16, 3 repeats unless given: a smoke test")
    parser.add_argument("--backend", default="numpy",
                        help="numpy (the CPU tables) or numpy,cupy (adds the GPU columns)")
    args = parser.parse_args(argv)
    if args.batch is None:
        args.batch = 16 if args.quick else 128
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    try:
        result = run(args.models, args.batch, args.repeats, not args.no_layers, not args.no_torch,
                     backends)
    except BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_report(result)
    return 0

