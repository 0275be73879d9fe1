"""Optimisers and learning-rate schedules with exactly PyTorch's update rules.

An optimiser takes the model (any layer or Sequential) and updates model.params in place from
model.grads. Its per-parameter state (momentum, Adam's moments) is keyed by parameter name and
created lazily, on the device of the parameter. A frozen layer's params (layer.trainable =
False) are left out of the step entirely, as PyTorch leaves a parameter whose grad is None:
no weight decay, no momentum, their buffers kept as they were. References: torch.optim.SGD, Adam, AdamW
(PyTorch 2.x documentation, "Algorithm" sections).
"""
import math

from minicnn.backend import array_module


class Optimizer:
    """Base class. model: the layer or Sequential whose params it updates, or None to bind it
    later (model.compile(optimizer=Adam(lr=1e-3)) binds it; Keras's way). A number given in
    its place is taken as the learning rate: Adam(1e-3)."""

    def __init__(self, model, lr):
        if isinstance(model, (int, float)) and not isinstance(model, bool):
            model, lr = None, model
        if model is not None and not (hasattr(model, "params") and hasattr(model, "grads")):
            raise TypeError(f"{type(self).__name__} takes the model (a layer or Sequential), whose "
                            f"params and grads it reads, got {type(model).__name__}.")
        if not 0 <= lr < math.inf:
            raise ValueError(f"learning rate must be a number >= 0, got {lr}.")
        self.model = model
        self.lr = lr
        self.steps = 0               # number of step() calls (Adam's t)
        self.state = {}              # {param name: {buffer name: array}}

    def bind(self, model):
        """Update model's params from now on (an optimiser created without one); returns self.
        Binding it to another model than its own starts its state afresh."""
        if model is not self.model:
            self.model, self.steps, self.state = model, 0, {}
        return self

    def step(self):
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__} has no model to update: create it with "
                               f"the model, or pass it to model.compile(optimizer=...).")
        self.steps += 1
        grads = self.model.grads
        params = getattr(self.model, "trainable_params", self.model.params)   # frozen: left out
        for name, p in params.items():
            self._update(name, p, grads[name], self.state.setdefault(name, {}))

    def zero_grad(self):
        self.model.zero_grad()

    def scale_loss(self, loss_fn):
        """The loss function whose gradients step() expects (Keras's Optimizer.scale_loss):
        loss_fn itself; minicnn.mixed_precision.LossScaleOptimizer's multiplies them by its
        loss scale."""
        return loss_fn

    def _update(self, name, p, g, state):
        raise NotImplementedError

    def state_dict(self):
        """{"lr", "steps", "state": {name: {buffer: array}}} for checkpoints."""
        return {"lr": self.lr, "steps": self.steps, "state": self.state}

    def load_state_dict(self, sd):
        self.lr, self.steps = sd["lr"], sd["steps"]
        self.state = {name: dict(buffers) for name, buffers in sd["state"].items()}


class SGD(Optimizer):
    """g = grad + wd * p;  buf = g (first step) or momentum * buf + g;
    g = g + momentum * buf (Nesterov) or buf;  p -= lr * g.
    """

    def __init__(self, model=None, lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(model, lr)
        if not 0 <= momentum < math.inf or not 0 <= weight_decay < math.inf:
            raise ValueError(f"momentum and weight_decay must be numbers >= 0, got {momentum} "
                             f"and {weight_decay}.")
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0.")
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay

    def _update(self, name, p, g, state):
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            buf = state.get("momentum")
            if buf is None:
                buf = state["momentum"] = g.copy()
            else:
                buf *= self.momentum
                buf += g
            g = g + self.momentum * buf if self.nesterov else buf
        p -= self.lr * g


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015, "Adam: A Method for Stochastic Optimization", Algorithm 1), as
    torch.optim.Adam's documentation writes it. At step t, for each parameter p with gradient g:

        g = g + wd * p                   (only with weight_decay: an L2 term in the gradient)
        m = b1 * m + (1 - b1) * g        a running mean of g        (state "exp_avg")
        v = b2 * v + (1 - b2) * g^2      a running mean of g^2      (state "exp_avg_sq")
        m_hat = m / (1 - b1^t)           bias correction: m and v start at 0, so early on they
        v_hat = v / (1 - b2^t)           are too small by exactly these factors
        p = p - lr * m_hat / (sqrt(v_hat) + eps)

    PyTorch computes the same step rearranged, lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t)
    + eps): equal algebraically, and to rounding in float64 (tests/test_torch.py).
    Known limit: t counts this optimiser's steps, not each parameter's as PyTorch does, so a
    layer unfrozen after t steps starts with too little bias correction; give the fine-tuning
    phase a fresh optimiser (model.compile again, as Keras's transfer-learning guide does).
    """
    decoupled = False            # AdamW sets True: weight decay shrinks p instead

    def __init__(self, model=None, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(model, lr)
        self.betas, self.eps, self.weight_decay = tuple(betas), eps, weight_decay

    def _update(self, name, p, g, state):
        xp = array_module(p)
        b1, b2 = self.betas
        t = self.steps                                  # 1 at the first step
        if self.weight_decay and self.decoupled:
            p *= 1 - self.lr * self.weight_decay        # AdamW: decay the weight itself
        elif self.weight_decay:
            g = g + self.weight_decay * p               # Adam: the L2 term joins the gradient
        if "exp_avg" not in state:                      # lazily, on p's device
            state["exp_avg"], state["exp_avg_sq"] = xp.zeros_like(p), xp.zeros_like(p)
        m, v = state["exp_avg"], state["exp_avg_sq"]    # p's shape, updated in place
        m[...] = b1 * m + (1 - b1) * g
        v[...] = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        p -= self.lr * m_hat / (xp.sqrt(v_hat) + self.eps)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019, torch.optim.AdamW): the weight
    shrinks, p = p - lr * wd * p, before the Adam step, and wd never enters m or v."""
    decoupled = True

    def __init__(self, model=None, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(model, lr, betas, eps, weight_decay)


# ---- learning-rate schedules -----------------------------------------------------------------
class LRSchedule:
    """Sets optimizer.lr from a step count; call step() once per epoch (or per batch for
    OneCycleLR), as with torch.optim.lr_scheduler. The lr for count t is lr_at(t)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.last_step = 0
        optimizer.lr = self.lr_at(0)

    def lr_at(self, t):
        raise NotImplementedError

    def step(self):
        self.last_step += 1
        self.optimizer.lr = self.lr_at(self.last_step)

    def state_dict(self):
        return {"base_lr": self.base_lr, "last_step": self.last_step}

    def load_state_dict(self, sd):
        self.base_lr, self.last_step = sd["base_lr"], sd["last_step"]
        self.optimizer.lr = self.lr_at(self.last_step)


class StepLR(LRSchedule):
    """lr = base * gamma ** (t // step_size)."""

    def __init__(self, optimizer, step_size, gamma=0.1):
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer)

    def lr_at(self, t):
        return self.base_lr * self.gamma ** (t // self.step_size)


class CosineAnnealingLR(LRSchedule):
    """lr = eta_min + (base - eta_min) * (1 + cos(pi * t / T_max)) / 2."""

    def __init__(self, optimizer, T_max, eta_min=0.0):
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer)

    def lr_at(self, t):
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * t / self.T_max)) / 2


