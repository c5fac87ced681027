"""The black-box tail contract (issue 7): ``loss_fn`` may be a NumPy function or a frozen network,
is only queried (detached outputs, no grad), its queries are counted, and bad answers are
refused clearly. Plus a small in-process run of the certified-defense experiment."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import ce, load_script, naive_cge, rel_err
from deepzero_kernels import CGE, RGE
from deepzero_kernels.models import SimpleCNN

MU = 1e-4


def np_ce(outputs, targets):
    """Cross-entropy per sample, computed in NumPy (returns an ndarray)."""
    assert isinstance(outputs, torch.Tensor) and not outputs.requires_grad
    assert not torch.is_grad_enabled()
    z = outputs.cpu().numpy()
    t = targets.cpu().numpy()
    m = z.max(1, keepdims=True)
    return m[:, 0] + np.log(np.exp(z - m).sum(1)) - z[np.arange(len(t)), t]


def model_and_batch(b=6):
    model = SimpleCNN(1, 3, depth=1, width=3).double()
    x = torch.randn(b, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (b,))
    return model, x, y


@pytest.mark.parametrize("train", [True, False])
def test_numpy_tail_matches_torch_ce(train):
    model, x, y = model_and_batch()
    model.train(train)
    est = CGE(model, np_ce, MU, chunk_size=4).estimate(x, y)
    assert rel_err(est, naive_cge(model, x, y, MU, ce)) < 1e-8
    default = CGE(model, mu=MU).estimate(x, y)  # closed-form CE at the logits
    assert rel_err(est, default) < 1e-8


def test_numpy_tail_rge_equals_torch_ce():
    model, x, y = model_and_batch()
    rge = RGE(model, np_ce, MU, q=5, chunk_size=2)
    u = rge.directions(list(rge.trainable()), torch.Generator().manual_seed(1))
    a = rge.estimate(x, y, directions=u)
    b = RGE(model, ce, MU, q=5).estimate(x, y, directions=u)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-9, atol=1e-12)


def test_frozen_network_tail():
    """White-box front (a small denoiser-like conv net) + a frozen classifier queried under
    no_grad: equal to the naive loop on the composition; the classifier is never differentiated."""
    front = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(),
                          nn.Conv2d(2, 1, 3, padding=1)).double()
    clf = SimpleCNN(1, 3, depth=1, width=3).double().eval()  # parameters still require grad
    seen = []

    def tail(images, targets):
        seen.append((images.requires_grad, torch.is_grad_enabled()))
        return ce(clf(images), targets)

    x = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    est = CGE(front, tail, MU, chunk_size=3).estimate(x, y)
    seen_naive = len(seen)
    assert rel_err(est, naive_cge(front, x, y, MU, tail)) < 1e-8
    assert seen_naive and all(s == (False, False) for s in seen)
    assert all(p.grad is None for p in clf.parameters())


def test_query_counting():
    model, x, y = model_and_batch(b=4)
    params = dict(model.named_parameters())
    masks = {"features.0.weight": torch.rand(params["features.0.weight"].shape) < 0.5}
    masks["features.0.weight"].view(-1)[0] = True
    cge = CGE(model, np_ce, MU, chunk_size=3)
    cge.estimate(x, y, masks)
    active = {n: int(masks[n].sum()) if n in masks else p.numel() for n, p in params.items()}
    calls = 1 + sum(math.ceil(a / 3) for a in active.values() if a)
    samples = x.shape[0] * (1 + sum(active.values()))
    assert (cge.last_num_queries, cge.last_num_queried_samples) == (calls, samples)
    assert cge.num_queries == calls and cge.num_queried_samples == samples
    cge.estimate(x, y)  # dense: every coordinate
    dense = sum(math.ceil(p.numel() / 3) for p in params.values())
    assert cge.last_num_queries == 1 + dense
    assert cge.last_num_queried_samples == x.shape[0] * (1 + sum(p.numel() for p in params.values()))
    assert cge.num_queries == calls + 1 + dense  # cumulative

    # Counting the tail's own calls agrees with the estimator's count.
    n_calls = [0, 0]

    def counted(o, t):
        n_calls[0] += 1
        n_calls[1] += o.shape[0]
        return np_ce(o, t)
    c2 = CGE(model, counted, MU)  # default chunking (memory-sized)
    c2.estimate(x, y)
    assert [c2.last_num_queries, c2.last_num_queried_samples] == n_calls

    rge = RGE(model, np_ce, MU, q=5, chunk_size=2)
    rge.estimate(x, y)
    assert (rge.last_num_queries, rge.last_num_queried_samples) == (1 + 3, x.shape[0] * 6)
    rge.estimate(x, y)
    assert (rge.num_queries, rge.num_queried_samples) == (8, x.shape[0] * 12)

    # The default loss is closed-form at the logits: only the unperturbed batch is a query.
    c3 = CGE(model, mu=MU)
    c3.estimate(x, y)
    assert (c3.last_num_queries, c3.last_num_queried_samples) == (1, x.shape[0])


@pytest.mark.parametrize("bad, exc, match", [
    (lambda o, t: np_ce(o, t)[:, None], ValueError, "per-sample"),
    (lambda o, t: np_ce(o, t).mean(), ValueError, "per-sample"),
    (lambda o, t: np.where(np.arange(o.shape[0]) == 1, np.nan, np_ce(o, t)), ValueError, "non-finite"),
    (lambda o, t: np.full(o.shape[0], np.inf), ValueError, "non-finite"),
    (lambda o, t: "loss", TypeError, "tensor or array"),
])
def test_bad_tail_is_refused(bad, exc, match):
    model, x, y = model_and_batch()
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        CGE(model, bad, MU).estimate(x, y)
    with pytest.raises(exc, match=match):
        RGE(model, bad, MU, q=2).estimate(x, y)
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k])


def test_tail_list_result_is_converted():
    model, x, y = model_and_batch()
    est = CGE(model, lambda o, t: np_ce(o, t).tolist(), MU).estimate(x, y)
    assert rel_err(est, naive_cge(model, x, y, MU, ce)) < 1e-8


# ----------------------------------------------------------------------------- the experiment
def _experiment():
    return load_script("python/experiments/blackbox_defense.py")


@pytest.mark.experiment
def test_defense_experiment_small():
    """A tiny in-process run of python/experiments/blackbox_defense.py: every stage runs, the
    metrics are finite, and fine-tuning on loss (A2) lowers the held-out loss (ZO and FO)."""
    exp = _experiment()
    res, = exp.run_experiment(sigmas=(0.25,), clf_epochs=2, clf_width=8, den_depth=4, den_width=8,
                              pre_epochs=3, grasp_q=8, zo_steps=12, batch_size=16, n_test=20, n0=10, n=30,
                              radii=(0.0, 0.25), verbose=False)
    a2 = res["a2_test"]
    assert all(math.isfinite(v) for v in a2.values())
    assert a2["ZO fine-tuned"] < a2["MSE-only"] and a2["FO fine-tuned"] < a2["MSE-only"]
    assert math.isfinite(res["test_mse_denoised"]) and res["test_mse_denoised"] < res["test_mse_noisy"]
    zo = res["zo"]
    assert all(math.isfinite(v) for v in zo["loss_history"])
    # The estimator's count of queries is what the black box saw during ZO fine-tuning.
    assert (zo["queries"], zo["queried_samples"]) == (zo["black_box_calls"], zo["black_box_images"])
    assert set(res["certified"]) == set(exp.METHODS)
    for ca in res["certified"].values():
        assert 0 <= ca["0.25"] <= ca["0.0"] <= 1
    assert 0.0 < sum(res["zo_grasp_densities"].values())


def test_certify_bounds():
    """Clopper-Pearson: all n votes give pA_lower = alpha^(1/n); a constant base classifier is
    certified at sigma * Phi^-1(alpha^(1/n)); a coin flip abstains."""
    from scipy.stats import norm
    exp = _experiment()
    assert exp.clopper_pearson_lower(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100))
    assert exp.clopper_pearson_lower(0, 100, 0.001) == 0.0
    x = torch.zeros(3, 1, 4, 4)
    y = torch.tensor([2, 2, 5])
    preds, radii = exp.certify(lambda z: torch.full((z.shape[0],), 2), x, y, 0.5, n0=5, n=100, alpha=0.001, seed=0)
    assert preds.tolist() == [2, 2, 2]
    np.testing.assert_allclose(radii, 0.5 * norm.ppf(0.001 ** (1 / 100)))
    assert exp.certified_accuracy(preds, radii, y.numpy(), 0.0) == pytest.approx(2 / 3)
    coin = torch.Generator().manual_seed(0)
    preds, _ = exp.certify(lambda z: torch.randint(0, 2, (z.shape[0],), generator=coin), x, y, 0.5,
                           n0=5, n=100, alpha=0.001, seed=0)
    assert (preds == -1).all()
