"""python/experiments/distributed_throughput.py as the paper's Fig. A6: its tables from results
(fast) and its --quick run on 1 and 2 gloo ranks (paper_experiment marker)."""
import argparse
import json
import os
import subprocess
import sys

import pytest

from conftest import load_script

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCRIPT = os.path.join(ROOT, "python", "experiments", "distributed_throughput.py")


def test_tables_from_results(tmp_path):
    mod = load_script("python/experiments/distributed_throughput.py")
    a = argparse.Namespace(model="m", size=8, batch=4, density=0.1, steps=1, warmup=0, ranks="1,2",
                           costs="flops", out=str(tmp_path), quick=False, worker=False, cost="measured")
    runs = [{"ranks": 1, "costs": None, "active": 10, "s_per_step": 2.0, "pert_per_s": 5.0, "imbalance_mean": 1.0},
            {"ranks": 2, "costs": "flops", "active": 10, "s_per_step": 1.25, "pert_per_s": 8.0,
             "imbalance_mean": 1.1}]
    mod.write(a, runs)
    rows = json.loads((tmp_path / "fig_a6.json").read_text())["rows"]
    assert [r["iterations_per_hour"] for r in rows] == [1800.0, 2880.0]
    assert rows[1]["speedup_vs_1_rank"] == pytest.approx(1.6)
    md = (tmp_path / "fig_a6.md").read_text()
    assert "| 2 | flops | 1.250 | 2,880 | 1.60x | 1.100 |" in md
    assert (tmp_path / "fig_a6.png").stat().st_size > 0


@pytest.mark.paper_experiment
def test_quick_run(tmp_path):
    out = tmp_path / "fig_a6"
    r = subprocess.run([sys.executable, SCRIPT, "--quick", "--costs", "measured", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads((out / "fig_a6.json").read_text())["rows"]
    assert [r["ranks"] for r in rows] == [1, 2]
    assert rows[0]["active"] == rows[1]["active"] > 0 and all(r["iterations_per_hour"] > 0 for r in rows)
