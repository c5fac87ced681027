"""The example of using the fused ops from one's own ZO loop keeps working."""

import pytest

from conftest import load_script

pytestmark = pytest.mark.experiment


def test_custom_zo_loop_learns():
    mod = load_script("python/examples/custom_zo_loop.py")
    assert mod.main(steps=15) < 0.3
