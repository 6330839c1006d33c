"""What the optimizer's ``weight_decay`` really is, shown with numbers.

1. ``SGD(weight_decay=wd)`` (with or without momentum) is plain SGD with ``rc.l2(wd / 2)`` on
   every parameter: the trained weights agree to rounding (within a bound that scales with the
   dtype's epsilon, so the difference falls by a factor of 10^9 from float32 to float64).
2. ``Adam(weight_decay=wd)`` is the same coupled L2 penalty, ``rc.l2(wd / 2)``; ``AdamW`` is
   not (it decays the weights outside the adaptive update) and ends somewhere else.
3. Why people think weight decay does nothing: with ``weight_decay`` the penalty is not in the
   loss, so the printed loss is the same for ``wd = 10`` and ``wd = 10000``. With regcollect
   it is part of the loss you print.

    python examples/optimizer_equivalence.py [--steps 50] [--dtype float64]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from tabulate import tabulate

import regcollect as rc


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(10, 32), torch.nn.LayerNorm(32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
    ).to(dtype)


def batches(steps: int, seed: int = 1, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 10, generator=g).to(dtype)
        yield x, x[:, :3].sum(dim=1, keepdim=True)


def train(
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
    steps: int,
    penalty: rc.Regularizer | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Train a fresh model; with ``penalty``, on every parameter through regcollect."""
    model, coll = make_model(dtype=dtype), rc.Collection()
    if penalty is not None:
        for name, _ in model.named_parameters():
            rc.add_regularizer(model, name, penalty, collection=coll)
    optimizer = make_optimizer(model)
    for x, y in batches(steps, dtype=dtype):
        loss = torch.nn.functional.mse_loss(model(x), y) + coll.loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def rounding_bound(weights: torch.Tensor, steps: int, momentum: float = 0.0) -> float:
    """How far two runs that differ only in rounding may drift apart.

    The two paths add the same numbers in another order, so each step's update may differ by a
    few roundings of the weights' scale: 8 ulps a step, summed over the steps, and summed again
    by momentum's running average (factor 1 / (1 - momentum); Adam's first moment the same).
    The bound scales with the dtype's epsilon: a real difference (a wrong coefficient, AdamW's
    decoupled decay) does not shrink in float64, a rounding difference does.
    """
    eps = torch.finfo(weights.dtype).eps
    scale = max(1.0, weights.abs().max().item())
    return steps * 8 * eps * scale / (1.0 - momentum)


def printed_losses(wd: float) -> dict[str, float]:
    """The first step's loss as a training loop prints it, both ways."""
    x, y = next(batches(1))
    model = make_model()
    data_loss = torch.nn.functional.mse_loss(model(x), y)  # what SGD(weight_decay=wd) users see
    coll = rc.Collection()
    rc.regularize(
        model, kernel=rc.l2(wd / 2), bias=rc.l2(wd / 2), norm=rc.l2(wd / 2), collection=coll
    )
    total = data_loss + coll.loss()  # what regcollect users see
    return {
        "weight_decay": wd,
        "printed loss, SGD(weight_decay)": data_loss.item(),
        "printed loss, rc.l2(wd/2)": total.item(),
        "penalty": coll.loss().item(),
    }


def main(steps: int = 50, wd: float = 0.05, dtype: torch.dtype = torch.float32) -> dict:
    rows = []

    def compare(label: str, ours: torch.Tensor, theirs: torch.Tensor, momentum: float) -> None:
        bound = rounding_bound(theirs, steps, momentum)
        diff = max_diff(ours, theirs)
        rows.append(
            {
                "comparison": label,
                "max |param difference|": diff,
                "rounding bound": bound,
                "equal to rounding": diff <= bound,
            }
        )

    l2 = rc.l2(wd / 2)

    def run(make: Callable[..., torch.optim.Optimizer], penalty: rc.Regularizer | None = None):
        return train(make, steps, penalty, dtype=dtype)

    compare(
        "SGD(weight_decay) vs SGD + rc.l2(wd/2)",
        run(lambda m: torch.optim.SGD(m.parameters(), lr=0.05, weight_decay=wd)),
        run(lambda m: torch.optim.SGD(m.parameters(), lr=0.05), l2),
        momentum=0.0,
    )
    compare(
        "SGD(momentum, weight_decay) vs SGD(momentum) + rc.l2(wd/2)",
        run(lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=wd)),
        run(lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), l2),
        momentum=0.9,
    )
    adam_l2 = run(lambda m: torch.optim.Adam(m.parameters(), lr=1e-2), l2)
    compare(
        "Adam(weight_decay) vs Adam + rc.l2(wd/2)",
        run(lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=wd)),
        adam_l2,
        momentum=0.9,
    )
    compare(
        "AdamW(weight_decay) vs Adam + rc.l2(wd/2)",
        run(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=wd)),
        adam_l2,
        momentum=0.9,
    )
    print(f"After {steps} steps in {dtype} (wd = {wd}):")
    print(tabulate(rows, headers="keys", floatfmt=".3g"))

    losses = [printed_losses(w) for w in (10.0, 10000.0)]
    print("\nThe loss a training loop prints at step 1:")
    print(tabulate(losses, headers="keys", floatfmt=".6g"))
    print(
        "\nweight_decay changes the training but not the printed loss; the regcollect loss"
        "\nshows the penalty, so you can see regularization at work (and when it dominates)."
    )
    result: dict = {row["comparison"]: row for row in rows}
    for row in losses:
        result[f"printed weight_decay={row['weight_decay']:g}"] = row[
            "printed loss, SGD(weight_decay)"
        ]
        result[f"printed regcollect={row['weight_decay']:g}"] = row["printed loss, rc.l2(wd/2)"]
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args()
    main(steps=args.steps, dtype=getattr(torch, args.dtype))
