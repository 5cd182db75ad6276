"""ChannelDependency / GroupDependency against NNI 3.0's own (torch.jit based) analysis, and fix_mask_conflict."""

from __future__ import annotations

import copy
import csv
import warnings

import pytest
import torch
import torchvision
from torch import nn

from algorithms import ChannelDependency, GroupDependency, fix_mask_conflict, resolve_mask_conflict
from algorithms.errors import PruningError
from algorithms.masks import unit_masks
from models import build_model

X64 = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
X32 = X64[:, :, :32, :32]


def nni_dependency(model: nn.Module, x: torch.Tensor) -> tuple[set[frozenset[str]], dict[str, int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nni.compression.utils.shape_dependency import ChannelDependency as NNIChannels
        from nni.compression.utils.shape_dependency import GroupDependency as NNIGroups

        sets = {frozenset(s) for s in NNIChannels(model, x).dependency_sets}
        groups = {name: int(count) for name, count in NNIGroups(model, x).dependency.items()}
    return sets, groups


def torchvision_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=10).eval()


CASES = {
    "resnet18": lambda: (torchvision_model("resnet18"), X64),
    "mobilenet_v2": lambda: (torchvision_model("mobilenet_v2"), X64),  # depthwise convs join their producer's set
    "regnet_x_400mf": lambda: (torchvision_model("regnet_x_400mf"), X64),  # grouped convs
    "zoo resnet": lambda: (build_model("resnet", (3, 32, 32), 10).eval(), X32),
    "zoo vgg": lambda: (build_model("vgg", (3, 32, 32), 10).eval(), X32),
    "zoo alexnet": lambda: (build_model("alexnet", (3, 32, 32), 10).eval(), X32),
}


@pytest.mark.parametrize("case", CASES)
def test_dependency_sets_and_group_counts_equal_nnis(case):
    model, x = CASES[case]()
    theirs_sets, theirs_groups = nni_dependency(model, x)
    ours = ChannelDependency(model, x)
    assert {frozenset(s) for s in ours.dependency_sets} == theirs_sets
    assert GroupDependency(model, x, ours.graph).dependency == theirs_groups


def test_resnet18_has_nnis_twelve_convolution_sets_and_csv(tmp_path):
    dependency = ChannelDependency(torchvision_model("resnet18"), X64)
    conv_sets = [s for s in dependency.sets if any(layer != "fc" for layer in s.layers)]
    assert len(conv_sets) == 12
    path = dependency.export(tmp_path / "dependency.csv")
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["Dependency Set", "Convolutional Layers"]
    assert rows[1] == ["Set 1", "conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert rows[5] == ["Set 5", "layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"]
    assert len(rows) == 1 + 13 and rows[-1] == ["Set 13", "fc"]


def test_zoo_resnet_shortcuts_sit_in_their_stage_sets():
    dependency = ChannelDependency(build_model("resnet", (3, 32, 32), 10).eval(), X32)
    for stage in (2, 3, 4):
        assert {
            f"layer{stage}.0.conv2",
            f"layer{stage}.0.shortcut.0",
            f"layer{stage}.1.conv2",
        } in dependency.dependency_sets
    assert dependency.set_of("linear").blocked_by == ["it reaches the model output"]


def test_concatenation_does_not_couple_but_addition_does():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.cat([self.a(x) * self.c(x), self.b(x)], 1))

    sets = ChannelDependency(Net().eval(), X32).dependency_sets
    assert {"a", "c"} in sets and {"b"} in sets


def masks_for(model: nn.Module, keep: dict[str, list[int]]) -> dict[str, dict[str, torch.Tensor]]:
    modules = dict(model.named_modules())
    return {
        name: {k: v.contiguous() for k, v in unit_masks(modules[name], units).items()} for name, units in keep.items()
    }


def test_conflicting_masks_keep_a_channel_any_member_keeps_and_report_it():
    model = torchvision_model("resnet18")
    masks = masks_for(
        model,
        {
            "layer2.0.conv2": list(range(0, 128, 2)),
            "layer2.0.downsample.0": list(range(64)),
            "layer2.1.conv2": list(range(0, 128, 2)),
            "layer1.0.conv1": list(range(16)),
        },
    )
    fix = resolve_mask_conflict(masks, model, X64)
    kept = (fix.masks["layer2.0.conv2"]["weight"].flatten(1) != 0).any(1)
    expected = torch.zeros(128, dtype=torch.bool)
    expected[0:128:2] = True
    expected[:64] = True
    assert torch.equal(kept, expected)
    assert all(
        torch.equal((fix.masks[n]["weight"].flatten(1) != 0).any(1), expected)
        for n in ("layer2.0.downsample.0", "layer2.1.conv2")
    )
    stage2 = next(s for s in fix.sets if "layer2.0.conv2" in s.layers)
    assert (
        stage2.asked == {"layer2.0.conv2": 64, "layer2.0.downsample.0": 64, "layer2.1.conv2": 64}
        and stage2.pruned == 32
        and stage2.changed
    )
    alone = next(s for s in fix.sets if s.layers == ["layer1.0.conv1"])
    assert alone.pruned == 48 and not alone.changed


def test_a_member_without_a_mask_keeps_its_whole_set():
    model = torchvision_model("resnet18")
    fix = resolve_mask_conflict(masks_for(model, {"conv1": list(range(8))}), model, X64)
    assert bool((fix.masks["conv1"]["weight"] != 0).all()) and fix.sets[0].pruned == 0


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_channel_fix_equals_nnis_fix_mask_conflict(name):
    model = torchvision_model(name)
    generator = torch.Generator().manual_seed(1)
    keep = {}
    for layer, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and float(torch.rand(1, generator=generator)) < 0.6:
            chosen = torch.rand(module.out_channels, generator=generator) > 0.4
            chosen[0] = True
            keep[layer] = chosen.nonzero().flatten().tolist()
    masks = masks_for(model, keep)
    ours = fix_mask_conflict(masks, model, X64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nni.compression.utils.mask_conflict import fix_mask_conflict as nni_fix

        theirs = nni_fix(copy.deepcopy(masks), model, X64)
    assert all(torch.equal(ours[n]["weight"] != 0, theirs[n]["weight"] != 0) for n in masks)


def test_grouped_convolutions_keep_equal_counts_per_group():
    model = torchvision_model("regnet_x_400mf")
    layer = "trunk_output.block2.block2-0.f.a.0"  # 64 filters read by a conv with groups=4
    assert GroupDependency(model, X64).dependency[layer] == 4
    fix = resolve_mask_conflict(
        masks_for(model, {layer: [*range(0, 10), *range(16, 20), *range(32, 48), *range(48, 50)]}), model, X64
    )
    per_group = (fix.masks[layer]["weight"].flatten(1) != 0).any(1).view(4, 16).sum(1)
    assert per_group.tolist() == [16, 16, 16, 16]  # the fullest group keeps all 16, so every group does
    fix = resolve_mask_conflict(
        masks_for(model, {layer: [*range(0, 8), *range(16, 20), *range(32, 40), *range(48, 56)]}), model, X64
    )
    kept = (fix.masks[layer]["weight"].flatten(1) != 0).any(1)
    assert kept.view(4, 16).sum(1).tolist() == [8, 8, 8, 8] and fix.sets[0].groups == 4
    weights = model.get_submodule(layer).weight.detach().flatten(1).abs().sum(1)
    restored = kept[16:32] & ~torch.isin(torch.arange(16, 32), torch.arange(16, 20))
    # the strongest pruned channels came back
    assert weights[16:32][restored].min() >= weights[16:32][~kept[16:32]].max()


def test_bad_masks_are_refused(tmp_path):
    model = torchvision_model("resnet18")
    good = masks_for(model, {"conv1": list(range(8))})
    with pytest.raises(PruningError, match="does not have"):
        fix_mask_conflict({"conv9": good["conv1"]}, model, X64)
    with pytest.raises(PruningError, match="has shape"):
        fix_mask_conflict({"layer1.0.conv1": good["conv1"]}, model, X64)
    partial = {"conv1": {"weight": torch.ones(64, 3, 7, 7)}}
    partial["conv1"]["weight"][3, 0] = 0
    with pytest.raises(PruningError, match="not a channel mask"):
        fix_mask_conflict(partial, model, X64)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PruningError, match="torch.load can read"):
        fix_mask_conflict(tmp_path / "junk.pt", model, X64)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(PruningError, match="does not hold masks"):
        fix_mask_conflict(tmp_path / "list.pt", model, X64)
