"""The channel analysis on ops and architectures beyond the zoo: channel-wise activations, stochastic depth, grouped
convs (#11)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth, stochastic_depth

from algorithms.graph import analyze
from algorithms.op_tables import ELEMENTWISE_ACTIVATION_FUNCTIONS, ELEMENTWISE_ACTIVATIONS
from backends import get_backend
from tests.helpers import consumer_zeroed_reference, randomize_norms, relative_error

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
ARGUMENTS = {
    nn.Threshold: (0.1, 20.0),
    F.threshold: (0.1, 20.0),
    F.threshold_: (0.1, 20.0),
    torch.clamp: (-0.5, 0.5),
    torch.clamp_: (-0.5, 0.5),
}


class Sandwich(nn.Module):
    """conv -> op -> BatchNorm-free conv -> classifier: the first conv is prunable exactly when the op is understood."""

    def __init__(self, op: nn.Module | object) -> None:
        super().__init__()
        self.first, self.second, self.head = (
            nn.Conv2d(3, 8, 3, padding=1),
            nn.Conv2d(8, 6, 3, padding=1),
            nn.Linear(6, 4),
        )
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (
            self.op(self.first(x))
            if isinstance(self.op, nn.Module)
            else self.op(self.first(x), *ARGUMENTS.get(self.op, ()))
        )
        return self.head(self.second(y).mean((2, 3)))


def module_for(kind: type[nn.Module]) -> nn.Module:
    return kind(*ARGUMENTS.get(kind, ()))


def check_prunes_exactly(model: nn.Module) -> None:
    model.eval()
    result = get_backend("scratch").prune(model, "conv_all", 0.5, X, scope="layer")
    assert result.kept.get("first") is not None and len(result.kept["first"]) == 4
    with torch.no_grad():
        assert relative_error(result.model(X), consumer_zeroed_reference(model, result.kept, X)) < 1e-5


@pytest.mark.parametrize("kind", ELEMENTWISE_ACTIVATIONS, ids=lambda k: k.__name__)
def test_every_channel_wise_activation_module_carries_channels(kind):
    torch.manual_seed(0)
    check_prunes_exactly(Sandwich(module_for(kind)))


@pytest.mark.parametrize(
    "function",
    sorted(ELEMENTWISE_ACTIVATION_FUNCTIONS, key=lambda f: f"{f.__module__}.{f.__name__}"),
    ids=lambda f: f.__name__,
)
def test_every_channel_wise_activation_function_carries_channels(function):
    torch.manual_seed(0)
    check_prunes_exactly(Sandwich(function))


def test_the_lists_cover_every_parameter_free_activation_torch_offers():
    """The complete list: every activation class in torch.nn.modules.activation is either listed or mixes channels."""
    import torch.nn.modules.activation as activations

    mixing = {
        "GLU",
        "Softmax",
        "Softmax2d",
        "LogSoftmax",
        "Softmin",
        "MultiheadAttention",
        "Module",
        "NonDynamicallyQuantizableLinear",
    }
    classes = {
        name for name, value in vars(activations).items() if isinstance(value, type) and issubclass(value, nn.Module)
    }
    assert classes - mixing == {kind.__name__ for kind in ELEMENTWISE_ACTIVATIONS}


@pytest.mark.parametrize(
    "op", [nn.Softmax(dim=1), nn.GLU(dim=1), nn.PReLU(8)], ids=["softmax over channels", "GLU", "per-channel PReLU"]
)
def test_ops_that_mix_channels_or_hold_per_channel_weights_still_block(op):
    class Mixer(Sandwich):
        def __init__(self) -> None:
            super().__init__(op)
            self.second = nn.Conv2d(4 if isinstance(op, nn.GLU) else 8, 6, 3, padding=1)

    graph = analyze(Mixer().eval(), X)
    assert not graph.group("first").prunable and "op" in graph.group("first").blocked_by[0]


@pytest.mark.parametrize(
    "op",
    [StochasticDepth(0.2, "row"), lambda x: stochastic_depth(x, 0.2, "row", training=False)],
    ids=["module", "function"],
)
def test_stochastic_depth_carries_channels(op):
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.branch, self.head = (
                nn.Conv2d(3, 8, 3, padding=1),
                nn.Conv2d(8, 8, 3, padding=1),
                nn.Linear(8, 4),
            )
            self.op = op

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            return self.head((x + self.op(self.branch(x))).mean((2, 3)))

    model = Residual().eval()
    graph = analyze(model, X)
    assert graph.group("stem").prunable and graph.group("stem").members == ["stem", "branch"]
    result = get_backend("scratch").prune(model, "conv_all", 0.5, X, scope="layer")
    with torch.no_grad():
        assert relative_error(result.model(X), consumer_zeroed_reference(model, result.kept, X)) < 1e-5


class GroupedBlock(nn.Module):
    """conv -> BN -> grouped conv (groups=4) -> BN -> conv: regnet's / resnext's pattern at toy size."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16)
        self.b, self.bn_b = nn.Conv2d(16, 24, 3, padding=1, groups=4), nn.BatchNorm2d(24)
        self.c, self.head = nn.Conv2d(24, 8, 1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_a(self.a(x)))
        x = torch.relu(self.bn_b(self.b(x)))
        return self.head(self.c(x).mean((2, 3)))


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("method", ["conv_all", "bn", "random"])
def test_grouped_convolutions_prune_within_each_group_exactly(scope, method):
    torch.manual_seed(0)
    model = randomize_norms(GroupedBlock()).eval()
    graph = analyze(model, X)
    assert graph.group("a").divisor == 4 and graph.group("b").divisor == 4 and graph.group("b").prunable
    result = get_backend("scratch").prune(model, method, 0.5, X, scope=None if method == "random" else scope)
    pruned_grouped = [layer for layer in ("a", "b") if layer in result.kept]  # global scope may leave one whole
    assert pruned_grouped if scope == "layer" or method == "random" else result.kept
    for layer in pruned_grouped:
        kept = torch.as_tensor(result.kept[layer])
        blocks = torch.bincount(kept // (result.original_units[layer] // 4), minlength=4)
        assert len(set(blocks.tolist())) == 1 and blocks[0] > 0  # the same count in every group
    pruned_b = result.model.b
    assert (
        pruned_b.groups == 4
        and pruned_b.in_channels == len(result.kept.get("a", range(16)))
        and pruned_b.out_channels == len(result.kept.get("b", range(24)))
    )
    with torch.no_grad():
        assert relative_error(result.model(X), consumer_zeroed_reference(model, result.kept, X)) < 1e-5


def test_a_pruned_grouped_model_rebuilds_from_its_state_dict_alone():
    from algorithms.modules import resize_to_state_dict

    torch.manual_seed(0)
    model = randomize_norms(GroupedBlock()).eval()
    pruned = get_backend("scratch").prune(model, "conv_all", 0.5, X, scope="layer").model
    rebuilt = resize_to_state_dict(GroupedBlock(), pruned.state_dict())
    rebuilt.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(X), pruned(X))


