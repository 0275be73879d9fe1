"""The backprop tour (docs/tour/) and its examples (examples/tour/) stay true to each other.

Every example runs in a fresh interpreter, exits 0, prints only passing "check: ... OK" lines,
and prints what its page shows: every line of the page's ```text block appears in the run's
output, in order, with its floating-point numbers masked (their last digits vary with the BLAS;
shapes, counts and words may not change). A reference function made slightly wrong makes its
example fail, so the checks can fail. Every example has a page, every page's example exists,
and every function a page names exists.
"""
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOUR = ROOT / "docs" / "tour"
EXAMPLES = ROOT / "examples" / "tour"
PAGES = sorted(TOUR.glob("[0-9][0-9]-*.md"))
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if p.name != "tourkit.py")   # kit: helpers
EXAMPLE_LINK = re.compile(r"\]\(\.\./\.\./examples/tour/(\w+\.py)\)")
FLOAT = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+)(?:[eE][-+]?\d+)?%?|[-+]?\d+[eE][-+]?\d+")
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _run(args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def run_example():
    """name -> the CompletedProcess of python examples/tour/<name>, run once per module."""
    runs = {}

    def run(name):
        if name not in runs:
            runs[name] = _run([str(EXAMPLES / name)])
        return runs[name]
    return run


def _page_of(script):
    """The tour page that links examples/tour/<script>."""
    pages = [p for p in PAGES if script in EXAMPLE_LINK.findall(p.read_text())]
    assert len(pages) == 1, f"{script} should be linked from exactly one tour page: {pages}"
    return pages[0]


def _masked(line):
    """The line with every float (and percentage) replaced by #, runs of spaces by one."""
    return " ".join(FLOAT.sub("#", line).split())


def _shown_output(page):
    """The lines of the page's ```text blocks (its example's output), without blank lines and
    "..." marks for trimmed lines; torch's lines only where torch is installed."""
    blocks = re.findall(r"```text\n(.*?)```", page.read_text(), re.S)
    assert blocks, f"{page.name} shows no output of its example"
    lines = [line for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.strip() not in ("", "...")
            and (HAS_TORCH or "torch" not in line)]


def test_the_tour_has_a_page_and_an_example_per_topic():
    assert [p.name for p in PAGES][:6] == [
        "01-convolution.md", "02-pooling.md", "03-batchnorm.md", "04-softmax-cross-entropy.md",
        "05-adam.md", "06-small-cnn.md"]
    assert {"convolution.py", "pooling.py", "batchnorm.py", "softmax_cross_entropy.py",
            "adam.py", "small_cnn.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs_passes_its_checks_and_prints_what_its_page_shows(script, run_example):
    run = run_example(script)
    assert run.returncode == 0, f"{script} failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
    out = run.stdout.splitlines()
    checks = [line for line in out if line.startswith("check:")]
    assert checks, f"{script} printed no check line"
    assert all(line.endswith(" OK") for line in checks), checks
    if not HAS_TORCH:
        assert script != "adam.py" or any(line.startswith("skip: torch") for line in out)
    got = iter(_masked(line) for line in out)                 # the shown lines, in order
    for want in _shown_output(_page_of(script)):
        assert any(_masked(want) == line for line in got), (
            f"{_page_of(script).name} shows a line that {script} no longer prints "
            f"(in this order):\n{want}\n--- it printed:\n{run.stdout}")


def test_the_small_cnn_learns(run_example):
    out = run_example("small_cnn.py").stdout
    went_down = re.search(r"the loss went down, ([\d.]+) before training -> ([\d.]+) in the "
                          r"last epoch OK", out)
    assert went_down, out
    first, last = map(float, went_down.groups())
    assert last < 0.5 * first
    accuracy = re.search(r"final test accuracy: ([\d.]+)%", out)
    assert accuracy and float(accuracy.group(1)) >= 80, out
    losses = [float(m) for m in re.findall(r"^\s+\d+\s+([\d.]+)\s", out, re.M)]
    assert len(losses) >= 4 and losses[-1] < losses[1] < 1.2 * losses[0], losses


# ---- a slightly wrong function makes its example fail ------------------------------------------
BREAK_AND_RUN = """
import os, runpy, sys
import numpy as np
import minicnn.reference as reference
from minicnn.nn import optim

def a_little_off(fn):
    '''fn with its first array result 0.1% too large.'''
    def broken(*args, **kwargs):
        result = fn(*args, **kwargs)
        if isinstance(result, np.ndarray):
            return result * 1.001
        result = list(result)
        first = [i for i, r in enumerate(result) if isinstance(r, np.ndarray)][0]
        result[first] = result[first] * 1.001
        return tuple(result)
    return broken

def adam_a_little_off(update):
    '''Adam's update, each step 1e-6 too large.'''
    def broken(self, name, p, g, state):
        update(self, name, p, g, state)
        p *= 1 + 1e-6
    return broken

target, script = sys.argv[1:]
if target == "Adam._update":
    optim.Adam._update = adam_a_little_off(optim.Adam._update)
else:
    setattr(reference, target, a_little_off(getattr(reference, target)))
sys.argv = [script]
sys.path.insert(0, os.path.dirname(script))         # as python <script> does: tourkit.py
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("script, target", [
    ("convolution.py", "conv2d_backward"), ("pooling.py", "maxpool2d_backward"),
    ("batchnorm.py", "batchnorm_backward"), ("softmax_cross_entropy.py", "softmax_cross_entropy"),
    ("adam.py", "Adam._update"), ("small_cnn.py", "relu_backward")])
def test_a_slightly_wrong_function_makes_its_example_fail(script, target):
    """The reference function (or Adam's update) 0.1% (1e-6) off, in the example's process
    only: one of its checks must say FAIL and the script must exit non-zero."""
    run = _run(["-c", BREAK_AND_RUN, target, str(EXAMPLES / script)])
    assert run.returncode != 0, f"{script} did not notice a broken {target}:\n{run.stdout}"
    assert any(line.startswith("check:") and line.endswith(" FAIL")
               for line in run.stdout.splitlines()), run.stdout + run.stderr
    assert "check failed" in run.stderr, run.stderr


# ---- links and names ---------------------------------------------------------------------------
def test_every_example_has_a_page_and_every_page_an_example():
    linked = {}
    for page in PAGES:
        scripts = set(EXAMPLE_LINK.findall(page.read_text()))
        assert len(scripts) == 1, f"{page.name} should link exactly one example: {scripts}"
        linked[page.name] = scripts.pop()
    assert sorted(linked.values()) == SCRIPTS, (linked, SCRIPTS)
    index = (TOUR / "README.md").read_text()
    assert set(EXAMPLE_LINK.findall(index)) == set(SCRIPTS)
    assert set(re.findall(r"\]\((\d\d-[\w-]+\.md)\)", index)) == {p.name for p in PAGES}


def test_the_functions_the_pages_name_exist():
    """Every `minicnn/<path>.py: name, name` a page or the index names is defined there."""
    named = 0
    for page in [TOUR / "README.md", *PAGES]:
        for path, names in re.findall(r"`(minicnn/[\w/]+\.py): ([\w, ]+)`", page.read_text()):
            assert (ROOT / path).exists(), f"{page.name}: no file {path}"
            module = importlib.import_module(path[:-3].replace("/", "."))
            for name in names.split(","):
                assert hasattr(module, name.strip()), f"{page.name}: {path} has no {name}"
                named += 1
    assert named >= 30
