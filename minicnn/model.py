"""Sequential: a stack of layers, with summary(), save() and minicnn.load()."""
import numpy as np

from minicnn.backend import array_module
from minicnn.errors import CheckpointError
from minicnn.layers import (Container, Conv2D, Dense, MaxPool2D, ReLU, layer_config,
                            layer_from_config)
from minicnn.serialization import read_archive, write_archive


class Sequential(Container):
    """Layers applied in order; backward runs them in reverse.

    Parameters are named "<index>.<key>" (and "<index>.body.<i>.<key>" inside a Residual),
    like a PyTorch state_dict.
    """

    def __init__(self, layers):
        super().__init__()
        self._layers = list(layers)
        self.input_shape = None

    def named_layers(self):
        return [(str(i), layer) for i, layer in enumerate(self._layers)]

    def __getitem__(self, i):
        return self._layers[i]

    def __len__(self):
        return len(self._layers)

    def schedule(self):
        """The order the layers run in: their own, except that a ReLU directly followed by a
        MaxPool2D runs after it. Max and ReLU commute (ReLU is monotone), so the output is the
        same, and so is every gradient: a window whose maximum is positive sends its gradient to
        the same pixel either way, one whose maximum is <= 0 sends none. The ReLU then works on
        a quarter of the values (the Keras-tutorial CNN's Conv-ReLU-MaxPool: ~10% of a step)."""
        order = list(range(len(self._layers)))
        i = 0
        while i + 1 < len(order):
            first, second = self._layers[order[i]], self._layers[order[i + 1]]
            if type(first) is ReLU and type(second) is MaxPool2D:
                order[i], order[i + 1] = order[i + 1], order[i]
                i += 2
            else:
                i += 1
        return order

    def forward(self, x, training=False):
        if hasattr(x, "shape"):
            self.input_shape = tuple(x.shape[1:])
        for i in self.schedule():
            x = self._layers[i].forward(x, training)
        return x

    def backward(self, dy, input_grad=True):
        """dy -> d loss / d input. input_grad=False skips the first layer's input gradient
        (a training loop never uses it; PyTorch skips it too) and returns None; only the
        layers that have parameters take the shortcut."""
        order = self.schedule()
        for i in reversed(order):
            layer = self._layers[i]
            if i == order[0] and not input_grad and isinstance(layer, (Conv2D, Dense)):
                return layer.backward(dy, input_grad=False)
            dy = layer.backward(dy)
        return dy

    def config(self):
        return {"layers": [layer_config(layer) for layer in self._layers]}

    def __repr__(self):
        inner = "".join(f"\n  ({i}) {layer!r}" for i, layer in enumerate(self._layers))
        return f"Sequential({inner}\n)"

    def summary(self, input_shape=None, print_fn=print):
        """Print a Keras-like table: layer, output shape, parameters, and the totals.

        input_shape: one example's shape, e.g. (3, 32, 32); defaults to the last input seen.
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
        line = "-" * (width + 38)
        print_fn(f"{'Layer (type)':<{width}}{'Output shape':<26}{'Param #':>12}")
        print_fn("=" * len(line))
        for name, shape, count in rows:
            print_fn(f"{name:<{width}}{str(shape):<26}{count:>12,}")
        print_fn("=" * len(line))
        state = sum(int(s.size) for s in self.state.values())
        print_fn(f"Total params: {total:,}" + (f"  (+ {state:,} non-trainable state values)"
                                               if state else ""))

    def save(self, path, **extra):
        """Write architecture, weights and state to one file (atomically). extra: JSON-able notes."""
        save_model(self, path, extra)


def _summary_rows(layer, x, indent, rows):
    """Run x through layer in inference mode, appending (name, output shape, #params) rows."""
    if isinstance(layer, Sequential):
        for sub in layer._layers:
            x = _summary_rows(sub, x, indent, rows)
        return x
    y = layer.forward(x, training=False)
    count = sum(int(p.size) for p in layer.params.values())
    rows.append((f"{indent}{type(layer).__name__}", ("N",) + tuple(y.shape[1:]), count))
    if isinstance(layer, Container):
        for name, sub in layer.named_layers():
            _summary_rows(sub, x, indent + f"  {name}: ", rows)
    return y


def save_model(model, path, extra=None, arrays=None):
    """Write model (architecture, params, state) plus optional extra header and arrays."""
    payload = {f"param:{k}": v for k, v in model.params.items()}
    payload.update({f"state:{k}": v for k, v in model.state.items()})
    payload.update(arrays or {})
    write_archive(path, {"model": layer_config(model), "extra": extra or {}}, payload)


def model_from_archive(path, header, arrays):
    """Build the model described by a read_archive() result and fill its arrays."""
    if "model" not in header:
        raise CheckpointError(f"{path} is a minicnn file without a model.")
    try:
        model = layer_from_config(header["model"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} describes a model this minicnn cannot build ({e}).") from None
    for kind, live in (("param", model.params), ("state", model.state)):
        stored = {k.split(":", 1)[1]: v for k, v in arrays.items() if k.startswith(kind + ":")}
        if set(stored) != set(live):
            raise CheckpointError(f"{path} does not match its model description "
                                  f"({kind} names differ).")
        for name, target in live.items():
            if stored[name].shape != target.shape:
                raise CheckpointError(f"{path} was written by another model: {name} has shape "
                                      f"{stored[name].shape}, expected {target.shape}.")
            target[...] = stored[name]
    return model


def load(path):
    """Read a file written by Sequential.save (or a training checkpoint) and return the model."""
    header, arrays = read_archive(path)
    return model_from_archive(path, header, arrays)
