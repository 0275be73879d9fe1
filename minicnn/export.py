"""ONNX export: a minicnn model as an ONNX graph (opset 17) that onnxruntime runs, and that the
converters which read ONNX (to TensorFlow Lite, TensorRT, Core ML...) take from there.

    model.export_onnx("model.onnx", (3, 32, 32))                       # Python
    python -m minicnn.export runs/resnet-small/best.npz model.onnx     # a training checkpoint

Each layer becomes the ONNX operator of the same maths, its parameters initializers named as
minicnn (and PyTorch) names them ("0.weight", "3.body.1.running_var"):

    Conv2D -> Conv (strides, pads, dilations, group)       Dense -> Gemm (transB=1)
    MaxPool2D -> MaxPool, AvgPool2D -> AveragePool          BatchNorm1D/2D -> BatchNormalization
      (padding never counts in a window: count_include_pad=0,   (inference form: the running
      minicnn's rule for average pooling with padding)          statistics)
    GlobalAveragePooling2D -> GlobalAveragePool + Flatten   ReLU -> Relu, Softmax -> Softmax
    Flatten -> Flatten                                      Residual -> its branches + Add
    Dropout -> nothing (the identity at inference)          Sequential -> its layers in order

The graph is float32 (a float64 model's parameters are rounded), its input "images" of shape
(N, C, H, W), NCHW, with N left free (any batch size); its output "outputs" (N, K). Needs the
onnx package (pip install "minicnn[export]"); onnxruntime only to check the file.
"""
import argparse
import json
import numbers
import os
import sys

import numpy as np

import minicnn
from minicnn.backend import array_module, to_numpy
from minicnn.datasets import loading as datasets
from minicnn.errors import BackendError, UsageError
from minicnn.nn.layers import LAYER_TYPES
from minicnn.nn.serialization import atomic_write
from minicnn.ops.im2col import to_pair
from minicnn.training.checkpoint import load_for_inference, predict_logits
from minicnn.training.cli import positive_int, run

OPSET = 17                  # ONNX 1.12+ and every onnxruntime since 1.12 run it
INPUT, OUTPUT = "images", "outputs"
PIXEL_SCALE = 255.0         # minicnn.datasets.loading.normalize: (x / 255 - mean) / std
TOLERANCE = 1e-4            # onnxruntime vs minicnn: max |difference| / max |minicnn's output|
MAX_BYTES = 2**31 - 1       # protobuf's limit on one message: an ONNX file without external data
INSTALL = 'pip install "minicnn[export]"'


def _onnx():
    """The onnx package, or a BackendError that says how to install it."""
    try:
        import onnx
    except ImportError:
        raise BackendError(f"Exporting to ONNX needs the onnx package: {INSTALL}.") from None
    return onnx


class OnnxGraph:
    """The nodes and initializers of the graph being built; each layer adds its own."""

    def __init__(self, onnx):
        self.onnx = onnx
        self.nodes = []
        self.initializers = []
        self._names = {}                # node name -> how many nodes asked for it

    def constant(self, name, array):
        """An initializer called name holding array as float32 -> name."""
        value = np.ascontiguousarray(to_numpy(array), dtype=np.float32)
        self.initializers.append(self.onnx.numpy_helper.from_array(value, name))
        return name

    def node(self, op, inputs, name, **attributes):
        """Add the operator op on inputs (names) -> the name of its one output: name, or
        name_2, name_3... when a node already has it (every output is written once)."""
        count = self._names[name] = self._names.get(name, 0) + 1
        name = name if count == 1 else f"{name}_{count}"
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [name], name=name, **attributes))
        return name


# ---- one function per layer type: (graph, layer, its parameter prefix, input name, x) ----------
# x is a sample input (1, ...) on the model's device; each returns (output name, layer(x)), the
# sample output giving the next layer its input shape.

def _pads(padding):
    """((top, bottom), (left, right)) -> ONNX's [top, left, bottom, right]."""
    (top, bottom), (left, right) = padding
    return [top, left, bottom, right]


