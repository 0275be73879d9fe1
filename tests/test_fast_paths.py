"""The fast paths explain themselves: which dx strategy and layout a conv layer gets (dx_strategy,
conv2d_path, pool2d_path), each named dx strategy forced on a problem it can take and checked
against minicnn.reference in float64, every fast function naming its reference, and every
docs/performance.md link in the code naming a section that exists."""
import pathlib
import re

import numpy as np
import pytest

from minicnn import ops
from minicnn import reference as R
from minicnn.ops import conv as conv_ops
from test_parallel import thread_workers

ROOT = pathlib.Path(__file__).resolve().parent.parent
PERFORMANCE = ROOT / "docs" / "performance.md"
SAME = ((1, 1), (1, 1))
VALID = ((0, 0), (0, 0))


# ---- which path a layer takes --------------------------------------------------------------
# (C, kernel, stride, padding, input_grad, dx_strategy, conv2d_path)
REPRESENTATIVE = [
    (3, (3, 3), (1, 1), SAME, True, "col2im", "channels-first im2col; dx col2im"),   # RGB
    (3, (3, 3), (1, 1), VALID, False, "none", "channels-first im2col; no dx"),       # RGB, 1st
    (32, (3, 3), (1, 1), SAME, True, "as-conv", "channels-last; dx as conv"),
    (32, (3, 3), (1, 1), VALID, True, "by-taps", "channels-last; dx by taps"),
    (32, (3, 3), (2, 2), SAME, True, "col2im", "channels-last; dx col2im"),          # stride 2
    (32, (3, 3), (1, 1), SAME, False, "none", "channels-last; no dx"),
    (64, (1, 1), (1, 1), VALID, True, "as-conv", "channels-last; dx as conv"),       # 1x1
    (16, (3, 3), (1, 1), ((2, 2), (2, 2)), True, "as-conv", "channels-last; dx as conv"),
    (16, (3, 3), (1, 1), ((3, 3), (3, 3)), True, "by-taps", "channels-last; dx by taps"),
    (16, (2, 2), (1, 1), ((0, 1), (0, 1)), True, "by-taps", "channels-last; dx by taps"),
    (16, (3, 3), (1, 2), SAME, True, "col2im", "channels-last; dx col2im"),          # one axis
]


@pytest.mark.parametrize("c, kernel, stride, padding, input_grad, strategy, path", REPRESENTATIVE)
def test_dx_strategy_and_conv2d_path_of_representative_layers(c, kernel, stride, padding,
                                                               input_grad, strategy, path):
    assert conv_ops.dx_strategy(c, kernel, stride, padding, input_grad) == strategy
    assert strategy in conv_ops.DX_STRATEGIES
    assert ops.conv2d_path(c, kernel, stride, padding, input_grad) == path
    # the layout it names is the one conv2d_forward takes
    x = np.zeros((1, c, 6, 6), dtype=np.float32)
    w = np.zeros((2, c) + kernel, dtype=np.float32)
    _, cache = conv_ops.conv2d_forward(x, w, None, stride, padding)
    assert path.startswith("channels-first") == (cache[0] == "channels-first")


def test_conv2d_path_takes_ints_and_pairs_as_a_layer_has_them():
    assert ops.conv2d_path(32, 3, 1, 1) == ops.conv2d_path(32, (3, 3), (1, 1), (1, 1))
    assert ops.conv2d_path(32, 3, 1, 1) == "channels-last; dx as conv"
    assert ops.conv2d_path(32, 3, 1, 0) == "channels-last; dx by taps"
    assert ops.conv2d_path(32, [3, 3], [2, 2], [[1, 1], [1, 1]]) == "channels-last; dx col2im"


def test_dx_strategy_follows_its_thresholds(monkeypatch):
    assert conv_ops.dx_strategy(8, (3, 3), (1, 1), SAME) == "as-conv"
    monkeypatch.setattr(conv_ops, "DX_GEMM_MIN_CHANNELS", 9)
    assert conv_ops.dx_strategy(8, (3, 3), (1, 1), SAME) == "col2im"
    monkeypatch.setattr(conv_ops, "DX_GEMM_MIN_CHANNELS", 1)
    monkeypatch.setattr(conv_ops, "CHANNELS_FIRST_BELOW", 1)
    assert conv_ops.dx_strategy(3, (3, 3), (1, 1), VALID) == "by-taps"
    assert ops.conv2d_path(3, 3, 1, 1) == "channels-last; dx as conv"


@pytest.mark.parametrize("op, kernel, stride, path", [
    ("max", 2, 2, "2x2 halving steps"), ("max", (2, 2), (2, 2), "2x2 halving steps"),
    ("max", 2, 1, "strided taps"), ("max", 3, 2, "strided taps"),
    ("max", (2, 1), 2, "strided taps"),
    ("avg", 2, 2, "strided taps"), ("avg", 3, 3, "strided taps")])
def test_pool2d_path(op, kernel, stride, path):
    assert ops.pool2d_path(op, kernel, stride) == path


def test_pool2d_path_names_the_path_maxpool_takes():
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6))
    for kernel, stride in (((2, 2), (2, 2)), ((3, 3), (1, 1)), ((2, 2), (1, 1))):
        _, cache = ops.maxpool2d_forward(x, kernel, stride)
        halving = ops.pool2d_path("max", kernel, stride) == "2x2 halving steps"
        assert halving == (cache[0] == "2x2")
    with pytest.raises(ValueError):
        ops.pool2d_path("min", 2, 2)


# ---- each named strategy, forced, against the reference ----------------------------------


