"""The BP-free baselines of the paper's Tab. 1 (FA, DFA, Align-ada; deepzero_kernels.baselines.
feedback_alignment) and the 8-layer CNN of Boopathy & Fiete (2022) they train: each rule against its
defining property in float64, the CNN's CGE against the naive loop, bad arguments, and the
``--quick`` run of python/experiments/tab1_bp_free.py (marked ``paper_experiment``)."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_kernels import CGE
from deepzero_kernels.baselines import feedback_alignment as bpf
from deepzero_kernels.models import MLP, BoopathyCNN8, boopathy_cnn8

from conftest import naive_cge, rel_err

ROOT = Path(__file__).resolve().parents[1]


def backprop(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_close(a, b, names=None):
    for n in names or a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-12, atol=1e-14, msg=f"{n}")


def cnn(width=4, in_ch=1):
    return boopathy_cnn8(width=width, num_classes=10, in_channels=in_ch, image_size=8).double()


def batch(n=6, shape=(1, 8, 8), classes=10):
    return torch.randn(n, *shape, dtype=torch.float64), torch.randint(0, classes, (n,))


def one_hidden(d=5, h=7, c=3):
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, c)).double()


# ----------------------------------------------------------------------------- the CNN
def test_cnn_is_the_8_layer_network():
    m = boopathy_cnn8(width=5, num_classes=10, in_channels=3)
    weights = [mod for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    assert len(weights) == 8
    assert [c.stride[0] for c in weights[:7]] == [1, 1, 1, 2, 1, 2, 1]
    assert all(c.out_channels == 5 and c.kernel_size == (3, 3) for c in weights[:7])
    assert all(not bn.affine for bn in m.modules() if isinstance(bn, nn.BatchNorm2d))
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert boopathy_cnn8(width=3, in_channels=1, image_size=8)(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)], ids=["digits", "cifar"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cnn_cge_matches_naive_loop(shape, training):
    """Sparse CGE of the delta engine on the CNN equals the perturb-forward-restore loop (float64),
    on delta rules only (no fallback)."""
    m = boopathy_cnn8(width=3, num_classes=10, in_channels=shape[0], image_size=shape[-1]).double().train(training)
    if not training:  # running statistics that are not the identity
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2.0)
    x, y = batch(5, shape)
    g = torch.Generator().manual_seed(3)
    masks = {n: torch.rand(p.shape, generator=g) < 0.15 for n, p in m.named_parameters()}
    est = CGE(m, mu=5e-3, backend="torch")
    got = est.estimate(x, y, masks)
    assert est.last_report.fast, str(est.last_report)
    assert rel_err(got, naive_cge(m, x, y, 5e-3, None, masks)) < 1e-9


# ----------------------------------------------------------------------------- FA
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_fa_with_symmetric_feedback_is_backprop(kind):
    model = MLP(12, 3, (7, 5)).double() if kind == "mlp" else cnn()
    x, y = batch(6, (12,), 3) if kind == "mlp" else batch()
    ref = backprop(model, x, y)
    rule = bpf.FeedbackAlignment(model, seed=1)
    for n, m in rule.chain:
        if n in rule.feedback:
            rule.feedback[n] = m.weight.detach().clone()
    rule.backward(x, y)
    assert_close(grads(model), ref)


def test_fa_random_feedback_changes_only_the_transported_error():
    """The last layer's gradient needs no transport (exact); earlier layers get B, not W^T."""
    model = cnn()
    x, y = batch()
    ref = backprop(model, x, y)
    bpf.FeedbackAlignment(model, seed=0).backward(x, y)
    got = grads(model)
    assert_close(got, ref, ["fc.weight", "fc.bias"])
    assert not torch.allclose(got["features.0.weight"], ref["features.0.weight"])


# ----------------------------------------------------------------------------- DFA
def test_dfa_one_hidden_layer_with_output_weights_as_feedback_is_backprop():
    model = one_hidden()
    x, y = batch(8, (5,), 3)
    ref = backprop(model, x, y)
    rule = bpf.DirectFeedbackAlignment(model, seed=0, example_input=x)
    assert set(rule.feedback) == {"0"} and rule.feedback["0"].shape == (3, 7)
    rule.feedback["0"] = model[2].weight.detach().clone()
    rule.backward(x, y)
    assert_close(grads(model), ref)