def _weight_and_bias(graph, layer, prefix, x_name):
    """[input, weight, bias] of a Conv or Gemm node: names, the bias only where the layer has
    one (ONNX's optional third input)."""
    inputs = [x_name, graph.constant(prefix + "weight", layer.params["weight"])]
    if "bias" in layer.params:
        inputs.append(graph.constant(prefix + "bias", layer.params["bias"]))
    return inputs


def _conv(graph, layer, prefix, x_name, x):
    """Conv: y = W * x + b, weight (F, C / groups, KH, KW) as minicnn and ONNX both hold it."""
    inputs = _weight_and_bias(graph, layer, prefix, x_name)
    # dilation and groups: the layer's when it has them (a dense, undilated conv otherwise)
    dilation = to_pair(getattr(layer, "dilation", 1), "dilation")
    y = graph.node("Conv", inputs, prefix + "conv", kernel_shape=list(layer.kernel_size),
                   strides=list(layer.stride), pads=_pads(layer._padding_for(*x.shape[2:])),
                   dilations=list(dilation), group=getattr(layer, "groups", 1))
    return y, layer.forward(x)


def _pool(graph, layer, prefix, x_name, x):
    """MaxPool or AveragePool; padding is never a value in a window (max: ignored; average:
    count_include_pad=0, the mean of the real pixels, as minicnn's average pooling)."""
    attributes = dict(kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
                      pads=_pads(layer._padding_for(*x.shape[2:])))
    if type(layer).op == "maxpool2d":
        y = graph.node("MaxPool", [x_name], prefix + "maxpool", **attributes)
    else:
        y = graph.node("AveragePool", [x_name], prefix + "avgpool", count_include_pad=0,
                       **attributes)
    return y, layer.forward(x)


def _global_average_pool(graph, layer, prefix, x_name, x):
    """(N, C, H, W) -> GlobalAveragePool (N, C, 1, 1) -> Flatten (N, C)."""
    pooled = graph.node("GlobalAveragePool", [x_name], prefix + "global_avgpool")
    return graph.node("Flatten", [pooled], prefix + "flatten", axis=1), layer.forward(x)


def _dense(graph, layer, prefix, x_name, x):
    """Gemm: y = x @ W^T + b, weight (OUT, IN)."""
    inputs = _weight_and_bias(graph, layer, prefix, x_name)
    return graph.node("Gemm", inputs, prefix + "gemm", transB=1), layer.forward(x)


def _batchnorm(graph, layer, prefix, x_name, x):
    """Inference form: y = weight * (x - running_mean) / sqrt(running_var + eps) + bias."""
    inputs = [x_name] + [graph.constant(prefix + key, arrays[key])
                         for arrays, key in ((layer.params, "weight"), (layer.params, "bias"),
                                             (layer.state, "running_mean"),
                                             (layer.state, "running_var"))]
    y = graph.node("BatchNormalization", inputs, prefix + "batchnorm", epsilon=float(layer.eps))
    return y, layer.forward(x)


def _flatten(graph, layer, prefix, x_name, x):
    """(N, C, H, W) -> (N, C*H*W), row-major as minicnn's reshape."""
    return graph.node("Flatten", [x_name], prefix + "flatten", axis=1), layer.forward(x)


def _relu(graph, layer, prefix, x_name, x):
    return graph.node("Relu", [x_name], prefix + "relu"), layer.forward(x)


def _softmax(graph, layer, prefix, x_name, x):
    return graph.node("Softmax", [x_name], prefix + "softmax", axis=1), layer.forward(x)


def _dropout(graph, layer, prefix, x_name, x):
    """The identity at inference: no node."""
    return x_name, x


def _prefix(prefix, name):
    """A sub-layer's prefix: its container's and its name; a layer named "" lends its names to
    its container, as minicnn's parameter names do ("layer1.0.conv1.weight")."""
    return f"{prefix}{name}." if name else prefix


