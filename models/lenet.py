"""LeNet-5 with BatchNorm, as in the original platform; the first FC sees any spatial size."""

from __future__ import annotations

import torch
from torch import nn

from .common import check_input_shape, conv_out, pool_out

MIN_SIZE = 16  # two (5x5 conv, 2x2 pool) stages must leave at least 1x1


class LeNet(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = check_input_shape("lenet", input_shape, MIN_SIZE)
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5),
            nn.BatchNorm2d(6),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        out_h = pool_out(conv_out(pool_out(conv_out(height, 5)), 5))
        out_w = pool_out(conv_out(pool_out(conv_out(width, 5)), 5))
        self.classifier = nn.Sequential(
            nn.Linear(16 * out_h * out_w, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def lenet(input_shape: tuple[int, int, int], num_classes: int) -> LeNet:
    return LeNet(input_shape, num_classes)
