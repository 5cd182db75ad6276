import pytest
import torch
from torch import nn

from backends import get_backend
from pipeline.deploy.latency import latency_by_layout
from pipeline.deploy.metrics import DEPLOYED_LAYOUT, TIMED_LAYOUTS, deployable
from tests.helpers import relative_error, zoo


@pytest.mark.parametrize("name", ["lenet", "vgg", "resnet", "alexnet"])
def test_deployable_folds_batchnorm_and_computes_the_same(name):
    model = zoo(name)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pruned = get_backend("scratch").prune(model, "conv_all", 0.5, x, scope="layer").model.eval()
    for original in (model, pruned):
        original.train()  # deployable() must not depend on, or change, the mode it is given
        folded = deployable(original)
        assert original.training and not folded.training
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()), "every conv+BN pair is folded"
        with torch.no_grad():
            assert relative_error(folded(x), original.eval()(x)) < 1e-5


def test_latency_is_timed_in_each_layout_with_inputs_and_weights_in_it():
    """The deployed layout (channels_last) comes first; the model really sees NHWC batches there, and is left contiguous
    after."""
    model = deployable(zoo("vgg"))
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    seen: list[tuple[bool, bool]] = []
    first_conv.register_forward_pre_hook(
        lambda module, args: seen.append(
            (args[0].is_contiguous(memory_format=torch.channels_last), module.weight.is_contiguous())
        )
    )
    x = torch.randn(1, 3, 32, 32)
    timings = latency_by_layout(model, example_input=x, batch=4, threads=1)
    assert (
        list(timings) == [DEPLOYED_LAYOUT, "contiguous"] == list(TIMED_LAYOUTS) and DEPLOYED_LAYOUT == "channels_last"
    )
    assert all(len(m.timings) == 1 and m.timings[0].median > 0 and not m.speedups for m in timings.values())
    nhwc = len(seen) - seen[::-1].index((True, False))  # every forward of the first layout, warm-up and timed runs
    assert nhwc > 0 and seen[:nhwc] == [(True, False)] * nhwc  # NHWC batch, NHWC weights
    assert seen[nhwc:] and seen[nhwc:] == [(False, True)] * (len(seen) - nhwc)
    assert first_conv.weight.is_contiguous()


def test_int8_models_time_in_both_layouts():
    from pipeline.deploy import quantize

    model = zoo("lenet").eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    int8 = deployable(quantize.post_training(model, [x], x[:1]))
    first_conv = next(m for m in int8.modules() if "Conv" in type(m).__name__)  # a quantized (fused) conv
    seen: list[bool] = []
    first_conv.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    timings = latency_by_layout(int8, example_input=x[:1], batch=2, threads=1)
    assert list(timings) == list(TIMED_LAYOUTS) and all(m.timings[0].median > 0 for m in timings.values())
    nhwc = seen.index(False)  # its quantized batches arrive NHWC, then NCHW
    assert nhwc > 0 and seen == [True] * nhwc + [False] * (len(seen) - nhwc)
