"""The README's Python examples run as printed, and the commands the README and docs/ show are
ones the tools accept: a change that breaks them fails here, not in a reader's first session.
(The tour's examples are run by tests/test_tour.py.)"""
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
TOOL_MODULES = {"train": "trainer"}         # python -m minicnn.X runs minicnn/training/<this>.py


def _run(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _cpu_blocks():
    """The README's ```python blocks that run without a GPU, in order (later ones use the names
    of earlier ones, as a reader typing them into one session would)."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    return [b for b in blocks if "x_gpu" not in b and "load_data()" not in b]


def _keras_block():
    [block] = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "load_data()" in b]
    return block


# CIFAR-10 stood in for by 64 + 32 random images (no download in a test)
SMALL_CIFAR = """
import numpy as np
import minicnn.datasets.cifar10 as cifar10
_rng = np.random.default_rng(0)
_split = lambda n: (_rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), _rng.integers(0, 10, n))
cifar10.load_data = lambda path=None: (_split(64), _split(32))
"""


def test_readme_keras_workflow_runs_as_printed(tmp_path):
    """The README's Keras program, on 64 small random images instead of CIFAR-10: it trains
    its 10 epochs, prints the epoch table and the evaluation, and plots the history."""
    result = _run(["-c", SMALL_CIFAR + _keras_block() + "\nprint('accuracy', test_acc)"],
                  tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line[:5].strip().isdigit()]
    assert [int(r[0]) for r in rows] == list(range(1, 11))
    assert "evaluate: loss" in result.stdout and "accuracy" in result.stdout
    assert (tmp_path / "history.png").stat().st_size > 1000


def test_readme_python_blocks_run_and_print_what_the_readme_shows(tmp_path):
    blocks = _cpu_blocks()
    assert len(blocks) >= 2, "the README's first model and gradcheck examples are missing"
    result = _run(["-c", "\n".join(blocks)], tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # the first model: its summary's total, as the README's comment says
    claimed = re.search(r"model\.summary\(\(3, 32, 32\)\)\s+# Keras-like table: ([\d,]+) "
                        r"parameters", README)
    assert claimed and f"Total params: {claimed.group(1)}" in out
    assert (tmp_path / "tutorial.npz").exists()
    # the gradcheck table the README prints: header and each row's tensor, shape, max |grad|
    # and verdict (the differences themselves are rounding noise and vary with the BLAS)
    shown = re.search(r"errors = minicnn\.gradcheck\(.*?```\nprints\n```\n(.*?)```", README, re.S)
    assert shown, "the README no longer shows what gradcheck prints"
    shown_lines = shown.group(1).strip("\n").splitlines()
    out_lines = out[out.index("gradcheck "):].strip("\n").splitlines()[:len(shown_lines)]
    assert out_lines[:3] == shown_lines[:3]
    row = re.compile(r"\s*(\S+)\s+(\(.*?\))\s+(\S+)\s.*\s(\S+)$")   # tensor, shape, |grad|, verdict
    for want, got in zip(shown_lines[3:], out_lines[3:]):
        assert row.match(want) and row.match(got), (want, got)
        assert row.match(want).groups() == row.match(got).groups(), (want, got)
    assert len(out_lines) == len(shown_lines) == 6


DOCS = {path.relative_to(ROOT).as_posix(): path.read_text()
        for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]}


def _documented_commands(tool):
    """Every `python -m minicnn.<tool> ...` command the README and docs/ show: code-block lines
    (up to a comment) and inline code spans, as (file, argument list)."""
    pattern = rf"python -m minicnn\.{tool}(?![\w.])"
    found = []
    for name, text in DOCS.items():
        lines = [line.split("#")[0] for line in text.splitlines()
                 if re.match(pattern, line.strip())]
        spans = [span for span in re.findall(r"`([^`]*)`", text) if re.match(pattern, span)]
        found += [(name, shlex.split(command)[3:]) for command in lines + spans]
    return found


@pytest.mark.parametrize("tool", ["train", "evaluate", "predict"])
def test_readme_commands_are_ones_the_tools_accept(tool):
    module = importlib.import_module(f"minicnn.training.{TOOL_MODULES.get(tool, tool)}")
    commands = _documented_commands(tool)
    assert any(name == "README.md" for name, _ in commands), \
        f"the README shows no python -m minicnn.{tool} command"
    for name, args in commands:
        try:
            module.build_parser().parse_args(args)
        except SystemExit as e:                     # status 2: an unknown flag or value
            assert e.code == 0 and "--help" in args, f"{name}: python -m minicnn.{tool} {args}"
