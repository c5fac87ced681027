"""The example of using the fused ops from one's own ZO loop keeps working."""
import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.experiment


def test_custom_zo_loop_learns():
    path = Path(__file__).resolve().parents[1] / "python" / "examples" / "custom_zo_loop.py"
    spec = importlib.util.spec_from_file_location("custom_zo_loop", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(steps=15) < 0.3
