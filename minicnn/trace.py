"""The backprop trace: what each layer's forward and backward do while a model trains, every N
steps, measured on the layers themselves (minicnn.callbacks.BackpropTrace, and --trace N on
python -m minicnn.train).

For every layer, at every traced step:

    shape         its output's shape (N, ...)
    cache_bytes   the bytes its cache holds for backward (the nbytes of the arrays in it)
    mean, std     of its output over the batch
    dead          the share of a ReLU's units (the channels of an (N, C, H, W) output, the
                  features of an (N, F) one) that were never positive on any image of the
                  window: the steps since the last traced one, this one included (the epoch's
                  table and flags: of the whole epoch, CS231n's "never activate across the
                  entire training dataset")
    grad_in       ||dL/dy||: the norm of the gradient arriving at the layer from above
    grad_weight   ||dL/dW||: the norm of its weight's gradient
    update_ratio  ||W_after - W_before|| / ||W_before|| for each parameter: what the optimizer's
                  step did to it, relative to its size
    gradcheck     (gradcheck=True) the float64 gradient check of the layer on the first
                  GRADCHECK_IMAGES images of the batch (minicnn.nn.gradcheck, GRADCHECK_ENTRIES
                  entries of each tensor): its largest error

How it sees them. On a traced step, each layer's forward and backward are watched: the
instance's methods are shadowed by wrappers that note the output and the gradient arriving,
removed again after the step, and the weights are copied before it (for the update). That
step runs as one model on the whole batch (model.whole_batch_step: a data-parallel step would
leave the other parts of the batch in worker copies; minicnn.parallel.data_parallel), which
changes its result only by float rounding. Between traced steps the trace only reads each
ReLU's cache after the step (its mask y > 0: the part of the batch the model itself ran).

Rules of thumb (CS231n, "Neural Networks Part 3: Babysitting the learning process"), checked
at each epoch end on the median of the epoch's traced steps, each broken one said in words
that name the layers (flags_of()):

    one traced step moving a weight by more than UPDATE_JUMP of its size
    the update ratio of a weight outside [UPDATE_LOW, UPDATE_HIGH]   (about 1e-3 is healthy)
    more than half a ReLU's units dead over the epoch
    vanishing / exploding gradients: the gradient arriving at a layer with weights below
    VANISHING or above EXPLODING times the one arriving at the last layer, or not finite
    the loss of the epoch's last half of traced steps within STUCK of log(classes): the
    net predicts every class alike, as at initialisation
    a gradient check above GRADCHECK_TOL

Output: trace.jsonl in log_dir (a line per traced step, and a line of flags per epoch),
a table per epoch printed with tqdm.write, and trace.png (a heatmap per quantity, layers by
steps), each rewritten whole and atomically: the first at each traced step and epoch end,
the second at each epoch end.
"""
import json
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minicnn.backend import to_numpy
from minicnn.nn.gradcheck import gradcheck as _gradcheck
from minicnn.nn.layers import ReLU
from minicnn.nn.serialization import atomic_write
from minicnn.nn.state_dicts import named_layers_flat

UPDATE_LOW, UPDATE_HIGH = 1e-4, 1e-2     # 10x either side of CS231n's 1e-3
# Adam's first step moves each weight by lr: a ratio of lr / rms(weight), 0.055 for the Keras
# tutorial's Dense(1024, 64) at lr 1e-3 (docs/trace.md)
UPDATE_JUMP = 0.1
DEAD = 0.5
VANISHING, EXPLODING = 1e-3, 1e3
STUCK = 0.02                              # relative: |loss - log K| < STUCK * log K
GRADCHECK_IMAGES, GRADCHECK_ENTRIES, GRADCHECK_TOL = 2, 16, 1e-6

# (key, title, log10 scale, colour range or None: the data's) of each heatmap in trace.png;
# fixed ranges where a rule of thumb gives the scale, so that two runs' pictures compare
QUANTITIES = (("mean", "output mean", False, None), ("std", "output std", False, None),
              ("dead", "dead share of ReLU units (window)", False, (0, 1)),
              ("grad_in", "log10 ||gradient arriving||", True, None),
              ("grad_weight", "log10 ||weight gradient||", True, None),
              ("update_ratio", "log10 ||update|| / ||weight|| (rule of thumb: -3)", True, (-6, 0)),
              ("gradcheck", "log10 gradient-check error", True, None))