def test_dfa_sends_the_output_error_to_each_hidden_layer():
    """Two hidden layers: layer 1 gets relu'(a_1) * (e B_1), not anything through layer 2."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x, y = batch(7, (4,), 3)
    rule = bpf.DirectFeedbackAlignment(model, seed=2)
    rule.backward(x, y)
    with torch.no_grad():
        a1 = model[0](x)
        h1 = a1.relu()
        a2 = model[2](h1)
        e = (F.softmax(model[4](a2.relu()), 1) - F.one_hot(y, 3)) / x.shape[0]
        d1 = (e @ rule.feedback["0"]) * (a1 > 0)
        d2 = (e @ rule.feedback["2"]) * (a2 > 0)
    torch.testing.assert_close(model[0].weight.grad, d1.t() @ x, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model[2].weight.grad, d2.t() @ h1, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model[4].weight.grad, e.t() @ a2.relu(), rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- Align-ada
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_align_ada_at_initialisation_is_backprop(kind):
    model = MLP(12, 3, (7, 5)).double() if kind == "mlp" else cnn()
    x, y = batch(6, (12,), 3) if kind == "mlp" else batch()
    ref = backprop(model, x, y)
    bpf.AlignAda(model).backward(x, y)
    assert_close(grads(model), ref)


def test_align_ada_carries_the_error_through_the_initial_network():
    """After the weights move: dW_1 = (relu'(a_1) * (e W_2(0))) x^T with the current a_1 and e and
    the initial W_2; the last layer keeps its true gradient; the initial copy does not move."""
    model = one_hidden()
    x, y = batch(8, (5,), 3)
    rule = bpf.AlignAda(model)
    w2_0 = model[2].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        rule.backward(x, y)
        opt.step()
    assert not torch.equal(model[2].weight, w2_0)
    assert torch.equal(rule.initial[2].weight, w2_0)
    ref = backprop(model, x, y)
    rule.backward(x, y)
    with torch.no_grad():
        a1 = model[0](x)
        e = (F.softmax(model(x), 1) - F.one_hot(y, 3)) / x.shape[0]
        d1 = (e @ w2_0) * (a1 > 0)
    torch.testing.assert_close(model[0].weight.grad, d1.t() @ x, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model[0].bias.grad, d1.sum(0), rtol=1e-12, atol=1e-14)
    assert_close(grads(model), ref, ["2.weight", "2.bias"])
    assert not torch.allclose(model[0].weight.grad, ref["0.weight"])


# ----------------------------------------------------------------------------- all rules
@pytest.mark.parametrize("method", ["fa", "dfa"])
def test_feedback_matrices_stay_fixed(method):
    model = cnn()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = batch()
    rule = bpf.make(method, model, seed=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rule.backward(x, y)
    fixed = {n: b.clone() for n, b in rule.feedback.items()}
    w0 = model.fc.weight.detach().clone()
    for _ in range(3):
        rule.backward(x, y)
        opt.step()
    assert not torch.equal(model.fc.weight, w0)
    assert fixed.keys() == rule.feedback.keys()
    assert all(torch.equal(fixed[n], rule.feedback[n]) for n in fixed)
    twin = cnn()
    twin.load_state_dict(start)
    again = bpf.make(method, twin, seed=4)
    again.backward(x, y)
    assert all(torch.equal(fixed[n], again.feedback[n]) for n in fixed)  # the seed fixes them


@pytest.mark.parametrize("method", ["fa", "dfa", "align_ada"])
def test_rules_reduce_the_training_loss(method):
    """A small MLP on two well-separated Gaussian classes, 40 full-batch SGD steps."""
    torch.manual_seed(0)
    y = torch.arange(64) % 2
    x = torch.randn(64, 10) * 0.5 + (2.0 * y - 1.0)[:, None] * torch.linspace(1.0, -1.0, 10)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    rule = bpf.make(method, model, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first = float(rule.backward(x, y))
    for _ in range(40):
        opt.step()
        last = float(rule.backward(x, y))
    assert last < 0.25 * first, (first, last)
    assert (model(x).argmax(1) == y).float().mean() > 0.95


def test_bad_arguments_raise_clear_errors():
    model = one_hidden()
    x, y = batch(4, (5,), 3)
    with pytest.raises(ValueError, match="unknown BP-free method"):
        bpf.make("sgd", model)
    with pytest.raises(ValueError, match="seed"):
        bpf.FeedbackAlignment(model, seed=-1)
    with pytest.raises(TypeError, match="loss_fn"):
        bpf.AlignAda(model, loss_fn="mse")
    with pytest.raises(TypeError, match="Module"):
        bpf.FeedbackAlignment(lambda t: t)
    with pytest.raises(ValueError, match="no Linear or Conv2d"):
        bpf.DirectFeedbackAlignment(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="neither a weight layer"):
        bpf.FeedbackAlignment(nn.Sequential(nn.Conv1d(2, 2, 3), nn.Flatten(), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="padding_mode"):
        bpf.FeedbackAlignment(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"),
                                            nn.Flatten(), nn.Linear(128, 2)))
    with pytest.raises(ValueError, match="same number"):
        bpf.FeedbackAlignment(model).backward(x, y[:2])

    class Residual(nn.Module):  # not a chain of its leaf modules
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 3)

        def forward(self, t):
            return self.b(t + self.a(t))

    with pytest.raises(ValueError, match="not the chain"):
        bpf.AlignAda(Residual().double()).backward(x, y)
    for bad in ({"width": 0}, {"image_size": 0}, {"in_channels": 0}):
        with pytest.raises(ValueError):
            boopathy_cnn8(**bad)
    assert isinstance(boopathy_cnn8(width=2), BoopathyCNN8)


def test_backward_keeps_buffers_of_a_single_training_step():
    """One backward = one train-mode forward of the model: BN running stats move once, as in a
    backprop step (the chain check and DFA's shape probe restore theirs)."""
    x, y = batch()
    for method in ("fa", "dfa", "align_ada"):
        a, b = cnn(), cnn()
        b.load_state_dict(a.state_dict())
        bpf.make(method, a).backward(x, y)
        b(x)
        for (n, ba), bb in zip(a.named_buffers(), b.buffers()):
            assert torch.equal(ba, bb), (method, n)


# ----------------------------------------------------------------------------- the experiment
@pytest.mark.paper_experiment
def test_quick_run(tmp_path):
    script = ROOT / "python" / "experiments" / "tab1_bp_free.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--threads", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    for ext in ("csv", "json", "md", "png"):
        assert (tmp_path / f"tab1_bp_free.{ext}").stat().st_size > 0
    rows = list(csv.DictReader(open(tmp_path / "tab1_bp_free.csv")))
    assert [(r["method"], int(r["width"])) for r in rows] == [
        ("DeepZero", 4), ("DeepZero", 8), ("FA", 8), ("FA", 16), ("DFA", 8), ("DFA", 16),
        ("Align-ada", 8), ("Align-ada", 16)]
    accs = [float(r["test_acc"]) for r in rows]
    assert all(0.0 <= a <= 1.0 for a in accs) and all(float(r["seconds"]) > 0 for r in rows)
    assert sum(accs) / len(accs) > 0.2  # chance is 0.1 on the 10 digits
    assert int(rows[1]["queries_per_step"]) < int(rows[1]["parameters"])  # sparse CGE (90% sparsity)
    info = json.load(open(tmp_path / "tab1_bp_free.json"))
    assert info["machine"]["torch"] == torch.__version__ and len(info["results"]) == len(rows)
    md = (tmp_path / "tab1_bp_free.md").read_text()
    assert "| Width | 4 | 8 | 8 | 16 |" in md and "| Accuracy (%) |" in md and "| Time (s) |" in md


def test_trainer_takes_cnn8_with_its_width(tmp_path):
    from deepzero_kernels import train
    out = tmp_path / "run"
    argv = ["--dataset", "synthetic", "--synthetic-shape", "1,8,8", "--synthetic-size", "32,16", "--model", "cnn8",
            "--width", "3", "--batch-size", "16", "--epochs", "1", "--sparsity", "0.5", "--sparsity-method", "random",
            "--no-progress", "--threads", "1", "--out", str(out)]
    assert train.main(argv) == 0
    import json
    derived = json.loads((out / "config.json").read_text())["derived"]
    from deepzero_kernels.models import boopathy_cnn8
    assert derived["parameters"] == sum(p.numel() for p in boopathy_cnn8(width=3, in_channels=1).parameters())
