"""python -m minicnn.precision: the precision ladder, one training step in each floating-point
format, every layer's error against float64.

    python -m minicnn.precision [--model keras-tutorial] [--batch 32] [--seed 0]
                                [--backend numpy] [--loss-scale 32768]

One batch (standard-normal images, what normalised images look like, and random labels, both
from --seed) goes forward and backward through the preset once in each precision, from the
same weights:

    float64    the truth: the model in float64
    float32    the model in float32
    float16    mixed_float16: float32 master weights, layers computing in float16, batch norm,
               softmax and the loss in float32 (minicnn.mixed_precision), the loss scaled
    bfloat16   mixed_bfloat16, the same (bfloat16 from ml_dtypes on NumPy), the loss scaled
    tf32       on CuPy only: float32 with the GEMMs on TF32 tensor cores (unverified: no GPU)

For each layer (every one, inside blocks too, run a layer at a time in the model's list order
as python -m minicnn.compare does; Dropout drops nothing) it prints the relative error
||a - a64|| / ||a64|| of the layer's output and of its gradient: the gradient of its
parameters for a layer that has them (what the optimiser applies), of its input otherwise.
The 16-bit rows run with the dynamic loss scale of minicnn.mixed_precision.LossScaleOptimizer:
2**15 (or --loss-scale), halved while the scaled gradients overflow (the steps the scaler
would skip); the table says the scale each row used, and the gradients are compared after
dividing by it. (Training
with mixed_bfloat16 does not scale the loss, as Keras does not: bfloat16 has float32's exponent
range. The ladder scales both 16-bit rows so that they differ in their format only.)
"""
import argparse
import contextlib

import numpy as np

from minicnn import mixed_precision
from minicnn.backend import array_module, get_backend, tf32_matmuls, to_device, to_numpy
from minicnn.compare import model_copy
from minicnn.errors import UsageError
from minicnn.inspect import backward_layers, forward_layers, named_layers
from minicnn.nn.losses import SoftmaxCrossEntropy
from minicnn.nn.zoo import MODELS, build_model
from minicnn.training.cli import positive_int, run

# precision -> (model dtype, policy); tf32 is float32 under tf32_matmuls()
RUNGS = {"float64": (np.float64, "float32"), "float32": (np.float32, "float32"),
         "float16": (np.float32, "mixed_float16"), "bfloat16": (np.float32, "mixed_bfloat16"),
         "tf32": (np.float32, "float32")}
INITIAL_SCALE = 2.0 ** 15           # LossScaleOptimizer's, Keras's
SCALE_TRIES = 64                    # halvings before a rung gives up (gradients inf at any scale)


def relative_error(a, truth):
    """||a - truth|| / ||truth|| in float64 (Frobenius norms); ||a|| where truth is all 0."""
    a, truth = (np.asarray(to_numpy(v), dtype=np.float64) for v in (a, truth))
    norm = np.linalg.norm(truth)
    diff = np.linalg.norm(a - truth)
    return diff / norm if norm > 0 else diff


def one_step(model, x, labels, loss_scale=1.0):
    """Forward and backward of model a layer at a time in its list order (minicnn.inspect's
    forward_layers: every layer's own output is seen), training mode, the loss's gradient
    multiplied by loss_scale -> (loss, [(name, grad of params?, output, gradient)]) for every
    layer (and Residual sum), the gradients divided by loss_scale again, as float64 on the
    host: the layer's parameter gradients, concatenated, where it has parameters of its own,
    else d loss / d its input."""
    logits, outputs = forward_layers(model, x, training=True)
    loss, dy = SoftmaxCrossEntropy()(logits, labels)
    _, input_grads = backward_layers(model, dy * dy.dtype.type(loss_scale))
    rows = []
    for name, layer in named_layers(model):
        own = bool(not layer.is_container and layer.params)
        grad = _concatenated(layer.grads.values()) if own else input_grads[name]
        rows.append((f"{name} {type(layer).__name__}".strip(), own, outputs[name],
                     _scaled(grad, 1.0 / loss_scale)))
    return loss, rows


def _concatenated(arrays):
    """The arrays flattened into one (1-D), on their device."""
    flat = [a.ravel() for a in arrays]
    return array_module(*flat).concatenate(flat)


def _scaled(g, factor):
    """g times factor in float64 on the host (the unscaled gradient, for comparing)."""
    return np.asarray(to_numpy(g), dtype=np.float64) * factor


def _finite(step):
    """Whether one_step's loss and every gradient are finite (no float16 overflow)."""
    loss, rows = step
    return np.isfinite(float(loss)) and all(np.isfinite(g).all() for *_, g in rows)


def rung(truth_model, precision, x, labels, backend="numpy", loss_scale=None):
    """One step of a copy of truth_model (float64) in precision -> (loss scale, loss, rows).
    The 16-bit rungs start at loss_scale (default INITIAL_SCALE; 1: no scaling) and halve it
    while the gradients overflow."""
    dtype, policy = RUNGS[precision]
    model = model_copy(truth_model, dtype).to(backend)      # (Dropout: p = 0 in every copy)
    scaled = policy != "float32"
    scale = (loss_scale or INITIAL_SCALE) if scaled else 1.0
    context = tf32_matmuls(x) if precision == "tf32" else contextlib.nullcontext()
    with mixed_precision.set_global_policy(policy), context:
        for _ in range(SCALE_TRIES):
            step = one_step(model, x.astype(dtype), labels, scale)
            if _finite(step) or not scaled:
                return scale, *step
            scale /= 2
    raise UsageError(f"The {precision} step gives inf or NaN gradients at every loss scale down "
                     f"to {scale:g}: its forward pass overflows.")


