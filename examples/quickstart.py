"""regcollect quickstart: declare penalties on the layers, add rc.loss(), watch rc.summary().

Trains a small classifier on synthetic data (two noisy, overlapping classes in 20 dimensions,
only 5 of which matter) with kernel, bias and activity regularizers, printing the penalty table
during training and at the end. Runs in a few seconds on 2 CPU cores.

    python examples/quickstart.py [--steps 300]
"""

from __future__ import annotations

import argparse

import torch

import regcollect as rc


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 20, generator=generator)
    logits = x[:, :5].sum(dim=1) + 0.5 * torch.randn(n, generator=generator)
    return x, (logits > 0).long()


def main(steps: int = 300, log_every: int = 100) -> dict[str, float]:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x_train, y_train = make_data(256, generator)
    x_test, y_test = make_data(1024, generator)

    model = torch.nn.Sequential(
        rc.nn.Linear(20, 64, kernel_regularizer=rc.l2(1e-3), bias_regularizer="l1"),
        torch.nn.ReLU(),
        rc.nn.Linear(64, 64, kernel_regularizer=rc.l1_l2(l1=1e-4, l2=1e-3)),
        torch.nn.ReLU(),
        rc.nn.Linear(64, 2, kernel_regularizer=rc.l2(1e-3), activity_regularizer=rc.l2(1e-4)),
    )
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    for step in range(1, steps + 1):
        index = torch.randint(0, len(x_train), (64,))
        data_loss = criterion(model(x_train[index]), y_train[index])
        total_loss = data_loss + rc.loss()  # every penalty, in one differentiable tensor
        optimizer.zero_grad()
        total_loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps:
            print(f"\nstep {step}: data loss {data_loss.item():.4f}")
            rc.summary(loss=total_loss)  # values of the rc.loss() above: no recomputation
            # The share of the penalty grows as the data loss falls: near the end (data loss
            # about 0.006 on 256 examples) it is most of the loss. What that means, and how to
            # pick a coefficient: docs/faq.md, "How big should the penalty be?".

    with torch.no_grad():  # no_grad: evaluation records no activity penalty
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    print(f"\ntest accuracy: {accuracy:.3f}")
    result = dict(rc.penalties())
    result["accuracy"] = accuracy
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    args = parser.parse_args()
    main(steps=args.steps)
