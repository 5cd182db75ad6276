"""torchrun / DistributedDataParallel on this CPU with two gloo processes (#13): gradients, the whole job, a lost
process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from models import build_model
from pipeline.data.datasets import load_dataset
from pipeline.snapshots import load_model
from pipeline.train.loop import evaluate, train
from pipeline.train.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
QUICK = [
    "--num_epochs",
    "1",
    "--limit_batches",
    "4",
    "--batch_size_per_device",
    "16",
    "--val_batch_size_per_device",
    "64",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _one_ddp_step(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        data = load_dataset("digits")
        torch.manual_seed(0)
        model = build_model("dnn_2", data.input_shape, data.num_classes)
        train(
            model,
            data,
            epochs=1,
            batch_size=16,
            val_batch_size=256,
            lr=0.1,
            optimizer_name="sgd",
            seed=0,
            limit_batches=1,
            limit_val_batches=1,
            runtime=Runtime(rank=rank, world_size=2),
        )
        if rank == 0:
            torch.save(model.state_dict(), out)
    finally:
        dist.destroy_process_group()


def test_each_epoch_shards_a_new_permutation_and_every_process_agrees_on_it():
    data = load_dataset("digits")
    loaders = [data.loader("train", 16, torch.Generator().manual_seed(0), shard=(rank, 2, 0)) for rank in (0, 1)]
    epochs = []
    for epoch in (0, 1):
        for loader in loaders:
            loader.set_epoch(epoch)
        shares = []
        for rank, loader in enumerate(loaders):
            expected = DistributedSampler(
                range(len(data.train_labels)), num_replicas=2, rank=rank, shuffle=True, seed=0
            )
            expected.set_epoch(epoch)
            labels = torch.cat([batch for _, batch in loader])
            assert torch.equal(labels, data.train_labels[list(expected)])
            shares.append(labels)
        epochs.append(torch.cat(shares))
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled between epochs


def test_one_ddp_step_of_two_processes_equals_one_process_on_both_batches(tmp_path):
    out = tmp_path / "ddp.pt"
    # spawn, not fork: a process forked after torch has started its thread pools can hang in them
    mp.start_processes(_one_ddp_step, args=(free_port(), str(out)), nprocs=2, start_method="spawn")
    data = load_dataset("digits")
    # the 32 images the two processes took: each the first 16 of its DistributedSampler share (epoch 0, seed 0)
    shares = [
        list(DistributedSampler(range(len(data.train_labels)), num_replicas=2, rank=rank, shuffle=True, seed=0))[:16]
        for rank in (0, 1)
    ]
    chosen = torch.tensor(shares[0] + shares[1])
    torch.manual_seed(0)
    single = build_model("dnn_2", data.input_shape, data.num_classes)
    optimizer = torch.optim.SGD(single.parameters(), lr=0.1)
    F.cross_entropy(single(data.normalize(data.train_images[chosen])), data.train_labels[chosen]).backward()
    optimizer.step()
    distributed = torch.load(out)
    assert all(torch.allclose(distributed[k], v, atol=1e-6, rtol=0) for k, v in single.state_dict().items())
    assert not torch.equal(
        distributed["classifier.weight"], build_model("dnn_2", data.input_shape, data.num_classes).classifier.weight
    )


def torchrun(
    tmp_path: Path, *flags: str, processes: int = 2, wait: bool = True, **kwargs
) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [
        *TORCHRUN,
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(free_port()),
        str(ROOT / "run.py"),
        *flags,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if wait:
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def written(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()}


def test_torchrun_job_writes_what_one_process_writes_and_its_figures_are_exact(tmp_path):
    (tmp_path / "single").mkdir()
    (tmp_path / "two").mkdir()
    single = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--model", "lenet", "--step", "123", *QUICK],
        cwd=tmp_path / "single",
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    done = torchrun(tmp_path / "two", "--model", "lenet", "--step", "123", *QUICK)
    assert done.returncode == 0, done.stderr
    assert written(tmp_path / "two") == written(tmp_path / "single")  # rank 0 wrote everything, once
    assert done.stdout.count("| 3 refined") == 1  # one table, printed by rank 0
    results = json.loads((tmp_path / "two/output/results/results_lenet_digits_prune_model.json").read_text())
    assert results["measured_on"]["processes"] == 2
    # the snapshot loads in a single process, and the accuracy two processes reduced is that model's exact figure
    model, meta = load_model(tmp_path / "two/output/snapshots/lenet/digits/model_refine", "lenet", "digits")
    assert meta["stage"] == "model_refine"
    assert evaluate(model, load_dataset("digits"), 64).top1 == pytest.approx(results["accuracy"], abs=1e-6)
    epochs = (tmp_path / "two/log/log_lenet_digits_base_model.txt").read_text().splitlines()
    assert len(epochs) == 1 and epochs[0].startswith("epoch0 top_1_accuracy")  # one writer


def _rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """The worker processes torchrun started, by their RANK."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        ranks = [item for item in environ if item.startswith(b"RANK=")]
        if parent == launcher.pid and ranks:
            found[int(ranks[0][5:])] = int(entry.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc (Linux)")
def test_a_killed_process_ends_the_job_with_a_message_and_no_half_written_snapshot(tmp_path):
    launcher = torchrun(
        tmp_path,
        "--model",
        "lenet",
        "--step",
        "123",
        "--num_epochs",
        "40",
        "--limit_batches",
        "20",
        "--batch_size_per_device",
        "16",
        wait=False,
    )
    logs = tmp_path / "log"  # the refine log is written to a staging file until step 3 completes

    def refining() -> bool:
        return (
            any(p.read_text() for p in logs.glob(".log_lenet_digits_prune_model.txt.staging-*"))
            if logs.is_dir()
            else False
        )

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not refining():  # steps 1 and 2 saved, step 3 under way
        assert launcher.poll() is None, launcher.communicate()[1]
        time.sleep(0.2)
    assert time.monotonic() < deadline and launcher.poll() is None, (
        "the job must still be refining when a process is killed"
    )
    os.kill(_rank_pids(launcher)[1], signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert (
        "another process of this job failed or stopped" in err
        or "interrupted; snapshots already written are complete" in err
    )
    snapshots = tmp_path / "output/snapshots/lenet/digits"
    # no staging folder, no refine snapshot of an unfinished step
    assert {p.name for p in snapshots.iterdir()} == {"model_base", "model_prune"}
    for name in ("model_base", "model_prune"):  # what was written is whole
        load_model(snapshots / name, "lenet", "digits")
    assert not (logs / "log_lenet_digits_prune_model.txt").exists()  # the unfinished step left no log


def test_bad_input_every_process_meets_is_said_once_by_rank_0(tmp_path):
    done = torchrun(tmp_path, "--data_type", "cifar10", "--data_dir", str(tmp_path / "nothing-here"), *QUICK)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "cifar10" in ours[0], done.stderr
    assert "[rank1]" not in done.stderr and "[rank0]" not in done.stderr  # no worker printed a traceback
    assert not (tmp_path / "output").exists() and not (tmp_path / "log").exists()


def test_sync_batchnorm_view_trains_the_models_own_tensors_and_leaves_its_batchnorms():
    from pipeline.train.distributed import _sync_batchnorm_view

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    view = _sync_batchnorm_view(model, None)
    assert isinstance(view[1], torch.nn.SyncBatchNorm) and type(model[1]) is torch.nn.BatchNorm2d
    assert (
        view[1].weight is model[1].weight
        and view[1].running_mean is model[1].running_mean
        and view[0].weight is model[0].weight
    )
    view.train()
    model.eval()
    view(torch.randn(2, 3, 8, 8)).sum().backward()  # without a process group SyncBatchNorm computes plain batch norm
    assert int(model[1].num_batches_tracked) == 1 and not torch.equal(model[1].running_mean, torch.zeros(4))
    assert model[0].weight.grad is not None and not model[1].training  # the view's modes are its own


def test_a_master_that_cannot_be_reached_is_one_line_after_a_bounded_wait(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "WORLD_SIZE": "2",
        "RANK": "1",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--join_timeout", "3", *QUICK],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and time.monotonic() - started < 60
    assert (
        done.stderr.startswith("error: process 1 could not join the job's process group at 127.0.0.1:")
        and done.stderr.count("\n") == 1
    )
    assert "Traceback" not in done.stderr and not any(tmp_path.iterdir())


def test_the_originals_flags_print_the_torchrun_commands(tmp_path, capsys):
    import run

    assert (
        run.main(
            [
                "--gpu_num_per_node",
                "4",
                "--num_nodes",
                "2",
                "--node_ips",
                "10.0.0.1,10.0.0.2",
                "--model",
                "vgg",
                "--step",
                "123",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines[1]
        == "torchrun --nproc_per_node 4 --nnodes 2 --node_rank 0 --master_addr 10.0.0.1 --master_port 29500 run.py "
        "--model vgg --step 123    # on 10.0.0.1"
    )
    assert lines[2].startswith("torchrun --nproc_per_node 4 --nnodes 2 --node_rank 1 --master_addr 10.0.0.1") and lines[
        2
    ].endswith("# on 10.0.0.2")
    assert run.main(["--num_nodes", "2", "--node_ips", "10.0.0.1"]) == 2
    assert "--num_nodes 2 needs --node_ips with 2 comma-separated addresses" in capsys.readouterr().err
