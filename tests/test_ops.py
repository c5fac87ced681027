"""conv2d_perturbed / linear_perturbed against the K-convolution definition (float64)."""
import random

import pytest
import torch
import torch.nn.functional as F

from deepzero_kernels import ops
from deepzero_kernels.ops import conv2d_perturbed, linear_perturbed


def random_conv_case(rng: random.Random):
    groups = rng.choice([1, 1, 2, 3])
    c_in = groups * rng.randint(1, 3)
    c_out = groups * rng.randint(1, 3)
    kh, kw = rng.randint(1, 4), rng.randint(1, 4)
    stride = (rng.randint(1, 3), rng.randint(1, 2))
    dilation = (rng.randint(1, 2), rng.randint(1, 3))
    padding = rng.choice([0, 1, (2, 1), "same", "valid"])
    if padding == "same":
        stride = (1, 1)
    h = rng.randint(dilation[0] * (kh - 1) + 1, 11)
    w = rng.randint(dilation[1] * (kw - 1) + 1, 11)
    return dict(b=rng.randint(1, 3), c_in=c_in, c_out=c_out, k=(kh, kw), h=h, w=w, stride=stride,
                padding=padding, dilation=dilation, groups=groups, bias=rng.random() < 0.6)


@pytest.mark.parametrize("seed", range(24))
def test_conv2d_perturbed_matches_definition(seed):
    case = random_conv_case(random.Random(seed))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case["b"], case["c_in"], case["h"], case["w"], dtype=torch.float64, generator=g)
    weight = torch.randn(case["c_out"], case["c_in"] // case["groups"], *case["k"], dtype=torch.float64, generator=g)
    bias = torch.randn(case["c_out"], dtype=torch.float64, generator=g) if case["bias"] else None
    kw = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=case["groups"])
    mu = 0.37
    params = ["weight"] + (["bias"] if bias is not None else [])
    for param in params:
        target = weight if param == "weight" else bias
        idx = torch.randint(0, target.numel(), (min(9, target.numel()) + 2,), generator=g)  # repeats allowed
        out = conv2d_perturbed(x, weight, bias, idx, mu, param=param, **kw)
        for k, i in enumerate(idx.tolist()):
            w2, b2 = weight.clone(), None if bias is None else bias.clone()
            (w2 if param == "weight" else b2).view(-1)[i] += mu
            ref = F.conv2d(x, w2, b2, **kw)
            assert out.shape[1:] == ref.shape
            torch.testing.assert_close(out[k], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_linear_perturbed_matches_definition(seed):
    g = torch.Generator().manual_seed(seed)
    b, n_in, n_out = (int(v) for v in torch.randint(1, 7, (3,), generator=g))
    x = torch.randn(b, n_in, dtype=torch.float64, generator=g)
    weight = torch.randn(n_out, n_in, dtype=torch.float64, generator=g)
    bias = torch.randn(n_out, dtype=torch.float64, generator=g) if seed % 2 else None
    for param in ["weight"] + (["bias"] if bias is not None else []):
        target = weight if param == "weight" else bias
        idx = torch.randperm(target.numel(), generator=g)
        out = linear_perturbed(x, weight, bias, idx, 0.1, param=param)
        for k, i in enumerate(idx.tolist()):
            w2, b2 = weight.clone(), None if bias is None else bias.clone()
            (w2 if param == "weight" else b2).view(-1)[i] += 0.1
            torch.testing.assert_close(out[k], F.linear(x, w2, b2), rtol=1e-12, atol=1e-12)


def test_cross_entropy_delta_matches_direct():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 7, dtype=torch.float64, generator=g) * 3
    y = torch.randint(0, 7, (5,), generator=g)
    delta = torch.randn(4, 5, 7, dtype=torch.float64, generator=g) * 0.1
    direct = F.cross_entropy((logits + delta).reshape(-1, 7), y.repeat(4), reduction="none").reshape(4, 5) \
        - F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(ops.cross_entropy_delta(logits, y, delta), direct, rtol=1e-10, atol=1e-12)
    coords = torch.tensor([0, 3, 6, 3])
    d1 = torch.randn(4, 5, dtype=torch.float64, generator=g)
    full = torch.zeros(4, 5, 7, dtype=torch.float64)
    full[torch.arange(4), :, coords] = d1
    torch.testing.assert_close(ops.cross_entropy_delta(logits, y, d1, coords),
                               ops.cross_entropy_delta(logits, y, full), rtol=1e-10, atol=1e-12)
    # Saturated softmax and a huge negative change: the closed form must stay finite.
    sat = torch.tensor([[800.0, 0.0]], dtype=torch.float64)
    out = ops.cross_entropy_delta(sat, torch.tensor([0]), torch.tensor([[-1000.0]], dtype=torch.float64),
                                  torch.tensor([0]))
    assert torch.isfinite(out).all() and abs(out.item() - 200.0) < 1e-9


