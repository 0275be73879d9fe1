"""python -m minicnn.compare: one training step on several implementations of the maths, layer
by layer: where do they part?

    python -m minicnn.compare                       reference, fast, torch (+ the GPU ones below)
    python -m minicnn.compare --implementations reference,fast --dtype float64
    python -m minicnn.compare --steps 50            also the weights' drift: compare_drift.png

Every implementation starts from the same weights (the --model preset drawn with --seed, or
--checkpoint's) and the same batch (--batch images of N(0, 1) pixels and random labels, drawn
with --seed), and runs one forward, the loss and one backward, a layer at a time in the
model's list order (minicnn.inspect.forward_layers: the fast Sequential's reordering and
cropping are left out, so each layer's output means the same everywhere). Dropout drops
nothing here (p = 0 in every copy): PyTorch's masks come from another generator. Each
implementation is compared with the first one listed, the baseline, tensor by tensor:

    out      each layer's output, in forward order; then the loss
    d<key>   each parameter's gradient (dweight, dbias), and
    dx       the gradient with respect to each layer's input, in backward order

    abs      max |a - b|
    rel      max |a - b| / |b| over the elements with |b| >= 1e-3 scale (the rest is ~0)
    ulps     max |a - b| / (eps32 * scale), eps32 = 2^-23: the error in units of float32
             rounding at the tensor's scale

where scale is max|b|, or 1e-3 of the largest max|b| among the step's outputs (for an output)
or gradients (for a gradient) where that is more: errors in a tensor a thousand times smaller
than the step's largest are judged at that scale. A tensor below 1e-5 of it is marked ~0 and
not judged: it is zero up to rounding (the gradient of a conv's bias before BatchNorm, exactly
0 in exact arithmetic, is float32's rounding noise of a sum that cancels), with no scale of its
own to measure an error against.

and the first tensor above --threshold ulps is named: where the two part.

    reference   minicnn.use("reference") on NumPy: the textbook maths
    fast        minicnn.use("fast") on NumPy (minicnn.ops)
    torch       PyTorch on the CPU: minicnn.bench.models.torch_twin of the model
    cupy        minicnn.use("fast") on CuPy: its generic path (CuPy's operations, cuBLAS)
    raw         minicnn.use("raw") on CuPy: the hand-written CUDA kernels (float32 only)
    torch-cuda, torch-cuda-tf32     PyTorch on the GPU, TF32 off / on (matmuls and cuDNN)

By default: reference, fast and torch (where installed), and the GPU ones where a GPU is.
With --steps N, each also takes N SGD steps (momentum 0.9, --lr) on N batches, as training runs
them (the fast Sequential with its reordering), and compare_drift.png shows, step by step, how
far each one's weights are from the baseline's (the largest ulps over the parameters).
"""
import argparse
import contextlib
import math
import os
from typing import NamedTuple

import numpy as np
from matplotlib.figure import Figure

import minicnn
from minicnn import backend
from minicnn.backend import to_numpy
from minicnn.errors import BackendError, UsageError
from minicnn.inspect import backward_layers, forward_layers, join_names, named_layers
from minicnn.nn.containers import Residual, Sequential
from minicnn.nn.layers import walk
from minicnn.nn.losses import SoftmaxCrossEntropy
from minicnn.nn.model import layer_config, layer_from_config, load
from minicnn.nn.optim import SGD
from minicnn.nn.serialization import open_archive
from minicnn.nn import zoo
from minicnn.training.cli import positive_int, run
from minicnn.training.plots import _save_png

EPS32 = float(np.finfo(np.float32).eps)          # 2^-23
REL_FLOOR = 1e-3       # rel ignores elements below this fraction of the tensor's largest
ZERO = 1e-5            # a tensor below this fraction of the largest of its kind is ~0: unjudged
THRESHOLD = 100        # ulps: reference, fast and torch stay within ~15 on a step (docs/inspect.md)
MOMENTUM = 0.9
CPU = ("reference", "fast", "torch")
GPU = ("cupy", "raw", "torch-cuda", "torch-cuda-tf32")
IMPLEMENTATIONS = CPU + GPU


