"""--device, --amp, --channels_last, --workers (#13): checks on this CPU; the CUDA ones skip here and say why."""

from __future__ import annotations

import json

import pytest
import torch

import run
from pipeline.data.datasets import load_dataset
from pipeline.errors import UsageError
from pipeline.snapshots import load_model
from pipeline.train.loop import evaluate
from pipeline.train.runtime import Runtime, check_amp, resolve_device
from tests.helpers import quick_run

QUICK = quick_run(limit_batches=3)
NO_CUDA = "no CUDA device on this machine: the GPU path is checked where one is (README, GPUs and clusters)"


def test_devices_resolve_and_impossible_ones_are_named(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="'tpu' is not a device"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="--device cuda: this machine has no usable CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError, match=r"--device cuda:7: this machine has 1 CUDA device\(s\), cuda:0 to cuda:0"):
        resolve_device("cuda:7")


def test_fp16_needs_cuda_and_bf16_runs_on_the_cpu():
    with pytest.raises(UsageError, match="--amp fp16 needs a CUDA device"):
        check_amp("fp16", torch.device("cpu"))
    check_amp("bf16", torch.device("cpu"))
    with pytest.raises(UsageError, match="unknown --amp 'int4'"):
        check_amp("int4", torch.device("cpu"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA device"),
        (["--device", "cuda:7"], "--device cuda:7: this machine has"),
        (["--workers", "-1"], "--workers must be 0 or more"),
        (["--device", "cpu", "--sync_bn"], "--sync_bn needs CUDA devices"),
    ],
)
def test_bad_device_requests_are_one_line_and_write_nothing(tmp_path, monkeypatch, capsys, flags, message):
    if flags[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    monkeypatch.chdir(tmp_path)
    assert run.main([*flags, *QUICK]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_bf16_channels_last_and_workers_train_and_say_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        run.main(
            [
                "--model",
                "lenet",
                "--step",
                "12",
                "--device",
                "cpu",
                "--amp",
                "bf16",
                "--channels_last",
                "--workers",
                "2",
                *QUICK,
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "output/results/results_lenet_digits_base_model.json").read_text())
    assert report["measured_on"] == {
        "device": "cpu",
        "dtype": "autocast bf16",
        "memory_format": "channels_last",
        "processes": 1,
    }
    model, _ = load_model(tmp_path / "output/snapshots/lenet/digits/model_base", "lenet", "digits")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast computes in bf16, the weights stay fp32
    exact = evaluate(model, load_dataset("digits"), 64, 1)
    assert abs(exact.top1 - report["accuracy"]) < 0.05  # bf16 rounding moves a few predictions at most


def test_data_loader_order_is_one_seeded_permutation_per_epoch_whatever_the_workers():
    data = load_dataset("digits")
    expected_generator = torch.Generator().manual_seed(4)
    expected = [torch.randperm(len(data.train_labels), generator=expected_generator)[:40] for _ in range(2)]
    for workers in (0, 2):
        generator = torch.Generator().manual_seed(4)
        loader = data.loader("train", 20, generator, limit=2, workers=workers)
        for epoch in range(2):
            labels = torch.cat([batch_labels for _, batch_labels in loader])
            assert torch.equal(labels, data.train_labels[expected[epoch]])
        assert len(loader) == 2


def test_test_split_shards_cover_every_image_once():
    data = load_dataset("digits")
    seen = [torch.cat([labels for _, labels in data.loader("test", 64, shard=(rank, 3, 0))]) for rank in range(3)]
    assert sum(len(s) for s in seen) == len(data.test_labels)
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.sort(data.test_labels).values)


def test_runtime_places_models_and_batches_in_channels_last():
    runtime = Runtime(channels_last=True)
    model = runtime.place(torch.nn.Conv2d(3, 4, 3))
    assert model.weight.is_contiguous(memory_format=torch.channels_last)
    assert runtime.inputs(torch.randn(2, 3, 8, 8)).is_contiguous(memory_format=torch.channels_last)
    assert runtime.inputs(torch.randn(2, 3)).shape == (2, 3)  # vectors pass through


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_job_trains_prunes_refines_and_its_snapshots_load_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        run.main(["--model", "resnet", "--step", "123", "--device", "cuda", "--amp", "bf16", "--channels_last", *QUICK])
        == 0
    )
    report = json.loads((tmp_path / "output/results/results_resnet_digits_prune_model.json").read_text())
    assert report["measured_on"]["device"].startswith("cuda")
    model, _ = load_model(tmp_path / "output/snapshots/resnet/digits/model_refine", "resnet", "digits")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert abs(evaluate(model, load_dataset("digits"), 64, 1).top1 - report["accuracy"]) < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_fp16_uses_a_grad_scaler_and_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run.main(["--model", "vgg", "--step", "1", "--device", "cuda", "--amp", "fp16", *QUICK]) == 0
    report = json.loads((tmp_path / "output/results/results_vgg_digits_base_model.json").read_text())
    # trained through the scaler, not diverged
    assert report["measured_on"]["dtype"] == "autocast fp16" and report["accuracy"] > 0.1


GPU_PRUNING = [
    ("scratch", "conv_all"),
    ("scratch", "bn"),
    ("scratch", "conv_similarity"),
    ("scratch", "random"),
    ("nni", "l1"),
    ("nni", "slim"),
    ("nni", "taylor"),
    ("tp", "l1"),
    ("tp", "taylor"),
    ("tp", "slim"),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("backend, method", GPU_PRUNING)
def test_every_backend_prunes_a_model_that_lives_on_the_gpu(backend, method, monkeypatch):
    """The pruned model stays on the GPU, keeps what the same call keeps on the CPU, and computes what that one
    computes."""
    # full fp32 on the GPU too, so 1e-4 measures pruning, not TF32
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    import copy

    from backends import get_backend
    from tests.helpers import relative_error, zoo

    if backend in ("nni", "tp"):
        pytest.importorskip({"nni": "nni", "tp": "torch_pruning"}[backend])
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 10
    options = {} if backend == "scratch" else {"train_batches": lambda: [(x, labels)], "training_steps": 2}
    results = {}
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(zoo("resnet")).to(device)
        results[device] = get_backend(backend).prune(
            model, method, 0.5, x.to(device), scope="layer", round_to=8, **options
        )
        pruned = results[device].model
        assert all(t.device.type == device for t in [*pruned.parameters(), *pruned.buffers()])
    cpu, cuda = results["cpu"], results["cuda"]
    # what trains while pruning differs in the last bits between devices
    if method not in ("taylor", "slim") or backend == "scratch":
        assert cuda.kept == cpu.kept
        with torch.no_grad():
            assert relative_error(cuda.model.eval()(x.cuda()).cpu(), cpu.model.eval()(x)) < 1e-4
