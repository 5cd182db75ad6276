"""Pruning that a GPU can use (python -m pytest bench/benchmarks/test_gpu_latency.py --benchmark-enable -s; skipped
without CUDA).

torchvision resnet50 (10 classes, random weights: latency does not depend on them), 224x224, batch 128, channels_last as
deployed (NCHW printed beside it): dense vs pruned (scratch conv_all = L1, global 0.5) vs the same with every kept
channel count rounded up to a multiple of 8, in fp32 and in bf16. BatchNorm folded, as deployed; each run bracketed by
CUDA synchronisation, warm-up, median of 30 runs, the three models interleaved.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from backends import get_backend
from pipeline.deploy.latency import latency_by_layout
from pipeline.deploy.metrics import DEPLOYED_LAYOUT, count_macs, deployable

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine: run this file where there is one"
)
BATCH = 128


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dense_pruned_and_rounded_on_the_gpu(benchmark, dtype):
    torch.manual_seed(0)
    dense = torchvision.models.resnet50(num_classes=10).eval()
    example = torch.randn(2, 3, 224, 224)
    scratch = get_backend("scratch")
    pruned = scratch.prune(dense, "conv_all", 0.5, example, scope="global").model
    rounded = scratch.prune(dense, "conv_all", 0.5, example, scope="global", round_to=8).model
    macs = {
        name: count_macs(model, example) for name, model in (("dense", dense), ("pruned", pruned), ("rounded", rounded))
    }
    device = torch.device("cuda")
    models = [deployable(m).to(device, dtype=dtype) for m in (dense, pruned, rounded)]
    x = example[:1].to(device, dtype=dtype)
    layouts = benchmark.pedantic(
        lambda: latency_by_layout(*models, example_input=x, batch=BATCH), rounds=1, iterations=1
    )
    timings = [t.median for t in layouts[DEPLOYED_LAYOUT].timings]
    nchw = [t.median for t in layouts["contiguous"].timings]
    # paired per block: dense and each pruned model timed in turns
    speedups = dict(zip(("pruned", "rounded"), (s.value for s in layouts[DEPLOYED_LAYOUT].speedups), strict=True))
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        dtype=str(dtype),
        batch=BATCH,
        ms={n: round(t * 1e3, 3) for n, t in zip(macs, timings, strict=True)},
        mac_ratio={n: round(macs["dense"] / macs[n], 3) for n in ("pruned", "rounded")},
        speedup={n: round(s, 3) for n, s in speedups.items()},
        ms_nchw={n: round(t * 1e3, 3) for n, t in zip(macs, nchw, strict=True)},
    )
    print(
        f"\n{torch.cuda.get_device_name()} {dtype}, batch {BATCH}: dense {timings[0] * 1e3:.2f} ms; pruned "
        f"{timings[1] * 1e3:.2f} ms ({speedups['pruned']:.2f}x, MACs / {macs['dense'] / macs['pruned']:.2f}); rounded "
        f"to 8 {timings[2] * 1e3:.2f} ms ({speedups['rounded']:.2f}x, MACs / {macs['dense'] / macs['rounded']:.2f}); "
        f"NCHW: dense {nchw[0] * 1e3:.2f}, pruned {nchw[1] * 1e3:.2f}, rounded {nchw[2] * 1e3:.2f} ms"
    )
    assert speedups["pruned"] > 1.0 and speedups["rounded"] > 1.0