class Trace:
    """The trace's hooks, Keras-callback shaped: minicnn.callbacks.BackpropTrace is this class
    made a Callback (see the module's docstring for what it records).

    every: trace every that many steps (steps count across epochs, from the first: step 0 is
    traced). log_dir: where trace.jsonl and trace.png go (None: nowhere; .records keeps them).
    gradcheck: also check each layer's gradients in float64 (slow: seconds a traced step).
    append: keep the records a log_dir's trace.jsonl already has (a resumed run).
    verbose: 1 prints the epoch's table and flags, 0 nothing.
    """

    def __init__(self, every=50, log_dir=None, gradcheck=False, append=False, verbose=1):
        super().__init__()
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"BackpropTrace's every must be a positive int, got {every!r}.")
        self.every, self.gradcheck, self.append, self.verbose = every, gradcheck, append, verbose
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.records, self.epoch_flags = [], []       # traced steps; [(epoch, [flag, ...])]
        self._probes, self._watching = [], None

    # ---- the hooks -----------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._layers = _named_leaves(self.model)
        self._positive = {}                    # ReLU name -> its units ever positive (window)
        self._positive_epoch = {}              # the same over the epoch
        self._started, self._lines = False, []        # _lines: the records as JSON lines
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.append and self.log_dir is not None and (self.log_dir / "trace.jsonl").exists():
            self.records, self.epoch_flags = read_trace(self.log_dir / "trace.jsonl")

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self._positive_epoch = epoch, {}

    def on_train_batch_begin(self, batch, logs=None):
        step = self.epoch * self.params.get("steps", 0) + batch
        if not self._started:                  # drop what a killed run traced past its resume
            self._started = True
            self.records = [r for r in self.records if r["step"] < step]
            self._lines = []
            self.epoch_flags = [(e, f) for e, f in self.epoch_flags if e < self.epoch]
        if step % self.every == 0:
            self._watch(step)

    def on_train_batch_end(self, batch, logs=None):
        for name, layer in self._layers:
            cache = layer._cache                    # a ReLU's: (its backward, the mask y > 0)
            if type(layer) is ReLU and isinstance(cache, tuple) and len(cache) == 2:
                self._note_positive(name, cache[1])
        if self._watching is not None:
            record = self._unwatch()
            self.records.append(record)
            self._write()

    def on_epoch_end(self, epoch, logs=None):
        records = [r for r in self.records if r["epoch"] == epoch]
        if not records:
            return
        summary = summarise(records)
        for row in summary:                    # the table's and flags' dead: over the epoch
            if row["name"] in self._positive_epoch:
                row["dead"] = float(1 - to_numpy(self._positive_epoch[row["name"]]).mean())
        flags = flags_of(summary, records)
        self.epoch_flags.append((epoch, flags))
        if self.verbose:
            tqdm.write(table(summary, epoch, len(records), self.every))
            for flag in flags or ["no rule of thumb broken."]:
                tqdm.write(f"  trace: {flag}")
        self._write()
        if self.log_dir is not None:
            plot_trace(self.records, self.log_dir / "trace.png")

    def on_train_end(self, logs=None):
        if self._watching is not None:         # fit stopped inside a traced step
            self._unhook()

    # ---- a traced step ----------------------------------------------------------------------
    def _watch(self, step):
        """Before a traced step: copy the weights, watch every layer and the loss."""
        model = self.model
        self._watching = dict(step=step, loss=None, loss_fn=model.loss,
                              before={(name, key): p.copy() for name, layer in self._layers
                                      for key, p in layer.params.items()})
        self._probes = [_Probe(layer, self.gradcheck) for _, layer in self._layers]

        def watched_loss(logits, labels):
            loss, dlogits = self._watching["loss_fn"](logits, labels)
            self._watching["loss"] = float(loss)
            return loss, dlogits
        model.loss, model.whole_batch_step = watched_loss, True

    def _unhook(self):
        for probe in self._probes:
            probe.remove()
        self.model.loss, self.model.whole_batch_step = self._watching["loss_fn"], False

    def _unwatch(self):
        """After a traced step: the step's record {"epoch", "step", "loss", "layers": [...]}."""
        watching, probes = self._watching, self._probes
        self._unhook()
        rows = []
        for (name, layer), probe in zip(self._layers, probes):
            trained = getattr(layer, "trainable", True)      # a frozen layer: no update
            row = dict(name=name, type=type(layer).__name__, shape=probe.shape,
                       cache_bytes=cache_bytes(layer._cache), mean=probe.mean, std=probe.std,
                       grad_in=probe.grad_in,
                       grad_weight=_norm(layer.grads["weight"])
                       if trained and "weight" in layer.grads else None,
                       update_ratio={key: update_ratio(watching["before"][name, key], p)
                                     for key, p in layer.params.items() if trained})
            if type(layer) is ReLU:
                positive = self._positive.pop(name, None)
                row["dead"] = None if positive is None else float(1 - to_numpy(positive).mean())
            if self.gradcheck and probe.input is not None:
                errors = _gradcheck(layer, probe.input, seed=watching["step"],
                                    entries=GRADCHECK_ENTRIES)
                row["gradcheck"] = max(errors.values())
            rows.append(row)
        self._watching, self._probes = None, []
        return dict(epoch=self.epoch, step=watching["step"], loss=watching["loss"], layers=rows)

    def _note_positive(self, name, mask):
        """OR this step's "ever positive" units of a ReLU into its window's."""
        if getattr(mask, "dtype", None) != np.bool_ or mask.ndim < 2:
            return
        positive = units_positive(mask)
        for ever in (self._positive, self._positive_epoch):
            ever[name] = positive if name not in ever else ever[name] | positive

    def _write(self):
        """Rewrite trace.jsonl whole (atomically), each record serialised once."""
        if self.log_dir is None:
            return
        while len(self._lines) < len(self.records):
            self._lines.append(json.dumps(_finite(self.records[len(self._lines)])) + "\n")
        flags = [json.dumps({"epoch": e, "flags": f}) + "\n" for e, f in self.epoch_flags]
        text = "".join(self._lines + flags).encode("utf-8")
        atomic_write(self.log_dir / "trace.jsonl", lambda f: f.write(text))


