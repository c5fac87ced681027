"""Bad input gets a ValueError/TypeError naming the argument, never a torch internal error or a
silently wrong number: targets, inputs, masks, counts, a step mu too small for the dtype, fused
ops with a kernel larger than the input."""
import pytest
import torch
import torch.nn as nn

import deepzero_kernels as dz
from deepzero_kernels.models import SimpleCNN
from deepzero_kernels.ops import check_mu, conv2d_perturbed, linear_perturbed


def _cnn():
    return SimpleCNN(1, 3, depth=1, width=4)


X = torch.randn(4, 1, 6, 6)
Y = torch.tensor([0, 1, 2, 1])
ESTIMATORS = {"cge": lambda m, **kw: dz.CGE(m, backend="torch", **kw),
              "rge": lambda m, **kw: dz.RGE(m, q=2, **kw)}


@pytest.mark.parametrize("est", ESTIMATORS)
@pytest.mark.parametrize("y,exc,words", [
    (torch.tensor([0, 1, 2, 3]), ValueError, ["y", "class index 3"]),
    (torch.tensor([0, -1, 2, 1]), ValueError, ["y", "negative"]),
    (Y.float(), TypeError, ["y", "int64", "float32", "loss_fn"]),
    (Y.int(), TypeError, ["y", "int64", "int32"]),
    (Y[:, None], ValueError, ["y", "(4, 1)", "1-D"]),
], ids=["out-of-range", "negative", "float", "int32", "B-by-1"])
def test_bad_targets_for_the_default_loss(est, y, exc, words):
    with pytest.raises(exc) as e:
        ESTIMATORS[est](_cnn()).estimate(X, y)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("est", ESTIMATORS)
def test_targets_of_a_user_loss_are_the_users_business(est):
    m = _cnn()

    def loss(out, t):  # real-valued (B, 1) targets
        return (out[:, :1] - t).square().sum(1)
    g = ESTIMATORS[est](m, loss_fn=loss).estimate(X, torch.randn(4, 1))
    assert all(torch.isfinite(v).all() for v in g.values())
    with pytest.raises(ValueError, match="batch size 4 but y has 3"):
        ESTIMATORS[est](m, loss_fn=loss).estimate(X, torch.randn(3, 1))


@pytest.mark.parametrize("est", ESTIMATORS)
def test_integer_x_is_refused(est):
    with pytest.raises(TypeError, match=r"x has integer dtype torch.int64.*float32"):
        ESTIMATORS[est](_cnn()).estimate((X * 10).long(), Y)


def test_integer_x_is_fine_for_an_embedding_model():
    m = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 3)).double()
    x = torch.tensor([[0, 1], [2, 3], [4, 0], [1, 1]])
    g = dz.CGE(m, mu=1e-4).estimate(x, Y)
    assert g["0.weight"].abs().sum() > 0


@pytest.mark.parametrize("est", ESTIMATORS)
@pytest.mark.parametrize("model", ["conv", "bn"])
def test_x_of_the_wrong_rank_names_x_and_its_shape(est, model):
    m = _cnn() if model == "conv" else nn.Sequential(nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(6 * 6 * 6, 3))
    x = torch.randn(6, 6, 6)  # a 3-D batch: B = C = 6 reaches BatchNorm2d
    with pytest.raises(ValueError) as e:
        ESTIMATORS[est](m).estimate(x, torch.tensor([0, 1, 2, 1, 0, 2]))
    assert "x has shape (6, 6, 6)" in str(e.value) and "4-D" in str(e.value)


def test_mask_on_another_device():
    m = _cnn()
    with pytest.raises(ValueError, match=r"masks\['fc.weight'\] is on meta"):
        dz.CGE(m).estimate(X, Y, masks={"fc.weight": torch.ones(3, 4, dtype=torch.bool, device="meta")})


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, True])
def test_chunk_size_must_be_a_positive_int(chunk_size):
    for make in (lambda: dz.RGE(_cnn(), chunk_size=chunk_size), lambda: dz.CGE(_cnn(), chunk_size=chunk_size)):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            make()


@pytest.mark.parametrize("est", ESTIMATORS)
def test_mu_too_small_for_the_dtype(est):
    m = _cnn()
    with pytest.raises(ValueError) as e:
        ESTIMATORS[est](m, mu=1e-30).estimate(X, Y)
    msg = str(e.value)
    assert "mu=1e-30" in msg and "torch.float32" in msg and "mu >=" in msg
    # The same mu is fine in float64, and the float32 threshold itself is accepted.
    ESTIMATORS[est](m.double(), mu=1e-9).estimate(X.double(), Y)


