"""The README's Python examples and examples/backprop_by_hand.py run as printed: a change to
the engine that breaks them fails here, not in a student's first session."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _run(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _cpu_blocks():
    """The README's ```python blocks that run without a GPU, in order (later ones use the names
    of earlier ones, as a reader typing them into one session would)."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    return [b for b in blocks if "x_gpu" not in b]


def test_readme_python_blocks_run_and_print_what_the_readme_shows(tmp_path):
    blocks = _cpu_blocks()
    assert len(blocks) >= 2, "the README's first model and gradcheck examples are missing"
    result = _run(["-c", "\n".join(blocks)], tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # the first model: its summary's total, as the README's comment says
    claimed = re.search(r"model\.summary\(\(3, 32, 32\)\)\s+# Keras-like table: ([\d,]+) parameters",
                        README)
    assert claimed and f"Total params: {claimed.group(1)}" in out
    assert (tmp_path / "tutorial.npz").exists()
    # the gradcheck table the README prints: header and each row's tensor, shape, max |grad|
    # and verdict (the differences themselves are rounding noise and vary with the BLAS)
    shown = re.search(r"errors = minicnn\.gradcheck\(.*?```\nprints\n```\n(.*?)```", README, re.S)
    assert shown, "the README no longer shows what gradcheck prints"
    shown_lines = shown.group(1).strip("\n").splitlines()
    out_lines = out[out.index("gradcheck "):].strip("\n").splitlines()[:len(shown_lines)]
    assert out_lines[:3] == shown_lines[:3]
    row = re.compile(r"\s*(\S+)\s+(\(.*?\))\s+(\S+)\s.*\s(\S+)$")   # tensor, shape, max|grad|, verdict
    for want, got in zip(shown_lines[3:], out_lines[3:]):
        assert row.match(want) and row.match(got), (want, got)
        assert row.match(want).groups() == row.match(got).groups(), (want, got)
    assert len(out_lines) == len(shown_lines) == 6


def test_backprop_by_hand_example_runs_and_checks_itself(tmp_path):
    result = _run([str(ROOT / "examples" / "backprop_by_hand.py")], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "matches Conv2D.forward: yes" in result.stdout
    assert "matches Conv2D.backward: yes" in result.stdout
    table = result.stdout[result.stdout.index("gradcheck Conv2D"):].splitlines()[3:]
    assert [(line.split()[0], line.split()[-1]) for line in table] == [
        ("input", "ok"), ("weight", "ok"), ("bias", "ok")]