def ladder(model, x, labels, precisions=("float32", "float16", "bfloat16"), backend="numpy",
           loss_scale=None):
    """The ladder of model (its weights are the truth's, run in float64) on the batch x, labels
    -> {"layers": [name], "grad_of": ["params" | "input"], "loss": float64 loss,
    "rungs": {precision: {"scale", "loss", "output": [error], "gradient": [error]}}}, the
    errors relative to float64's. loss_scale: the 16-bit rungs' first scale (rung)."""
    x = to_device(np.asarray(x, dtype=np.float64), backend)
    labels = np.asarray(labels)
    _, truth_loss, truth = rung(model, "float64", x, labels, backend)
    result = {"layers": [name for name, *_ in truth],
              "grad_of": ["params" if own else "input" for _, own, *_ in truth],
              "loss": float(truth_loss), "rungs": {}}
    for precision in precisions:
        scale, loss, rows = rung(model, precision, x, labels, backend, loss_scale)
        result["rungs"][precision] = {
            "scale": scale, "loss": relative_error(loss, truth_loss),
            "output": [relative_error(r[2], t[2]) for r, t in zip(rows, truth)],
            "gradient": [relative_error(r[3], t[3]) for r, t in zip(rows, truth)]}
    return result


def format_table(result):
    """The ladder as text: a row a layer, its output's and its gradient's errors in each
    precision, then the loss's, and the loss scale each precision used."""
    rungs, names = result["rungs"], list(result["rungs"])
    width = max(len(n) for n in result["layers"]) + 2
    cells = 10 * len(names)
    head = (f"{'':<{width + 8}}{'output':^{cells}}  {'gradient':^{cells}}\n"
            f"{'layer':<{width}}{'grad of':<8}" + "".join(f"{n:>10}" for n in names) + "  "
            + "".join(f"{n:>10}" for n in names))
    lines = [head, "-" * (width + 8 + 2 * cells + 2)]
    for i, name in enumerate(result["layers"]):
        lines.append(f"{name:<{width}}{result['grad_of'][i]:<8}"
                     + "".join(f"{rungs[n]['output'][i]:>10.1e}" for n in names) + "  "
                     + "".join(f"{rungs[n]['gradient'][i]:>10.1e}" for n in names))
    lines.append(f"{'loss':<{width + 8}}" + "".join(f"{rungs[n]['loss']:>10.1e}" for n in names))
    lines.append("loss scale: " + ", ".join(f"{n} {rungs[n]['scale']:g}" for n in names))
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m minicnn.precision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="keras-tutorial",
                        help=f"model preset: {', '.join(MODELS)} (default keras-tutorial)")
    parser.add_argument("--batch", type=positive_int, default=32, help="images (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="weights, images and labels")
    parser.add_argument("--backend", default="numpy", help="numpy (CPU) or cupy (GPU: adds tf32)")
    parser.add_argument("--loss-scale", type=float, default=INITIAL_SCALE,
                        help="the 16-bit rows' loss scale, halved while their gradients "
                             "overflow (default 2**15, the scaler's; 1: no scaling)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _main(argv):
    args = build_parser().parse_args(argv)
    if args.model not in MODELS:
        raise UsageError(f"Unknown model {args.model!r}; choose one of: {', '.join(MODELS)}.")
    if args.backend not in ("numpy", "cupy"):
        raise UsageError(f"--backend must be numpy or cupy, got {args.backend!r}.")
    if not 0 < args.loss_scale < float("inf"):
        raise UsageError(f"--loss-scale must be a positive number, got {args.loss_scale}.")
    get_backend(args.backend)                   # a missing CuPy/GPU: its sentence
    size = (224, 224) if args.model == "resnet18" else (32, 32)
    rng = np.random.default_rng(args.seed)
    model = build_model(args.model, rng=rng, dtype=np.float64, image_size=size)
    x = rng.standard_normal((args.batch, 3) + size)
    labels = rng.integers(0, 10 if args.model != "resnet18" else 1000, size=args.batch)
    precisions = ["float32", "float16"]
    if mixed_precision.BFLOAT16 is not None:
        precisions.append("bfloat16")
    if args.backend == "cupy":
        precisions.append("tf32")
    print(f"precision ladder: {args.model}, one training step on {args.batch} images "
          f"(seed {args.seed}), {args.backend}; relative error ||a - a64|| / ||a64|| against "
          f"float64")
    print(format_table(ladder(model, x, labels, precisions, args.backend, args.loss_scale)))
    if mixed_precision.BFLOAT16 is None:
        print('(no bfloat16 row: pip install "minicnn[precision]" for ml_dtypes)')
    return 0


def main(argv=None):
    """The command line: exit status 0, or 2 with one sentence on stderr for bad input."""
    return run(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