def test_mu_threshold_is_the_rounding_rule():
    w = torch.full((3,), 2.0)
    eps = torch.finfo(torch.float32).eps
    assert check_mu(100 * eps * 2.0, {"w": w}) == pytest.approx(100 * eps * 2.0)
    with pytest.raises(ValueError, match=r"mu=.* too small for w \(torch.float32"):
        check_mu(99 * eps * 2.0, {"w": w})
    # A step this large moves every value by mu to within 0.5%.
    mu = 100 * eps * 2.0
    assert ((w + mu) - w - mu).abs().max() <= 0.005 * mu
    with pytest.raises(ValueError, match="bfloat16"):  # 5e-3 is below bfloat16's resolution at 1
        check_mu(5e-3, {"w": torch.ones(2, dtype=torch.bfloat16)})


def test_fused_ops_refuse_a_tiny_mu_and_a_kernel_larger_than_the_input():
    w, idx = torch.randn(2, 1, 5, 5), torch.tensor([0, 3])
    with pytest.raises(ValueError) as e:
        conv2d_perturbed(torch.randn(1, 1, 3, 3), w, None, idx, 1e-3)
    assert "weight's 5x5 kernel" in str(e.value) and "x's 3x3 padded input" in str(e.value)
    with pytest.raises(ValueError, match="kernel .*dilation"):
        conv2d_perturbed(torch.randn(1, 1, 7, 7), torch.randn(2, 1, 3, 3), None, idx, 1e-3, dilation=4)
    out = conv2d_perturbed(torch.randn(1, 1, 3, 3), w, None, idx, 1e-3, padding=1)  # padded: 5x5 fits
    assert out.shape == (2, 1, 2, 1, 1)
    with pytest.raises(ValueError, match="mu=1e-30 is too small for weight"):
        conv2d_perturbed(torch.randn(1, 1, 7, 7), w, None, idx, 1e-30)
    with pytest.raises(ValueError, match="mu=1e-30 is too small for bias"):
        linear_perturbed(torch.randn(2, 3), torch.randn(4, 3), torch.randn(4), idx, 1e-30, param="bias")


# ----------------------------------------------------------------------------- trainer CLI
import errno  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from deepzero_kernels import train  # noqa: E402

TINY = ["--dataset", "synthetic", "--synthetic-shape", "1,8,8", "--synthetic-size", "48,24",
        "--model", "cnn", "--width", "4", "--depth", "2", "--batch-size", "16", "--grasp-q", "4",
        "--no-progress", "--threads", "1", "--epochs", "2"]