def test_greedy_methods_leave_grouped_channels_whole():
    model = randomize_norms(GroupedBlock()).eval()
    result = get_backend("scratch").prune(model, "conv_similarity", 0.5, X)
    assert "a" not in result.kept and "b" not in result.kept and len(result.kept["c"]) == 4


def test_layers_left_whole_are_listed_with_the_op_that_stopped_them():
    class RolledChannels(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.b(torch.relu(self.a(x)))
            return self.head(torch.roll(y, 1, 1).mean((2, 3)))

    result = get_backend("scratch").prune(RolledChannels().eval(), "conv_all", 0.5, X, scope="layer")
    assert list(result.kept) == ["a"]
    assert result.info["why_unprunable"] == {
        "b": "a roll over channels (roll) is not understood by the channel analysis"
    }


def test_cases_an_independent_review_found():
    """A grouped conv called twice, a clamp with per-channel bounds, a block per channel: blocked, never broken."""

    class CalledTwice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.g, self.head = (
                nn.Conv2d(3, 16, 1),
                nn.Conv2d(3, 16, 1),
                nn.Conv2d(16, 16, 1, groups=4),
                nn.Linear(16, 4),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head((self.g(torch.relu(self.a(x))) + self.g(torch.relu(self.b(x)))).mean((2, 3)))

    class ClampPerChannel(Sandwich):
        def __init__(self) -> None:
            super().__init__(nn.Identity())
            self.low = nn.Parameter(torch.randn(8, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.second(torch.clamp(self.first(x), min=self.low)).mean((2, 3)))

    class OnePerGroup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.g, self.head = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 32, 1, groups=16), nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.g(torch.relu(self.a(x))).mean((2, 3)))

    for model, layer, reason in [
        (CalledTwice(), "a", "called more than once"),
        (ClampPerChannel(), "first", "clamp"),
        (OnePerGroup(), "a", "one per group"),
    ]:
        graph = analyze(model.eval(), X)
        assert not graph.group(layer).prunable and reason in graph.group(layer).blocked_by[0]
        result = get_backend("scratch").prune(model, "conv_all", 0.5, X, scope="layer")
        assert layer not in result.kept and reason in " ".join(result.info["why_unprunable"].values())
        with torch.no_grad():
            assert relative_error(result.model(X), consumer_zeroed_reference(model, result.kept, X)) < 1e-5
    with pytest.raises(Exception, match="grouped convolution"):
        get_backend("scratch").prune(GroupedBlock().eval(), "conv_similarity", {"a": 0.5}, X)


def test_the_nni_backend_leaves_grouped_channels_whole():
    result = get_backend("nni").prune(randomize_norms(GroupedBlock()).eval(), "l1", 0.5, X, scope="layer")
    assert list(result.kept) == ["c"]