# ---- the copies of the model, one per implementation --------------------------------------------
def model_copy(model, dtype):
    """A fresh copy of model with its weights and state in dtype, every Dropout's p at 0."""
    def convert(config):
        if isinstance(config, list):
            return [convert(c) for c in config]
        if not isinstance(config, dict):
            return config
        config = {k: convert(v) for k, v in config.items()}
        if "dtype" in config:
            config["dtype"] = np.dtype(dtype).name
        if config.get("type") == "Dropout":
            config["p"] = 0.0
        return config
    copy = layer_from_config(convert(layer_config(model)))
    for mine, theirs in ((copy.params, model.params), (copy.state, model.state)):
        for name, value in mine.items():
            value[...] = to_numpy(theirs[name])
    return copy


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def available():
    """The implementations this machine can run, in IMPLEMENTATIONS order."""
    torch = _torch()
    gpu = backend.gpu_available()
    cuda = torch is not None and torch.cuda.is_available()
    ok = {"reference": True, "fast": True, "torch": torch is not None, "cupy": gpu, "raw": gpu,
          "torch-cuda": cuda, "torch-cuda-tf32": cuda}
    return [name for name in IMPLEMENTATIONS if ok[name]]


def check_implementations(names, dtype):
    """names as a list, or UsageError / BackendError saying which one cannot run here."""
    names = list(names)
    for name in names:
        if name not in IMPLEMENTATIONS:
            raise UsageError(f"Unknown implementation {name!r}; choose from "
                             f"{', '.join(IMPLEMENTATIONS)}.")
    if len(names) < 2 or len(set(names)) != len(names):
        raise UsageError(f"Give two or more different implementations to compare, got "
                         f"{','.join(names)}.")
    if "raw" in names and np.dtype(dtype) != np.float32:
        raise UsageError("The raw CUDA kernels are float32 only; use --dtype float32 with raw.")
    torch = _torch() if any(name.startswith("torch") for name in names) else None
    for name in names:
        if name.startswith("torch") and torch is None:
            raise UsageError(f"{name} needs PyTorch: pip install torch.")
        if name in ("cupy", "raw"):
            backend.get_backend("cupy")                 # BackendError: what to install
        if name.startswith("torch-cuda") and not torch.cuda.is_available():
            raise BackendError(f"{name} needs PyTorch built with CUDA and a GPU, and "
                               f"torch.cuda.is_available() is False here.")
    return names


class Runner:
    """One implementation's copy of the model (minicnn's: reference, fast, cupy, raw):
    step(x, labels) -> tensors(...) of one training step, train_step(x, labels, lr) one SGD
    step as training runs it, weights() -> {param name: NumPy copy}."""

    def __init__(self, name, model, dtype):
        self.name, self.dtype = name, np.dtype(dtype)
        self.layers = named_layers(model)
        self.model = model_copy(model, dtype)
        self.device = "cupy" if name in ("cupy", "raw") else "numpy"
        self.implementation = "reference" if name == "reference" else (
            "raw" if name == "raw" else "fast")
        self.model.to(self.device)
        self.optimizer = None

    def _inputs(self, x, labels):
        xp = backend.get_backend(self.device)
        return xp.asarray(x.astype(self.dtype)), xp.asarray(labels)

    def step(self, x, labels):
        x, labels = self._inputs(x, labels)
        with minicnn.use(self.implementation):
            logits, outputs = forward_layers(self.model, x, training=True)
            loss, dlogits = SoftmaxCrossEntropy()(logits, labels)
            _, input_grads = backward_layers(self.model, dlogits)
        return tensors(self.layers, outputs, input_grads, self.model.grads, loss)

    def train_step(self, x, labels, lr):
        x, labels = self._inputs(x, labels)
        self.optimizer = self.optimizer or SGD(self.model, lr=lr, momentum=MOMENTUM)
        with minicnn.use(self.implementation):
            _, dlogits = SoftmaxCrossEntropy()(self.model.forward(x, training=True), labels)
            self.model.backward(dlogits, input_grad=False)
            self.optimizer.step()

    def weights(self):
        return {k: np.array(to_numpy(v)) for k, v in self.model.params.items()}


