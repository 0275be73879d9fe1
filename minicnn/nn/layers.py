"""Layers: thin classes that own parameters, gradients and the cache; the maths is in function
pairs, from minicnn.reference, minicnn.ops (the default) or the CUDA kernels, whichever
minicnn.use() chose (minicnn.implementation.ops_for). A layer keeps the backward that matches
its forward beside the cache.

Every layer has
    forward(x, training=False) -> y      training=True keeps the cache backward needs
    backward(dy) -> dx                   fills self.grads (same keys and shapes as self.params),
                                         overwriting them: gradients are not accumulated
    params, grads                        dicts of live arrays, named "weight" and "bias"
    state                                non-trainable arrays (BatchNorm's running statistics)
    trainable                            False freezes the layer (Keras's name): no optimiser
                                         updates its params, backward computes no gradient
                                         of them, and BatchNorm normalises with its running
                                         statistics and keeps them (minicnn.nn.transfer)
Images are NCHW. Parameters use PyTorch's shapes, so weights can be copied across.
"""
import math
import numbers

import numpy as np

from minicnn import dtype_policy, implementation, ops
from minicnn.parallel import workers
from minicnn.nn import state_dicts
from minicnn.backend import array_module, to_device
from minicnn.ops.im2col import to_pair, same_padding


# minicnn's own layer classes by name (filled as each class is defined): what a saved model's
# description may name (minicnn.nn.model.layer_from_config).
LAYER_TYPES = {}


