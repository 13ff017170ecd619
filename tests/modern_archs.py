"""Tiny modern CNNs for the modern model matrix (tests/test_matrix_modern.py): seeded, 3x32x32
input, <= 16 channels, BatchNorm where the real architecture has it (its parameters and running
statistics drawn at random, so no BN is the identity), a classifier head of CLASSES logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CLASSES = 5


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
            act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """Conv (no bias) - BatchNorm - activation (None: none), as torchvision writes them."""
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([act()] if act else []))


class SqueezeExcite(nn.Module):
    """GAP, 1x1 reduce, activation, 1x1 expand, gate, channel-wise Mul."""

    def __init__(self, channels: int, squeezed: int, act: type[nn.Module] = nn.ReLU, gate: type[nn.Module] = nn.Hardsigmoid):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.act = act()
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.gate = gate()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


class MobileNetV3(nn.Module):
    """Stem conv-BN-HardSwish (stride 2), an inverted residual (1x1 expand, depthwise 3x3, squeeze-excite
    with ReLU and HardSigmoid, 1x1 project, residual Add), a 1x1 conv-BN-HardSwish, GAP and the
    Linear-HardSwish-Dropout-Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, stride=2, act=nn.Hardswish)
        self.expand = conv_bn(8, 16, 1, act=nn.Hardswish)
        self.dw = conv_bn(16, 16, 3, groups=16, act=nn.Hardswish)
        self.se = SqueezeExcite(16, 4)
        self.project = conv_bn(16, 8, 1, act=None)
        self.last = conv_bn(8, 16, 1, act=nn.Hardswish)
        self.classifier = nn.Sequential(nn.Linear(16, 16), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(16, CLASSES))

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.se(self.dw(self.expand(x))))
        x = self.last(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class EfficientNet(nn.Module):
    """EfficientNet-B0 style: stem conv-BN-SiLU (stride 2), an MBConv (1x1 expand, depthwise 3x3,
    squeeze-excite with SiLU and Sigmoid, 1x1 project, residual Add), a strided MBConv without the
    residual, 1x1 conv-BN-SiLU, GAP, Dropout, Linear."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, stride=2, act=nn.SiLU)
        self.block1 = nn.Sequential(conv_bn(8, 16, 1, act=nn.SiLU), conv_bn(16, 16, 3, groups=16, act=nn.SiLU),
                                    SqueezeExcite(16, 4, nn.SiLU, nn.Sigmoid), conv_bn(16, 8, 1, act=None))
        self.block2 = nn.Sequential(conv_bn(8, 16, 1, act=nn.SiLU), conv_bn(16, 16, 3, 2, groups=16, act=nn.SiLU),
                                    SqueezeExcite(16, 4, nn.SiLU, nn.Sigmoid), conv_bn(16, 12, 1, act=None))
        self.head = conv_bn(12, 16, 1, act=nn.SiLU)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, CLASSES))

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block1(x)
        x = self.head(self.block2(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (ConvNeXt's downsampling norm)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """Patchify stem (4x4 stride 4 conv, LayerNorm over channels), a ConvNeXt block (depthwise 7x7,
    LayerNorm, Linear 4x, GELU, Linear, layer scale, residual Add), GAP, LayerNorm, Linear. No BN:
    ConvNeXt has none."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), LayerNorm2d(8, eps=1e-6))
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.norm = nn.LayerNorm(8, eps=1e-6)
        self.pw1 = nn.Linear(8, 16)
        self.pw2 = nn.Linear(16, 8)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)  # layer scale (1e-6 at init in the paper: made visible)
        self.head_norm = nn.LayerNorm(8, eps=1e-6)
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pw2(F.gelu(self.pw1(self.norm(y))))
        x = x + y.permute(0, 3, 1, 2)
        return self.fc(self.head_norm(x.mean((2, 3))))


