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