def _sequential(graph, layer, prefix, x_name, x):
    """The sub-layers in their listed order."""
    for name, sub in layer.named_layers():
        x_name, x = _emit(graph, sub, _prefix(prefix, name), x_name, x)
    return x_name, x


def _residual(graph, layer, prefix, x_name, x):
    """y = body(x) + shortcut(x), the shortcut the identity when the block has none."""
    (body_name, body), *shortcut = layer.named_layers()      # body first, then any shortcut
    y_name, y = _emit(graph, body, _prefix(prefix, body_name), x_name, x)
    s_name, s = x_name, x
    for name, sub in shortcut:
        s_name, s = _emit(graph, sub, _prefix(prefix, name), x_name, x)
    if y.shape != s.shape:
        layer.forward(x)                            # raises: it says which shapes differ
    return graph.node("Add", [y_name, s_name], prefix + "add"), y + s


# By class name: minicnn's own layers only (a user's subclass may compute something else). The
# names are those of minicnn.nn.layers.LAYER_TYPES; naming them keeps this module off
# minicnn.nn.containers, which imports it for the containers' export_onnx method.
WRITERS = {"Conv2D": _conv, "MaxPool2D": _pool, "AvgPool2D": _pool,
           "GlobalAveragePooling2D": _global_average_pool, "Dense": _dense,
           "BatchNorm1D": _batchnorm, "BatchNorm2D": _batchnorm, "Flatten": _flatten,
           "ReLU": _relu, "Softmax": _softmax, "Dropout": _dropout,
           "Sequential": _sequential, "Residual": _residual}


def _emit(graph, layer, prefix, x_name, x):
    """Add layer's nodes to graph -> (output name, layer's output for the sample x)."""
    name = type(layer).__name__
    if name not in WRITERS or LAYER_TYPES.get(name) is not type(layer):
        raise UsageError(f"{name} layers cannot be exported to ONNX yet; minicnn.export writes "
                         f"minicnn's {', '.join(WRITERS)}.")
    writer = WRITERS[name]
    try:
        return writer(graph, layer, prefix, x_name, x)
    except ValueError as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"The model cannot take input of this shape: {e}") from None


# ---- the graph -----------------------------------------------------------------------------------
def _input_shape(input_shape):
    """One example's shape, e.g. (3, 32, 32), as a tuple of positive Python ints."""
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if not shape or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool)
                            and n >= 1 for n in shape):
        raise UsageError(f"input_shape must be one example's shape, positive whole numbers such "
                         f"as (3, 32, 32), got {input_shape!r}.")
    return tuple(int(n) for n in shape)


def _normalization(normalization, channels):
    """{"mean": [C], "std": [C]} (a checkpoint's "norm") as float64 arrays, or None."""
    if normalization is None:
        return None
    try:
        mean = np.asarray(normalization["mean"], dtype=np.float64).reshape(-1)
        std = np.asarray(normalization["std"], dtype=np.float64).reshape(-1)
    except (KeyError, TypeError, ValueError):
        mean = std = None
    if (mean is None or mean.shape != (channels,) or std.shape != (channels,)
            or not np.isfinite(mean).all() or not np.isfinite(std).all() or std.min() <= 0):
        raise UsageError(f"normalization must be {{'mean': [...], 'std': [...]}}, {channels} "
                         f"finite numbers each, std above 0, got {normalization!r}.")
    return mean, std