def _usage_error(argv, capsys, *words):
    """``argv`` is refused with exit code 2 and one line on stderr that holds ``words``."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error:" in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.mark.parametrize("extra,words", [
    (["--width", "1000000"], ["--width 1000000", "GiB", "memory"]),
    (["--estimator", "rge", "--q", "1000000000"], ["--q 1000000000", "GiB"]),
    (["--grasp-q", "1000000000"], ["--grasp-q 1000000000", "GiB"]),
    (["--seed", str(2 ** 64)], ["--seed", str(2 ** 64)]),
    (["--seed", "-1"], ["--seed"]),
    (["--device", "meta"], ["--device meta", "'meta'"]),
    (["--device", "mps"], ["--device mps", "'mps'"]),
    (["--dist-timeout", "1e300"], ["--dist-timeout", "1e+300"]),
    (["--mu", "1e-30"], ["--mu 1e-30", "float32", "mu >="]),
], ids=["width", "q", "grasp-q", "seed-64bit", "seed-negative", "meta", "mps", "dist-timeout", "mu"])
def test_trainer_usage_errors_are_one_line_exit_2(extra, words, capsys):
    _usage_error(TINY + extra, capsys, *words)


def test_trainer_backend_triton_on_cpu(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _usage_error(TINY + ["--backend", "triton", "--device", "cpu"], capsys, "--backend triton", "cpu")


def test_trainer_out_is_checked_before_the_data(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    missing_data = ["--dataset", "cifar10", "--data-dir", str(tmp_path / "no_cifar"), "--no-progress"]
    _usage_error(missing_data + ["--out", str(f)], capsys, f"--out {f}", "not a directory")
    _usage_error(missing_data + ["--out", str(f / "run")], capsys, f"--out {f / 'run'}", "not writable")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        _usage_error(missing_data + ["--out", str(ro)], capsys, "not writable")


def _fo_run(tmp_path):
    out = tmp_path / "run"
    assert train.main(TINY + ["--estimator", "fo", "--sparsity", "0", "--epochs", "1", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("field,value", [("lr", "0.1"), ("epochs", 1.5), ("synthetic_shape", 5), ("augment", "yes"),
                                         ("model", "vgg"), ("seed", True)])
def test_resume_with_a_wrongly_typed_config_field(tmp_path, capsys, field, value):
    out = _fo_run(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["config"][field] = value
    (out / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    _usage_error(["--resume", str(out), "--no-progress"], capsys, "config.json", repr(field))


@pytest.mark.parametrize("where,value,words", [
    (("state", "epoch"), "1", ["state.epoch", "str"]),
    (("state", "ep", "n"), 1.5, ["state.ep.n", "float"]),
    (("state", "step"), 99, ["step 99"]),
    (("masks",), [1, 2], ["masks", "list"]),
    (("grasp",), None, ["grasp", "NoneType"]),
    (("rng", "data"), "seed", ["rng['data']"]),
    (("state",), {"epoch": 1}, ["state.step is missing"]),
])
def test_resume_with_a_wrongly_typed_checkpoint_field(tmp_path, capsys, where, value, words):
    out = _fo_run(tmp_path)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    d = ck
    for k in where[:-1]:
        d = d[k]
    d[where[-1]] = value
    torch.save(ck, out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert train.main(["--resume", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "checkpoint" in err and "corrupt" in err, err
    for w in words:
        assert w in err, (w, err)
    assert (out / "checkpoint.pt").read_bytes() == before


def test_disk_full_during_the_plot_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    import matplotlib.figure

    def full(self, f, **kw):
        f.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    out = tmp_path / "run"
    assert train.main(TINY + ["--estimator", "fo", "--sparsity", "0", "--epochs", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: [Errno {errno.ENOSPC}] cannot write {out / 'metrics.png'}: No space left on device"
    assert sorted(set(os.listdir(out)) - {"tensorboard"}) == ["best.pt", "checkpoint.pt", "config.json", "metrics.csv",
                                                              "metrics.jsonl", "summary.json"]


@pytest.mark.parametrize("exc", [RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                                              "can't allocate memory: you tried to allocate 36000000000000 bytes."),
                                 MemoryError()], ids=["torch", "python"])
def test_out_of_memory_is_one_line(monkeypatch, capsys, exc):
    def oom(*a, **k):
        raise exc
    monkeypatch.setattr(train, "evaluate", oom)
    assert train.main(TINY + ["--estimator", "fo", "--sparsity", "0", "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: out of memory") and "--width" in err


# ----------------------------------------------------------------------------- divergence
@pytest.mark.parametrize("estimator", ["fo", "cge", "rge"])
def test_divergence_stops_with_an_error_and_keeps_the_start_checkpoint(tmp_path, capsys, estimator):
    out = tmp_path / "run"
    argv = TINY + ["--estimator", estimator, "--q", "4", "--sparsity", "0", "--lr", "1e30", "--out", str(out)]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "diverged at epoch 1" in err and "--lr" in err, err
    assert "done" not in err and "last good checkpoint" in err
    ck = torch.load(out / "checkpoint.pt", weights_only=True)  # the one written before the first step
    assert (ck["state"]["epoch"], ck["state"]["step"]) == (0, 0)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    steps_per_epoch = 3  # 48 samples, batch 16
    monkeypatch.setattr(train.LRSchedule, "__call__", lambda self, t: 1.0 if t < steps_per_epoch else 1e30)
    out = tmp_path / "run"
    assert train.main(TINY + ["--estimator", "cge", "--sparsity", "0.5", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "diverged at epoch 2, step 1" in err and f"last good checkpoint {out / 'checkpoint.pt'} is kept" in err
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("extra,code", [(["--device", "meta"], 2), (["--lr", "1e30", "--estimator", "fo"], 1)])
def test_cli_errors_have_no_traceback(extra, code):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-m", "deepzero_kernels.train"] + TINY + ["--sparsity", "0"] + extra,
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == code
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
