"""Fully connected nets of the original platform: the targets of the `neuron` operator."""

from __future__ import annotations

import torch
from torch import nn

from .common import check_input_shape


class DNN(nn.Module):
    """in -> hidden... -> classes, ReLU between layers; `classifier` is the output layer."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        channels, height, width = check_input_shape(f"dnn_{len(hidden) + 1}", input_shape, 1)
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        width_in = channels * height * width
        for units in hidden:
            layers += [nn.Linear(width_in, units), nn.ReLU(inplace=True)]
            width_in = units
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.flatten(x)))


def dnn_2(input_shape: tuple[int, int, int], num_classes: int) -> DNN:
    return DNN(input_shape, num_classes, (128,))


def dnn_4(input_shape: tuple[int, int, int], num_classes: int) -> DNN:
    return DNN(input_shape, num_classes, (4096, 256, 128))
