"""Mixed precision, Keras's API: layers compute in float16 (or bfloat16), the weights stay float32.

    from minicnn import mixed_precision
    mixed_precision.set_global_policy("mixed_float16")      # before compile, as in Keras
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=5)                                # python -m minicnn.train --precision

What changes under a mixed policy, and where (the casting lives in one place,
minicnn.dtype_policy.autocast, which minicnn.implementation.ops_for applies to the maths every
layer calls; the layers' own code does not change):

    parameters   stay float32 (the master weights): model.params, which the optimiser updates
    each op      casts its floating-point inputs (x, the weights, dy) to its dtype and returns
                 its outputs in it: the compute dtype (float16 / bfloat16) for conv, dense,
                 pooling, ReLU and dropout; float32 for batch norm (its statistics), softmax and
                 the loss (FLOAT32_OPS, PyTorch autocast's rule). A layer stores the float16
                 gradients of its weights into its float32 grads.
    the loss     LossScaleOptimizer (mixed_float16 only; bfloat16 has float32's exponent range):
                 dlogits are multiplied by the loss scale S, so that small gradients do not
                 flush to zero in float16; step() divides the gradients by S in float32 and
                 updates the weights, or, when any gradient is inf or NaN (float16 overflowed),
                 skips the step and halves S. After dynamic_growth_steps good steps in a row, S
                 doubles. Keras's defaults: S = 2**15, growth every 2000 steps.

NumPy has no fast float16 GEMM (its float16 matmul is a plain loop), so on a CPU this is for
studying the numerics, and it is slower than float32 (minicnn.ops multiplies float16 in float32
BLAS and rounds once, docs/precision.md); on a GPU float16 is the path to tensor cores
(unverified here: no GPU). bfloat16 on NumPy comes from ml_dtypes (pip install
"minicnn[precision]"); on CuPy only where CuPy takes ml_dtypes' bfloat16 arrays (unverified).
python -m minicnn.precision shows one step's errors in each precision against float64.
"""
import math

from minicnn.dtype_policy import (BFLOAT16, FLOAT32_OPS, POLICIES, Policy, autocast,
                                  global_policy, is_floating, set_global_policy)
from minicnn.backend import array_module
from minicnn.nn.optim import Optimizer

__all__ = ["Policy", "set_global_policy", "global_policy", "LossScaleOptimizer", "ScaledLoss",
           "autocast", "is_floating", "for_policy", "all_finite", "POLICIES", "FLOAT32_OPS",
           "BFLOAT16"]


# ---- dynamic loss scaling ---------------------------------------------------------------------
class ScaledLoss:
    """loss_fn with its gradient multiplied by scale: (logits, labels) -> (loss, dlogits * scale).
    The loss itself is not scaled (it is what fit reports). A class, not a closure, so that the
    data-parallel step can send it to its worker processes."""

    def __init__(self, loss_fn, scale):
        self.loss_fn, self.scale = loss_fn, scale

    def __call__(self, logits, labels):
        loss, dlogits = self.loss_fn(logits, labels)            # dlogits float32 (FLOAT32_OPS)
        return loss, dlogits * dlogits.dtype.type(self.scale)


