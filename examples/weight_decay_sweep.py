"""Is regularization doing anything? The classic overfitting demo, swept over lambda.

Needs the examples extra (tqdm, matplotlib): ``pip install -e ".[examples]"``.

Linear regression with 200 inputs but only 100 training examples (100 test examples; true
weights 0.01, bias 0.05, noise 0.01; the d2l.ai weight-decay data with 100 instead of 20
training examples, so that the data can be learnt at all), weights initialised N(0, 1),
minibatch 5, SGD lr 0.003, 100 epochs. An L2 penalty on the weight only, ``rc.l2(lam / 2)``
(that is ``lam/2 * ||w||^2``, the textbook weight decay), trades training loss for test loss:
too little and the model memorises the training set, too much and it learns nothing (the
weights go to 0 and the test loss to that of predicting the mean); the best lambda is in
between. Prints a table, saves ``weight_decay_sweep.png`` with the optimum marked:

    python examples/weight_decay_sweep.py [--epochs 100] [--outdir plots]
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

LAMBDAS = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def make_data(n_train: int = 100, n_test: int = 100, n_inputs: int = 200, seed: int = 0):
    """``y = 0.01 * sum(x) + 0.05 + noise(0.01)``: the d2l.ai weight-decay data."""
    g = torch.Generator().manual_seed(seed)
    true_w, true_b = torch.full((n_inputs, 1), 0.01), 0.05
    x = torch.randn(n_train + n_test, n_inputs, generator=g)
    y = x @ true_w + true_b + 0.01 * torch.randn(n_train + n_test, 1, generator=g)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def squared_loss(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred - y) ** 2 / 2).mean()


def train(lam: float, epochs: int, data, seed: int = 0) -> dict[str, float]:
    (x_train, y_train), (x_test, y_test) = data
    coll = rc.Collection()  # one collection per run keeps the runs independent
    torch.manual_seed(seed)
    model = rc.nn.Linear(x_train.shape[1], 1, kernel_regularizer=rc.l2(lam / 2), collection=coll)
    torch.nn.init.normal_(model.weight)
    torch.nn.init.zeros_(model.bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.003)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(x_train), generator=g).split(5):
            loss = squared_loss(model(x_train[batch]), y_train[batch]) + coll.loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return {
            "lambda": lam,
            "train_loss": squared_loss(model(x_train), y_train).item(),
            "test_loss": squared_loss(model(x_test), y_test).item(),
            "w_norm": model.weight.norm().item(),
            "penalty": coll.loss().item(),
        }


def plot(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams = [r["lambda"] for r in rows]
    best = min(rows, key=lambda r: r["test_loss"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    left.plot(lams, [r["train_loss"] for r in rows], "o-", label="train")
    left.plot(lams, [r["test_loss"] for r in rows], "s-", label="test")
    left.plot([best["lambda"]], [best["test_loss"]], "*", ms=16, color="C3", label="best test")
    left.annotate(
        f"best: lambda = {best['lambda']:g}, test loss {best['test_loss']:.3g}",
        (best["lambda"], best["test_loss"]),
        xytext=(15, 45),
        textcoords="offset points",
        ha="left",
        arrowprops={"arrowstyle": "->", "color": "C3"},
    )
    first, last = rows[0], rows[-1]
    for r, where in ((first, "left"), (last, "right")):
        left.annotate(
            f"{r['test_loss']:.3g}",
            (r["lambda"], r["test_loss"]),
            xytext=(0, 6),
            textcoords="offset points",
            ha=where,
        )
    left.set(ylabel="squared loss", yscale="log", title="Loss vs lambda: an optimum in between")
    left.legend(loc="upper right")
    right.plot(lams, [r["w_norm"] for r in rows], "o-", color="C2")
    right.axvline(best["lambda"], color="C3", ls=":", label="best test loss")
    right.axhline(0.01 * 200**0.5, color="0.5", ls="--", label="||true w|| = 0.141")
    right.set(ylabel="||w||", yscale="log", title="Weight norm vs lambda")
    right.legend()
    for ax in (left, right):
        # symlog: lambda = 0 sits on the axis, the rest on a log scale
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlim(-0.02, lams[-1] * 1.5)
        ax.set_xticks(lams, [f"{lam:g}" for lam in lams])
        ax.set_xlabel("lambda (penalty lambda/2 * ||w||^2)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(
    epochs: int = 100, lambdas: tuple[float, ...] = LAMBDAS, outdir: str | Path = "plots"
) -> list[dict[str, float]]:
    from tabulate import tabulate

    data = make_data()
    rows = [train(lam, epochs, data) for lam in tqdm(lambdas, desc="lambda", leave=False)]
    print(tabulate(rows, headers="keys", floatfmt=".4g"))
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    plot(rows, outdir / "weight_decay_sweep.png")
    print(f"\nsaved {outdir / 'weight_decay_sweep.png'}")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--outdir", default="plots", help="where the PNG goes (default plots/)")
    args = parser.parse_args()
    main(epochs=args.epochs, outdir=args.outdir)