class TorchRunner(Runner):
    """PyTorch's twin of the model (minicnn.bench.models.torch_twin) with the same weights;
    forward hooks keep each layer's output, full backward hooks the gradient of its input."""

    def __init__(self, name, model, dtype):
        from minicnn.bench.models import torch_twin
        self.torch = torch = _torch()
        self.name, self.dtype, self.layers = name, np.dtype(dtype), named_layers(model)
        self.device = "cuda" if name.startswith("torch-cuda") else "cpu"
        self.tf32 = name == "torch-cuda-tf32"
        copy = model_copy(model, dtype)
        self.module = torch_twin(copy, torch).to(self.device, getattr(torch, self.dtype.name))
        self.modules = _twins(copy, self.module)                # {layer name: torch module}
        # torch_twin's weights went through float32: copy them again, exactly, in dtype
        with torch.no_grad():
            for name, layer in named_layers(copy):
                arrays = {**layer.params, **layer.state}
                module = self.modules[name]
                for key, tensor in (*module.named_parameters(recurse=False),
                                    *module.named_buffers(recurse=False)):
                    if key in arrays:
                        tensor.copy_(torch.from_numpy(arrays[key]))
        self.optimizer = None

    def _inputs(self, x, labels):
        torch = self.torch
        return (torch.tensor(x, dtype=getattr(torch, self.dtype.name), device=self.device),
                torch.tensor(labels, dtype=torch.int64, device=self.device))

    @contextlib.contextmanager
    def _precision(self):
        """TF32 as this runner says (on for torch-cuda-tf32, off otherwise), restored after."""
        flags = self.torch.backends.cuda.matmul, self.torch.backends.cudnn
        before = [f.allow_tf32 for f in flags]
        try:
            for f in flags:
                f.allow_tf32 = self.tf32
            yield
        finally:
            for f, value in zip(flags, before):
                f.allow_tf32 = value

    def step(self, x, labels):
        torch = self.torch
        x, labels = self._inputs(x, labels)
        x.requires_grad_(True)
        outputs, input_grads, hooks = {}, {}, []
        for name, module in self.modules.items():
            hooks.append(module.register_forward_hook(
                lambda m, args, out, name=name: outputs.__setitem__(name, out.detach())))
            hooks.append(module.register_full_backward_hook(
                lambda m, grad_in, grad_out, name=name: input_grads.__setitem__(name,
                                                                                 grad_in[0])))
        try:
            with self._precision():
                self.module.train()
                self.module.zero_grad()
                loss = torch.nn.functional.cross_entropy(self.module(x), labels)
                loss.backward()
        finally:
            for hook in hooks:
                hook.remove()
        grads = {join_names(name, key): p.grad for name, _ in self.layers
                 for key, p in self.modules[name].named_parameters(recurse=False)}
        outputs, input_grads, grads = ({k: v.detach().cpu().numpy() for k, v in d.items()
                                        if v is not None}
                                       for d in (outputs, input_grads, grads))
        return tensors(self.layers, outputs, input_grads, grads, float(loss.detach()))

    def train_step(self, x, labels, lr):
        torch = self.torch
        x, labels = self._inputs(x, labels)
        self.optimizer = self.optimizer or torch.optim.SGD(self.module.parameters(), lr=lr,
                                                           momentum=MOMENTUM)
        with self._precision():
            self.module.train()
            self.optimizer.zero_grad()
            torch.nn.functional.cross_entropy(self.module(x), labels).backward()
            self.optimizer.step()

    def weights(self):
        return {join_names(name, key): p.detach().cpu().numpy() for name, _ in self.layers
                for key, p in self.modules[name].named_parameters(recurse=False)}


