"""Containers: layers made of layers. Sequential (a stack, with summary() and save()) and
Residual (y = body(x) + shortcut(x)); walk() visits every layer of a tree."""
import numpy as np

from minicnn import implementation
from minicnn.nn import fitting
from minicnn.backend import array_module
from minicnn.nn.layers import AvgPool2D, Conv2D, Dense, Layer, MaxPool2D, ReLU
from minicnn.nn.model import layer_config, layer_from_config, save_model
from minicnn.ops.im2col import conv_output_size


class Container(Layer, abstract=True):
    is_container = True
    """A layer made of named sub-layers; params, grads and state are flat "name.key" views
    of the sub-layers' live arrays, built on each access.
    """

    def __init__(self):
        self._cache = None

    def named_layers(self):
        raise NotImplementedError

    def layers(self):
        return [layer for _, layer in self.named_layers()]

    def _flat(self, attr):
        return dict(self._flat_items(attr))

    def _flat_items(self, attr):
        """("name.key", array) pairs; a sub-layer named "" lends its keys to this container
        unprefixed (a torchvision block holds conv1 and downsample directly: minicnn.nn.zoo)."""
        return [(f"{name}.{k}" if name else k, v) for name, layer in self.named_layers()
                for k, v in getattr(layer, attr).items()]

    def _check_unique_keys(self):
        """ValueError when two arrays would have one name (sub-layers named "")."""
        seen = set()
        for key in (k for attr in ("params", "state") for k, _ in self._flat_items(attr)):
            if key in seen:
                raise ValueError(f"{type(self).__name__}: two arrays would be named {key!r}; "
                                 f"give their layers distinct names.")
            seen.add(key)

    params = property(lambda self: self._flat("params"))
    grads = property(lambda self: self._flat("grads"))
    state = property(lambda self: self._flat("state"))

    def zero_grad(self):
        for layer in self.layers():
            layer.zero_grad()

    @property
    def trainable(self):
        """True while any layer inside is trainable; setting it sets every layer inside, as
        Keras does (minicnn.nn.transfer.freeze freezes a model up to a layer)."""
        return not self.layers() or any(layer.trainable for layer in self.layers())

    @trainable.setter
    def trainable(self, value):
        for layer in self.layers():
            layer.trainable = value

    trainable_params = property(lambda self: self._flat("trainable_params"))

    def to(self, backend):
        for layer in self.layers():
            layer.to(backend)
        self._cache = None
        return self

    # ---- the Keras workflow (minicnn.nn.fitting) ----------------------------------------------
    optimizer = loss = None
    metrics = ()
    stop_training = False

    def compile(self, optimizer="adam", loss="sparse_categorical_crossentropy", metrics=None):
        """Choose the optimizer, loss and metrics fit uses: names ("adam", "sgd", "adamw";
        "sparse_categorical_crossentropy"; "accuracy", "top5") or objects."""
        fitting.compile(self, optimizer, loss, metrics)

    def fit(self, x, y=None, batch_size=32, epochs=1, validation_data=None,
            validation_split=0.0, callbacks=None, shuffle=True, verbose=1, initial_epoch=0,
            seed=None, validation_batch_size=None, initial_state=None):
        """Train on arrays x (N, C, H, W), y (N,), or on ImageDataGenerator.flow(...);
        -> History (.history["loss"], ["accuracy"], ["val_loss"], ...). Keras's arguments,
        and minicnn.nn.fitting.fit's seed and initial_state (resuming inside an epoch)."""
        return fitting.fit(self, x, y, batch_size, epochs, validation_data, validation_split,
                           callbacks, shuffle, verbose, initial_epoch, seed,
                           validation_batch_size, initial_state)

    def evaluate(self, x, y, batch_size=32, return_dict=False, verbose=0):
        """[loss, *metrics] on x, y (or a dict with return_dict=True)."""
        return fitting.evaluate(self, x, y, batch_size, return_dict, verbose)

    def predict(self, x, batch_size=32):
        """The outputs (logits) for x as a NumPy array; one image (C, H, W) -> (1, classes)."""
        return fitting.predict(self, x, batch_size)

    def export_onnx(self, path, input_shape, class_names=None, normalization=None,
                    fold_normalization=True):
        """Write the model to path as an ONNX file for inputs of one example's shape
        input_shape, e.g. (3, 32, 32) -> the onnx.ModelProto (minicnn.export.export_onnx)."""
        from minicnn.export import export_onnx   # a room above nn/ (it reads checkpoints)
        return export_onnx(self, path, input_shape, class_names, normalization,
                           fold_normalization)