class TestBadInput:
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(3, 4, 3, 3)
    b = torch.randn(3)

    def test_idx_out_of_range(self):
        with pytest.raises(ValueError, match="idx out of range"):
            conv2d_perturbed(self.x, self.w, self.b, torch.tensor([0, self.w.numel()]), 0.1)
        with pytest.raises(ValueError, match="idx out of range"):
            conv2d_perturbed(self.x, self.w, self.b, torch.tensor([-1]), 0.1)

    def test_idx_not_integer_or_empty(self):
        with pytest.raises(TypeError, match="idx"):
            conv2d_perturbed(self.x, self.w, self.b, torch.tensor([0.0]), 0.1)
        with pytest.raises(TypeError, match="idx"):
            conv2d_perturbed(self.x, self.w, self.b, [0, 1], 0.1)
        with pytest.raises(ValueError, match="idx is empty"):
            conv2d_perturbed(self.x, self.w, self.b, torch.tensor([], dtype=torch.long), 0.1)
        with pytest.raises(ValueError, match="idx must be 1-D"):
            conv2d_perturbed(self.x, self.w, self.b, torch.tensor([[0]]), 0.1)

    @pytest.mark.parametrize("mu", [0.0, -1e-3, float("nan"), float("inf")])
    def test_bad_mu(self, mu):
        with pytest.raises(ValueError, match="mu"):
            conv2d_perturbed(self.x, self.w, self.b, torch.tensor([0]), mu)
        with pytest.raises(ValueError, match="mu"):
            linear_perturbed(torch.randn(2, 3), torch.randn(4, 3), None, torch.tensor([0]), mu)

    def test_mu_type(self):
        with pytest.raises(TypeError, match="mu"):
            conv2d_perturbed(self.x, self.w, self.b, torch.tensor([0]), "0.1")

    def test_shapes_and_dtypes(self):
        with pytest.raises(ValueError, match="channels"):
            conv2d_perturbed(torch.randn(2, 5, 5, 5), self.w, self.b, torch.tensor([0]), 0.1)
        with pytest.raises(ValueError, match="x must be 4-D"):
            conv2d_perturbed(torch.randn(4, 5, 5), self.w, self.b, torch.tensor([0]), 0.1)
        with pytest.raises(TypeError, match="dtype"):
            conv2d_perturbed(self.x.double(), self.w, self.b, torch.tensor([0]), 0.1)
        with pytest.raises(TypeError, match="floating-point"):
            conv2d_perturbed(self.x.long(), self.w, self.b, torch.tensor([0]), 0.1)
        with pytest.raises(ValueError, match="bias"):
            conv2d_perturbed(self.x, self.w, torch.randn(4), torch.tensor([0]), 0.1)
        with pytest.raises(ValueError, match="groups"):
            conv2d_perturbed(self.x, self.w, self.b, torch.tensor([0]), 0.1, groups=3)
        with pytest.raises(ValueError, match="features"):
            linear_perturbed(torch.randn(2, 3), torch.randn(4, 5), None, torch.tensor([0]), 0.1)
        with pytest.raises(ValueError, match="bias"):
            linear_perturbed(torch.randn(2, 3), torch.randn(4, 3), None, torch.tensor([0]), 0.1, param="bias")
        with pytest.raises(ValueError, match="param"):
            linear_perturbed(torch.randn(2, 3), torch.randn(4, 3), None, torch.tensor([0]), 0.1, param="w")

    def test_backend_choice(self):
        with pytest.raises(ValueError, match="backend"):
            conv2d_perturbed(self.x, self.w, self.b, torch.tensor([0]), 0.1, backend="cuda")
        avail = ops.backends()
        assert avail["torch"][0]
        for name, (ok, why) in avail.items():
            assert isinstance(why, str) and why
            if not ok:
                with pytest.raises(ValueError, match="not available"):
                    conv2d_perturbed(self.x, self.w, self.b, torch.tensor([0]), 0.1, backend=name)