class ResNeXt(nn.Module):
    """RegNet/ResNeXt: stem conv-BN-ReLU, a bottleneck with a grouped 3x3 (4 groups, stride 2), a 1x1
    strided projection with BN, Add, ReLU, GAP, Linear."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, stride=2)
        self.block = nn.Sequential(conv_bn(8, 16, 1), conv_bn(16, 16, 3, 2, groups=4), conv_bn(16, 16, 1, act=None))
        self.proj = conv_bn(8, 16, 1, 2, act=None)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.block(x) + self.proj(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class UNet(nn.Module):
    """U-Net/FPN: two encoder levels (conv-BN-ReLU, MaxPool), a bottleneck, a ConvTranspose 2x2
    stride 2 up and a bilinear Resize up, each Concat with the encoder level's skip and conv-BN-ReLU,
    then a 1x1 conv to per-pixel class scores and, for fine-tuning, GAP and a Linear classifier."""

    def __init__(self):
        super().__init__()
        self.enc1 = conv_bn(3, 8)
        self.enc2 = conv_bn(8, 16)
        self.mid = conv_bn(16, 16)
        self.up2 = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec2 = conv_bn(24, 8)
        self.dec1 = conv_bn(16, 8)
        self.out = nn.Conv2d(8, CLASSES, 1)
        self.fc = nn.Linear(CLASSES, CLASSES)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="bilinear", align_corners=False), e1], 1))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.out(d1), 1), 1))


class C2f(nn.Module):
    """YOLOv8's C2f: 1x1 conv, Split in two (chunk), a bottleneck on the second half (with its
    residual), Concat of the halves and the bottleneck, 1x1 conv."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        half = cout // 2  # a local: an attribute `half` would shadow nn.Module.half()
        self.cv1 = conv_bn(cin, cout, 1, act=nn.SiLU)
        self.m = nn.Sequential(conv_bn(half, half, act=nn.SiLU), conv_bn(half, half, act=nn.SiLU))
        self.cv2 = conv_bn(cout + half, cout, 1, act=nn.SiLU)

    def forward(self, x):
        a, b = self.cv1(x).chunk(2, 1)
        return self.cv2(torch.cat([a, b, b + self.m(b)], 1))


class YOLONeck(nn.Module):
    """YOLO-style: a backbone of strided conv-BN-SiLU and C2f blocks giving P3 (8x8) and P4 (4x4), the
    neck (P4 nearest-Resize x2, Concat with P3, C2f; a strided conv back down, Concat with P4, C2f),
    1x1 heads per scale, then, for fine-tuning, GAP of each, Concat and a Linear classifier."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, stride=2, act=nn.SiLU)
        self.down3 = conv_bn(8, 8, stride=2, act=nn.SiLU)
        self.c3 = C2f(8, 8)
        self.down4 = conv_bn(8, 16, stride=2, act=nn.SiLU)
        self.c4 = C2f(16, 16)
        self.n3 = C2f(24, 8)
        self.n3_down = conv_bn(8, 8, stride=2, act=nn.SiLU)
        self.n4 = C2f(24, 16)
        self.head3 = nn.Conv2d(8, 8, 1)
        self.head4 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x):
        p3 = self.c3(self.down3(self.stem(x)))
        p4 = self.c4(self.down4(p3))
        n3 = self.n3(torch.cat([F.interpolate(p4, scale_factor=2.0, mode="nearest"), p3], 1))
        n4 = self.n4(torch.cat([self.n3_down(n3), p4], 1))
        pooled = [F.adaptive_avg_pool2d(h, 1) for h in (self.head3(n3), self.head4(n4))]
        return self.fc(torch.flatten(torch.cat(pooled, 1), 1))


ARCHS = {"mobilenetv3": MobileNetV3, "efficientnet": EfficientNet, "convnext": ConvNeXt, "resnext": ResNeXt,
         "unet": UNet, "yolo": YOLONeck}


def build(arch: str, seed: int = 0) -> nn.Module:
    """The architecture at seeded random init, in eval mode, every BN's weight, bias and running
    statistics drawn at random (weight 0.5..1.5, bias and mean N(0, 0.3), var 0.5..2)."""
    torch.manual_seed(seed)
    module = ARCHS[arch]()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None  # track_running_stats is on
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return module.eval()