def _checked_names(names, count, owner):
    """names as a list of count distinct strings without dots ("" allowed: see _flat_items),
    or ValueError naming owner."""
    names = list(names)
    if (len(names) != count or len(set(names)) != count
            or not all(isinstance(n, str) and "." not in n for n in names)):
        raise ValueError(f"{owner} names must be {count} distinct strings without dots, got "
                         f"{names!r}.")
    return names


def _as_layer(body):
    return Sequential(body) if isinstance(body, (list, tuple)) else body


class Residual(Container):
    """y = body(x) + shortcut(x): a ResNet block without autograd.

    body: a layer or a list of layers; shortcut: None for the identity, or a layer/list (e.g. a
    1x1 Conv2D projection, with stride, when the body changes the shape). Put the ReLU that
    follows the addition after the block. dx = body.backward(dy) + shortcut.backward(dy).
    """

    def __init__(self, body, shortcut=None, names=("body", "shortcut")):
        super().__init__()
        self.body = _as_layer(body)
        self.shortcut = _as_layer(shortcut) if shortcut is not None else None
        self.names = tuple(_checked_names(names, 2, "Residual"))   # body's, shortcut's
        self._check_unique_keys()

    def named_layers(self):
        named = [(self.names[0], self.body)]
        return named + [(self.names[1], self.shortcut)] if self.shortcut is not None else named

    def forward(self, x, training=False):
        y = self.body.forward(x, training)
        s = x if self.shortcut is None else self.shortcut.forward(x, training)
        if y.shape != s.shape:
            raise ValueError(f"Residual body output {tuple(y.shape)} does not match the shortcut "
                             f"{tuple(s.shape)}; give the block a projection shortcut.")
        out = y + s
        self._keep(True, training, out)
        return out

    def backward(self, dy):
        self._cached(dy)
        dx = self.body.backward(dy)
        return dx + (dy if self.shortcut is None else self.shortcut.backward(dy))

    def config(self):
        config = {"body": layer_config(self.body),
                  "shortcut": layer_config(self.shortcut) if self.shortcut is not None else None}
        if self.names != ("body", "shortcut"):      # files without the key load as before
            config["names"] = list(self.names)
        return config

    @classmethod
    def from_config(cls, config):
        shortcut = config.get("shortcut")
        return cls(layer_from_config(config["body"]),
                   layer_from_config(shortcut) if shortcut is not None else None,
                   config.get("names", ("body", "shortcut")))