class OneCycleLR(LRSchedule):
    """A warm-up from max_lr/div_factor to max_lr over pct_start of total_steps, then a decay
    down to max_lr/(div_factor*final_div_factor), both shaped by anneal ("cos": half-cosine
    ramps, "linear": straight lines): PyTorch's OneCycleLR (two phases, anneal_strategy),
    stepped once per batch. With anneal="linear" this is the linear warm-up/decay ("triangle")
    schedule of fast CIFAR-10 training.
    """

    def __init__(self, optimizer, max_lr, total_steps, pct_start=0.3, anneal="cos",
                 div_factor=25.0, final_div_factor=1e4):
        if anneal not in ("cos", "linear"):
            raise ValueError(f"anneal must be 'cos' or 'linear', got {anneal!r}.")
        self.max_lr, self.total_steps, self.anneal = max_lr, total_steps, anneal
        self.initial_lr = max_lr / div_factor
        self.min_lr = self.initial_lr / final_div_factor
        self.warmup_end = float(pct_start * total_steps) - 1
        super().__init__(optimizer)

    def _interpolate(self, start, end, frac):
        if self.anneal == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * frac) + 1)
        return (end - start) * frac + start

    def lr_at(self, t):
        if t <= self.warmup_end:
            return self._interpolate(self.initial_lr, self.max_lr, t / self.warmup_end)
        frac = (t - self.warmup_end) / (self.total_steps - 1 - self.warmup_end)
        return self._interpolate(self.max_lr, self.min_lr, min(frac, 1.0))


class ReduceLROnPlateau:
    """Multiply lr by factor when the metric has not improved for more than patience epochs
    (PyTorch's ReduceLROnPlateau, threshold_mode "rel"). Call step(metric) once per epoch.
    """

    def __init__(self, optimizer, mode="min", factor=0.1, patience=10, threshold=1e-4,
                 cooldown=0, min_lr=0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}.")
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {factor}.")
        self.optimizer, self.mode, self.factor, self.patience = optimizer, mode, factor, patience
        self.threshold, self.cooldown, self.min_lr = threshold, cooldown, min_lr
        self.best = math.inf if mode == "min" else -math.inf
        self.bad_epochs = 0
        self.cooldown_left = 0

    def _improved(self, metric):
        if self.mode == "min":
            return metric < self.best * (1 - self.threshold)
        return metric > self.best * (1 + self.threshold)

    def step(self, metric):
        metric = float(metric)
        if self._improved(metric):
            self.best, self.bad_epochs = metric, 0
        else:
            self.bad_epochs += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_epochs = 0
        if self.bad_epochs > self.patience:
            self.optimizer.lr = max(self.optimizer.lr * self.factor, self.min_lr)
            self.cooldown_left, self.bad_epochs = self.cooldown, 0

    def state_dict(self):
        return {"best": self.best, "bad_epochs": self.bad_epochs, "cooldown_left": self.cooldown_left}

    def load_state_dict(self, sd):
        self.best, self.bad_epochs, self.cooldown_left = sd["best"], sd["bad_epochs"], sd["cooldown_left"]
