"""Exact zeros: L1 in the loss against L1 as a proximal step (``rc.attach_optimizer``).

Needs the examples extra (tqdm, matplotlib): ``pip install -e ".[examples]"``.

A sparse linear-regression problem: 100 inputs, of which 10 matter. The same ``rc.l1(0.05)``
on the weights, trained with plain SGD two ways:

- **in the loss** (``loss + rc.loss()``): the gradient ``0.05 * sign(w)`` makes irrelevant
  weights oscillate around zero; they get small, never exactly zero;
- **as a proximal step** (``rc.attach_optimizer(optimizer, decoupled=True)``): after each
  update, weights are soft-thresholded by ``lr * 0.05``, so irrelevant ones land on 0 exactly
  and stay there, and the model can be stored sparse.

Prints the share of exact zeros, of near-zeros (``|w| < 1e-3``) and the error on the true
weights for each, and saves ``sparsity.png`` (the weights, side by side, on one y-axis):

    python examples/sparsity.py [--steps 400] [--outdir plots]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

try:
    from tqdm import tqdm
except ModuleNotFoundError as missing:  # named here, not as a bare "No module named 'tqdm'"
    raise SystemExit(
        f'{__file__} needs {missing.name}: pip install -e ".[examples]" (tqdm, matplotlib)'
    ) from missing

import regcollect as rc

INPUTS, RELEVANT, SAMPLES = 100, 10, 400


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w_true = torch.zeros(INPUTS)
    w_true[:RELEVANT] = torch.randn(RELEVANT, generator=g).sign() * (
        1.0 + torch.rand(RELEVANT, generator=g)
    )
    x = torch.randn(SAMPLES, INPUTS, generator=g)
    y = x @ w_true + 0.05 * torch.randn(SAMPLES, generator=g)
    return x, y, w_true


def train(proximal: bool, steps: int, data: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y, _ = data
    coll = rc.Collection()
    torch.manual_seed(0)
    model = rc.nn.Linear(INPUTS, 1, bias=False, kernel_regularizer=rc.l1(0.05), collection=coll)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    if proximal:
        rc.attach_optimizer(optimizer, decoupled=True, collection=coll)
    for _ in tqdm(range(steps), desc="proximal" if proximal else "in the loss", leave=False):
        # rc.loss() is the same value both ways; attached, the step applies its gradient.
        loss = torch.nn.functional.mse_loss(model(x).squeeze(1), y) + coll.loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.weight.detach()[0]


def plot(weights: dict[str, torch.Tensor], w_true: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(weights), figsize=(11, 3.5), sharey=True)
    for ax, (name, w) in zip(axes, weights.items()):
        zeros = int((w == 0).sum())
        ax.stem(w.numpy(), markerfmt=".", basefmt=" ")
        ax.plot(w_true.numpy(), "x", color="tab:red", label="true weight")
        ax.set_title(f"L1 {name}: {zeros} of {len(w)} weights exactly 0")
        ax.set_xlabel("input")
    axes[0].set_ylabel("weight")
    axes[0].legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(steps: int = 400, outdir: Path | str = "plots") -> dict[str, dict[str, float]]:
    data = make_data()
    w_true = data[2]
    relevant = w_true != 0
    weights = {"in the loss": train(False, steps, data), "proximal": train(True, steps, data)}
    results = {}
    print(f"{'L1 applied':<14} {'exact zeros':>12} {'|w| < 1e-3':>11} {'true-weight error':>18}")
    for name, w in weights.items():
        results[name] = {
            "exact_zeros": (w[~relevant] == 0).float().mean().item(),
            "near_zero": (w[~relevant].abs() < 1e-3).float().mean().item(),
            "true_error": (w[relevant] - w_true[relevant]).abs().max().item(),
            "relevant_kept": (w[relevant] != 0).float().mean().item(),
        }
        r = results[name]
        print(
            f"{name:<14} {r['exact_zeros']:>12.0%} {r['near_zero']:>11.0%} {r['true_error']:>18.3f}"
        )
    print("(shares over the 90 irrelevant weights; error: largest over the 10 relevant ones)")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    plot(weights, w_true, out / "sparsity.png")
    print(f"saved {out / 'sparsity.png'}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--outdir", default="plots")
    args = parser.parse_args()
    main(steps=args.steps, outdir=args.outdir)