class Layer:
    """Base class: bookkeeping shared by every layer; subclasses add forward and backward."""
    _out_shape = None          # the last training forward's output shape: what dy must have
    is_container = False       # True for layers made of layers (their params are views)
    _trainable = True          # False: frozen (the trainable property)

    def __init_subclass__(cls, abstract=False, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__module__.startswith("minicnn.") and not (abstract or cls.__name__.startswith("_")):
            LAYER_TYPES[cls.__name__] = cls

    @classmethod
    def from_config(cls, config):
        """The layer that config() describes (fresh parameters); containers rebuild their
        sub-layers first."""
        return cls(**config)

    def __init__(self):
        self.params = {}
        self.grads = {}
        self.state = {}
        self._cache = None

    def __call__(self, x, training=False):
        return self.forward(x, training)

    def forward(self, x, training=False):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def zero_grad(self):
        for g in self.grads.values():
            g[...] = 0

    @property
    def trainable(self):
        """Whether training updates this layer (Keras's Layer.trainable). Set False to freeze
        it: its grads are zeroed and stay zero, optimisers skip its params, and a BatchNorm
        normalises with its running statistics and does not update them."""
        return self._trainable

    @trainable.setter
    def trainable(self, value):
        if not isinstance(value, bool):
            raise TypeError(f"trainable must be True or False, got {value!r}.")
        if not value and self._trainable:
            self.zero_grad()
        self._trainable = value

    @property
    def trainable_params(self):
        """The params an optimiser updates: all of them, or none when the layer is frozen."""
        return self.params if self._trainable else {}

    def config(self):
        """The constructor arguments, JSON-serialisable: enough to rebuild the layer."""
        return {}

    def path(self, x):
        """Which implementation runs this layer on input x: "reference", "fast" or "raw", with
        the fast path's variant where it has several (model.summary(paths=True) prints it)."""
        return implementation.name_for(x)

    def layers(self):
        """The sub-layers of a container; none for a plain layer."""
        return []

    def state_dict(self):
        """{name: NumPy array}: copies of the parameters and running statistics under
        PyTorch's names ("weight", a model's "0.weight" or "layer1.0.bn1.running_mean"), as
        torch's state_dict (minicnn.nn.state_dicts)."""
        return state_dicts.state_dict(self)

    def load_state_dict(self, state_dict, strict=True):
        """Copy a {name: array} mapping under PyTorch's names into the parameters and running
        statistics; strict=True: the keys must be exactly this layer's (a StateDictError lists
        the missing, unexpected and mis-shaped ones, and nothing is copied). -> (missing keys,
        unexpected keys)."""
        return state_dicts.load_state_dict(self, state_dict, strict)

    def to(self, backend):
        """Move parameters, gradients and state to backend ("numpy" or "cupy"); returns self."""
        for arrays in (self.params, self.grads, self.state):
            for name in arrays:
                arrays[name] = to_device(arrays[name], backend)
        self._cache = None
        return self

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    # -- helpers for subclasses ---------------------------------------------------------------
    def _add_param(self, name, value):
        xp = array_module(value)
        self.params[name] = value
        self.grads[name] = xp.zeros_like(value)

    def _keep(self, cache, training, y=None):
        """Keep the cache only in training mode: inference holds on to no activations.
        y: the forward's output, whose shape backward's dy must have."""
        self._cache = cache if training else None
        self._out_shape = tuple(y.shape) if training and y is not None else None

    def _cached(self, dy=None):
        """The cache of the last training forward; dy, when given, must have its output's shape."""
        name = type(self).__name__
        if self._cache is None:
            raise RuntimeError(f"{name}.backward() was called before "
                               f"forward(x, training=True); run a training forward pass first.")
        if dy is not None and self._out_shape is not None:
            shape = tuple(getattr(dy, "shape", ()))
            if shape != self._out_shape:
                raise ValueError(f"{name}.backward expects dy of shape {self._out_shape} (its "
                                 f"forward's output), got {shape}.{self._backward_hint}")
        return self._cache

    _backward_hint = ""

    def _weight_bias_backward(self, dy, input_grad):
        """backward of a layer with a weight and an optional bias (Conv2D, Dense): the kept
        backward gives dx, dw, db; dw and db overwrite the grads. A frozen layer computes dx
        only (nothing at all without input_grad), and its grads stay zero."""
        backward, cache = self._cached(dy)
        if not self._trainable:
            return backward(dy, cache, input_grad, weight_grad=False)[0] if input_grad else None
        dx, dw, db = backward(dy, cache, input_grad)
        self.grads["weight"][...] = dw
        if "bias" in self.grads:
            self.grads["bias"][...] = db
        return dx

    def _check_input(self, x, ndim=None, channels=None, dtype=None):
        """Raise ValueError naming the layer and the expected vs received shape or dtype.

        ndim None: any number of dimensions; dtype None: any floating-point dtype. Under a
        mixed-precision policy any floating-point input will do: each op casts it to its dtype.
        """
        name = type(self).__name__
        layout = {None: "an array", 2: "(N, features)", 4: "(N, C, H, W)"}[ndim]
        if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
            raise ValueError(f"{name} expects an array of shape {layout}, got {type(x).__name__}.")
        if ndim is not None and x.ndim != ndim:
            raise ValueError(f"{name} expects input of shape {layout}, got shape {tuple(x.shape)}.")
        if channels is not None and x.shape[1] != channels:
            what = "features" if ndim == 2 else "channels"
            raise ValueError(f"{name} expects {channels} input {what}, got shape {tuple(x.shape)} "
                             f"({x.shape[1]} {what}).")
        if dtype is not None and x.dtype != dtype and not dtype_policy.global_policy().mixed:
            raise ValueError(f"{name} has {np.dtype(dtype).name} parameters and expects "
                             f"{np.dtype(dtype).name} input, got {x.dtype}.")
        if not dtype_policy.is_floating(x.dtype):
            raise ValueError(f"{name} expects floating-point input, got {x.dtype}.")


def walk(layer):
    """Yield layer and every layer inside it, depth first, in forward order."""
    yield layer
    for sub in layer.layers():
        yield from walk(sub)


def _positive_int(value, name):
    """value as a Python int, or ValueError naming the argument."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return int(value)


def _uniform(rng, bound, shape, dtype):
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def padding_for(padding, kernel, stride, h, w, dilation=(1, 1)):
    """((top, bottom), (left, right)) of a window layer's padding ("valid", "same" as
    TensorFlow's, or a pair (ph, pw) for both sides) on an input of size h x w; "same" counts
    a dilated kernel's span, dilation*(kernel - 1) + 1 (PyTorch's and TensorFlow's rule)."""
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        span = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
        return (same_padding(h, span[0], stride[0]), same_padding(w, span[1], stride[1]))
    ph, pw = padding
    return (ph, ph), (pw, pw)


INITIALIZERS = ("pytorch", "glorot_uniform")


def _initial_params(layer, shape, fan_in, fan_out, bias, initializer, rng):
    """Add weight (shape) and bias (shape[0],) to layer, drawn as initializer says:
    "pytorch" (None): PyTorch's Conv2d/Linear, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both;
    "glorot_uniform": Keras's default, U(-sqrt(6 / (fan_in + fan_out)), ...) and zero bias."""
    if initializer not in (None, *INITIALIZERS):
        raise ValueError(f"kernel_initializer must be one of {', '.join(INITIALIZERS)}, got "
                         f"{initializer!r}.")
    rng = _rng(rng)
    if initializer == "glorot_uniform":
        layer._add_param("weight", _uniform(rng, math.sqrt(6.0 / (fan_in + fan_out)), shape,
                                            layer.dtype))
        if bias:
            layer._add_param("bias", np.zeros(shape[0], dtype=layer.dtype))
        return
    bound = 1.0 / math.sqrt(fan_in)
    layer._add_param("weight", _uniform(rng, bound, shape, layer.dtype))
    if bias:
        layer._add_param("bias", _uniform(rng, bound, (shape[0],), layer.dtype))


def _rng(rng):
    return rng if rng is not None else np.random.default_rng()


class Conv2D(Layer):
    """2-D convolution, weight (out, in // groups, kh, kw), bias (out,); padding int, pair,
    "same" or "valid"; dilation: taps that many pixels apart; groups: in and out channels in
    that many independent groups (groups == in_channels: depthwise), as PyTorch's Conv2d.

    Initialised as PyTorch's Conv2d: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias,
    fan_in = in // groups * kh * kw; kernel_initializer="glorot_uniform" draws them as Keras's
    Conv2D does (zero bias). Under minicnn.use("raw") a dilated or grouped conv runs
    minicnn.ops's (the CUDA kernels take neither).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 dtype=np.float32, rng=None, kernel_initializer=None, dilation=1, groups=1):
        super().__init__()
        self.in_channels = _positive_int(in_channels, "Conv2D in_channels")
        self.out_channels = _positive_int(out_channels, "Conv2D out_channels")
        self.kernel_size = to_pair(kernel_size, "kernel_size", minimum=1)
        self.stride = to_pair(stride, "stride", minimum=1)
        self.dilation = to_pair(dilation, "dilation", minimum=1)
        self.groups = _positive_int(groups, "Conv2D groups")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"Conv2D groups must divide in_channels and out_channels, got "
                             f"groups={groups} for {in_channels} -> {out_channels} channels.")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', "
                                 f"got {padding!r}.")
        else:
            padding = to_pair(padding, "padding", minimum=0)
        self.padding = padding
        self.dtype = np.dtype(dtype)
        kh, kw = self.kernel_size
        self.kernel_initializer = kernel_initializer
        cin = self.in_channels // self.groups                   # each filter's input channels
        _initial_params(self, (out_channels, cin, kh, kw), cin * kh * kw,
                        out_channels * kh * kw, bias, kernel_initializer, rng)

    def _padding_for(self, h, w):
        return padding_for(self.padding, self.kernel_size, self.stride, h, w, self.dilation)

    def _plain(self):
        """Dilation 1 and one group: the convolution every implementation (raw too) takes."""
        return self.dilation == (1, 1) and self.groups == 1

    def forward(self, x, training=False):
        self._check_input(x, 4, self.in_channels, self.dtype)
        pad = self._padding_for(*x.shape[2:])
        span = [d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation)]
        if any(x.shape[2 + a] + sum(pad[a]) < span[a] for a in (0, 1)):
            dilated = "" if self.dilation == (1, 1) else f" (dilation {self.dilation})"
            raise ValueError(f"Conv2D kernel {self.kernel_size}{dilated} is larger than the "
                             f"padded input of shape {tuple(x.shape)}.")
        fns = implementation.ops_for(x)             # reference, fast (ops) or raw (CUDA)
        w, b = self.params["weight"], self.params.get("bias")
        if self._plain():
            out, cache = fns.conv2d_forward(x, w, b, self.stride, pad)
        else:                                       # the raw kernels take neither: ops's
            fns = ops if implementation.name_for(x) == "raw" else fns
            out, cache = fns.conv2d_forward(x, w, b, self.stride, pad, self.dilation,
                                            self.groups)
        self._keep((fns.conv2d_backward, cache), training, out)
        return out

    def path(self, x):
        name = implementation.name_for(x)
        if name == "fast" or (name == "raw" and not self._plain()):
            pad = self._padding_for(*x.shape[2:])
            return "fast: " + ops.conv2d_path(self.in_channels, self.kernel_size, self.stride,
                                              pad, dilation=self.dilation, groups=self.groups)
        return "raw: CUDA implicit GEMM" if name == "raw" else name

    def backward(self, dy, input_grad=True):
        """dy (N, F, OH, OW) -> dx; input_grad=False skips dx (None) for a first layer."""
        return self._weight_bias_backward(dy, input_grad)

    def config(self):
        config = {"in_channels": self.in_channels, "out_channels": self.out_channels,
                  "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                  "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                  "bias": "bias" in self.params, "dtype": self.dtype.name}
        if not self._plain():               # files without the keys (dilation 1, one group) load
            config.update(dilation=list(self.dilation), groups=self.groups)
        return config


NO_PADDING = ((0, 0), (0, 0))


class _Pool2D(Layer):
    """Shared constructor and checks of the pooling layers; stride defaults to the kernel size.

    padding: 0 (default) or "valid": none; an int or a pair (ph, pw): that many rows (columns)
    on each side, at most half the window, as PyTorch; "same": TensorFlow's, ceil(H / stride)
    outputs, the odd extra row or column after (minicnn.ops.im2col.same_padding). Padding is
    not a value: a window pools its real pixels only (max: -inf padding; average: the mean of
    the real pixels, PyTorch's count_include_pad=False for explicit padding too, which is
    TensorFlow's "same"). Under minicnn.use("raw") a padded max-pool, or one of a window of
    more than 256 taps, runs minicnn.ops's (the CUDA kernel takes neither).
    """
    op = None                  # "maxpool2d" or "avgpool2d": the op's functions' prefix

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = to_pair(kernel_size, "kernel_size", minimum=1)
        self.stride = to_pair(stride if stride is not None else kernel_size, "stride", minimum=1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', "
                                 f"got {padding!r}.")
        else:
            padding = to_pair(padding, "padding", minimum=0)
            if any(p > k // 2 for p, k in zip(padding, self.kernel_size)):
                raise ValueError(f"{type(self).__name__} padding {padding} must be at most half "
                                 f"the window {self.kernel_size}.")
        self.padding = padding

    def _padding_for(self, h, w):
        return padding_for(self.padding, self.kernel_size, self.stride, h, w)

    def _fns(self, x, pad):
        """The op module for x: the active implementation's, but minicnn.ops's under "raw" for a
        padded pool or a window of more than 256 taps (the CUDA max-pool kernel takes no padding
        and keeps the winning tap in a byte)."""
        if self._raw_cannot(pad) and implementation.name_for(x) == "raw":
            return ops
        return implementation.ops_for(x)

    def _raw_cannot(self, pad):
        return pad != NO_PADDING or self.kernel_size[0] * self.kernel_size[1] > 256

    def forward(self, x, training=False):
        self._check_input(x, 4)
        pad = self._padding_for(*x.shape[2:])
        if any(x.shape[2 + a] + sum(pad[a]) < self.kernel_size[a] for a in (0, 1)):
            raise ValueError(f"{type(self).__name__} window {self.kernel_size} is larger than the "
                             f"input of shape {tuple(x.shape)}.")
        fns = self._fns(x, pad)
        forward, backward = getattr(fns, f"{self.op}_forward"), getattr(fns, f"{self.op}_backward")
        if pad == NO_PADDING:               # the raw kernel takes no padding argument
            out, cache = forward(x, self.kernel_size, self.stride, training)
        else:
            out, cache = forward(x, self.kernel_size, self.stride, training, pad)
        self._keep((backward, cache), training, out)
        return out

    def path(self, x):
        name = implementation.name_for(x)
        pad = self._padding_for(*x.shape[2:])
        # no raw avg-pool, and no padding or large window in the raw max-pool: minicnn.ops's
        if name == "fast" or (name == "raw" and (self.op == "avgpool2d" or self._raw_cannot(pad))):
            return "fast: " + ops.pool2d_path(self.op[:3], self.kernel_size, self.stride, pad)
        return "raw: CUDA kernel" if name == "raw" else name

    def backward(self, dy):
        pool_backward, cache = self._cached(dy)
        return pool_backward(dy, cache)

    def config(self):
        config = {"kernel_size": list(self.kernel_size), "stride": list(self.stride)}
        if self.padding != (0, 0):          # files without the key (no padding) still load
            config["padding"] = (self.padding if isinstance(self.padding, str)
                                 else list(self.padding))
        return config


class MaxPool2D(_Pool2D):
    """Max over each window; the gradient goes to the (first) maximum."""
    op = "maxpool2d"


class AvgPool2D(_Pool2D):
    """Mean over each window's real pixels; the gradient is shared equally among them."""
    op = "avgpool2d"


class GlobalAveragePooling2D(Layer):
    """(N, C, H, W) -> (N, C): the mean of each channel over the whole image (Keras's name),
    for a head that works at any image size."""

    def forward(self, x, training=False):
        self._check_input(x, 4)
        fns = implementation.ops_for(x)
        out, cache = fns.global_avgpool2d_forward(x)
        self._keep((fns.global_avgpool2d_backward, cache), training, out)
        return out

    def backward(self, dy):
        global_avgpool2d_backward, cache = self._cached(dy)
        return global_avgpool2d_backward(dy, cache)


class Dense(Layer):
    """Fully connected: y = x @ weight.T + bias, weight (out, in). PyTorch's Linear init, or
    Keras's with kernel_initializer="glorot_uniform"."""

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32, rng=None,
                 kernel_initializer=None):
        super().__init__()
        self.in_features = _positive_int(in_features, "Dense in_features")
        self.out_features = _positive_int(out_features, "Dense out_features")
        self.dtype = np.dtype(dtype)
        self.kernel_initializer = kernel_initializer
        _initial_params(self, (out_features, in_features), in_features, out_features, bias,
                        kernel_initializer, rng)

    def forward(self, x, training=False):
        self._check_input(x, 2, self.in_features, self.dtype)
        fns = implementation.ops_for(x)
        y, cache = fns.dense_forward(x, self.params["weight"], self.params.get("bias"))
        self._keep((fns.dense_backward, cache), training, y)
        return y

    def backward(self, dy, input_grad=True):
        """dy (N, OUT) -> dx; input_grad=False skips dx (None) for a first layer."""
        return self._weight_bias_backward(dy, input_grad)

    def config(self):
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": "bias" in self.params, "dtype": self.dtype.name}


class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W)."""

    def forward(self, x, training=False):
        if not hasattr(x, "ndim") or x.ndim < 2:
            raise ValueError(f"Flatten expects input of shape (N, ...), got "
                             f"{getattr(x, 'shape', type(x).__name__)}.")
        y = x.reshape(x.shape[0], -1)
        self._keep(x.shape, training, y)
        return y

    def backward(self, dy):
        return dy.reshape(self._cached(dy))


class ReLU(Layer):
    """y = max(x, 0)."""

    def forward(self, x, training=False):
        self._check_input(x)
        fns = implementation.ops_for(x)
        y, mask = fns.relu_forward(x, training)
        self._keep((fns.relu_backward, mask), training, y)
        return y

    def backward(self, dy):
        relu_backward, mask = self._cached(dy)
        return relu_backward(dy, mask)

    _backward_hint = (" (Stepping backward through a Sequential by hand? Its forward runs a ReLU "
                      "that precedes a MaxPool2D after it: go in reversed(model.schedule()) order.)")


class Softmax(Layer):
    """Softmax over the class axis of (N, K). For training, prefer SoftmaxCrossEntropy on logits."""

    def forward(self, x, training=False):
        self._check_input(x, 2)
        fns = implementation.ops_for(x)
        y = fns.softmax(x)
        self._keep((fns.softmax_backward, y), training, y)
        return y

    def backward(self, dy):
        softmax_backward, y = self._cached(dy)
        return softmax_backward(dy, y)


class Dropout(Layer):
    """Inverted dropout with probability p in training mode; the identity at inference.

    rng: the numpy Generator that decides the masks (part of a checkpoint's state): one seed a
    training forward, and each image's mask from that seed and the image's index in the whole
    batch (minicnn.reference.activations.image_generators), so that a data-parallel step, each
    worker's model copy drawing from a copy of rng, drops what one model on the batch drops.
    """

    def __init__(self, p=0.5, rng=None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout probability must be in [0, 1], got {p}.")
        self.p = p
        self.rng = _rng(rng)

    def forward(self, x, training=False):
        self._check_input(x)
        if not training:
            self._keep(None, False)
            return x
        fns = implementation.ops_for(x)
        if self.p == 0:
            self._keep((fns.dropout_backward, 1), True, x)   # nothing dropped: a mask of ones
            return x
        y, mask = fns.dropout_forward(x, self.p, self.rng, first=workers.first_image())
        self._keep((fns.dropout_backward, mask), training, y)
        return y

    def backward(self, dy):
        dropout_backward, mask = self._cached(dy)
        return dropout_backward(dy, mask)

    def config(self):
        return {"p": self.p}


class _BatchNorm(Layer):
    """Batch normalisation over every axis but the channel, PyTorch's conventions:
    biased variance to normalise, unbiased variance in the running estimate,
    running = (1 - momentum) * running + momentum * batch.

    Frozen (trainable = False), it runs in inference mode even in a training forward: it
    normalises with the running statistics and leaves them as they are (Keras 3's rule, so
    that fine-tuning a pretrained base does not wash out its statistics on a small new
    dataset). Its backward is then the affine map's, dx = dy * gamma / sqrt(running_var + eps).
    """
    ndim = None

    def __init__(self, num_features, momentum=0.1, eps=1e-5, dtype=np.float32):
        super().__init__()
        self.num_features = _positive_int(num_features, f"{type(self).__name__} num_features")
        self.momentum, self.eps = momentum, eps
        self.dtype = np.dtype(dtype)
        self._add_param("weight", np.ones(num_features, dtype=self.dtype))
        self._add_param("bias", np.zeros(num_features, dtype=self.dtype))
        self.state["running_mean"] = np.zeros(num_features, dtype=self.dtype)
        self.state["running_var"] = np.ones(num_features, dtype=self.dtype)

    def forward(self, x, training=False):
        self._check_input(x, self.ndim, self.num_features, self.dtype)
        w, b = self.params["weight"], self.params["bias"]
        fns = implementation.ops_for(x)
        if not training or not self._trainable:
            y = fns.batchnorm_inference(x, w, b, self.eps,
                                        self.state["running_mean"], self.state["running_var"])
            frozen = training and ("frozen", w / array_module(x).sqrt(
                self.state["running_var"] + self.eps))                 # scale (C,): backward's
            self._keep(frozen or None, training, y)
            return y
        if x.size // x.shape[1] < 2:
            raise ValueError(f"{type(self).__name__} needs more than one value per channel in "
                             f"training mode, got input of shape {tuple(x.shape)}.")
        y, cache, (mean, var, m) = fns.batchnorm_forward(x, w, b, self.eps)
        # m: values per channel in the whole batch. In a data-parallel step (minicnn.parallel.data_parallel)
        # every worker's replica has the same, whole-batch statistics and shares this state:
        # the first worker updates it.
        if workers.rank() == 0:
            mom = self.momentum
            self.state["running_mean"][...] = (1 - mom) * self.state["running_mean"] + mom * mean
            self.state["running_var"][...] = ((1 - mom) * self.state["running_var"]
                                              + mom * var * (m / (m - 1)))
        self._keep((fns.batchnorm_backward, cache), training, y)
        return y

    def backward(self, dy):
        batchnorm_backward, cache = self._cached(dy)
        if batchnorm_backward == "frozen":          # y = scale * x + shift, per channel
            shape = (1, -1) + (1,) * (dy.ndim - 2)
            return dy * cache.reshape(shape)
        dx, dgamma, dbeta = batchnorm_backward(dy, cache)
        self.grads["weight"][...] = dgamma
        self.grads["bias"][...] = dbeta
        return dx

    def config(self):
        return {"num_features": self.num_features, "momentum": self.momentum, "eps": self.eps,
                "dtype": self.dtype.name}


class BatchNorm2D(_BatchNorm):
    """Batch norm of (N, C, H, W) over N, H and W."""
    ndim = 4


class BatchNorm1D(_BatchNorm):
    """Batch norm of (N, C) over N."""
    ndim = 2
