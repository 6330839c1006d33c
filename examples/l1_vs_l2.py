"""L1 vs L2 vs L1L2 on the same overfitting problem: which weights survive?

Needs the examples extra (tqdm, matplotlib): ``pip install -e ".[examples]"``.

The data of ``weight_decay_sweep.py`` with d2l.ai's 20 training examples (200 inputs).
L2 shrinks every weight a little; L1 pushes most of them to (near) zero and keeps a few, so
the model becomes sparse; L1L2 sits in between. Prints the test loss and the fraction of
near-zero weights (``|w| < 1e-3``) per penalty and saves ``l1_vs_l2.png`` with the weight
histograms (one x-range for all panels; the near-zero share and test loss in each title):

    python examples/l1_vs_l2.py [--epochs 100] [--outdir plots]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

try:
    from tqdm import tqdm
except ModuleNotFoundError as missing:  # named here, not as a bare "No module named 'tqdm'"
    raise SystemExit(
        f'{__file__} needs {missing.name}: pip install -e ".[examples]" (tqdm, matplotlib)'
    ) from missing

import regcollect as rc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from weight_decay_sweep import make_data, squared_loss  # the same data

NEAR_ZERO = 1e-3
PENALTIES = {
    "none": None,
    "L2 l2(1.5)": rc.l2(1.5),
    "L1 l1(0.05)": rc.l1(0.05),
    "L1L2 l1_l2(0.02, 0.5)": rc.l1_l2(l1=0.02, l2=0.5),
}


def train(penalty: rc.Regularizer | None, epochs: int, data, seed: int = 0):
    (x_train, y_train), (x_test, y_test) = data
    coll = rc.Collection()
    torch.manual_seed(seed)
    model = rc.nn.Linear(x_train.shape[1], 1, kernel_regularizer=penalty, collection=coll)
    torch.nn.init.normal_(model.weight, std=0.01)
    torch.nn.init.zeros_(model.bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.003)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(x_train), generator=g).split(5):
            loss = squared_loss(model(x_train[batch]), y_train[batch]) + coll.loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    w = model.weight.detach().flatten()
    with torch.no_grad():
        test_loss = squared_loss(model(x_test), y_test).item()
    return w, {
        "test_loss": test_loss,
        "near_zero": (w.abs() < NEAR_ZERO).float().mean().item(),
        "max_abs_w": w.abs().max().item(),
        "w_norm": w.norm().item(),
    }


def plot(
    weights: dict[str, torch.Tensor], results: dict[str, dict[str, float]], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One x-range and one set of bins for every panel, so the widths compare at a glance.
    limit = max(w.abs().max().item() for w in weights.values()) * 1.05
    bins = torch.linspace(-limit, limit, 61).numpy()
    fig, axes = plt.subplots(
        1, len(weights), figsize=(4 * len(weights), 3.6), sharex=True, sharey=True
    )
    for ax, (name, w) in zip(axes, weights.items()):
        r = results[name]
        ax.hist(w.numpy(), bins=bins, color="C0")
        ax.set_title(f"{name}\n{r['near_zero']:.0%} near zero, test loss {r['test_loss']:.3g}")
        ax.set_xlabel("weight value")
    axes[0].set_ylabel(f"count (of {len(next(iter(weights.values())))} weights)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(epochs: int = 100, outdir: str | Path = "plots") -> dict[str, dict[str, float]]:
    from tabulate import tabulate

    data = make_data(n_train=20)
    weights, results = {}, {}
    for name, penalty in tqdm(PENALTIES.items(), desc="penalty", leave=False):
        weights[name], results[name] = train(penalty, epochs, data)
    print(
        tabulate([{"penalty": k, **v} for k, v in results.items()], headers="keys", floatfmt=".4g")
    )
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    plot(weights, results, outdir / "l1_vs_l2.png")
    print(f"\nsaved {outdir / 'l1_vs_l2.png'}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--outdir", default="plots", help="where the PNG goes (default plots/)")
    args = parser.parse_args()
    main(epochs=args.epochs, outdir=args.outdir)