# (strategy, C, F, kernel, stride, padding): problems each strategy can take (channels-last:
# C >= CHANNELS_FIRST_BELOW). "as-conv" is exact on any stride-1 padding up to K-1 (the valid
# case pads dy by K-1: correct, only slower); "by-taps" on any stride-1 padding.
FORCED = [
    ("as-conv", 8, 5, (3, 3), (1, 1), SAME),
    ("as-conv", 9, 4, (3, 2), (1, 1), VALID),
    ("as-conv", 10, 65, (2, 2), (1, 1), ((1, 0), (0, 1))),      # F > 64: one GEMM a chunk
    ("by-taps", 8, 5, (3, 3), (1, 1), VALID),
    ("by-taps", 9, 4, (3, 3), (1, 1), SAME),
    ("by-taps", 10, 65, (2, 3), (1, 1), ((0, 2), (1, 0))),
    ("col2im", 8, 5, (3, 3), (1, 1), SAME),
    ("col2im", 9, 4, (3, 3), (1, 1), VALID),
    ("col2im", 8, 6, (3, 3), (2, 2), SAME),
    ("col2im", 11, 65, (2, 3), (2, 1), ((0, 1), (2, 0))),
    ("none", 8, 5, (3, 3), (1, 1), SAME),
]
STRATEGY_FUNCTIONS = {"as-conv": "_dx_as_conv", "by-taps": "_dx_by_taps", "col2im": "_dx_col2im"}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("strategy, c, f, kernel, stride, padding", FORCED,
                         ids=[case[0] for case in FORCED])
def test_each_forced_dx_strategy_equals_the_reference(strategy, c, f, kernel, stride, padding,
                                                      threads, monkeypatch):
    rng = np.random.default_rng(c * 100 + f)
    x = rng.standard_normal((3, c, 6, 7))
    w, b = rng.standard_normal((f, c) + kernel), rng.standard_normal(f)
    ran = []
    monkeypatch.setattr(conv_ops, "dx_strategy", lambda *args: strategy)
    for name, fn_name in STRATEGY_FUNCTIONS.items():
        def spy(*args, _name=name, _fn=getattr(conv_ops, fn_name)):
            ran.append(_name)
            return _fn(*args)
        monkeypatch.setattr(conv_ops, fn_name, spy)
    expected_out, ref_cache = R.conv2d_forward(x, w, b, stride, padding)
    input_grad = strategy != "none"
    with thread_workers(threads):
        for workspace in (conv_ops.CONV_WORKSPACE_BYTES, 1):     # 1: one image a chunk
            monkeypatch.setattr(conv_ops, "CONV_WORKSPACE_BYTES", workspace)
            out, cache = conv_ops.conv2d_forward(x, w, b, stride, padding)
            assert cache[0] == "channels-last"
            np.testing.assert_allclose(out, expected_out, rtol=1e-10, atol=1e-10)
            dout = rng.standard_normal(out.shape)
            ran.clear()
            dx, dw, db = conv_ops.conv2d_backward(dout, cache, input_grad)
            assert ran == ([] if strategy == "none" else [strategy])
            ref_dx, ref_dw, ref_db = R.conv2d_backward(dout, ref_cache, input_grad)
            np.testing.assert_allclose(dw, ref_dw, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(db, ref_db, rtol=1e-10, atol=1e-10)
            if strategy == "none":
                assert dx is None
            else:
                assert dx.shape == x.shape and dx.dtype == np.float64
                np.testing.assert_allclose(dx, ref_dx, rtol=1e-10, atol=1e-10)


def test_the_backward_asks_dx_strategy(monkeypatch):
    """conv2d_backward takes its dx the way dx_strategy says, with the layer's own shapes."""
    asked = []

    def strategy(*args):
        asked.append(args)
        return "col2im"
    monkeypatch.setattr(conv_ops, "dx_strategy", strategy)
    x, w = np.ones((2, 8, 5, 5)), np.ones((4, 8, 3, 3))
    out, cache = conv_ops.conv2d_forward(x, w, None, (1, 1), SAME)
    conv_ops.conv2d_backward(np.ones(out.shape), cache)
    assert asked == [(8, (3, 3), (1, 1), SAME, True, (1, 1))]          # the last: dilation


# ---- the code names its reference and its measurements' section ---------------------------
def _docstring_lines(fn):
    return [line.strip() for line in (fn.__doc__ or "").splitlines()]


@pytest.mark.parametrize("name", ops.__all__)
def test_every_fast_function_names_its_reference_and_what_differs(name):
    lines = _docstring_lines(getattr(ops, name))
    assert f"Reference: minicnn.reference.{name}." in lines, name
    assert callable(getattr(R, name))
    differs = [line for line in lines if line.startswith("Differs: ")]
    assert len(differs) == 1 and len(differs[0]) > len("Differs: "), name


def _slug(heading):
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_performance_links_in_the_code_name_sections_that_exist():
    text = PERFORMANCE.read_text()
    anchors = {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}
    links = []
    for path in (ROOT / "minicnn").rglob("*.py"):
        for anchor in re.findall(r"docs/performance\.md#([\w-]+)", path.read_text()):
            links.append((path.relative_to(ROOT).as_posix(), anchor))
    assert len(links) >= 15
    assert [link for link in links if link[1] not in anchors] == []
    # and the document's own links between its sections
    assert [a for a in re.findall(r"\]\(#([\w-]+)\)", text) if a not in anchors] == []


def test_no_measurement_history_left_in_the_tuned_code():
    """Timings and A/B pairs live in docs/performance.md; the code keeps one line of reason."""
    timing = re.compile(r"\d+(\.\d+)?\s*->\s*\d+(\.\d+)?\s*(ms|us)\b|\bA/B\b|[Mm]easured on")
    for folder in ("ops", "parallel", "bench"):
        for path in (ROOT / "minicnn" / folder).glob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                assert not timing.search(line), f"{path.name}:{number}: {line.strip()}"