class Sequential(Container):
    """Layers applied in order; backward runs them in reverse.

    Parameters are named "<index>.<key>" (and "<index>.body.<i>.<key>" inside a Residual),
    like a PyTorch state_dict. layers may also be a dict {name: layer}, as PyTorch's
    Sequential(OrderedDict(...)), or come with names, a list of one per layer: then the names
    stand for the indexes ("conv1.weight").
    """

    def __init__(self, layers, names=None):
        super().__init__()
        if isinstance(layers, dict):
            layers, names = list(layers.values()), list(layers)
        self._layers = list(layers)
        self._names = (None if names is None                # None: named 0, 1, 2, ...
                       else _checked_names(names, len(self._layers), "Sequential"))
        self._check_unique_keys()
        self.input_shape = None
        self._order = list(range(len(self._layers)))         # the last forward's schedule()

    def named_layers(self):
        names = self._names or [str(i) for i in range(len(self._layers))]
        return list(zip(names, self._layers))

    def __getitem__(self, i):
        """The layer at index i, or (a named Sequential) of name i."""
        if isinstance(i, str):
            if self._names is None or i not in self._names:
                raise KeyError(f"this Sequential has no layer named {i!r}; its layers are "
                               f"{', '.join(name for name, _ in self.named_layers())}.")
            return self._layers[self._names.index(i)]
        return self._layers[i]

    def __len__(self):
        return len(self._layers)

    def schedule(self):
        """The order the layers run in. Under minicnn.use("reference"): their own. Otherwise
        (fast, raw) a ReLU directly followed by a MaxPool2D runs after it. Max and ReLU commute (ReLU is monotone), so the output is the
        same, and so is every gradient: a window whose maximum is positive sends its gradient to
        the same pixel either way, one whose maximum is <= 0 sends none. The ReLU then works on
        a quarter of the values (the Keras-tutorial CNN's Conv-ReLU-MaxPool: ~10% of a step)."""
        order = list(range(len(self._layers)))
        if implementation.active() == "reference":
            return order
        i = 0
        while i + 1 < len(order):
            first, second = self._layers[order[i]], self._layers[order[i + 1]]
            if type(first) is ReLU and type(second) is MaxPool2D:
                order[i], order[i + 1] = order[i + 1], order[i]
                i += 2
            else:
                i += 1
        return order

    def needed_input(self, h, w):
        """(h', w'), at most (h, w): the top-left part of an h x w input that the output
        depends on; all of it, (h, w), under minicnn.use("reference"). A pooling window that does not fit is dropped (a 2x2 max-pool of a 13x13 map
        reads 12x12 of it), and an unpadded conv reads only the input its needed outputs cover,
        so the Keras-tutorial CNN never reads the last 2 rows and columns of a 32x32 image
        (sizes of each output, and the part of it that is read, going back from Flatten):

            image 32 -> conv 30 -> pool 15 -> conv 13 -> pool 6 -> conv 4 -> Flatten
                  30 <-      28 <-      14 <-      12 <-      6 <-      4

        The walk goes forward through the layers it has a rule for (unpadded Conv2D, MaxPool2D,
        AvgPool2D, ReLU), up to the first other one (Flatten, Dense, BatchNorm, whose statistics
        see every pixel, a padded conv, ...), which needs all of its input, and then back."""
        if implementation.active() == "reference":
            return h, w
        layers = [self._layers[i] for i in self.schedule()]
        sizes = [(h, w)]                                  # each ruled layer's input size
        for layer in layers:
            out = _output_size(layer, sizes[-1])
            if out is None or min(out) < 1:
                break
            sizes.append(out)
        need = sizes[-1]                                  # the first other layer's: all of it
        for layer, size in zip(reversed(layers[:len(sizes) - 1]), reversed(sizes[:-1])):
            need = _input_needed(layer, need, size)
        return need

    def forward(self, x, training=False):
        """The layers in schedule() order, on the part of x that the output depends on
        (needed_input: a view of x's top-left h' x w'; the same output, less work)."""
        if hasattr(x, "shape"):
            self.input_shape = tuple(x.shape[1:])
        order = self._order = self.schedule()                # backward goes back through it
        if getattr(x, "ndim", 0) == 4 and order:
            h, w = self.needed_input(*x.shape[2:])
            if (h, w) != tuple(x.shape[2:]):
                try:
                    x = self._layers[order[0]].forward(x[:, :, :h, :w], training)
                except ValueError:                # bad input: say so about the array given
                    self._layers[order[0]].forward(x, training)
                    raise
                order = order[1:]
        for i in order:
            x = self._layers[i].forward(x, training)
        return x

    def backward(self, dy, input_grad=True):
        """dy -> d loss / d input. input_grad=False skips the first layer's input gradient
        (a training loop never uses it; PyTorch skips it too) and returns None; only the
        layers that have parameters take the shortcut. It also skips every layer before the
        first one with trainable params (a frozen base, a leading Flatten): nothing there
        needs a gradient."""
        order = self._order
        if not input_grad:
            learning = [p for p, i in enumerate(order) if self._layers[i].trainable_params]
            if not learning:
                return None
            order = order[learning[0]:]
        for i in reversed(order):
            layer = self._layers[i]
            if i == order[0] and not input_grad and isinstance(layer, (Conv2D, Dense)):
                return layer.backward(dy, input_grad=False)
            dy = layer.backward(dy)
        if not input_grad:
            return None
        if dy.ndim == 4 and dy.shape[2:] != self.input_shape[1:]:   # forward cropped the input
            n, c, h, w = dy.shape                         # (needed_input): 0 for the rest
            dx = array_module(dy).zeros((n, c) + self.input_shape[1:], dtype=dy.dtype)
            dx[:, :, :h, :w] = dy
            dy = dx
        return dy

    def config(self):
        config = {"layers": [layer_config(layer) for layer in self._layers]}
        if self._names is not None:                 # files without the key: 0, 1, 2, ...
            config["names"] = list(self._names)
        return config

    @classmethod
    def from_config(cls, config):
        return cls([layer_from_config(c) for c in config["layers"]], config.get("names"))

    def __repr__(self):
        inner = "".join(f"\n  ({name}) {layer!r}" for name, layer in self.named_layers())
        return f"Sequential({inner}\n)"

    def summary(self, input_shape=None, print_fn=print, paths=False):
        """Print a Keras-like table: layer, output shape, parameters, and the totals.

        input_shape: one example's shape, e.g. (3, 32, 32); defaults to the last input seen.
        paths=True adds a column: which implementation (minicnn.use) runs each layer, and the
        fast path's variant, and says how the fast path's forward differs from the list.
        """
        input_shape = tuple(input_shape or self.input_shape or ())
        if not input_shape:
            raise ValueError("summary() needs input_shape, e.g. model.summary((3, 32, 32)), "
                             "until the model has seen an input.")
        params = next(iter(self.params.values()), None)
        xp = array_module(params) if params is not None else np
        dtype = params.dtype if params is not None else np.float32
        rows = []
        x = xp.zeros((1,) + input_shape, dtype=dtype)
        _summary_rows(self, x, "", rows)
        total = sum(int(p.size) for p in self.params.values())
        width = max(34, max(len(r[0]) for r in rows) + 2)
        path_width = max(len(r[3]) for r in rows) + 2 if paths else 0
        line = "-" * (width + 38 + path_width)
        print_fn(f"{'Layer (type)':<{width}}{'Output shape':<26}{'Param #':>12}"
                 + (f"  {'Path':<{path_width - 2}}" if paths else ""))
        print_fn("=" * len(line))
        for name, shape, count, path in rows:
            print_fn(f"{name:<{width}}{str(shape):<26}{count:>12,}"
                     + (f"  {path}" if paths else ""))
        print_fn("=" * len(line))
        state = sum(int(s.size) for s in self.state.values())
        print_fn(f"Total params: {total:,}" + (f"  (+ {state:,} non-trainable state values)"
                                               if state else ""))
        trainable = sum(int(p.size) for p in self.trainable_params.values())
        if trainable < total:                       # Keras's two lines, once a layer is frozen
            print_fn(f"Trainable params: {trainable:,}")
            print_fn(f"Non-trainable params: {total - trainable:,} (frozen)")
        if paths:
            for note in self._schedule_notes(input_shape):
                print_fn(note)

    def _schedule_notes(self, input_shape):
        """What forward does differently from the list (fast and raw; none for reference)."""
        notes = []
        order = self.schedule()
        swapped = [i for i, j in enumerate(order) if i != j and i < j]
        if swapped:
            notes.append("forward runs the ReLU after the MaxPool2D at layers "
                         + ", ".join(f"{i}-{i + 1}" for i in swapped)
                         + " (the same outputs and gradients, a quarter of the ReLU's work)")
        if len(input_shape) == 3:
            h, w = self.needed_input(*input_shape[1:])
            if (h, w) != tuple(input_shape[1:]):
                notes.append(f"forward reads only the top-left {h}x{w} of each "
                             f"{input_shape[1]}x{input_shape[2]} input: the output does not "
                             f"depend on the rest (needed_input)")
        return notes

    def save(self, path, **extra):
        """Write architecture, weights and state to one file (atomically). extra: JSON-able notes."""
        save_model(self, path, extra)


