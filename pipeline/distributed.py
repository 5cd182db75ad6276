"""Several processes, one or many machines: torch.distributed as torchrun starts it, DistributedDataParallel for training.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each process it starts; this module reads
them, joins the process group (gloo on the CPU, nccl on CUDA) and offers the few collectives the job needs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import UsageError
from .runtime import Runtime

JOIN_TIMEOUT_S = 120  # how long a process waits for the others at a collective before giving up with a message


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: torch.device, timeout_s: float = JOIN_TIMEOUT_S) -> tuple[int, int, torch.device]:
    """Join the process group torchrun set up; returns (rank, world size, this process's device).

    A master that cannot be reached within `timeout_s` is one clear error, not an endless wait.
    """
    rank, world_size, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"process {rank} is local rank {local_rank} but this node has {torch.cuda.device_count()} CUDA device(s); "
                             "use --nproc_per_node no larger than that")  # fmt: skip
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            with _native_stderr_silenced():
                dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as error:  # DistStoreError (a RuntimeError): the master's store did not answer in time
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise UsageError(f"process {rank} could not join the job's process group at {where} within {timeout_s:g} s "
                             f"({type(error).__name__}); check --master_addr / --master_port and that rank 0 is running") from None  # fmt: skip
    return rank, world_size, device


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """c10d's C++ side logs every failed connection attempt straight to file descriptor 2; the one-line error says it instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as sink:
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(runtime: Runtime) -> None:
    """Everyone waits here: rank 0 has finished writing what the others are about to read."""
    if runtime.distributed:
        dist.barrier()


def data_parallel(model: nn.Module, runtime: Runtime) -> nn.Module:
    """DDP over `model`: gradients are averaged across processes in backward.

    With sync_bn, DDP wraps a SyncBatchNorm view of the model whose layers share the model's own parameters and
    running statistics, so training it trains `model`, which keeps its plain BatchNorms for snapshots and pruning.
    """
    trained = nn.SyncBatchNorm.convert_sync_batchnorm(model) if runtime.sync_bn else model
    return DistributedDataParallel(trained, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)


def _collective_tensor(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    return values.to(runtime.device) if runtime.device.type == "cuda" else values.clone()  # nccl reduces CUDA tensors only


def all_reduce_sum(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    reduced = _collective_tensor(values, runtime)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.cpu()


def all_reduce_max(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    reduced = _collective_tensor(values, runtime)
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    return reduced.cpu()


def average_gradients(parameters: list[nn.Parameter], runtime: Runtime) -> None:
    """What DDP does for the model, for parameters outside it (feature distillation's projections)."""
    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
            parameter.grad.div_(runtime.world_size)