def _twins(layer, module, prefix=""):
    """{layer name: torch module} for torch_twin(layer)'s layers, named as named_layers names
    minicnn's (torch_twin mirrors Sequential and Residual one to one)."""
    if isinstance(layer, (Sequential, Residual)):
        subs = (list(module) if isinstance(layer, Sequential) else
                [getattr(module, name) for name, _ in layer.named_layers()])
        found = {}
        for (name, sub), twin in zip(layer.named_layers(), subs):
            found.update(_twins(sub, twin, join_names(prefix, name)))
        return found | ({prefix: module} if isinstance(layer, Residual) else {})
    return {prefix: module}


def runner(name, model, dtype):
    return (TorchRunner if name.startswith("torch") else Runner)(name, model, dtype)


# ---- the comparison ------------------------------------------------------------------------------
def tensors(layers, outputs, input_grads, grads, loss):
    """[(layer name, layer type, tensor, NumPy float64)] in the order a step makes them: each
    layer's output, the loss, then going back each layer's parameter gradients and dx."""
    rows = [(name, type(layer).__name__, "out", outputs[name]) for name, layer in layers]
    rows.append(("", "loss", "loss", loss))
    for name, layer in reversed(layers):
        rows += [(name, type(layer).__name__, f"d{key}", grads[join_names(name, key)])
                 for key in ([] if layer.is_container else layer.params)]
        if input_grads.get(name) is not None:
            rows.append((name, type(layer).__name__, "dx", input_grads[name]))
    return [(n, t, what, np.asarray(to_numpy(a), dtype=np.float64)) for n, t, what, a in rows]


def errors(a, b, floor=0.0):
    """(abs, rel, ulps) of a against the baseline b, at the scale max(max|b|, floor) (the
    module docstring defines them)."""
    diff = np.abs(a - b)
    scale = max(float(np.abs(b).max(initial=0.0)), floor)
    big = np.abs(b) >= REL_FLOOR * scale
    rel = float((diff[big] / np.abs(b[big])).max(initial=0.0)) if scale > 0 else 0.0
    return (float(diff.max(initial=0.0)), rel,
            float(diff.max(initial=0.0)) / (EPS32 * scale) if scale > 0 else 0.0)


class Comparison(NamedTuple):
    """compare()'s result: baseline name; rows [(layer, type, tensor, {implementation:
    (abs, rel, ulps)}, zero: the tensor is ~0 and not judged)]; parting {implementation:
    (layer, type, tensor) of the first row above threshold, or None}; threshold in ulps."""
    baseline: str
    rows: list
    parting: dict
    threshold: float


def compare(model, x, labels, implementations=("reference", "fast", "torch"),
            dtype=np.float32, threshold=THRESHOLD):
    """One training step of model on x (N, C, H, W), labels (N,) on each implementation, each
    compared with the first, tensor by tensor -> Comparison."""
    names = check_implementations(implementations, dtype)
    results = {name: runner(name, model, dtype).step(x, labels) for name in names}
    base = results[names[0]]
    largest = {}                                # of the outputs (and loss), of the gradients
    for _, _, what, b in base:
        family = what.startswith("d")
        largest[family] = max(largest.get(family, 0.0), float(np.abs(b).max(initial=0.0)))
    rows, parting = [], {name: None for name in names[1:]}
    for i, (layer, kind, what, b) in enumerate(base):
        errs, zero = {}, float(np.abs(b).max(initial=0.0)) < ZERO * largest[what.startswith("d")]
        for name in names[1:]:
            got = results[name][i]
            assert got[:3] == (layer, kind, what), (got[:3], (layer, kind, what))
            errs[name] = errors(got[3], b, REL_FLOOR * largest[what.startswith("d")])
            if parting[name] is None and errs[name][2] > threshold and not zero:
                parting[name] = (layer, kind, what)
        rows.append((layer, kind, what, errs, zero))
    return Comparison(names[0], rows, parting, threshold)