def _output_size(layer, size):
    """(OH, OW) of a layer that Sequential.needed_input has a rule for, on an input of
    size (H, W); None for any other layer."""
    if type(layer) is ReLU:
        return size
    if (type(layer) in (MaxPool2D, AvgPool2D, Conv2D) and layer.padding in ("valid", (0, 0))
            and getattr(layer, "dilation", (1, 1)) == (1, 1)):
        return tuple(conv_output_size(n, k, s, 0, 0)
                     for n, k, s in zip(size, layer.kernel_size, layer.stride))
    return None


def _input_needed(layer, need, size):
    """The (rows, columns) of a ruled layer's size (H, W) input that its first need
    (rows, columns) outputs read: a window's stride * (outputs - 1) + its kernel."""
    if type(layer) is ReLU:
        return need
    return tuple(min(n, s * (r - 1) + k)
                 for r, n, k, s in zip(need, size, layer.kernel_size, layer.stride))


def _summary_rows(layer, x, indent, rows):
    """Run x through layer in inference mode, appending (name, output shape, #params, path)
    rows."""
    if isinstance(layer, Sequential):
        for sub in layer._layers:
            x = _summary_rows(sub, x, indent, rows)
        return x
    y = layer.forward(x, training=False)
    count = sum(int(p.size) for p in layer.params.values())
    path = "" if isinstance(layer, Container) else layer.path(x)
    rows.append((f"{indent}{type(layer).__name__}", ("N",) + tuple(y.shape[1:]), count, path))
    if isinstance(layer, Container):
        for name, sub in layer.named_layers():
            _summary_rows(sub, x, indent + (f"  {name}: " if name else "  "), rows)
    return y