class _Probe:
    """One layer watched for one step: its forward and backward shadowed on the instance by
    wrappers that note the output's shape, mean and std (and, for a gradient check, the first
    images of its input) and the norm of the gradient arriving; remove() unshadows them."""

    def __init__(self, layer, keep_input):
        self.layer, self.input = layer, None
        self.shape = self.mean = self.std = self.grad_in = None
        forward, backward = layer.forward, layer.backward

        def watched_forward(x, training=False):
            y = forward(x, training)
            self.shape = list(y.shape)
            self.mean, self.std = float(y.mean(dtype=np.float64)), float(y.std(dtype=np.float64))
            if keep_input:
                self.input = x[:GRADCHECK_IMAGES].copy()
            return y

        def watched_backward(dy, *args, **kwargs):
            self.grad_in = _norm(dy)
            return backward(dy, *args, **kwargs)
        layer.forward, layer.backward = watched_forward, watched_backward

    def remove(self):
        del self.layer.forward, self.layer.backward       # the class's methods again


# ---- the quantities ------------------------------------------------------------------------
def _norm(a):
    """||a||, the Euclidean norm of all its entries, accumulated in float64."""
    return math.sqrt(float((a.astype(np.float64) ** 2).sum()))


def update_ratio(before, after):
    """||after - before|| / ||before||; None for a parameter that was all zeros."""
    size = _norm(before)
    return _norm(after - before) / size if size > 0 else None


def units_positive(a):
    """(C,) bools: which units of a (N, C, ...) array were positive anywhere, on any image."""
    return (a > 0).any(axis=(0, *range(2, a.ndim)))


def cache_bytes(cache):
    """The nbytes of the arrays in a layer's cache (nested tuples, lists, dicts), each array
    counted once."""
    seen, total, todo = set(), 0, [cache]
    while todo:
        item = todo.pop()
        if isinstance(item, (tuple, list)):
            todo.extend(item)
        elif isinstance(item, dict):
            todo.extend(item.values())
        elif hasattr(item, "nbytes") and hasattr(item, "dtype") and id(item) not in seen:
            seen.add(id(item))
            total += int(item.nbytes)
    return total


def _named_leaves(model):
    """[(name, layer)] of the model's layers that are not containers, in forward order, named as
    their parameters are ("3", "4.body.0", "layer1.0.bn1"; a bare layer: ""); a layer used twice
    is watched once."""
    found, seen = [], set()
    for prefix, layer in named_layers_flat(model):
        if id(layer) not in seen:
            seen.add(id(layer))
            found.append((prefix[:-1], layer))            # "4.body.0." -> "4.body.0"
    return found