def _label(layer, kind, what):
    return f"{layer} {kind} {what}".strip() if layer else what


def print_comparison(c, print_fn=print):
    """One table per implementation against the baseline, then where each parts from it."""
    for name in c.parting:
        print_fn(f"\n{name} against {c.baseline}")
        print_fn(f"  {'tensor':<32}{'abs':>11}{'rel':>11}{'ulps':>11}")
        for layer, kind, what, errs, zero in c.rows:
            a, r, u = errs[name]
            mark = ("  <- parts" if c.parting[name] == (layer, kind, what) else
                    "  ~0, not judged" if zero else "")
            print_fn(f"  {_label(layer, kind, what):<32}{a:>11.2e}{r:>11.2e}{u:>11.1f}{mark}")
    print_fn("")
    for name, where in c.parting.items():
        if where is None:
            worst = max((row for row in c.rows if not row[4]), key=lambda row: row[3][name][2])
            print_fn(f"{name} and {c.baseline} agree: no tensor above {c.threshold:g} ulps "
                     f"(the largest: {worst[3][name][2]:.1f} at {_label(*worst[:3])}).")
        else:
            row = next(r for r in c.rows if r[:3] == where)
            print_fn(f"{name} parts from {c.baseline} at {_label(*where)} "
                     f"({row[3][name][2]:.1f} ulps > {c.threshold:g})." + _near_tie(c, row, name))


def _near_tie(c, row, name):
    """A note when a MaxPool2D's or ReLU's dx parts after every output agreed: the gradient
    of a choice (which input is a window's largest, whether one is above 0) that rounding in
    the forward made differently, where two candidates were within a few ulps."""
    layer, kind, what, errs, _ = row
    outputs_agree = all(r[3][name][2] <= c.threshold for r in c.rows if r[2] in ("out", "loss"))
    if kind in ("MaxPool2D", "ReLU") and what == "dx" and errs[name][1] > 0.5 and outputs_agree:
        tie = "two values of a window" if kind == "MaxPool2D" else "a value and 0"
        return (f" Every output agreed: at a near tie ({tie} a few ulps apart) rounding in the "
                f"forward chose differently, and the gradient went to another pixel.")
    return ""


# ---- drift over several steps -------------------------------------------------------------------
def drift(model, batches, implementations=("reference", "fast", "torch"), dtype=np.float32,
          lr=0.01):
    """Each implementation trains its copy of model on batches [(x, labels)], SGD with momentum
    0.9 -> {implementation: [the largest ulps (errors()) over the parameters against the
    baseline's, after each step]} for every implementation but the first."""
    names = check_implementations(implementations, dtype)
    runners = [runner(name, model, dtype) for name in names]
    distances = {name: [] for name in names[1:]}
    for x, labels in batches:
        for r in runners:
            r.train_step(x, labels, lr)
        base = {k: v.astype(np.float64) for k, v in runners[0].weights().items()}
        for r in runners[1:]:
            w = r.weights()
            distances[r.name].append(max(errors(w[k].astype(np.float64), b)[2]
                                         for k, b in base.items()))
    return distances


