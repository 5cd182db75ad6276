"""Benchmarks of the pruning backends (run: python -m pytest bench --benchmark-enable -s).

Figures go to the README. Ratios are taken within one run: this machine is shared and noisy.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from backends import get_backend
from models import build_model
from pipeline.metrics import count_macs, measure_latency

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
METHOD = {"scratch": "conv_all", "nni": "l1"}  # the same L1 criterion on both backends
ROUNDS = {"scratch": 15, "nni": 3}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "torchvision_resnet18":
        return torchvision.models.resnet18(num_classes=10).eval()
    return build_model(name, (3, 32, 32), 10).eval()


def _prune(backend: str, model: torch.nn.Module) -> torch.nn.Module:
    return get_backend(backend).prune(model, METHOD[backend], 0.5, X, scope="layer").model.eval()


@pytest.mark.parametrize("backend", ["scratch", "nni"])
@pytest.mark.parametrize("name", ["torchvision_resnet18", "vgg"])
def test_prune_time(benchmark, backend, name):
    """Whole pruning call at 0.5, layer scope: scoring, selection and surgery / ModelSpeedup."""
    model = _model(name)
    pruned = benchmark.pedantic(lambda: _prune(backend, model), rounds=ROUNDS[backend], warmup_rounds=1)
    benchmark.extra_info["params_before"] = sum(p.numel() for p in model.parameters())
    benchmark.extra_info["params_after"] = sum(p.numel() for p in pruned.parameters())
    before, after = benchmark.extra_info["params_before"], benchmark.extra_info["params_after"]
    print(f"\n{backend} {name}: {benchmark.stats.stats.median * 1e3:.0f} ms, {before:,} -> {after:,} params")
    if backend == "scratch" and name == "torchvision_resnet18":
        assert benchmark.stats.stats.median < 0.1, f"scratch pruning of resnet18 took {benchmark.stats.stats.median:.3f} s (budget 0.1 s)"


@pytest.mark.parametrize("name", ["vgg", "resnet", "torchvision_resnet18"])
def test_pruned_latency(benchmark, name):
    """Batch-64 latency of dense, scratch-pruned and NNI-pruned models, timed in interleaved rounds.

    Measured with 1 thread (asserted: stable on this shared 2-core machine) and with 2
    threads (reported: the smaller pruned convs split less well over two threads, so the
    ratio drops by ~5% there, for NNI's identically shaped model too). The scratch-pruned zoo
    vgg and resnet must be at least 0.9 x as much faster as their MAC reduction predicts.
    torchvision's resnet18 is reported only: at 32x32 its last stage runs on 1x1 maps, where
    per-op overhead, not MACs, sets the time.
    """
    model = _model(name)
    scratch, nni = _prune("scratch", model), _prune("nni", model)
    mac_ratio = count_macs(model, X) / count_macs(scratch, X)
    figures = {}

    def measure() -> None:
        for threads in (1, 2):
            figures[threads] = measure_latency(model, scratch, nni, example_input=X, batch=64, runs=20, threads=threads)

    benchmark.pedantic(measure, rounds=1)
    for threads, (dense_s, scratch_s, nni_s) in figures.items():
        benchmark.extra_info[f"threads{threads}"] = {"dense_ms": dense_s * 1e3, "scratch_ms": scratch_s * 1e3, "nni_ms": nni_s * 1e3, "mac_ratio": mac_ratio}
        print(
            f"\n{name}, {threads} thread(s): batch-64 latency dense {dense_s * 1e3:.1f} ms, scratch {scratch_s * 1e3:.1f} ms "
            f"({dense_s / scratch_s:.2f}x), nni {nni_s * 1e3:.1f} ms ({dense_s / nni_s:.2f}x) for a {mac_ratio:.2f}x MAC reduction"
        )
    ratio = figures[1][0] / figures[1][1]
    if name != "torchvision_resnet18":
        assert ratio >= 0.9 * mac_ratio, f"{name}: 1-thread latency ratio {ratio:.2f} < 0.9 x MAC ratio {mac_ratio:.2f}"
