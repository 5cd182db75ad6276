"""Where and how the job computes: device, mixed precision, memory format, data-loading workers, process group.

One frozen record that the train / evaluate loops and the job read, so a flag such as --amp reaches every forward
without every function growing another parameter. Defaults are exact fp32 on the CPU, one process.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.errors import UsageError

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(text: str) -> torch.device:
    """auto = the first CUDA device when there is one, else the CPU; cuda / cuda:N checked against what this machine
    has."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UsageError(f"--device {text}: only cpu and cuda devices are supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UsageError(
            f"--device {text}: this machine has no usable CUDA device (torch.cuda.is_available() is False); use "
            "--device cpu or auto"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise UsageError(f"--device {text}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


def check_amp(amp: str, device: torch.device) -> None:
    if amp not in AMP_DTYPES:
        raise UsageError(f"unknown --amp {amp!r}; choose one of: {', '.join(AMP_DTYPES)}")
    if amp == "fp16" and device.type != "cuda":
        raise UsageError(
            "--amp fp16 needs a CUDA device (the CPU autocasts to bf16 only); use --amp bf16 or --device cuda"
        )


def float32_name(device: torch.device) -> str:
    """What "fp32" means on `device`: CUDA runs convolutions in TF32 by default on GPUs that have it (PyTorch's
    cudnn.allow_tf32)."""
    return (
        "float32 (TF32 convolutions allowed)"
        if device.type == "cuda" and torch.backends.cudnn.allow_tf32
        else "float32"
    )


def synchronize(device: torch.device) -> None:
    """CUDA runs asynchronously: a timer must wait for the queued kernels, or it times the launch, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Runtime:
    """The compute settings of one process of the job."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: str = "off"
    channels_last: bool = False
    workers: int = 0  # DataLoader worker processes (0: load in the training process)
    rank: int = 0
    world_size: int = 1
    sync_bn: bool = False  # BatchNorm statistics over every process's batch (SyncBatchNorm; CUDA only)
    # the process group of the job's training collectives (torch.distributed), when there are several processes
    group: Any = None
    wait_group: Any = None  # the same processes, for barriers that wait while rank 0 works alone (a longer timeout)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes every file; the others compute and wait."""
        return self.rank == 0

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def place(self, model: nn.Module) -> nn.Module:
        """The model on this device, in this memory format (in place, as nn.Module.to is)."""
        return model.to(self.device, memory_format=torch.channels_last) if self.channels_last else model.to(self.device)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """A batch on this device, in this memory format; copied asynchronously from pinned memory on CUDA."""
        if self.channels_last and images.ndim == 4:
            return images.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return images.to(self.device, non_blocking=True)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision for the forward passes inside (loss included); a no-op when --amp is off."""
        dtype = AMP_DTYPES[self.amp]
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16 gradients underflow without loss scaling; bf16 and fp32 need none (the scaler is then a no-op)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")

    def describe(self) -> dict[str, Any]:
        """What a results JSON records next to the figures measured under these settings."""
        return {
            "device": str(self.device),
            "dtype": float32_name(self.device) if self.amp == "off" else f"autocast {self.amp}",
            "memory_format": "channels_last" if self.channels_last else "contiguous (NCHW)",
            "processes": self.world_size,
        }


CPU = Runtime()
