"""The backprop tour, stop 5: the Adam optimiser, step by step.

    python examples/tour/adam.py                 (docs/tour/05-adam.md explains it)

Adam (Kingma & Ba 2015, Algorithm 1) keeps two running means per parameter entry:
    m = b1 m + (1 - b1) g          the mean of the gradient g
    v = b2 v + (1 - b2) g^2        the mean of its square
    m_hat = m / (1 - b1^t),  v_hat = v / (1 - b2^t)      bias correction at step t = 1, 2, ...
    p = p - lr * m_hat / (sqrt(v_hat) + eps)
A small model takes a few Adam steps through minicnn.optim.Adam, while the formula above,
written out by hand, and (if it is installed) torch.optim.Adam take the same steps from the
same gradients; the script prints the differences and exits non-zero if one is too large.
Then the same for Adam's L2 weight decay and for AdamW's decoupled one.
"""
import numpy as np

import minicnn
from minicnn.nn import Dense, SoftmaxCrossEntropy
from tourkit import check, rel_err

try:
    import torch                          # a second opinion, never a requirement
except ImportError:
    torch = None


def adam_step(p, g, m, v, t, lr, betas, eps, weight_decay=0.0, decoupled=False):
    """One Adam step of one parameter, as the paper writes it -> the new p, m, v (new arrays).

    t counts the steps from 1. weight_decay: Adam adds wd * p to the gradient (an L2 penalty);
    AdamW (decoupled=True) shrinks p by lr * wd * p instead, outside m and v.
    """
    b1, b2 = betas
    if decoupled:
        p = p - lr * weight_decay * p
    else:
        g = g + weight_decay * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g ** 2
    m_hat = m / (1 - b1 ** t)              # at t = 1: m_hat = g exactly
    v_hat = v / (1 - b2 ** t)              # at t = 1: v_hat = g^2 exactly
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


def compare(name, hyper, steps=5, verbose=False):
    """steps of minicnn.optim.<name> on a Dense(4, 3) layer against adam_step by hand and
    torch.optim.<name>, all fed minicnn's gradients; prints the check lines.
    hyper: lr, betas, eps, weight_decay (the three optimisers take the same names)."""
    rng = np.random.default_rng(0)
    model = Dense(4, 3, dtype=np.float64, rng=rng)        # params: weight (3, 4), bias (3,)
    x = rng.standard_normal((8, 4))                       # 8 examples, 4 features
    labels = rng.integers(0, 3, 8)                        # 3 classes
    loss_fn = SoftmaxCrossEntropy()
    opt = getattr(minicnn.optim, name)(model, **hyper)
    # by hand: (p, m, v) per parameter, m and v starting at zero
    hand = {k: (p.copy(), np.zeros_like(p), np.zeros_like(p)) for k, p in model.params.items()}
    if torch is not None:
        theirs = {k: torch.tensor(p.copy(), requires_grad=True) for k, p in model.params.items()}
        torch_opt = getattr(torch.optim, name)(list(theirs.values()), **hyper)
    b1, b2 = hyper["betas"]
    if verbose:
        print(f"{name}({', '.join(f'{k}={v}' for k, v in hyper.items())}); "
              f"weight[0, 0], step by step:")
        print(f"  {'t':>2} {'loss':>7} {'g':>9} {'m':>9} {'1-b1^t':>7} {'m_hat':>9} {'v':>9} "
              f"{'1-b2^t':>7} {'v_hat':>9} {'change':>9}")
    for t in range(1, steps + 1):
        loss, dlogits = loss_fn(model.forward(x, training=True), labels)
        model.backward(dlogits)                           # fills model.grads
        before = model.params["weight"][0, 0]
        opt.step()                                        # minicnn (its t is opt.steps)
        for k, g in model.grads.items():                  # by hand, from the same gradient
            p, m, v = hand[k]
            hand[k] = adam_step(p, g, m, v, t, **hyper, decoupled=name == "AdamW")
        if torch is not None:                             # torch, from the same gradient
            for k, tp in theirs.items():
                tp.grad = torch.tensor(model.grads[k])
            torch_opt.step()
        if verbose:
            g = model.grads["weight"][0, 0]
            m, v = opt.state["weight"]["exp_avg"][0, 0], opt.state["weight"]["exp_avg_sq"][0, 0]
            print(f"  {t:>2} {loss:7.4f} {g:9.2e} {m:9.2e} {1 - b1 ** t:7.4f} "
                  f"{m / (1 - b1 ** t):9.2e} {v:9.2e} {1 - b2 ** t:7.4f} {v / (1 - b2 ** t):9.2e} "
                  f"{model.params['weight'][0, 0] - before:9.2e}")
    if verbose:
        lr = hyper["lr"]
        print(f"  step 1 moves each entry by -lr * g / (|g| + eps), about -lr * sign(g) = "
              f"{-lr:+.2e} (here g > 0).")
        print(f"  Without the bias correction it would move by -lr * (1-b1) g / sqrt((1-b2) g^2) "
              f"= {-lr * (1 - b1) / (1 - b2) ** 0.5:+.2e}.")
    what = f"minicnn.optim.{name}" + (" with weight_decay" if hyper["weight_decay"] else "")
    check(f"{what} vs the formula by hand, {steps} steps",
          max(rel_err(model.params[k], hand[k][0]) for k in hand), 1e-12)
    if torch is None:
        print(f"skip: torch is not installed, so no comparison with torch.optim.{name}")
        return
    check(f"{what} vs torch.optim.{name}, {steps} steps",
          max(rel_err(model.params[k], theirs[k].detach().numpy()) for k in theirs), 1e-10)


compare("Adam", dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), verbose=True)
print()
compare("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1))   # L2 in g
compare("AdamW", dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1))  # decoupled
