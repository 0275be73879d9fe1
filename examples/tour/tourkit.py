"""What every tour example shares: show an array in one line, measure an error, check it.

The examples import it from their own folder (python examples/tour/<topic>.py puts that folder
on the path)."""
import numpy as np


def show(name, a, count=4):
    """One line per array: its name, its shape and its first count numbers."""
    fmt = "{:7d}" if a.dtype.kind in "iu" else "{:7.3f}"
    head = " ".join(fmt.format(v + 0) for v in np.ravel(a)[:count])  # + 0: no "-0.000"
    print(f"  {name:<10}{str(a.shape):<16}{head} ...")


def rel_err(a, b):
    """max|a - b| / max(1, max|a|): relative for large values, absolute for small (as gradcheck)."""
    return float(np.max(np.abs(np.subtract(a, b))) / max(1.0, np.max(np.abs(a))))


def check(what, err, tol):
    """Print one check line; stop the script (exit status 1) if err is not below tol."""
    print(f"check: {what} max rel err {err:.0e} {'OK' if err < tol else 'FAIL'}")
    if not err < tol:
        raise SystemExit(f"check failed: {what}: {err:.1e} is not below {tol:.0e}")
