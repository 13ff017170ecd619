"""The VGG family in plain torch, with torchvision's state_dict key names.

`features.{i}.weight/bias` for the convolutions, `classifier.{0,3,6}.weight/bias` for the
dense layers, so a torchvision `vgg16-*.pth` loads as it is. Random initialisation
follows torchvision: kaiming-normal (fan-out, ReLU gain) for convolutions, N(0, 0.01)
for linear layers, zero biases, which keeps activations at a realistic scale through
all layers.
"""

from __future__ import annotations

import torch
from torch import nn

CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, config: list[int | str], num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def init_like_torchvision(model: nn.Module, generator: torch.Generator) -> None:
    """kaiming-normal fan-out for Conv, N(0, 0.01) for Linear, zero biases (seeded)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            std = (2.0 / (m.out_channels * m.kernel_size[0] * m.kernel_size[1])) ** 0.5
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * std)
                if m.bias is not None:  # as torchvision's init: a Conv2d built with bias=False has none
                    m.bias.zero_()
        elif isinstance(m, nn.Linear):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * 0.01)
                m.bias.zero_()


def vgg(arch: str, num_classes: int = 1000, seed: int = 0) -> VGG:
    """A VGG of the named architecture with torchvision-style random weights."""
    model = VGG(CONFIGS[arch], num_classes=num_classes)
    init_like_torchvision(model, torch.Generator().manual_seed(seed))
    return model
