import pytest
import torch
import torch.fx

from models import MODEL_NAMES, InputTooSmallError, build_model

# Parameter counts for 3x32x32 images and 10 classes, as listed in the README.
EXPECTED_PARAMS = {
    "dnn_2": 394_634,
    "dnn_4": 13_670_026,
    "lenet": 62_050,
    "alexnet": 24_345_162,
    "vgg": 14_790_090,
    "resnet": 11_173_962,
}


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64)])
@pytest.mark.parametrize("classes", [10, 100])
def test_every_model_builds_traces_and_runs(name, shape, classes):
    model = build_model(name, shape, classes).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        expected = model(x)
        assert expected.shape == (2, classes)
        assert torch.equal(traced(x), expected)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_counts_match_readme(name):
    model = build_model(name, (3, 32, 32), 10)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[name]


def test_shapes_follow_the_original_platform():
    lenet = build_model("lenet", (1, 28, 28), 10)
    assert [m.out_channels for m in lenet.modules() if isinstance(m, torch.nn.Conv2d)] == [6, 16]
    assert [m.out_features for m in lenet.modules() if isinstance(m, torch.nn.Linear)] == [120, 84, 10]
    assert lenet.classifier[0].in_features == 16 * 4 * 4  # 28 -> 24 -> 12 -> 8 -> 4: flatten at spatial size 4x4
    dnn_4 = build_model("dnn_4", (1, 28, 28), 10)
    assert [m.out_features for m in dnn_4.modules() if isinstance(m, torch.nn.Linear)] == [4096, 256, 128, 10]
    vgg = build_model("vgg", (3, 32, 32), 10)
    assert [m.out_features for m in vgg.classifier if isinstance(m, torch.nn.Linear)] == [128, 10]
    resnet = dict(build_model("resnet", (3, 32, 32), 10).named_modules())
    assert isinstance(resnet["layer4.0.shortcut.0"], torch.nn.Conv2d)
    assert resnet["conv1"].kernel_size == (3, 3)


@pytest.mark.parametrize("name", ["lenet", "alexnet", "vgg", "resnet"])
def test_image_too_small_is_refused_clearly(name):
    with pytest.raises(InputTooSmallError, match=rf"{name} needs images of at least 16x16, got 8x8"):
        build_model(name, (1, 8, 8), 10)


def test_unknown_model_and_bad_classes():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model("nope")
    with pytest.raises(ValueError, match="num_classes must be at least 2"):
        build_model("lenet", (1, 28, 28), 1)
