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
