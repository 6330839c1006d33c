"""Regularize an existing (pretrained) model in one call: L2 on the kernels, nothing on biases
and norms, then train briefly and look at the table.

    python examples/pretrained.py [--steps 60]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import regcollect as rc


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class TinyResNet(nn.Module):
    """A small ResNet-style network: stem, two residual blocks, pooled linear head."""

    def __init__(self, classes: int = 4, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layers = nn.Sequential(Block(width), Block(width))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)).mean(dim=(2, 3)))


def main(steps: int = 60) -> dict[str, float]:
    torch.manual_seed(0)
    # "Download" pretrained weights: a state_dict, as from torch.hub or a checkpoint file.
    checkpoint = TinyResNet().state_dict()
    model = TinyResNet()
    model.load_state_dict(checkpoint)

    # One call: kernels get L2, biases and norm parameters nothing (as recommended for BN nets).
    handle = rc.regularize(model, kernel=rc.l2(5e-4))
    print(f"regularized {len(handle)} tensors; biases and norm layers left alone\n")

    x = torch.randn(64, 3, 16, 16)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long() + 2 * (x[:, 1].mean(dim=(1, 2)) > 0).long()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        total_loss = nn.functional.cross_entropy(model(x), y) + rc.loss()
        optimizer.zero_grad()
        total_loss.backward()
        optimizer.step()
    print(f"after {steps} steps:")
    rc.summary(loss=total_loss)
    return rc.penalties()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    main(parser.parse_args().steps)
