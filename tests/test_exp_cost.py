"""python/experiments/fig_a2_cge_rge_cost.py (Fig. A2 / Tab. A1): its timed loops compute what
they name, restore the model, and account for their time by stage."""
import os
import subprocess
import sys

import pytest
import torch

from deepzero_kernels import CGE
from deepzero_kernels.models import build_model

from conftest import load_script

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCRIPT = os.path.join(ROOT, "python", "experiments", "fig_a2_cge_rge_cost.py")


@pytest.fixture(scope="module")
def exp():
    return load_script("python/experiments/fig_a2_cge_rge_cost.py")


def _small():
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=10, width=2, depth=1).double().train()
    x, y = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (5,))
    return model, x, y


def test_cge_loop_is_the_coordinate_wise_estimate(exp):
    model, x, y = _small()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads, stages = exp.cge_loop(model, x, y, 1e-6)
    ref = CGE(model, mu=1e-6).estimate(x, y)
    for n in ref:
        assert torch.allclose(grads[n], ref[n], rtol=1e-6, atol=1e-9), n
        assert torch.equal(dict(model.named_parameters())[n], before[n])  # restored bitwise
    assert stages["dv"] == 0 and stages["mi"] > 0


def test_rge_loop_is_unbiased_rge_and_restores(exp):
    model, x, y = _small()
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    g, stages = exp.rge_loop(model, x, y, 1e-6, torch.Generator().manual_seed(3))
    assert torch.equal(torch.nn.utils.parameters_to_vector(model.parameters()), theta)
    # The same directions by hand: sum over q = d unit directions of the difference quotient times u.
    gen, d = torch.Generator().manual_seed(3), theta.numel()
    with torch.no_grad():
        base = torch.nn.functional.cross_entropy(model(x), y, reduction="none").mean()
        want = torch.zeros(d, dtype=theta.dtype)
        params = list(model.parameters())
        for _ in range(d):
            u = torch.randn(d, generator=gen, dtype=theta.dtype)
            u /= u.norm()
            torch.nn.utils.vector_to_parameters(theta + 1e-6 * u, params)
            want += (torch.nn.functional.cross_entropy(model(x), y, reduction="none").mean() - base) / 1e-6 * u
        torch.nn.utils.vector_to_parameters(theta, params)
    assert (g - want).norm() <= 1e-9 * want.norm()  # the same sum, up to the order of roundings
    assert all(stages[s] > 0 for s in ("dv", "wp", "mi", "ao"))


def test_markdown_has_tab_a1_layout(exp):
    rows = [{"parameters": 10, "method": m, "seconds": 1.0, "dv_s": 0.1, "wp_s": 0.2, "mi_s": 0.3, "ao_s": 0.4}
            for m in ("rge_loop", "cge_loop", "cge_engine")]
    args = exp.build_parser().parse_args([])
    md = exp.markdown(rows, args)
    assert "| 10 | 1.000 | 1.000 | 1.000 |" in md and "| 10 | 0.1 / 0.1 | 0.2 / 0.2 | 0.3 / 0.3 | 0.4 / 0.4 |" in md


@pytest.mark.paper_experiment
def test_quick_run(tmp_path):
    out = tmp_path / "fig_a2"
    r = subprocess.run([sys.executable, SCRIPT, "--quick", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("fig_a2.csv", "fig_a2.json", "fig_a2.md", "fig_a2.png"):
        assert (out / f).stat().st_size > 0, f
    import json
    rows = json.loads((out / "fig_a2.json").read_text())["rows"]
    secs = {(r["parameters"], r["method"]): r["seconds"] for r in rows}
    assert len(secs) == 15 and all(v > 0 for v in secs.values())
    big = max(p for p, _ in secs)
    assert secs[(big, "cge_engine")] < secs[(big, "cge_loop")]  # the engine's whole point
