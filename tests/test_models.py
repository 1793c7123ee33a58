import pytest
import torch
from torch import nn

from robusttrain.models import MLP, LeNet, ResNet20, build_backbone, count_parameters


@pytest.mark.parametrize(
    ("model", "input_shape", "expected_params"),
    [
        # 784*128 + 128 + 128*10 + 10
        (MLP(784, [128], 10), (1, 28, 28), 101_770),
        # 784*256 + 256 + 256*64 + 64 + 64*10 + 10
        (MLP(784, [256, 64], 10), (1, 28, 28), 218_058),
        # conv1 1*6*25+6, conv2 6*16*25+16, fc 16*4*4*120+120, fc 120*10+10
        (LeNet(1, 10, image_size=28), (1, 28, 28), 156 + 2_416 + 30_840 + 1_210),
        # 32x32 RGB: fc input 16*5*5
        (LeNet(3, 10, image_size=32), (3, 32, 32), 456 + 2_416 + 48_120 + 1_210),
    ],
)
def test_output_shape_and_parameter_count(model, input_shape, expected_params):
    assert model(torch.randn(4, *input_shape)).shape == (4, 10)
    assert count_parameters(model) == expected_params


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_resnet20_shape_and_size(norm):
    model = ResNet20(norm=norm)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # ResNet-20 has about 0.27M parameters (He et al. 2016, Table 6)
    assert 0.26e6 < count_parameters(model) < 0.28e6
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    has_gn = any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert (has_bn, has_gn) == (norm == "batch", norm == "group")


def test_resnet20_rejects_unknown_norm():
    with pytest.raises(ValueError, match="unknown norm"):
        ResNet20(norm="layer")


@pytest.mark.parametrize(
    "model",
    [MLP(784, [32, 16], 10, dropout=0.1), LeNet(3, 5, (4, 8), 20, 32), ResNet20(7, "group", 8, 4)],
)
def test_build_backbone_rebuilds_same_architecture(model):
    rebuilt = build_backbone(model.spec)
    assert type(rebuilt) is type(model)
    assert rebuilt.spec == model.spec
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    rebuilt.load_state_dict(model.state_dict())


@pytest.mark.parametrize(
    "spec",
    [
        {"class_path": "os.system", "init_args": {}},
        {"class_path": "torch.nn.Linear", "init_args": {"in_features": 1, "out_features": 1}},
        {"class_path": "robusttrain.models.build_backbone", "init_args": {}},
        {"class_path": "robusttrain.models.Nope"},
        "robusttrain.models.MLP",
    ],
)
def test_build_backbone_refuses_foreign_classes(spec):
    with pytest.raises(ValueError):
        build_backbone(spec)


def test_invalid_sizes_are_rejected():
    with pytest.raises(ValueError, match="positive sizes"):
        MLP(784, [0], 10)
    with pytest.raises(ValueError, match="dropout"):
        MLP(dropout=1.0)
