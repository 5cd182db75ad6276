import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from algorithms.criteria import METHODS
from algorithms.errors import PruningError
from algorithms.graph import analyze
from algorithms.masks import apply_masks
from algorithms.modules import eval_mode
from backends import get_backend
from models import MODEL_NAMES, build_model
from tests.helpers import randomize_norms, relative_error, zeroed_reference, zoo

SCRATCH = get_backend("scratch")
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _cases():
    for name in MODEL_NAMES:
        for method, spec in METHODS.items():
            if spec.source == "norm" and name.startswith("dnn"):
                continue
            for scope in ("global", "layer"):
                if scope == "global" and spec.greedy:
                    continue
                yield name, method, scope


@pytest.mark.parametrize("name, method, scope", list(_cases()))
def test_pruned_model_equals_channel_zeroed_original(name, method, scope):
    model = zoo(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # a fresh dnn's |w| all lie below the default 0.06 (fan-in 3072): that threshold decides nothing and is refused
    options = {"threshold": 0.01} if method == "conv_threshold" and name.startswith("dnn") else {}
    result = SCRATCH.prune(model, method, 0.5, X, scope=scope, seed=3, **options)
    assert result.kept, "something must be pruned at 0.5"
    graph = analyze(model, X)
    with torch.no_grad():
        actual = result.model.eval()(X)
    expected = zeroed_reference(model, result.kept, result.original_units, graph.norm_after, X)
    assert relative_error(actual, expected) < 1e-4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model must be untouched"
    assert type(result.model) is type(model)
    pruned_params = sum(p.numel() for p in result.model.parameters())
    assert pruned_params < sum(p.numel() for p in model.parameters())


def test_torchvision_resnet18_prunes_runs_and_matches_torch_pruning_size():
    model = randomize_norms(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    result = SCRATCH.prune(model, "conv_all", 0.5, x, scope="layer")
    assert sum(p.numel() for p in result.model.parameters()) == 2_801_450  # Torch-Pruning 1.6.1's figure, DESIGN.md s6
    graph = analyze(model, x)
    with torch.no_grad():
        assert (
            relative_error(
                result.model(x), zeroed_reference(model, result.kept, result.original_units, graph.norm_after, x)
            )
            < 1e-4
        )
    assert result.kept["conv1"] == result.kept["layer1.0.conv2"] == result.kept["layer1.1.conv2"]  # residual group
    assert "fc" not in result.kept


def test_residual_groups_share_one_decision_and_classifier_is_never_pruned():
    result = SCRATCH.prune(zoo("resnet"), "bn", 0.5, X)
    for members in (
        ["conv1", "layer1.0.conv2", "layer1.1.conv2"],
        ["layer4.0.conv2", "layer4.0.shortcut.0", "layer4.1.conv2"],
    ):
        assert all(result.kept[m] == result.kept[members[0]] for m in members)
    assert "linear" not in result.kept


def test_layer_scope_removes_floor_of_each_layer():
    result = SCRATCH.prune(zoo("lenet"), "conv_all", 0.29, X, scope="layer")
    expected = {"features.0": 6 - 1, "features.4": 16 - 4, "classifier.0": 120 - 34, "classifier.2": 84 - 24}
    assert {k: len(v) for k, v in result.kept.items()} == expected
    assert all(v == sorted(v) for v in result.kept.values())
    hundred = nn.Sequential(nn.Linear(8, 100), nn.ReLU(), nn.Linear(100, 3))
    kept = SCRATCH.prune(hundred, "neuron", 0.29, torch.randn(2, 8), scope="layer").kept
    assert len(kept["0"]) == 71  # 0.29 * 100 removes 29, not 28 (float rounding)


def test_global_scope_pools_scores_and_prunes_layers_unevenly():
    model = zoo("vgg")
    result = SCRATCH.prune(model, "bn", 0.5, X, scope="global")
    total = sum(result.original_units[k] for k in result.kept if k.startswith("features"))
    removed = sum(result.original_units[k] - len(v) for k, v in result.kept.items())
    assert removed == math.floor(total * 0.5)
    fractions = {round(len(v) / result.original_units[k], 3) for k, v in result.kept.items()}
    assert len(fractions) > 3  # layers lose different amounts
    gammas = torch.cat(
        [model.features[i + 1].weight.abs() for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    )
    threshold = gammas.sort().values[math.floor(total * 0.5)]
    for name, kept in result.kept.items():
        bn = dict(model.named_modules())[name.replace(name.split(".")[-1], str(int(name.split(".")[-1]) + 1))]
        assert bool((bn.weight.abs()[kept] >= threshold).all())


def test_every_layer_keeps_at_least_one_unit():
    result = SCRATCH.prune(zoo("vgg"), "bn", 0.99, X, scope="global")
    assert all(len(v) >= 1 for v in result.kept.values())
    result.model(X)


def test_masks_have_nni_shape_and_the_masked_model_keeps_bn_beta():
    model = zoo("lenet")
    result = SCRATCH.prune(model, "conv_max", 0.5, X, scope="layer")
    mask = result.masks["features.0"]
    assert mask["weight"].shape == model.features[0].weight.shape and mask["bias"].shape == (6,)
    assert mask["bias"].nonzero().flatten().tolist() == result.kept["features.0"]
    masked = apply_masks(model, result.masks)
    assert torch.count_nonzero(masked.features[0].weight[mask["bias"] == 0]) == 0
    assert torch.equal(model.features[0].weight, zoo("lenet").features[0].weight)
    with torch.no_grad():
        assert not torch.allclose(masked(X), result.model(X))  # beta of pruned channels still feeds the masked model


def test_random_is_seeded():
    model = zoo("alexnet")
    a = SCRATCH.prune(model, "random", 0.5, X, seed=1).kept
    b = SCRATCH.prune(model, "random", 0.5, X, seed=1).kept
    c = SCRATCH.prune(model, "random", 0.5, X, seed=2).kept
    assert a == b and a != c
    assert {k: len(v) for k, v in a.items()}["features.0"] == 48


def test_conv_threshold_counts_weights_above_the_threshold():
    conv = nn.Conv2d(1, 4, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.5, 0.01, 0.2, 0.02]).view(4, 1, 1, 1))
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(4, 2, 1))
    kept = SCRATCH.prune(model, "conv_threshold", 0.5, torch.randn(1, 1, 4, 4), threshold=0.1).kept
    assert kept["0"] == [0, 2]