class LossScaleOptimizer(Optimizer):
    """Dynamic loss scaling around an optimiser (Keras's LossScaleOptimizer, its defaults).

        fit:     loss_fn = optimizer.scale_loss(model.loss)     dlogits * S: grads come out S x
        step():  grads finite?  yes: grads /= S, inner step, good_steps += 1,
                                     S *= 2 after dynamic_growth_steps good steps in a row
                                no:  skip the step (params and the inner state untouched),
                                     S /= 2, good_steps = 0

    S is a power of two, so scaling and unscaling change no bit of a gradient that does not
    overflow. lr, steps, state and model are the inner optimiser's; state_dict() adds
    "loss_scale": {"scale", "good_steps"}, which a checkpoint keeps.
    """

    def __init__(self, inner_optimizer, initial_scale=2.0 ** 15, dynamic_growth_steps=2000):
        if (not isinstance(inner_optimizer, Optimizer)
                or isinstance(inner_optimizer, LossScaleOptimizer)):
            raise TypeError(f"LossScaleOptimizer wraps a minicnn.nn.optim optimiser, got "
                            f"{type(inner_optimizer).__name__}.")
        if not (0 < initial_scale < math.inf) or int(dynamic_growth_steps) < 1:
            raise ValueError(f"initial_scale must be a positive number and dynamic_growth_steps "
                             f"at least 1, got {initial_scale} and {dynamic_growth_steps}.")
        self.inner_optimizer = inner_optimizer
        self.loss_scale = float(initial_scale)
        self.dynamic_growth_steps = int(dynamic_growth_steps)
        self.good_steps = 0               # finite steps since S last changed (Keras's step_counter)
        self.skipped_steps = 0            # steps skipped for inf/NaN gradients, this session

    # the inner optimiser's, read and written through (schedules set lr; fit reads it)
    lr = property(lambda self: self.inner_optimizer.lr,
                  lambda self, v: setattr(self.inner_optimizer, "lr", v))
    steps = property(lambda self: self.inner_optimizer.steps,
                     lambda self, v: setattr(self.inner_optimizer, "steps", v))
    state = property(lambda self: self.inner_optimizer.state,
                     lambda self, v: setattr(self.inner_optimizer, "state", v))
    model = property(lambda self: self.inner_optimizer.model)

    def bind(self, model):
        self.inner_optimizer.bind(model)
        return self

    def scale_loss(self, loss_fn):
        """loss_fn whose gradient is S times its own (Keras's Optimizer.scale_loss)."""
        return ScaledLoss(self.inner_optimizer.scale_loss(loss_fn), self.loss_scale)

    def step(self):
        """Unscale the gradients and step, or skip and halve S (see the class docstring).
        -> True when the step was taken."""
        if self.model is None:
            return self.inner_optimizer.step()          # its sentence: no model to update
        grads = list(self.model.grads.values())
        if not all_finite(grads):
            self.loss_scale /= 2
            self.good_steps = 0
            self.skipped_steps += 1
            return False
        for g in grads:
            g *= g.dtype.type(1.0 / self.loss_scale)    # a power of two: exact, unless subnormal
        self.inner_optimizer.step()
        self.good_steps += 1
        if self.good_steps == self.dynamic_growth_steps:
            self.loss_scale *= 2
            self.good_steps = 0
        return True

    def state_dict(self):
        return {**self.inner_optimizer.state_dict(),
                "loss_scale": {"scale": self.loss_scale, "good_steps": self.good_steps}}

    def load_state_dict(self, sd):
        """The inner optimiser's state and, when sd has it, the loss scale's."""
        self.inner_optimizer.load_state_dict(sd)
        if sd.get("loss_scale") is not None:
            self.loss_scale = float(sd["loss_scale"]["scale"])
            self.good_steps = int(sd["loss_scale"]["good_steps"])

    def __repr__(self):
        return (f"LossScaleOptimizer({type(self.inner_optimizer).__name__}, "
                f"loss_scale={self.loss_scale:g}, good_steps={self.good_steps})")


def all_finite(arrays):
    """Whether every value of every array is finite, read back as one number (one wait for a
    GPU)."""
    if not arrays:
        return True
    xp = array_module(*arrays)
    return bool(xp.stack([xp.isfinite(a).all() for a in arrays]).all())


def for_policy(optimizer, policy=None):
    """optimizer as compile uses it under policy (default: the global one): wrapped in a
    LossScaleOptimizer under mixed_float16 (unless it is one already), else as it is."""
    policy = global_policy() if policy is None else policy
    if policy.compute_dtype == "float16" and not isinstance(optimizer, LossScaleOptimizer):
        return LossScaleOptimizer(optimizer)
    return optimizer