# ---- the epoch's summary and the rules of thumb -----------------------------------------------
def _median(values):
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def summarise(records):
    """The median of each quantity over records (traced steps), one row a layer; the shape and
    cache bytes of the last."""
    rows = []
    for i, last in enumerate(records[-1]["layers"]):
        column = [r["layers"][i] for r in records]
        row = dict(name=last["name"], type=last["type"], shape=last["shape"],
                   cache_bytes=last["cache_bytes"])
        for key in ("mean", "std", "dead", "grad_in", "grad_weight", "gradcheck"):
            row[key] = _median([c.get(key) for c in column])
        row["update_ratio"] = {k: _median([c["update_ratio"].get(k) for c in column])
                               for k in last["update_ratio"]}
        rows.append(row)
    return rows


def _label(row):
    return f"{row['name']} {row['type']}".strip()


def flags_of(summary, records):
    """The rules of thumb that an epoch breaks, a sentence each naming the layers, in the order
    one trouble leads to the next. summary: summarise's rows (with the epoch's dead shares);
    records: the epoch's traced steps."""
    flags = []

    def flag(trouble, found, meaning, shown=_e):
        """One sentence: the trouble at each layer of found [(row, value)], then what it means."""
        if found:
            at = ", ".join(f"{_label(row)} ({shown(value)})" for row, value in found)
            flags.append(f"{trouble} at {at}: {meaning}")

    weighted = [row for row in summary if "weight" in row["update_ratio"]]
    largest = [(row, max((v for v in _column(records, row, "weight") if v is not None),
                         default=None)) for row in weighted]
    jumps = [(row, v) for row, v in largest if v is not None and v > UPDATE_JUMP]
    flag("updates too large", jumps, f"one step moved those weights by more than "
         f"{UPDATE_JUMP:g} of their size (rule of thumb: about 1e-3 a step): lower the "
         f"learning rate.")
    ratios = [(row, row["update_ratio"]["weight"]) for row in weighted
              if row["update_ratio"]["weight"] is not None]
    flag("updates too large", [(row, v) for row, v in ratios    # (those not flagged above)
                               if v > UPDATE_HIGH and all(row is not r for r, _ in jumps)],
         f"the median ||update|| / ||weight|| is above {UPDATE_HIGH:g} (rule of thumb: about "
         f"1e-3): lower the learning rate.")
    flag("dead ReLUs", [(row, row["dead"]) for row in summary
                        if row.get("dead") is not None and row["dead"] > DEAD],
         "that share of the units was never positive in the epoch (rule of thumb: at most "
         "half): a too-high learning rate or a bad initialisation pushed them below zero for "
         "good.", shown=lambda v: f"{v:.0%}")
    output = summary[-1]["grad_in"]
    gradients = [(row, row["grad_in"] / output) for row in weighted    # (none at a loss
                 if row["grad_in"] is not None and output]                # that is exactly 0)
    flag("exploding gradients", [(row, g) for row, g in gradients
                                 if not math.isfinite(g) or g > EXPLODING],
         f"the gradient arriving there is that many times the one at the output layer (rule "
         f"of thumb: at most {EXPLODING:g}).")
    flag("vanishing gradients", [(row, g) for row, g in gradients if g < VANISHING],
         f"the gradient arriving there is that fraction of the one at the output layer (rule "
         f"of thumb: at least {VANISHING:g}): the layers below hardly learn.")
    flag("updates too small", [(row, v) for row, v in ratios if v < UPDATE_LOW],
         f"the median ||update|| / ||weight|| is below {UPDATE_LOW:g} (rule of thumb: about "
         f"1e-3): those weights no longer learn.")
    flag("gradient check failed", [(row, row["gradcheck"]) for row in summary
                                   if (row.get("gradcheck") or 0) > GRADCHECK_TOL],
         f"backward disagrees with centred differences in float64 by more than "
         f"{GRADCHECK_TOL:g}.")
    shape = summary[-1]["shape"] or []
    classes = shape[-1] if len(shape) == 2 else None
    losses = [r["loss"] for r in records[len(records) // 2:] if r["loss"] is not None]
    if classes and classes > 1 and losses:
        loss, chance = float(np.mean(losses)), math.log(classes)
        if abs(loss - chance) < STUCK * chance:
            flags.append(f"loss stuck at {loss:.3f}, log({classes}) = {chance:.3f}: the net "
                         f"predicts every class alike, as an untrained one does.")
    return flags


def _e(value):
    return f"{value:.1e}"


def _column(records, row, key):
    """The update ratio `key` of row's layer in each record."""
    return [layer["update_ratio"].get(key) for r in records for layer in r["layers"]
            if layer["name"] == row["name"]]


def _cell(value, kind):
    if value is None:
        return "-"
    if kind == "share":
        return f"{value:.0%}"
    if kind == "bytes":
        return f"{value / 2**20:.1f}M" if value >= 2**20 else f"{value / 2**10:.0f}K"
    return f"{value:.2e}" if kind == "e" else f"{value:.3f}"


def table(summary, epoch, steps, every):
    """The epoch's summary as a fixed-width table, a line a layer."""
    width = max(18, max(len(_label(row)) for row in summary) + 2)
    gradcheck = any(row["gradcheck"] is not None for row in summary)
    lines = [f"trace, epoch {epoch + 1}: median of {steps} traced step{'s' * (steps != 1)} "
             f"(every {every}); dead: never positive in the epoch",
             f"{'layer':<{width}}{'output':>14}{'cache':>8}{'mean':>9}{'std':>9}{'dead':>6}"
             f"{'|dy|':>10}{'|dW|':>10}{'upd/W':>10}" + (f"{'gradchk':>10}" if gradcheck else "")]
    for row in summary:
        shape = "x".join(str(n) for n in (row["shape"] or ["-"])[1:]) or "-"
        line = (f"{_label(row):<{width}}{shape:>14}{_cell(row['cache_bytes'], 'bytes'):>8}"
                f"{_cell(row['mean'], 'f'):>9}{_cell(row['std'], 'f'):>9}"
                f"{_cell(row['dead'], 'share'):>6}{_cell(row['grad_in'], 'e'):>10}"
                f"{_cell(row['grad_weight'], 'e'):>10}"
                f"{_cell(row['update_ratio'].get('weight'), 'e'):>10}")
        lines.append(line + (f"{_cell(row['gradcheck'], 'e'):>10}" if gradcheck else ""))
    return "\n".join(lines)


# ---- files -----------------------------------------------------------------------------------
def _finite(value):
    """value with every float that is not finite as None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_trace(path):
    """trace.jsonl -> (the traced steps' records, [(epoch, flags)])."""
    records, flags = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            entry = json.loads(line)
            if "layers" in entry:
                records.append(entry)
            else:
                flags.append((entry["epoch"], entry["flags"]))
    return records, flags


def plot_trace(records, path):
    """trace.png: a heatmap per quantity (layers by traced steps) and the traced loss."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r["step"] for r in records]
    names = [_label(row) for row in records[-1]["layers"]]
    fig = Figure(figsize=(13, 11), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(4, 2).ravel()
    for ax, (key, title, log, limits) in zip(axes, QUANTITIES):
        grid = np.array([[_value(row, key) for row in r["layers"]] for r in records]).T
        shown = [i for i in range(len(names)) if np.isfinite(grid[i]).any()]
        ax.set_title(title + ("  (white: 0)" if log and shown else ""), fontsize=10)
        if not shown:
            why = " (gradcheck=False)" if key == "gradcheck" else ""
            ax.text(0.5, 0.5, f"not recorded{why}", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_axis_off()
            continue
        grid = grid[shown]
        if log:
            grid = np.where(grid > 0, np.log10(np.where(grid > 0, grid, 1)), np.nan)
        vmin, vmax = limits or (None, None)
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest",
                          cmap="viridis", vmin=vmin, vmax=vmax,
                          extent=(-0.5, len(steps) - 0.5, len(shown) - 0.5, -0.5))
        ax.set_yticks(range(len(shown)), [names[i] for i in shown], fontsize=7)
        ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 6)).astype(int))
        ax.set_xticks(ticks, [str(steps[t]) for t in ticks], fontsize=7)
        ax.set_xlabel("step", fontsize=8)
        fig.colorbar(image, ax=ax)
    ax = axes[len(QUANTITIES)]
    losses = [np.nan if r["loss"] is None else r["loss"] for r in records]
    ax.plot(steps, losses, marker="o", markersize=2)
    classes = records[-1]["layers"][-1]["shape"][-1] if records[-1]["layers"] else None
    if classes and classes > 1:
        ax.axhline(math.log(classes), color="tab:red", linestyle="--", linewidth=1,
                   label=f"log({classes}): chance")
        ax.legend(fontsize=8)
    ax.set_title("loss of the traced steps", fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.grid(alpha=0.3)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=70))


def _value(row, key):
    value = row["update_ratio"].get("weight") if key == "update_ratio" else row.get(key)
    return np.nan if value is None else value