def test_conv_similarity_removes_one_of_two_duplicate_filters():
    conv = nn.Conv2d(2, 4, 3)
    with torch.no_grad():
        conv.weight[3] = conv.weight[1] * 1.0001
    model = nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    kept = SCRATCH.prune(model.eval(), "conv_similarity", 0.25, torch.randn(1, 2, 8, 8)).kept["0"]
    assert kept == [0, 2, 3]  # 1 and 3 are the closest pair; 1 has the smaller L1 norm


class ConcatDepthwise(nn.Module):
    """Channel concat (offsets), a depthwise conv, and an elementwise gate: beyond the zoo."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(14)
        self.dw = nn.Conv2d(14, 14, 3, padding=1, groups=14, bias=False)
        self.c = nn.Conv2d(14, 10, 1)
        self.fc = nn.Linear(10 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        y = F.relu(self.c(self.dw(y)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 4), 1))


def test_concat_depthwise_and_flatten_are_sliced_exactly():
    model = randomize_norms(ConcatDepthwise()).eval()
    x = torch.randn(2, 3, 16, 16)
    result = SCRATCH.prune(model, "conv_all", 0.5, x, scope="layer")
    assert {k: len(v) for k, v in result.kept.items()} == {"a": 4, "b": 3, "c": 5}
    assert result.model.dw.groups == 7 and result.model.fc.in_features == 5 * 16
    # the BatchNorm sits after the concat: zero the pruned channels there, at their concat offsets
    after_norm = {"bn": [*result.kept["a"], *(8 + k for k in result.kept["b"])], "c": result.kept["c"]}
    with torch.no_grad():
        expected = zeroed_reference(model, after_norm, {"bn": 14, "c": 10}, {}, x)
        assert relative_error(result.model(x), expected) < 1e-5


def test_exclude_and_per_layer_ratios():
    model = zoo("resnet")
    result = SCRATCH.prune(model, "conv_all", 0.5, X, exclude=["layer1.0.conv2", "layer4"])
    assert "conv1" not in result.kept and not any(k.startswith("layer4") for k in result.kept)
    assert "layer2.0.conv1" in result.kept
    ratios = SCRATCH.prune(model, "conv_all", {"layer1.0.conv1": 0.25, "layer2.0.conv2": 0.5}, X)
    assert {k: len(v) for k, v in ratios.kept.items()} == {
        "layer1.0.conv1": 48,
        "layer2.0.conv2": 64,
        "layer2.0.shortcut.0": 64,
        "layer2.1.conv2": 64,
    }


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.conv(x)
        return x


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: SCRATCH.prune(m, "magic", 0.5, X), "unknown pruning method 'magic'"),
        (lambda m: SCRATCH.prune(m, "bn", 1.0, X), r"sparsity must be a fraction of channels in \[0, 1\), got 1.0"),
        (lambda m: SCRATCH.prune(m, "bn", -0.1, X), "sparsity must be a fraction"),
        (
            lambda m: SCRATCH.prune(m, "bn", 0.5, X, exclude=["nope"]),
            "exclude names 'nope', which the model does not have",
        ),
        (
            lambda m: SCRATCH.prune(m, "bn", {"nope": 0.5}, X),
            "per-layer sparsity names 'nope', which is not in the model",
        ),
        (
            lambda m: SCRATCH.prune(m, "bn", {"classifier.4": 0.5}, X),
            "classifier.4 cannot be pruned: it reaches the model output",
        ),
        (
            lambda m: SCRATCH.prune(m, "conv_similarity", 0.5, X, scope="global"),
            r"conv_similarity \(a greedy per-layer method\) cannot use scope='global'",
        ),
        (lambda m: SCRATCH.prune(m, "bn", 0.5, X, scope="model"), "unknown scope 'model'; choose 'global' or 'layer'"),
        (
            lambda m: SCRATCH.prune(m, "bn", {"features.0": 0.5}, X, scope="global"),
            "per-layer sparsity ratios cannot use scope='global'",
        ),
    ],
)
def test_bad_requests_raise_value_errors_and_leave_the_model_alone(call, message):
    model = zoo("lenet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        call(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bn_method_on_a_model_without_batchnorm_is_refused():
    with pytest.raises(PruningError, match="has no BatchNorm; use conv_all or neuron"):
        SCRATCH.prune(build_model("dnn_2", (3, 32, 32), 10), "bn", 0.5, X)


def test_untraceable_model_names_the_offending_line():
    with pytest.raises(
        PruningError,
        match=r"^torch.fx cannot trace or capture Untraceable at test_scratch_backend.py:\d+ `if x.sum\(\) > 0:`: a "
        r"branch or a number taken from a tensor's values",
    ):
        SCRATCH.prune(Untraceable(), "conv_all", 0.5, X)


def test_default_method_follows_the_original():
    assert SCRATCH.default_method(zoo("vgg")) == "bn"
    assert SCRATCH.default_method(build_model("dnn_4", (1, 28, 28), 10)) == "neuron"


def test_eval_mode_gives_each_submodule_its_own_mode_back_even_after_an_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout()).train()
    model[1].eval()  # a part kept frozen on purpose must stay frozen
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        assert not any(module.training for module in model.modules())
        raise RuntimeError("boom")
    assert [module.training for module in model.modules()] == [True, True, False, True]


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if not n.startswith("dnn")] + ["resnet18"])
def test_round_to_keeps_multiples_of_n_rounded_up_and_stays_exact(name):
    model = randomize_norms(torchvision.models.resnet18(num_classes=10)).eval() if name == "resnet18" else zoo(name)
    plain = SCRATCH.prune(model, "conv_all", 0.3, X, scope="layer")
    rounded = SCRATCH.prune(model, "conv_all", 0.3, X, scope="layer", round_to=8)
    assert rounded.kept, "something is still pruned"
    for layer, units in rounded.kept.items():
        assert len(units) % 8 == 0 and len(units) < rounded.original_units[layer]
        # rounded up: the plain choice plus the best of the rest
        assert len(units) >= len(plain.kept[layer]) and set(plain.kept[layer]) <= set(units)
    for layer in set(plain.kept) - set(rounded.kept):  # a group that would round up to its full size stays whole
        assert -(-len(plain.kept[layer]) // 8) * 8 >= plain.original_units[layer]
    graph = analyze(model, X)
    with torch.no_grad():
        actual = rounded.model.eval()(X)
    assert (
        relative_error(actual, zeroed_reference(model, rounded.kept, rounded.original_units, graph.norm_after, X))
        < 1e-4
    )


def test_round_to_in_a_grouped_conv_keeps_equal_blocks_and_the_best_units():
    from algorithms.selection import round_up_kept

    scores = torch.tensor([5.0, 1, 4, 2, 9, 8, 3, 7])  # two blocks of four
    assert round_up_kept(scores, torch.tensor([0, 2, 4, 5]), 2).tolist() == [0, 2, 4, 5]  # already a multiple
    # the best removed unit (score 7) comes back
    assert round_up_kept(scores, torch.tensor([0, 4, 5]), 4).tolist() == [0, 4, 5, 7]
    assert round_up_kept(scores, torch.tensor([0, 4]), 4, blocks=2).tolist() == [0, 2, 4, 5]  # 2 per block: 4 in all
    assert round_up_kept(scores, torch.tensor([0, 4]), 16).tolist() == list(range(8))  # never past the group's size
    with pytest.raises(PruningError, match="round_to must be a positive whole number of channels, got 0"):
        SCRATCH.prune(zoo("lenet"), "conv_all", 0.5, X, round_to=0)
