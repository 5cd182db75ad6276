"""Sensitivity analysis: upstream reuse vs the straightforward scan
(python -m pytest bench/benchmarks/test_sensitivity_time.py --benchmark-enable -s, ~6 min).

Zoo vgg and resnet on digits (real 1x32x32 test images, 2 batches of 64), the default grid (0.1 .. 0.9) over every
prunable unit, conv_all ranking. The straightforward scan prunes the same models and runs each one whole; the
analysis reuses the values computed before each unit (recorded during the baseline evaluation). Both must give the
same numbers to the last digit. Timing is fair to both: one untimed round of each first (the first run of a new
layer shape pays oneDNN's kernel creation, whichever side meets it first), then two rounds alternating the two,
and the faster round of each (noise on this shared machine only ever adds time). The ratio is the figure the README
quotes; beside it the bound any exact reuse has: MACs of every model the straightforward scan evaluates (baseline
included) over MACs of the parts downstream of each unit.
"""

from __future__ import annotations

import time

import pytest
import torch

from algorithms import SensitivityAnalysis, prune_channels
from algorithms.graph import analyze
from algorithms.tracing import trace
from algorithms.upstream import split_graph
from models import build_model
from pipeline.analysis.layer_stats import layer_stats
from pipeline.data.datasets import load_dataset


def mac_bound(model: torch.nn.Module, example: torch.Tensor) -> float:
    """How much faster an exact reuse of upstream values can at most be, counting multiply-accumulates."""
    analysis = SensitivityAnalysis(model, lambda _: 0.0, example_input=example)
    graph, traced = analyze(model, example), trace(model)
    baseline = sum(row.macs for row in layer_stats(model, example))
    whole = downstream = baseline
    for layers in analysis._find_units(graph, None).values():
        split = split_graph(traced, analysis._changed_modules(layers, graph))
        changed_part = {str(node.target) for node in split.downstream.nodes if node.op == "call_module"}
        for sparsity in analysis.sparsities:
            pruned = prune_channels(model, "conv_all", {layers[0]: sparsity}, example, scope="layer", graph=graph).model
            rows = layer_stats(pruned, example)
            whole += sum(row.macs for row in rows)
            downstream += sum(row.macs for row in rows if row.name in changed_part)
    return whole / downstream


@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_sensitivity_scan_time(benchmark, name):
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model(name, data.input_shape, data.num_classes).eval()
    batches = list(data.batches("test", 64, limit=2))

    @torch.inference_mode()
    def top1(candidate: torch.nn.Module) -> float:
        candidate.eval()
        return sum(int((candidate(x).argmax(1) == y).sum()) for x, y in batches) / sum(len(y) for _, y in batches)

    def scan(reuse: bool) -> dict[str, dict[float, float]]:
        analysis = SensitivityAnalysis(
            model, top1, reuse_upstream=reuse, example_input=batches[0][0][:1], progress=False
        )
        return analysis.analysis(val_args=[model])

    plain_seconds: list[float] = []
    plain_results: list[dict[str, dict[float, float]]] = []

    def timed_plain_scan() -> None:  # pytest-benchmark's untimed setup: each reuse round follows a plain one
        started = time.perf_counter()
        plain_results.append(scan(False))
        plain_seconds.append(time.perf_counter() - started)

    reused = benchmark.pedantic(lambda: scan(True), setup=timed_plain_scan, rounds=2, warmup_rounds=1, iterations=1)
    plain, reuse = min(plain_seconds[1:]), benchmark.stats.stats.min
    ratio, bound = plain / reuse, mac_bound(model, batches[0][0][:1])
    benchmark.extra_info.update(
        straightforward_s=round(plain, 2),
        straightforward_cold_s=round(plain_seconds[0], 2),
        units=len(reused),
        points=sum(map(len, reused.values())),
        speedup=round(ratio, 2),
        mac_bound=round(bound, 2),
        threads=torch.get_num_threads(),
    )
    print(
        f"\n{name}: straightforward {plain:.1f} s (cold round {plain_seconds[0]:.1f} s), with upstream reuse "
        f"{reuse:.1f} s: {ratio:.2f}x (MAC bound {bound:.2f}x)"
    )
    assert all(result == reused for result in plain_results)  # the same numbers, to the last digit
    assert ratio > 1.3, f"upstream reuse gained only {ratio:.2f}x on {name}"
