"""Small networks: the two MNIST networks of the papers and a tiny CPU test network.

- `SmallCNN`: the MNIST network of TRADES (Zhang et al., ICML 2019, arXiv:1901.08573;
  yaodongyu/TRADES `models/small_cnn.py`), also used by GAIRAT's MNIST runs. Four 3x3 convs
  (32, 32, 64, 64 channels, no padding, max-pool after the 2nd and 4th) and an MLP head
  (200, 200, dropout 0.5). 312,202 parameters for 10 classes.
- `LeNet5Madry`: the MNIST network of Madry et al. (ICLR 2018, arXiv:1706.06083;
  MadryLab/mnist_challenge `model.py`), used by MMA for MNIST. Two 5x5 'same' convs (32, 64
  channels), each followed by 2x2 max-pool, then fc 1024. 3,274,634 parameters for 10 classes.
- `Tiny`: not from a paper. About 15k parameters, for seconds-long CPU smoke tests.

All three are bare networks that expect normalised input; `mixlab.models.build_model` puts the
`Normalize` layer in front (for 1-channel input the default is the identity: the MNIST papers
feed raw pixels in [0, 1]). Inputs are (N, C, 28, 28) as in the papers; 32x32 also works
(see each forward). Outputs are (N, num_classes) logits.
"""

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F


class SmallCNN(nn.Module):
    """TRADES SmallCNN (MNIST). Input (N, C, 28, 28), output (N, num_classes) logits.

    `zero_init_last=True` copies TRADES: the last layer starts at zero, so every logit is 0 and
    the input gradient is exactly 0 before training (attacks on an untrained SmallCNN do
    nothing). Pass False for a random last layer.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, drop: float = 0.5,
                 zero_init_last: bool = True):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 32, 3)),  # 28 -> 26
            ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(32, 32, 3)),           # 26 -> 24
            ("relu2", nn.ReLU()),
            ("pool1", nn.MaxPool2d(2, 2)),             # 24 -> 12
            ("conv3", nn.Conv2d(32, 64, 3)),           # 12 -> 10
            ("relu3", nn.ReLU()),
            ("conv4", nn.Conv2d(64, 64, 3)),           # 10 -> 8
            ("relu4", nn.ReLU()),
            ("pool2", nn.MaxPool2d(2, 2)),             # 8 -> 4
        ]))
        self.classifier = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(64 * 4 * 4, 200)),
            ("relu1", nn.ReLU()),
            ("drop", nn.Dropout(drop)),
            ("fc2", nn.Linear(200, 200)),
            ("relu2", nn.ReLU()),
            ("fc3", nn.Linear(200, num_classes)),
        ]))
        # TRADES initialisation: He-normal convs (fan_in), zero conv biases.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            nn.init.zeros_(self.classifier.fc3.weight)
            nn.init.zeros_(self.classifier.fc3.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        # The head expects 4x4 maps (what 28x28 gives, where this is the identity); a 32x32 input
        # gives 5x5 maps, which adaptive pooling brings to 4x4.
        out = F.adaptive_avg_pool2d(out, 4)
        return self.classifier(torch.flatten(out, 1))


class LeNet5Madry(nn.Module):
    """Madry et al.'s MNIST CNN. Input (N, C, 28, 28), output (N, num_classes) logits."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=5, padding=2)  # 28 -> 28, pool -> 14
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)           # 14 -> 14, pool -> 7
        self.fc1 = nn.Linear(7 * 7 * 64, 1024)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.max_pool2d(F.relu(self.conv1(x)), 2)
        out = F.max_pool2d(F.relu(self.conv2(out)), 2)
        # Identity on 28x28 inputs; a 32x32 input gives 8x8 maps, brought to the 7x7 the head expects.
        out = F.adaptive_avg_pool2d(out, 7)
        out = F.relu(self.fc1(torch.flatten(out, 1)))
        return self.fc2(out)


class Tiny(nn.Module):
    """A very small CNN (~15k parameters) for CPU smoke tests; not from a paper.

    Three 3x3 conv -> BN -> ReLU layers (16, 32, 32 channels; max-pool after the first two),
    global average pooling, one linear layer. BatchNorm is kept on purpose, so tests exercise
    the train/eval mode switch that attacks and the training loop rely on.
    Input (N, C, H, W) with H, W >= 4 (28 and 32 both fine); output (N, num_classes) logits.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()

        def conv_bn_relu(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.features = nn.Sequential(
            *conv_bn_relu(in_channels, 16), nn.MaxPool2d(2),
            *conv_bn_relu(16, 32), nn.MaxPool2d(2),
            *conv_bn_relu(32, 32),
        )
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.fc(torch.flatten(out, 1))
