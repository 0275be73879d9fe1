"""Hypothesis strategies shared by the property tests: small conv/pool problems."""
from hypothesis import strategies as st


@st.composite
def conv_problems(draw, max_size=7):
    """A small conv problem: (N, C, H, W, F, (kh, kw), (sh, sw), padding)."""
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    padding = draw(st.one_of(st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2)),
                             st.sampled_from(["same", "valid"])))
    stride = draw(st.one_of(st.integers(1, 2), st.tuples(st.integers(1, 2), st.integers(1, 2))))
    pad_h = 0 if isinstance(padding, str) else (padding if isinstance(padding, int) else padding[0])
    pad_w = 0 if isinstance(padding, str) else (padding if isinstance(padding, int) else padding[1])
    h = draw(st.integers(max(1, kh - 2 * pad_h), max_size))
    w = draw(st.integers(max(1, kw - 2 * pad_w), max_size))
    if padding == "valid":
        h, w = max(h, kh), max(w, kw)
    return (draw(st.integers(1, 3)), draw(st.integers(1, 3)), h, w, draw(st.integers(1, 3)),
            (kh, kw), stride, padding)


@st.composite
def pool_problems(draw, max_size=7):
    """(N, C, H, W, (kh, kw), (sh, sw)) with windows that fit the image."""
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(kh, max_size)),
            draw(st.integers(kw, max_size)), (kh, kw), (sh, sw))
