import os
import sys

import pytest
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

# Property tests run a modest number of examples by default; set HYPOTHESIS_PROFILE=thorough
# for a longer search.
settings.register_profile("default", max_examples=40, deadline=None)
settings.register_profile("thorough", max_examples=400, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(params=["numpy", "cupy"])
def xp(request):
    """The array module of each backend; the cupy case is skipped without CuPy and a GPU."""
    from minicnn.backend import get_backend
    from minicnn.errors import BackendError
    try:
        return get_backend(request.param)
    except BackendError as e:
        pytest.skip(f"CuPy or a GPU is not available: {e}")
