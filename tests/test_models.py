"""Model shapes and parameter counts (the paper's ResNet-20 has ~0.27M parameters)."""
import pytest
import torch

from deepzero_kernels.models import MLP, SimpleCNN, build_model, resnet20, resnet32, resnet44, resnet56


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("fn,count", [(resnet20, 269722), (resnet32, 464154), (resnet44, 658586),
                                      (resnet56, 853018)])
def test_resnet_parameter_counts(fn, count):
    # Option-A shortcuts have no parameters: these are the counts of He et al. (2016).
    assert n_params(fn()) == count


def test_resnet20_forward_shape():
    m = resnet20().eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("depth,width", [(1, 4), (2, 8), (3, 16)])
def test_simple_cnn_structure(depth, width):
    m = SimpleCNN(1, 10, depth=depth, width=width)
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d)]
    assert len(convs) == depth
    expect = 9 * width * (1 + width * (depth - 1)) + 2 * width * depth + width * 10 + 10
    assert n_params(m) == expect
    assert m(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_build_model_names():
    assert isinstance(build_model("cnn", in_channels=1, image_size=8), SimpleCNN)
    mlp = build_model("mlp", in_channels=1, image_size=8, width=4)
    assert isinstance(mlp, MLP) and mlp(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert n_params(build_model("resnet20")) == 269722
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0", "densenet", "shufflenet_v2",
                                  "convnext", "vit"])
def test_architectures_build_for_cifar_and_digits(name):
    """Every architecture of the trainer's --model takes 32x32 RGB and 8x8 grey inputs."""
    for c, s in ((3, 32), (1, 8)):
        m = build_model(name, in_channels=c, num_classes=7, image_size=s).eval()
        with torch.no_grad():
            assert m(torch.randn(2, c, s, s)).shape == (2, 7)


def test_efficientnet_b0_is_b0():
    """The B0 table: 16 MBConv blocks, squeeze-excitation in each, 4.0M parameters at 10 classes."""
    from deepzero_kernels.models import MBConv, SqueezeExcite, efficientnet_b0
    m = efficientnet_b0()
    assert sum(isinstance(x, MBConv) for x in m.modules()) == 16
    assert sum(isinstance(x, SqueezeExcite) for x in m.modules()) == 16
    assert 3.9e6 < n_params(m) < 4.1e6


def test_stochastic_depth_is_identity_in_eval_and_at_zero():
    from deepzero_kernels.models import StochasticDepth
    x = torch.randn(64, 3, 2, 2)
    assert torch.equal(StochasticDepth(0.5).eval()(x), x)
    assert torch.equal(StochasticDepth(0.0).train()(x), x)
    y = StochasticDepth(0.5).train()(x)
    kept = (y != 0).flatten(1).all(1)
    assert 0 < int(kept.sum()) < 64, "about half the samples are dropped"
    torch.testing.assert_close(y[kept], 2 * x[kept])
    with pytest.raises(ValueError, match="p must be"):
        StochasticDepth(1.0)


def test_engine_refuses_active_stochastic_depth():
    """Dropped residuals are random: a train-mode estimate with drop_path > 0 is a clear error; in
    eval mode stochastic depth is the identity and the estimate runs."""
    from deepzero_kernels import CGE
    from deepzero_kernels.models import convnext
    m = convnext(3, 1, dims=(4,), depths=(1,), drop_path=0.5)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
    masks = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in m.named_parameters()}
    masks["fc.weight"][0, 0] = True
    m.features[1].drop.p = 0.5
    with pytest.raises(ValueError, match="random"):
        CGE(m.train(), mu=1e-3).estimate(x, y, masks)
    CGE(m.eval(), mu=1e-3).estimate(x, y, masks)
