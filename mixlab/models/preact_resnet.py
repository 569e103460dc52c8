"""PreActResNet-18, the default fast network for CIFAR-sized images.

Paper: He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016,
arXiv:1603.05027. Pre-activation blocks (BN -> ReLU -> conv), as in the adversarial-training code
of locuslab/fast_adversarial and GAIRAT: widths 64-128-256-512, two blocks per stage, a final
BN + ReLU before pooling. 11,172,170 parameters for 10 classes and 3 input channels.

This is the bare network: it expects *normalised* input. Use
`mixlab.models.build_model("preactresnet18", ...)`, which puts the `Normalize` layer in front,
so the model you get takes pixels in [0, 1].
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class PreActBlock(nn.Module):
    """Two 3x3 convs, each preceded by BN + ReLU; identity (or 1x1 conv) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        # A projection is needed only when the shape changes (stride 2 or more channels).
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The projection shortcut reads the pre-activated tensor (He et al. 2016, fig. 4e).
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet for small images.

    Args:
        num_blocks: blocks per stage, e.g. (2, 2, 2, 2) for PreActResNet-18.
        num_classes: number of output logits.
        in_channels: 3 for colour images, 1 for greyscale.

    Input: (N, in_channels, H, W) normalised images; H = W = 32 in the papers (any size >= 8
    works because pooling is adaptive). Output: (N, num_classes) logits.
    """

    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        widths = (64, 128, 256, 512)
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        stages = []
        in_planes = widths[0]
        for i, (planes, n) in enumerate(zip(widths, num_blocks)):
            stride = 1 if i == 0 else 2  # 32x32 -> 32, 16, 8, 4
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(widths[-1])
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        # Adaptive pooling equals the original avg_pool2d(out, 4) on 32x32 inputs and also
        # accepts 28x28 (MNIST) inputs.
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(torch.flatten(out, 1))


def PreActResNet18(num_classes: int = 10, in_channels: int = 3) -> PreActResNet:
    """PreActResNet-18: 2 blocks in each of 4 stages (11,172,170 parameters for 10 classes)."""
    return PreActResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)
