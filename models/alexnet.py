"""CIFAR AlexNet with BatchNorm (96, 256, 384, 384, 256; FC 4096, 4096).

Three 2x2 max-pools, then an adaptive 2x2 average pool, so the FC input is
256*2*2 for every image size from 16 upwards (the FC layer sees a 2x2 map: the
flatten-with-spatial-size case that pruning has to handle).
"""

from __future__ import annotations

import torch
from torch import nn

from .common import check_input_shape

MIN_SIZE = 16


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class AlexNet(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, _, _ = check_input_shape("alexnet", input_shape, MIN_SIZE)
        self.features = nn.Sequential(
            *_conv_bn(channels, 96),
            nn.MaxPool2d(2),
            *_conv_bn(96, 256),
            nn.MaxPool2d(2),
            *_conv_bn(256, 384),
            *_conv_bn(384, 384),
            *_conv_bn(384, 256),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(256 * 2 * 2, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def alexnet(input_shape: tuple[int, int, int], num_classes: int) -> AlexNet:
    return AlexNet(input_shape, num_classes)
