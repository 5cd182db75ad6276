"""Several processes, one or many machines: torch.distributed as torchrun starts it, DistributedDataParallel for
training.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each process it starts; this module reads
them, joins the process group (gloo on the CPU, nccl on CUDA) and offers the few collectives the job needs. It also
turns the original platform's launcher flags into the torchrun command lines that do the same.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import shlex
import sys
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.errors import UsageError
from pipeline.train.runtime import Runtime

JOIN_TIMEOUT_S = 120  # how long a process waits to join the others before giving up with a message
# How long a training collective (DDP, the metric reductions) may wait for a slow process before failing.
COLLECTIVE_TIMEOUT_S = 30 * 60
# How long a process waits at a barrier while rank 0 prunes or quantizes alone (a CPU QAT epoch on CIFAR takes long).
# A process that dies does not make the others wait this long: torchrun stops them, and gloo reports a closed peer.
WAIT_TIMEOUT_S = 6 * 3600
LAUNCHER_FLAGS = ("--gpu_num_per_node", "--num_nodes", "--node_ips")
MASTER_PORT = 29500


def launched_by_torchrun() -> bool:
    """torchrun (or a user following its protocol) set up more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: torch.device, timeout_s: float = JOIN_TIMEOUT_S) -> tuple[int, int, torch.device, Any, Any]:
    """Join the processes torchrun started; returns (rank, world size, this process's device, the group for training
    collectives, the group for barriers).

    A master that cannot be reached within `timeout_s` is one clear error, not an endless wait. The job's collectives
    run in groups of their own with longer timeouts, so a slow step of rank 0's does not count as a failure. Each group
    meets once here, while every process is present: NCCL connects a group at its first collective.
    """
    rank, world_size, local_rank = (
        int(os.environ["RANK"]),
        int(os.environ["WORLD_SIZE"]),
        int(os.environ.get("LOCAL_RANK", "0")),
    )
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"process {rank} is local rank {local_rank} but this node has {torch.cuda.device_count()} CUDA "
                "device(s); use --nproc_per_node no larger than that"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            with _native_stderr_silenced():
                dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except (
            RuntimeError,
            ValueError,
        ) as error:  # DistStoreError (a RuntimeError): the master's store did not answer in time
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise UsageError(
                f"process {rank} could not join the job's process group at {where} within {timeout_s:g} s "
                f"({type(error).__name__}); check --master_addr / --master_port and that rank 0 is running"
            ) from None
    groups = [
        dist.new_group(timeout=datetime.timedelta(seconds=seconds))
        for seconds in (COLLECTIVE_TIMEOUT_S, WAIT_TIMEOUT_S)
    ]
    for group in groups:
        dist.barrier(group=group)
    return rank, world_size, device, groups[0], groups[1]


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """c10d's C++ side logs every failed connection attempt straight to file descriptor 2; the one-line error says it
    instead."""
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
    """Tear the process group down (torch warns at exit otherwise)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def peer_failed(error: BaseException) -> bool:
    """A collective failed because another process went away (gloo raises a plain RuntimeError naming itself)."""
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(word in str(error) for word in ("gloo", "NCCL", "closed by peer"))
    )


def barrier(runtime: Runtime) -> None:
    """Everyone waits here: rank 0 has finished writing what the others are about to read."""
    if runtime.distributed:
        dist.barrier(group=runtime.wait_group)


def data_parallel(model: nn.Module, runtime: Runtime) -> nn.Module:
    """DDP over `model`: gradients are averaged across processes in backward.

    With sync_bn, DDP wraps a view of the model whose BatchNorms are SyncBatchNorms holding the model's own parameters
    and running statistics: training the view trains `model`, which keeps its plain BatchNorms for snapshots, pruning,
    int8 fusion and deployment.
    """
    trained = _sync_batchnorm_view(model, runtime.group) if runtime.sync_bn else model
    return DistributedDataParallel(
        trained,
        device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
        process_group=runtime.group,
    )


def _sync_batchnorm_view(module: nn.Module, group: Any) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, group)  # a new module around the same tensors
    # shares the parameter and buffer tables (so the tensors) and the hook tables (a hook on the model fires in the
    # view);
    # gets its own child table below, so the model's children stay as they are
    view = copy.copy(module)
    view._modules = OrderedDict(
        (name, None if child is None else _sync_batchnorm_view(child, group)) for name, child in module._modules.items()
    )
    return view


def _collective_tensor(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    # nccl reduces CUDA tensors only
    return values.to(runtime.device) if runtime.device.type == "cuda" else values.clone()


def _all_reduced(values: torch.Tensor, runtime: Runtime, op: Any) -> torch.Tensor:
    reduced = _collective_tensor(values, runtime)
    dist.all_reduce(reduced, op=op, group=runtime.group)
    return reduced.cpu()


def all_reduce_sum(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """The element-wise sum over every process (every process gets it)."""
    return _all_reduced(values, runtime, dist.ReduceOp.SUM)


def all_reduce_max(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """The element-wise maximum over every process (every process gets it)."""
    return _all_reduced(values, runtime, dist.ReduceOp.MAX)


def average_gradients(parameters: list[nn.Parameter], runtime: Runtime) -> None:
    """What DDP does for the model, for parameters outside it (feature distillation's projections)."""
    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM, group=runtime.group)
            parameter.grad.div_(runtime.world_size)


def broadcast_parameters(parameters: list[nn.Parameter], runtime: Runtime) -> None:
    """Every process starts from rank 0's values (what DDP does for the model when it wraps it)."""
    with torch.no_grad():
        for parameter in parameters:
            dist.broadcast(parameter.data, src=0, group=runtime.group)


def torchrun_commands(processes_per_node: int, nodes: int, node_ips: list[str], argv: list[str]) -> list[str]:
    """The original's --gpu_num_per_node / --num_nodes / --node_ips as the torchrun command line(s) that do the same."""
    if nodes > 1 and len(node_ips) != nodes:
        raise UsageError(
            f"--num_nodes {nodes} needs --node_ips with {nodes} comma-separated addresses (the first is the master), "
            f"got {len(node_ips)}"
        )
    rest, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in LAUNCHER_FLAGS:
            skip = True
        elif not token.startswith(tuple(f"{flag}=" for flag in LAUNCHER_FLAGS)):
            rest.append(token)
    command = f"torchrun --nproc_per_node {processes_per_node}"
    if nodes == 1:
        return [f"{command} run.py {shlex.join(rest)}".rstrip()]
    return [
        f"{command} --nnodes {nodes} --node_rank {rank} --master_addr {node_ips[0]} --master_port {MASTER_PORT} "
        f"run.py {shlex.join(rest)}".rstrip()
        + f"    # on {ip}"
        for rank, ip in enumerate(node_ips)
    ]
