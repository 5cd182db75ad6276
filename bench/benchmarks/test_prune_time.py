"""Prune time per backend and method (python -m pytest bench/benchmarks/test_prune_time.py --benchmark-enable).

Whole call at 0.5 of channels, each method at its own default scope (as the harness runs it): scoring,
selection and surgery (scratch), masks, dependency groups and ModelSpeedup (nni; `level` masks only), or
DepGraph, group importance and in-place pruning of a copy (tp). Data-driven NNI and Torch-Pruning methods train
(or take gradients for) 4 steps on random batches. Compare backends by the ratio of medians within one run: the
machine is shared. `-k "conv_all or l1"` times the one criterion all three share.
"""

from __future__ import annotations

import pytest

from algorithms.criteria import METHODS

from .inputs import prune

NNI = ["level", "l1", "l2", "fpgm", "slim", "taylor", "agp", "linear"]
TP = ["l1", "l2", "lamp", "bn", "random", "taylor", "hessian", "group_norm", "slim"]
CASES = [("scratch", m) for m in METHODS] + [("nni", m) for m in NNI] + [("tp", m) for m in TP]
ROUNDS = {"scratch": 10, "nni": 3, "tp": 5}


@pytest.mark.parametrize("name", ["lenet", "vgg", "resnet", "torchvision_resnet18"])
@pytest.mark.parametrize("backend, method", CASES)
def test_prune_time(benchmark, models, name, backend, method):
    model = models[name]
    pruned = benchmark.pedantic(
        lambda: prune(backend, model, method, scope=None), rounds=ROUNDS[backend], warmup_rounds=1
    )
    before, after = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in pruned.parameters())
    benchmark.extra_info.update(params_before=before, params_after=after)
    assert after < before or method == "level"  # level zeroes single weights: same shapes
    if (backend, method, name) == ("scratch", "conv_all", "torchvision_resnet18"):
        assert benchmark.stats.stats.median < 0.1, (
            f"scratch pruning of resnet18 took {benchmark.stats.stats.median:.3f} s (budget 0.1 s)"
        )
