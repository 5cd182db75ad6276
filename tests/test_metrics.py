import pytest
import torch
from torch import nn

from backends import get_backend
from pipeline.metrics import deployable
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