def build_onnx(model, input_shape, class_names=None, normalization=None,
               fold_normalization=True):
    """-> the onnx.ModelProto of model for inputs of one example's shape input_shape (C, H, W);
    export_onnx describes the arguments."""
    onnx = _onnx()
    helper = onnx.helper
    shape = _input_shape(input_shape)
    norm = _normalization(normalization, shape[0])
    weights = 4 * sum(int(a.size) for a in (*model.params.values(), *model.state.values()))
    if weights > MAX_BYTES:
        raise UsageError(f"The model's {weights:,} bytes of float32 weights are more than one "
                         f"ONNX file holds ({MAX_BYTES:,}, protobuf's limit); minicnn does not "
                         f"write ONNX's external data files.")
    first = next(iter(model.params.values()), None)
    xp = array_module(first) if first is not None else np
    x = xp.zeros((1,) + shape, dtype=first.dtype if first is not None else np.float32)
    graph = OnnxGraph(onnx)
    x_name = INPUT
    if norm is not None and fold_normalization:
        # (pixels / 255 - mean) / std = (pixels - 255 mean) / (255 std); mean, std (1, C, 1, 1)
        stats = (-1,) + (1,) * (len(shape) - 1)
        mean = graph.constant("normalization.mean", (PIXEL_SCALE * norm[0]).reshape(1, *stats))
        std = graph.constant("normalization.std", (PIXEL_SCALE * norm[1]).reshape(1, *stats))
        x_name = graph.node("Div", [graph.node("Sub", [x_name, mean], "normalization.sub"), std],
                            "normalization.div")
    y_name, y = _emit(graph, model, "", x_name, x)
    if not graph.nodes or graph.nodes[-1].output[0] != y_name:    # a model of Dropout only
        graph.node("Identity", [y_name], "identity")
    graph.nodes[-1].output[0] = OUTPUT                   # the last node writes the output
    classes = list(class_names) if class_names is not None else None
    if classes is not None and tuple(y.shape[1:]) != (len(classes),):
        raise UsageError(f"The model gives outputs of shape {tuple(y.shape[1:])} per example "
                         f"for {len(classes)} class names.")
    inputs = [helper.make_tensor_value_info(INPUT, onnx.TensorProto.FLOAT, ["N", *shape])]
    outputs = [helper.make_tensor_value_info(OUTPUT, onnx.TensorProto.FLOAT,
                                             ["N", *(int(n) for n in y.shape[1:])])]
    proto = helper.make_model(
        helper.make_graph(graph.nodes, "minicnn", inputs, outputs, graph.initializers),
        opset_imports=[helper.make_opsetid("", OPSET)], producer_name="minicnn",
        producer_version=minicnn.__version__)
    proto.doc_string = _describe_input(shape, norm, fold_normalization)
    helper.set_model_props(proto, _metadata(shape, classes, norm, fold_normalization))
    return proto


def _describe_input(shape, norm, fold):
    layout = "NCHW" if len(shape) == 3 else "N, features"
    if norm is None:
        return f"input: float32 ({layout}), as minicnn's model.forward takes it."
    if fold:
        return (f"input: RGB pixel values 0-255 as float32 ({layout}); the graph normalises "
                f"them, (x / 255 - mean) / std, in its first two nodes.")
    return (f"input: float32 ({layout}), already normalised, (pixels / 255 - mean) / std with "
            f"the metadata's mean and std.")


def _metadata(shape, classes, norm, fold):
    """The model's metadata_props: strings, JSON where they hold lists."""
    props = {"input_layout": "NCHW" if len(shape) == 3 else "NC",
             "input": _describe_input(shape, norm, fold)}
    if classes is not None:
        props["classes"] = json.dumps(classes)
    if norm is not None:
        props["normalization"] = json.dumps({"mean": norm[0].tolist(), "std": norm[1].tolist(),
                                             "pixel_scale": PIXEL_SCALE, "in_graph": bool(fold)})
    return props


def export_onnx(model, path, input_shape, class_names=None, normalization=None,
                fold_normalization=True):
    """Write model to path as an ONNX file (opset OPSET), atomically -> the onnx.ModelProto.

    input_shape: one example's shape, e.g. (3, 32, 32); the batch dimension is left free.
    class_names: stored in the metadata ("classes", a JSON list), one per output.
    normalization: {"mean": [C], "std": [C]} as a checkpoint stores it ("norm"), the model's
    input being (pixels / 255 - mean) / std. With fold_normalization (the default) the graph
    takes the RGB pixel values 0-255 as float32 and normalises them itself in a first Sub and
    Div node; without, it takes normalised input and the metadata ("normalization": mean, std,
    pixel_scale, in_graph) says how to make it. Either way the metadata holds the numbers.
    Without normalization the graph takes what model.forward takes.
    """
    proto = build_onnx(model, input_shape, class_names, normalization, fold_normalization)
    data = proto.SerializeToString()
    atomic_write(path, lambda f: f.write(data))
    return proto


