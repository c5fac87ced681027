"""bench/plot.py draws every committed benchmark summary and refuses malformed ones with a message."""
import json
import pathlib

import pytest

from conftest import load_script

pytest.importorskip("matplotlib")

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
# The committed references, plus any other summary a local run wrote beside them with
# --bench-summary (bench/results/*-quick-summary.json is ignored by git, so it is only sometimes here).
SUMMARIES = sorted({"cpu-amd-epyc-summary.json", "cpu-amd-epyc-archs-summary.json"}
                   | {p.name for p in (BENCH / "results").glob("*-summary.json")})


@pytest.fixture(scope="module")
def plot():
    return load_script("bench/plot.py")


def _is_png(path: pathlib.Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", SUMMARIES)
def test_plots_committed_summary(plot, name, tmp_path):
    out = tmp_path / (name[:-5] + ".png")
    assert plot.main([str(BENCH / "results" / name), "-o", str(out)]) == str(out)
    assert _is_png(out)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left behind


def test_kernels_only_summary(plot, tmp_path):
    """A summary with kernel timings and no workload ratios (a --quick run of test_kernels.py)
    is drawn from its kernels table."""
    src = tmp_path / "k-summary.json"
    src.write_text(json.dumps({"device": "d", "mode": "quick", "workloads": {}, "kernels": {
        "cnn_chain1": {"reference": {"kernel": "conv_delta_chain", "k": 4, "time_s": 0.02},
                       "native": {"kernel": "conv_delta_chain", "k": 4, "time_s": 0.01,
                                  "gbytes_per_s": 5e-4}}}}))
    assert _is_png(pathlib.Path(plot.main([str(src)])))


def test_kernel_and_dense_views(plot, tmp_path):
    """--dense draws the extrapolated ratios; --kernels reads both names of the reference kernel
    backend (``torch`` in older summaries, ``reference`` now)."""
    src = tmp_path / "s-summary.json"
    src.write_text(json.dumps({"device": "d", "mode": "default", "workloads": {"w": {"engine": {
        "engine-torch": {"pert_per_s": 10.0, "speedup_vs": {"reference": 2.0, "fo": 0.01},
                         "dense_speedup_vs": {"reference": 3.0, "fo": 6e-5}}}}},
        "kernels": {"old": {"torch": {"time_s": 2.0}, "native": {"time_s": 0.5, "gbytes_per_s": 3.0}},
                    "new": {"reference": {"time_s": 1.0}, "native": {"time_s": 4.0}}}}))
    assert plot.main([str(src), "--dense"]).endswith("s-summary-dense.png")
    assert plot.main([str(src), "--kernels"]).endswith("s-summary-kernels.png")
    for name in ("s-summary-dense.png", "s-summary-kernels.png"):
        assert _is_png(tmp_path / name)
    assert [p["rows"] for p in plot.kernel_panels(json.loads(src.read_text()))] == [
        [("native", {"kernels": 4.0})], [("native", {"kernels": 0.25})]]


@pytest.mark.parametrize("text,message", [
    ('{"workloads": ', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"device": "x"}', "no 'workloads' and no 'kernels'"),
    ('{"workloads": {"w": {"engine": {"engine-torch": {"speedup_vs": {"reference": "fast"}}}}}}',
     "nothing to plot"),
])
def test_malformed_summary_says_why(plot, tmp_path, text, message):
    src, out = tmp_path / "bad-summary.json", tmp_path / "bad.png"
    src.write_text(text)
    with pytest.raises(SystemExit) as e:
        plot.main([str(src), "-o", str(out)])
    assert message in str(e.value.code) and str(src) in str(e.value.code)
    assert not out.exists()


def test_failed_draw_keeps_previous_chart(plot, tmp_path, monkeypatch):
    src = tmp_path / "s-summary.json"
    src.write_text(json.dumps({"device": "d", "mode": "default", "workloads": {"w": {
        "engine": {"engine-torch": {"pert_per_s": 10.0, "speedup_vs": {"reference": 2.0}}}}}}))
    out = tmp_path / "s-summary.png"
    out.write_bytes(b"previous")

    def boom(self, fname, **kw):  # half a file, then a failure
        pathlib.Path(fname).write_bytes(b"\x89PNG half")
        raise RuntimeError("disk full")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", boom)
    with pytest.raises(RuntimeError):
        plot.main([str(src)])
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-summary.json", "s-summary.png"]
