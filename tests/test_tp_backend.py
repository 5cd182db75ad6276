"""The `tp` backend: Torch-Pruning 1.6.1 behind the common contract (#12)."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

import run
from algorithms.errors import PruningError
from algorithms.graph import analyze
from backends import get_backend
from backends.tp_backend import METHODS
from pipeline.snapshots import load_model
from tests.helpers import quick_run, randomize_norms, relative_error, zeroed_reference, zoo

pytest.importorskip("torch_pruning")

TP = get_backend("tp")
SCRATCH = get_backend("scratch")
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
DATA = {
    "train_batches": lambda: iter([(X, torch.tensor([0, 1, 2, 3]))] * 2),
    "training_steps": 2,
    "importance_batches": 1,
}
ZOO = ["dnn_2", "dnn_4", "lenet", "alexnet", "vgg", "resnet", "torchvision_resnet18"]


def model_named(name: str) -> torch.nn.Module:
    if name == "torchvision_resnet18":
        torch.manual_seed(0)
        return randomize_norms(torchvision.models.resnet18(num_classes=10)).eval()
    return zoo(name)


def refusal(name: str, method: str, model: torch.nn.Module) -> str | None:
    """The one-line error the request must get, or None where the method applies."""
    has_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if METHODS[method].needs_norm and not has_norm:
        return "has no BatchNorm"
    if method == "group_slim" and name in ("lenet", "alexnet", "vgg"):  # hidden Linear layers without BatchNorm
        return "group_slim needs a BatchNorm after every pruned layer"
    return None


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", ZOO)
def test_every_method_prunes_every_zoo_model_exactly(name, method):
    model = model_named(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected_error = refusal(name, method, model)
    if expected_error:
        with pytest.raises(PruningError, match=expected_error):
            TP.prune(model, method, 0.5, X, **DATA)
        return
    result = TP.prune(model, method, 0.5, X, **DATA)
    assert result.backend == "tp" and result.kept and type(result.model) is type(model)
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model must be untouched"
    reference = result.info.get("masked_model", model)  # sparse training changed the weights Torch-Pruning then pruned
    graph = analyze(model, X)
    with torch.no_grad():
        expected = zeroed_reference(reference.eval(), result.kept, result.original_units, graph.norm_after, X)
        assert relative_error(result.model.eval()(X), expected) < 1e-4
    for layer, keep in result.kept.items():
        assert result.masks[layer]["weight"].flatten(1).abs().sum(1).nonzero().flatten().tolist() == keep
        assert len(keep) == result.model.get_submodule(layer).weight.shape[0]


def torch_pruning_group_l1(model: torch.nn.Module, layer: str) -> torch.Tensor:
    """Torch-Pruning's MagnitudeImportance(p=1) for one plain conv -> BatchNorm -> next-layer chain: the mean over the
    group's members of the filter's L1 norm, the BatchNorm |gamma| and the next layer's input-column L1 norm (its
    normaliser divides by a constant and does not change the order)."""
    graph = analyze(model, X)
    modules = dict(model.named_modules())
    members = [modules[layer].weight.detach().abs().flatten(1).sum(1)]
    if layer in graph.norm_after:
        members.append(modules[graph.norm_after[layer]].weight.detach().abs())
    group = graph.group_of_producer[layer]
    for consumer in graph.consumers:
        if consumer.kind in ("conv", "linear") and any(
            graph.group_of_space.get(s.space) == group for s in consumer.layout
        ):
            columns = modules[consumer.module].weight.detach().abs().transpose(0, 1).flatten(1).sum(1)
            # an NCHW flatten: H*W columns per channel
            members.append(columns.view(-1, consumer.layout[0].repeat).sum(1))
    return torch.stack(members).mean(0)


@pytest.mark.parametrize("name", ["lenet", "vgg"])
def test_tp_l1_ranks_whole_groups_where_scratch_ranks_filters(name):
    """On chains without coupled layers, `tp l1` keeps the top half by Torch-Pruning's group L1 (filter + BatchNorm +
    next layer's input columns) and `scratch conv_all` the top half by filter L1; their overlap is what those two orders
    share, exactly."""
    model = zoo(name)
    tp_kept = TP.prune(model, "l1", 0.5, X, scope="layer").kept
    scratch_kept = SCRATCH.prune(model, "conv_all", 0.5, X, scope="layer").kept
    assert set(tp_kept) == set(scratch_kept)
    modules = dict(model.named_modules())
    for layer, kept in tp_kept.items():
        count = len(kept)
        assert kept == sorted(torch_pruning_group_l1(model, layer).topk(count).indices.tolist())
        assert scratch_kept[layer] == sorted(
            modules[layer].weight.detach().abs().flatten(1).sum(1).topk(count).indices.tolist()
        )
    shared = sum(len(set(tp_kept[k]) & set(scratch_kept[k])) for k in tp_kept) / sum(len(k) for k in tp_kept.values())
    assert 0.5 < shared < 1.0  # related criteria, not the same one


def test_scope_ratios_exclude_and_round_to_mean_what_they_mean():
    model = zoo("vgg")
    layer = TP.prune(model, "l1", 0.5, X, scope="layer")
    assert all(len(k) == result // 2 for k, result in ((layer.kept[n], layer.original_units[n]) for n in layer.kept))
    global_ = TP.prune(model, "l1", 0.5, X, scope="global")
    assert global_.scope == "global" and len({len(k) / global_.original_units[n] for n, k in global_.kept.items()}) > 1
    one = TP.prune(model, "l1", {"features.0": 0.5}, X)
    assert list(one.kept) == ["features.0"] and len(one.kept["features.0"]) == one.original_units["features.0"] // 2
    excluded = TP.prune(model, "l1", 0.5, X, scope="layer", exclude=["features.0"])
    assert "features.0" not in excluded.kept and "features.3" in excluded.kept
    rounded = TP.prune(model, "l1", 0.3, X, scope="layer", round_to=8)
    assert all(len(k) % 8 == 0 for k in rounded.kept.values()) and rounded.info["round_to"] == 8


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: TP.prune(zoo("lenet"), "fpgm", 0.5, X),
            "Torch-Pruning offers no method 'fpgm' here; choose one of: l1, l2",
        ),
        (lambda: TP.prune(zoo("lenet"), "l1", 0.5, X, round_to=8), r"round_to=8 is larger than features.0 \(6 units\)"),
        (lambda: TP.prune(zoo("lenet"), "l1", 0.5, X, round_to=0), "round_to must be a positive whole number"),
        (lambda: TP.prune(zoo("lenet"), "taylor", 0.5, X), "taylor is data-driven: pass train_batches"),
        (lambda: TP.prune(zoo("lenet"), "l1", {"classifier.4": 0.5}, X), "not a prunable Conv2d / hidden Linear"),
        (lambda: TP.prune(zoo("lenet"), "l1", 1.5, X), r"sparsity must be a fraction of channels in \[0, 1\)"),
        (lambda: TP.prune(zoo("lenet"), "l1", 0.5, X, scope="nearby"), "unknown scope"),
    ],
)
def test_bad_requests_are_one_clear_error(call, message):
    with pytest.raises(PruningError, match=message):
        call()


def test_torch_pruning_failures_are_one_line():
    torch.manual_seed(0)
    shufflenet = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    with pytest.raises(PruningError, match=r"^Torch-Pruning l1 failed on ShuffleNetV2: ZeroDivisionError"):
        TP.prune(shufflenet, "l1", 0.5, torch.randn(1, 3, 64, 64))
    vit = torchvision.models.VisionTransformer(
        32, 8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=4
    ).eval()
    with pytest.raises(PruningError, match="the model Torch-Pruning l1 pruned no longer runs"):
        TP.prune(vit, "l1", 0.5, torch.randn(1, 3, 32, 32))


QUICK = quick_run(limit_batches=2)


@pytest.mark.parametrize("method", ["lamp", "group_norm"])
def test_run_py_tp_round_trip(tmp_path, monkeypatch, method):
    monkeypatch.chdir(tmp_path)
    assert (
        run.main(
            [
                "--backend",
                "tp",
                "--prune_method",
                method,
                "--model",
                "vgg",
                "--step",
                "123",
                "--prune_steps",
                "2",
                *QUICK,
            ]
        )
        == 0
    )
    pruned, meta = load_model(tmp_path / "output/snapshots/vgg/digits/model_prune", "vgg", "digits")
    assert meta["backend"] == "tp" and meta["method"] == method
    report = json.loads((tmp_path / "output/results/results_vgg_digits_pruning.json").read_text())
    assert report["params"] < report["base"]["params"] and report["prune_train_steps"] == (
        2 if method == "group_norm" else 0
    )
    assert (tmp_path / "output/snapshots/vgg/digits/model_refine/weights.pt").is_file()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--backend", "tp", "--prune_method", "fpgm"], "Torch-Pruning offers no method 'fpgm'"),
        (["--backend", "tp", "--round_to", "8"], "round_to=8 is larger than features.0"),
        (
            ["--backend", "nni", "--prune_method", "level", "--round_to", "8"],
            "round_to rounds channel counts; level prunes single weights",
        ),
        (["--backend", "tp", "--round_to", "0"], "--round_to must be positive"),
    ],
)
def test_run_py_refuses_bad_tp_requests_before_training(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    assert run.main([*flags, "--model", "lenet", "--step", "12", *QUICK]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "output").exists()


class SoftmaxHead(torch.nn.Module):
    """conv -> a hidden Linear -> the classifier behind a log_softmax, and a frozen BatchNorm'd first layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.hidden, self.fc = (
            torch.nn.Conv2d(3, 8, 3),
            torch.nn.BatchNorm2d(8),
            torch.nn.Linear(8, 16),
            torch.nn.Linear(16, 10),
        )
        self.up = torch.nn.ConvTranspose2d(8, 8, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        y = self.up(y).mean((2, 3))
        return torch.log_softmax(self.fc(torch.relu(self.hidden(y))), 1)


def test_the_classifier_stays_whole_behind_a_softmax_and_only_conv2d_and_linear_are_roots():
    model = randomize_norms(SoftmaxHead()).eval()
    model.conv.requires_grad_(False)
    model.bn.train()  # a per-module mode the result must keep
    result = TP.prune(model, "l1", 0.5, X)
    assert set(result.kept) == {"conv", "hidden"}  # not fc (the output), not the ConvTranspose2d
    assert result.model(X).shape == (4, 10)
    assert not result.model.conv.weight.requires_grad and result.model.hidden.weight.requires_grad
    assert result.model.bn.training and not result.model.training


def test_coupled_layers_take_their_largest_ratio_as_in_scratch():
    model = zoo("resnet")
    members = ["layer2.0.conv2", "layer2.0.shortcut.0"]
    tp_kept = TP.prune(model, "l1", {members[0]: 0.25, members[1]: 0.75}, X).kept
    scratch_kept = SCRATCH.prune(model, "conv_all", {members[0]: 0.25, members[1]: 0.75}, X).kept
    # 128 channels, 0.75 removed
    assert len(tp_kept[members[0]]) == len(tp_kept[members[1]]) == len(scratch_kept[members[0]]) == 32


def test_hessian_uses_every_sample():
    """Torch-Pruning 1.6.1 alone keeps only the last sample's gradient; with ours, changing the others changes the
    choice."""
    model = zoo("vgg")
    labels = torch.arange(8) % 10
    batches = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) for seed in (5, 6)]
    batches[1][-1] = batches[0][-1]  # the same last sample

    def kept(images: torch.Tensor) -> dict[str, list[int]]:
        return TP.prune(
            model, "hessian", 0.5, X, train_batches=lambda: iter([(images, labels)]), importance_batches=1
        ).kept

    assert kept(batches[0]) != kept(batches[1])


def test_a_layer_torch_pruning_would_silently_skip_is_refused():
    with pytest.raises(
        PruningError, match=r"would keep no channel of features.0 \(6 units\) and skip it silently; use a lower ratio"
    ):
        TP.prune(zoo("lenet"), "l1", 0.9, X)
    with pytest.raises(PruningError, match="would keep no channel of features.0 .* use a round_to of at most 3"):
        TP.prune(zoo("lenet"), "l1", 0.5, X, round_to=4)


def test_run_py_refuses_group_slim_on_layers_without_batchnorm_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert (
        run.main(["--backend", "tp", "--prune_method", "group_slim", "--model", "lenet", "--step", "12", *QUICK]) == 2
    )
    assert "group_slim needs a BatchNorm after every pruned layer, and classifier.0 has none" in capsys.readouterr().err
    assert not (tmp_path / "output").exists()
