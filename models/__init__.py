"""The model zoo: a name -> constructor dict; every model is built for a dataset's shape."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .alexnet import alexnet
from .common import InputTooSmallError
from .dnn import dnn_2, dnn_4
from .lenet import lenet
from .resnet import resnet
from .vgg import vgg

MODEL_BUILDERS: dict[str, Callable[[tuple[int, int, int], int], nn.Module]] = {
    "dnn_2": dnn_2,
    "dnn_4": dnn_4,
    "lenet": lenet,
    "alexnet": alexnet,
    "vgg": vgg,
    "resnet": resnet,
}
MODEL_NAMES: tuple[str, ...] = tuple(MODEL_BUILDERS)


def build_model(name: str, input_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10) -> nn.Module:
    """Build a zoo model for images of `input_shape` (C, H, W) and `num_classes` outputs."""
    if name not in MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return MODEL_BUILDERS[name](tuple(int(d) for d in input_shape), int(num_classes))


__all__ = ["MODEL_NAMES", "MODEL_BUILDERS", "build_model", "InputTooSmallError"]
