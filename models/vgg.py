"""VGG-16 with BatchNorm and the original platform's small classifier (512 -> 128 -> classes).

Pools use ceil mode so 28x28 (MNIST) survives five halvings; a global average
pool then gives 512 features for any size from 16 up.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import check_input_shape

MIN_SIZE = 16
VGG16_CFG: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


class VGG(nn.Module):
    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, cfg: tuple[int | str, ...] = VGG16_CFG
    ) -> None:
        super().__init__()
        channels, _, _ = check_input_shape("vgg", input_shape, MIN_SIZE)
        layers: list[nn.Module] = []
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [
                    nn.Conv2d(channels, int(item), 3, padding=1),
                    nn.BatchNorm2d(int(item)),
                    nn.ReLU(inplace=True),
                ]
                channels = int(item)
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(channels, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg(input_shape: tuple[int, int, int], num_classes: int) -> VGG:
    return VGG(input_shape, num_classes)
