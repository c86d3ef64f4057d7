"""A MobileNetV3-style network at toy width (torchvision naming: ``features``, ``block``, ``classifier``)."""

from __future__ import annotations

import torch
from torch import nn

from tests.zoo.common import ZooCase, ZooModule, loaders, quadrant_images


class Conv2dNormActivation(nn.Sequential):
    """conv + BatchNorm (+ activation) in one Sequential, as torchvision.ops.Conv2dNormActivation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation: type[nn.Module] | None = nn.Hardswish,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False
            ),
            nn.BatchNorm2d(out_channels),
        ]
        if activation is not None:
            layers.append(activation())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """avgpool -> 1x1 ``fc1`` -> ReLU -> 1x1 ``fc2`` -> Hardsigmoid, multiplied onto the input."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class InvertedResidual(nn.Module):
    """Expand 1x1 (+BN+Hardswish), depthwise kxk (+BN+act), optional SE, project 1x1 (+BN), residual."""

    def __init__(self, cin: int, expanded: int, cout: int, kernel: int, stride: int, use_se: bool, act: str) -> None:
        super().__init__()
        activation = nn.Hardswish if act == "HS" else nn.ReLU
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(Conv2dNormActivation(cin, expanded, 1, activation=activation))
        layers.append(Conv2dNormActivation(expanded, expanded, kernel, stride, groups=expanded, activation=activation))
        if use_se:
            layers.append(SqueezeExcitation(expanded, max(8, expanded // 4)))
        layers.append(Conv2dNormActivation(expanded, cout, 1, activation=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


class MobileNetV3(nn.Module):
    """Stem, inverted residuals, last conv, ``avgpool``, ``classifier`` = Linear-Hardswish-Dropout-Linear."""

    # (in, expanded, out, kernel, stride, SE, activation), a shrunken MobileNetV3-Small table
    SETTINGS = [
        (8, 8, 8, 3, 2, True, "RE"),
        (8, 24, 12, 3, 1, False, "RE"),
        (12, 36, 12, 3, 1, False, "RE"),
        (12, 48, 16, 5, 2, True, "HS"),
        (16, 64, 16, 5, 1, True, "HS"),
    ]

    def __init__(self, num_classes: int = 4, last_channel: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = [Conv2dNormActivation(3, 8, 3, stride=1)]
        layers += [InvertedResidual(*s) for s in self.SETTINGS]
        layers.append(Conv2dNormActivation(16, 48, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(48, last_channel), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(last_channel, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class MobileNetClassifier(ZooModule):
    """The network as ``self.model``."""

    lr = 1e-2

    def __init__(self) -> None:
        super().__init__()
        self.model = MobileNetV3()
        self.example_input_array = torch.zeros(2, 3, 16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def mobilenet_v3() -> ZooCase:
    """MobileNetV3-style, 5 inverted residuals (3 with SE), on 3x16x16 images."""
    torch.manual_seed(0)
    train, val = loaders(quadrant_images(512), quadrant_images(128, seed=1))
    # 40 steps: eval mode uses BatchNorm running statistics, which lag the weights for the first ~20 steps
    return ZooCase(
        "mobilenet_v3",
        MobileNetClassifier(),
        train,
        val,
        torch.randn(2, 3, 16, 16),
        head=["model.classifier.3"],
        max_steps=40,
    )