def plot_drift(distances, baseline, path, title=""):
    """The distance of each implementation's weights from the baseline's, step by step."""
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.subplots()
    for name, d in distances.items():
        steps = np.arange(1, len(d) + 1)
        ax.plot(steps, np.maximum(d, 1e-3), marker="o", markersize=2, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("SGD step")
    ax.set_ylabel(f"max over parameters of\n|w - w_{baseline}| / (eps32 max|w|)")
    ax.set_title(title or f"weights' distance from {baseline}'s", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    _save_png(fig, path)


# ---- the command ---------------------------------------------------------------------------------
def build_parser():
    parser = argparse.ArgumentParser(prog="python -m minicnn.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="keras-tutorial",
                        help=f"a preset: {', '.join(zoo.MODELS)} (default keras-tutorial)")
    parser.add_argument("--checkpoint", default=None,
                        help="start from this model file's weights instead of a fresh preset")
    parser.add_argument("--implementations", default=None,
                        help=f"comma-separated, the first the baseline; from "
                             f"{', '.join(IMPLEMENTATIONS)} (default: those this machine runs)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--batch", type=positive_int, default=16, help="images (default 16)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="also train N steps on each and plot the drift")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD's rate for --steps")
    parser.add_argument("--threshold", type=float, default=THRESHOLD,
                        help=f"ulps above which two tensors part (default {THRESHOLD})")
    parser.add_argument("--seed", type=int, default=0, help="weights and batches (default 0)")
    parser.add_argument("--out", default=".", help="where compare_drift.png goes (default .)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _input_shape(checkpoint):
    """(C, H, W) of the images a checkpoint of python -m minicnn.train was trained on (its
    "input_shape"), else CIFAR-10's (3, 32, 32): a preset's, or a model file's without one."""
    if checkpoint is None:
        return 3, 32, 32
    with open_archive(checkpoint) as archive:
        extra = archive.header.get("extra")
    shape = extra.get("input_shape") if isinstance(extra, dict) else None
    return tuple(shape) if isinstance(shape, list) and len(shape) == 3 else (3, 32, 32)


def _batch(rng, n, shape, classes):
    x = rng.standard_normal((n,) + shape).astype(np.float32)          # (N, C, H, W)
    return x, rng.integers(0, classes, n)


def _main(argv):
    args = build_parser().parse_args(argv)
    if args.model not in zoo.MODELS:
        raise UsageError(f"Unknown model {args.model!r}; choose one of: "
                         f"{', '.join(zoo.MODELS)}.")
    names = (available() if args.implementations is None
             else [n.strip() for n in args.implementations.split(",") if n.strip()])
    check_implementations(names, args.dtype)
    if not (0 <= args.lr < math.inf and 0 < args.threshold < math.inf and args.seed >= 0):
        raise UsageError(f"--lr must be a number >= 0, --threshold one > 0 and --seed a whole "
                         f"number >= 0, got {args.lr:g}, {args.threshold:g} and {args.seed}.")
    rng = np.random.default_rng(args.seed)
    model = (load(args.checkpoint) if args.checkpoint else
             zoo.build_model(args.model, rng=rng))
    shape = _input_shape(args.checkpoint)
    classes = next(layer for layer in reversed(list(walk(model)))
                   if "weight" in layer.params).params["weight"].shape[0]
    x, labels = _batch(rng, args.batch, shape, classes)
    what = args.checkpoint or args.model
    print(f"minicnn.compare  {what}  batch {args.batch}  {args.dtype}  seed {args.seed}  "
          f"baseline {names[0]}")
    c = compare(model, x, labels, names, args.dtype, args.threshold)
    print_comparison(c)
    if args.steps:
        batches = [_batch(rng, args.batch, shape, classes) for _ in range(args.steps)]
        distances = drift(model, batches, names, args.dtype, args.lr)
        path = os.path.join(args.out, "compare_drift.png")
        plot_drift(distances, names[0], path, f"{what}, {args.dtype}, batch {args.batch}, "
                                              f"SGD lr {args.lr:g} momentum {MOMENTUM}")
        print(f"\nweights' distance from {names[0]}'s (max ulps over the parameters):")
        marks = sorted({1, max(1, args.steps // 4), max(1, args.steps // 2), args.steps})
        print(f"  {'step':<18}" + "".join(f"{s:>10}" for s in marks))
        for name, d in distances.items():
            print(f"  {name:<18}" + "".join(f"{d[s - 1]:>10.1f}" for s in marks))
        print(f"wrote {path}")
    return 0


def main(argv=None):
    """The command line: exit status 0, or 2 with one sentence on stderr for bad input."""
    return run(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
