"""Batch-1 and batch-64 latency of dense vs pruned models per backend (python -m pytest bench/benchmarks/test_latency.py
--benchmark-enable -s).

Timed the way the harness times every cell (bench.cell.latency_figures: the deployable form with BatchNorm
folded, channels_last as deployed and NCHW beside it, inference mode, warm-up, median of 20 interleaved runs, the
harness's thread count), in BLOCKS separate blocks: one block's speedup varies by about +-10% on this shared machine, so
the target is checked on the median block and the spread is reported. Target: at 50% of channels the zoo vgg and resnet
run at least 0.9 x as much faster at batch 64 as their MAC reduction predicts, for every backend that prunes physically.
torchvision's resnet18 is reported only: at 32x32 its last stage runs on 1x1 maps, where per-op overhead sets the time.
"""

from __future__ import annotations

import statistics

import pytest

from bench.cell import latency_figures
from bench.matrix import MatrixSpec
from pipeline.deploy.metrics import count_macs

from .inputs import L1, X, prune

SPEC = MatrixSpec()  # the harness defaults: thread count and runs
BLOCKS = 5


@pytest.mark.parametrize("backend", ["scratch", "nni"])
@pytest.mark.parametrize("name", ["vgg", "resnet", "torchvision_resnet18"])
def test_pruned_latency(benchmark, models, name, backend):
    dense = models[name]
    pruned = prune(backend, dense, L1[backend])
    mac_ratio = count_macs(dense, X) / count_macs(pruned, X)
    blocks = benchmark.pedantic(lambda: [latency_figures(SPEC, dense, pruned, X[:1]) for _ in range(BLOCKS)], rounds=1)
    speedups = sorted(block["speedup_b64"] for block in blocks)
    figures = min(blocks, key=lambda block: abs(block["speedup_b64"] - statistics.median(speedups)))  # the median block
    benchmark.extra_info.update(figures, mac_ratio=mac_ratio, threads=SPEC.threads, speedup_b64_blocks=speedups)
    print(
        f"\n{name} {backend}, {SPEC.threads} thread(s), median of {BLOCKS} blocks: batch 1 "
        f"{figures['latency_b1_before_ms']:.2f} -> {figures['latency_b1_after_ms']:.2f} ms "
        f"({figures['speedup_b1']:.2f}x); batch 64 {figures['latency_b64_before_ms']:.1f} -> "
        f"{figures['latency_b64_after_ms']:.1f} ms ({figures['speedup_b64']:.2f}x, blocks "
        f"{speedups[0]:.2f}-{speedups[-1]:.2f}) for a {mac_ratio:.2f}x MAC reduction = "
        f"{figures['speedup_b64'] / mac_ratio:.2f} of it (channels_last); NCHW: batch 64 "
        f"{figures['latency_b64_before_ms_nchw']:.1f} -> {figures['latency_b64_after_ms_nchw']:.1f} ms "
        f"({figures['speedup_b64_nchw']:.2f}x = {figures['speedup_b64_nchw'] / mac_ratio:.2f} of it)"
    )
    if name != "torchvision_resnet18":
        assert figures["speedup_b64"] >= 0.9 * mac_ratio, (
            f"{name}/{backend}: batch-64 speedup {figures['speedup_b64']:.2f} < 0.9 x {mac_ratio:.2f}"
        )
