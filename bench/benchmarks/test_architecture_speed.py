"""Scratch vs Torch-Pruning 1.6.1: how long one pruning call takes on torchvision and timm architectures, and how far
each prunes (python -m pytest bench/benchmarks/test_architecture_speed.py --benchmark-enable -s, ~5 min).

Both prune every Conv2d / hidden Linear at layer ratio 0.5 by filter L1 norm, the classifier left whole, from a
1x3x64x64 example (random init, BatchNorm statistics randomised). Warm calls: one untimed round first; Torch-Pruning
prunes in place, so each of its rounds gets a fresh copy made outside the timing. One thread, the median of three calls.
Torch-Pruning's time is its whole call (building the dependency graph, scoring, pruning), as scratch's is (tracing,
scoring, surgery of a new model). The scratch test of a model runs after Torch-Pruning's and asserts it is no slower;
the table the run prints is the one in the README.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

from backends import get_backend
from tests.helpers import randomize_norms

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
MODELS = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "regnet_x_400mf",
    "convnext_tiny",
    "shufflenet_v2_x1_0",
    "vit_b_16",
    # timm 1.0.31 (#27): the CNN families whose BatchNormAct2d, layer scale and ghost modules scratch now follows
    "timm:resnet50d",
    "timm:regnetx_002",
    "timm:regnety_002",
    "timm:mobilenetv3_small_100",
    "timm:mobilenetv4_conv_small",
    "timm:efficientnet_lite0",
    "timm:repvgg_a0",
    "timm:ghostnet_100",
    "timm:convnext_atto",
    "timm:densenet121",
    "timm:convnextv2_atto",  # GlobalResponseNorm
    # transformers: whole heads and MLP units (Torch-Pruning's pruned model does not run)
    "timm:vit_tiny_patch16_224",
    "timm:deit_tiny_patch16_224",
    "timm:swin_tiny_patch4_window7_224",
]
# timm models built for the 64x64 example: ViT's patch grid and Swin's windows follow the image size
TIMM_SIZES = {"vit": {"img_size": 64}, "dei": {"img_size": 64}, "swi": {"img_size": 64, "window_size": 8}}
RESULTS: dict[str, dict[str, object]] = {}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchvision_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("timm:"):
        import timm

        name = name.removeprefix("timm:")
        size = TIMM_SIZES.get(name[:3], {})
        return randomize_norms(timm.create_model(name, pretrained=False, num_classes=10, **size)).eval()
    extra = {"image_size": 64} if name.startswith("vit") else {}
    return randomize_norms(getattr(torchvision.models, name)(num_classes=10, **extra)).eval()


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def torch_pruning_call(model: nn.Module) -> nn.Module:
    import torch_pruning as tp

    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp.pruner.MagnitudePruner(
            model,
            X,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=0.5,
            ignored_layers=[classifier],
            global_pruning=False,
        ).step()
    return model


def runs(model: nn.Module) -> bool:
    try:
        with torch.no_grad():
            model(X)
        return True
    except Exception:
        return False


@pytest.mark.parametrize("library", ["torch_pruning", "scratch"])
@pytest.mark.parametrize("name", MODELS)
def test_prune_call_time(benchmark, name, library):
    pytest.importorskip("torch_pruning")
    model = torchvision_model(name)
    row = RESULTS.setdefault(name, {"params": params(model)})
    if library == "torch_pruning":
        try:
            pruned = benchmark.pedantic(
                torch_pruning_call, setup=lambda: ((copy.deepcopy(model),), {}), rounds=3, warmup_rounds=1
            )
        except Exception as error:  # e.g. shufflenet: Torch-Pruning 1.6.1 fails on the channel shuffle
            row["torch_pruning"] = f"fails ({type(error).__name__})"
            pytest.skip(f"Torch-Pruning fails on {name}: {type(error).__name__}")
        row["torch_pruning"] = params(pruned) if runs(pruned) else f"{params(pruned):,} (pruned model fails to run)"
        row["tp_s"] = benchmark.stats.stats.median
    else:
        pruned = benchmark.pedantic(
            lambda: get_backend("scratch").prune(model, "conv_all", 0.5, X, scope="layer").model,
            rounds=3,
            warmup_rounds=1,
        )
        assert runs(pruned)
        row.update(scratch=params(pruned), scratch_s=benchmark.stats.stats.median)
        benchmark.extra_info.update({key: value for key, value in row.items() if key != "tp_s"})
        if "tp_s" in row:
            ratio = row["tp_s"] / row["scratch_s"]
            benchmark.extra_info["tp_over_scratch"] = round(ratio, 2)
            assert ratio >= 1.0, (
                f"scratch pruned {name} in {row['scratch_s']:.3f} s, Torch-Pruning in {row['tp_s']:.3f} s"
            )


def test_print_the_table():
    """Runs last: the README table, from this run."""
    if not RESULTS:
        pytest.skip("no model was benchmarked")
    print(
        "\n| model | params | scratch (layer 0.5) | Torch-Pruning | scratch time | Torch-Pruning time "
        "|\n|---|---|---|---|---|---|"
    )
    for name, row in RESULTS.items():
        tp = row.get("torch_pruning", "-")
        tp_params = f"{tp:,}" if isinstance(tp, int) else tp
        tp_s = f"{row['tp_s'] * 1000:.0f} ms" if "tp_s" in row else "-"
        print(
            f"| {name} | {row['params']:,} | {row.get('scratch', 0):,} | {tp_params} | "
            f"{row.get('scratch_s', 0) * 1000:.0f} ms | {tp_s} |"
        )
