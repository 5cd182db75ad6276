"""prune -> distil -> int8 targets on digits (python -m pytest bench/benchmarks/test_compression.py --benchmark-enable
-s, ~10 min).

* int8 (ptq) of the zoo vgg and resnet, trained on digits (run.py's default 8 epochs): size <= 0.27x of fp32, batch-64
  latency >= 2x faster than fp32 at the same architecture (BatchNorm folded, channels_last, as deployed; NCHW printed
  beside it; 2 threads, interleaved rounds), top-1 within 1 point.
* Distillation: vgg at 70% of channels removed (conv_all, layer scope), refined with and without the base model as
  teacher (logits only, and logits + feature maps through learned projections), same epochs, three seeds: mean +- std of
  each, reported with no target on the sign.
* NNI's quantizers beside the real int8 path, on the same refined vgg: top-1 of NNI's simulated int8 (ptq, qat, lsq; one
  epoch for the trained ones) against FX ptq / qat with real int8 kernels. Accuracy only: NNI's models are float.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

import pytest
import torch

from pipeline.config import JobConfig
from pipeline.data.datasets import load_dataset
from pipeline.deploy import quantize
from pipeline.deploy.latency import latency_by_layout
from pipeline.deploy.metrics import DEPLOYED_LAYOUT, deployable, model_size_mb
from pipeline.job import Job
from pipeline.train.loop import evaluate


def trained_base(name: str, tmp_path, seed: int = 0) -> tuple[Job, torch.nn.Module]:
    config = JobConfig(
        model=name,
        data_type="digits",
        seed=seed,
        save_dir=str(tmp_path / "snapshots"),
        log_dir=str(tmp_path / "log"),
        result_dir=str(tmp_path / "results"),
        echo_epochs=False,
    )
    job = Job(config, load_dataset("digits"))
    job.run("1")
    return job, job.models["1"]


@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_int8_size_speed_and_accuracy(benchmark, tmp_path, name):
    job, model = trained_base(name, tmp_path)
    data, example = job.data, job.data.example_input(1)
    generator = torch.Generator().manual_seed(0)
    calibration = [images for images, _ in data.batches("train", 32, generator, 8)]
    quantized = benchmark.pedantic(lambda: quantize.post_training(model, calibration, example), rounds=1, iterations=1)
    fp32, int8 = evaluate(model, data, 256), evaluate(quantized, data, 256)
    measured = latency_by_layout(deployable(model), deployable(quantized), example_input=example, batch=64, threads=2)
    size_ratio, speedup, drop = (
        model_size_mb(quantized) / model_size_mb(model),
        measured[DEPLOYED_LAYOUT].speedups[0].value,
        fp32.top1 - int8.top1,
    )
    per_layout = {
        layout: f"{m.timings[0].median * 1e3:.1f} -> {m.timings[1].median * 1e3:.1f} ms ({m.speedups[0].value:.2f}x)"
        for layout, m in measured.items()
    }
    benchmark.extra_info.update(
        size_ratio=round(size_ratio, 3),
        speedup_b64=round(speedup, 2),
        fp32_top1=fp32.top1,
        int8_top1=int8.top1,
        batch64_by_layout=per_layout,
    )
    print(
        f"\n{name}: int8 size {size_ratio:.3f}x, batch-64 "
        + "; ".join(f"{layout} {text}" for layout, text in per_layout.items())
        + f", top-1 {fp32.top1:.4f} -> {int8.top1:.4f}"
    )
    assert size_ratio <= 0.27 and speedup >= 2.0 and drop <= 0.01


def test_distillation_against_plain_refine_over_three_seeds(benchmark, tmp_path):
    plain, distilled, features = [], [], []

    def refine_both() -> None:
        for seed in range(3):
            job, _ = trained_base("vgg", tmp_path / f"seed{seed}", seed)
            # global L1 at 0.7 collapses vgg on digits
            job.config = replace(job.config, percent=0.7, method="conv_all", scope="layer")
            job.run("2")
            for distill, kd_features, scores in (
                (False, None, plain),
                (True, None, distilled),
                (True, "auto", features),
            ):
                job.config = replace(job.config, distill=distill, kd_features=kd_features)
                scores.append(job.step_refine()["accuracy"])

    benchmark.pedantic(refine_both, rounds=1, iterations=1)
    summary = {
        label: (statistics.mean(s), statistics.stdev(s))
        for label, s in (("plain", plain), ("kd", distilled), ("kd_features", features))
    }
    benchmark.extra_info.update({f"{label}_top1": [round(m, 4), round(s, 4)] for label, (m, s) in summary.items()})
    print(
        f"\nvgg 70% channels removed, refined {job_epochs()} epochs: plain {summary['plain'][0]:.4f} +- "
        f"{summary['plain'][1]:.4f}, KD {summary['kd'][0]:.4f} +- {summary['kd'][1]:.4f}, KD + features "
        f"{summary['kd_features'][0]:.4f} +- {summary['kd_features'][1]:.4f} (seeds 0-2; per seed plain {plain}, KD "
        f"{distilled}, KD + features {features})"
    )


def job_epochs() -> int:
    return JobConfig(data_type="digits").epochs("3")


def test_nni_simulated_int8_beside_real_int8(benchmark, tmp_path):
    pytest.importorskip("nni")
    job, _ = trained_base("vgg", tmp_path)
    job.config = replace(job.config, percent=0.5, method="conv_all", scope="layer")
    job.run("23")
    top1: dict[str, float] = {"fp32 refined": job.rows[-1]["top-1"]}

    def quantize_all() -> None:
        for mode in ("ptq", "qat", "nni-ptq", "nni-qat", "nni-lsq"):
            job.config = replace(job.config, quantize=mode)
            top1[mode] = job.step_quantize()["accuracy"]

    benchmark.pedantic(quantize_all, rounds=1, iterations=1)
    benchmark.extra_info.update({mode: round(value, 4) for mode, value in top1.items()})
    print("\nvgg conv_all 0.5, refined, top-1: " + ", ".join(f"{mode} {value:.4f}" for mode, value in top1.items()))
    assert abs(top1["nni-ptq"] - top1["fp32 refined"]) <= 0.02  # NNI's simulated ptq is a faithful int8 simulation