# ---- checking a file with onnxruntime ------------------------------------------------------------
def compare_with_onnxruntime(path, x, expected):
    """Run the ONNX file at path on x (N, ...) float32 in onnxruntime -> the largest
    |onnxruntime's output - expected|, or None when onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run([OUTPUT], {INPUT: np.asarray(x, dtype=np.float32)})
    return float(np.abs(out - np.asarray(expected, dtype=np.float64)).max())


# ---- python -m minicnn.export ------------------------------------------------------------------
def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m minicnn.export",
        description="Write a checkpoint of python -m minicnn.train as an ONNX file (opset "
                    f"{OPSET}), check it with onnx.checker and, when onnxruntime is installed, "
                    "compare its outputs with minicnn's on a random batch.")
    parser.add_argument("checkpoint", help="a .npz written by python -m minicnn.train")
    parser.add_argument("out", help="the .onnx file to write")
    parser.add_argument("--no-fold-normalization", dest="fold", action="store_false",
                        help="take normalised input and state mean and std in the metadata "
                             "(default: the graph takes pixels 0-255 and normalises them)")
    parser.add_argument("--check-images", type=positive_int, default=8,
                        help="random images in the onnxruntime comparison")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _main(argv):
    args = build_parser().parse_args(argv)
    onnx = _onnx()                                  # a missing package fails before the read
    net = load_for_inference(args.checkpoint)
    shape = (3,) + tuple(net.size)
    norm = {"mean": net.mean.tolist(), "std": net.std.tolist()}
    export_onnx(net.model, args.out, shape, net.classes, norm, args.fold)
    size = os.path.getsize(args.out)
    print(f"wrote {args.out} (ONNX opset {OPSET}, {size / 1e6:.2f} MB): {INPUT} [N, "
          f"{', '.join(map(str, shape))}] -> {OUTPUT} [N, {len(net.classes)}]")
    print(f"  {_describe_input(shape, norm, args.fold)}")
    print(f"  normalisation mean {_numbers(net.mean)}, std {_numbers(net.std)} "
          f"({'in the graph and ' if args.fold else ''}in the metadata)")
    print(f"  classes: {', '.join(net.classes)}")
    onnx.checker.check_model(args.out, full_check=True)
    print("  onnx.checker: the file is valid")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(args.check_images,) + shape, dtype=np.uint8)
    expected = predict_logits(net.model, pixels, net.mean, net.std, np)
    x = (pixels.astype(np.float32) if args.fold
         else datasets.normalize(pixels, net.mean, net.std))
    error = compare_with_onnxruntime(args.out, x, expected)
    if error is None:
        print("  onnxruntime is not installed, so the outputs were not compared (pip install "
              "onnxruntime to compare them)")
        return 0
    relative = error / max(float(np.abs(expected).max()), sys.float_info.min)
    print(f"  onnxruntime vs minicnn on {len(x)} random images: max |difference| {error:.2g} "
          f"({relative:.2g} of the largest output)")
    if not relative <= TOLERANCE:
        print(f"error: onnxruntime's outputs differ from minicnn's by more than {TOLERANCE:g} "
              f"of the largest; this is a bug in minicnn {minicnn.__version__}'s export, please "
              f"report it.", file=sys.stderr)
        return 1
    return 0


def _numbers(values):
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def main(argv=None):
    """The command line: exit status 0, or 2 with one sentence on stderr for bad input, 1 when
    onnxruntime disagrees with minicnn."""
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
