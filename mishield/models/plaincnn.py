"""mishield's own skip-free architecture, the default evaluation model of an audit."""

from __future__ import annotations

from torch import nn


def plain_cnn(num_classes: int = 10, in_chans: int = 3, width: int = 32) -> nn.Module:
    """A VGG-style network without skip connections: the default evaluation architecture.

    Being skip-free makes it as different as possible from the ResNet-like targets the audit
    usually judges, which is what the protocol asks of an evaluation model.
    """

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    w = width
    return nn.Sequential(
        *block(in_chans, w), *block(w, w), nn.MaxPool2d(2),
        *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
        *block(2 * w, 4 * w), *block(4 * w, 4 * w), nn.MaxPool2d(2),
        *block(4 * w, 8 * w),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
        nn.Linear(8 * w, num_classes),
    )  # fmt: skip
