"""Structured pruning with the group lasso: whole filters exactly zero, then removed.

Needs the examples extra (tqdm, matplotlib): ``pip install -e ".[examples]"``.

A small CNN (two 3x3 convolutions of 16 filters, no biases, a linear head) learns a synthetic
image task whose labels come from a "teacher" CNN with only 4 filters: most of the student's
filters are not needed. ``rc.GroupLasso(factor)`` on each convolution kernel penalises the
L2 norm of every filter (``axis=0``), and ``rc.attach_optimizer(..., decoupled=True)`` applies
it as a proximal step (block soft-thresholding) after each SGD update, which sets unneeded
filters exactly to zero. Those filters (and the matching input channels of the next layer)
are then cut out of the network, leaving a smaller model with the same outputs.

Prints, with and without the group lasso: the filters exactly zero, the parameters, and the
test accuracy before and after removing them; saves ``prune_group_lasso.png`` (filter norms):

    python examples/prune_group_lasso.py [--steps 300] [--outdir plots]
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

FILTERS, CLASSES, SIZE = 16, 4, 10
FACTOR = 0.1


def cnn(filters: tuple[int, int] = (FILTERS, FILTERS)) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, filters[0], 3, bias=False),
        torch.nn.ReLU(),
        torch.nn.Conv2d(filters[0], filters[1], 3, bias=False),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(filters[1], CLASSES),
    )


def make_data(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    teacher = cnn((4, 4))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        # Centred logits, so that every class is common.
        shift = teacher(torch.randn(2000, 1, SIZE, SIZE, generator=g)).mean(dim=0)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 1, SIZE, SIZE, generator=g)
        with torch.no_grad():
            return x, (teacher(x) - shift).argmax(dim=1)

    return {"train": sample(1000), "test": sample(1000)}


def train(data, steps: int, group_lasso: bool) -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = cnn()
    coll = rc.Collection()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if group_lasso:
        for i in (0, 2):  # each filter of each convolution is a group
            rc.add_regularizer(model[i], "weight", rc.GroupLasso(FACTOR), collection=coll)
        rc.attach_optimizer(optimizer, decoupled=True, collection=coll)
    x, y = data["train"]
    for _ in tqdm(range(steps), desc="group lasso" if group_lasso else "plain", leave=False):
        # The step applies the penalty (as a proximal step); its value is still in the loss.
        loss = torch.nn.functional.cross_entropy(model(x), y) + coll.loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def prune(model: torch.nn.Sequential) -> torch.nn.Sequential:
    """A smaller copy without the filters that are exactly zero (and the input channels of
    the next layer that read them)."""
    conv1, conv2, head = model[0], model[2], model[6]
    keep1 = (conv1.weight.flatten(1) != 0).any(dim=1)
    keep2 = (conv2.weight.flatten(1) != 0).any(dim=1)
    small = cnn((max(int(keep1.sum()), 1), max(int(keep2.sum()), 1)))
    with torch.no_grad():
        if keep1.any() and keep2.any():
            small[0].weight.copy_(conv1.weight[keep1])
            small[2].weight.copy_(conv2.weight[keep2][:, keep1])
            small[6].weight.copy_(head.weight[:, keep2])
        else:  # nothing left: every output is the head's bias
            for p in (small[0].weight, small[2].weight, small[6].weight):
                p.zero_()
        small[6].bias.copy_(head.bias)
    return small


def accuracy(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    x, y = data
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def plot(models: dict[str, torch.nn.Sequential], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for ax, layer in zip(axes, (0, 2)):
        for offset, (name, model) in zip((-0.2, 0.2), models.items()):
            norms = model[layer].weight.detach().flatten(1).norm(dim=1).numpy()
            zeros = int((norms == 0).sum())
            ax.bar(torch.arange(FILTERS) + offset, norms, width=0.4, label=f"{name} ({zeros} zero)")
        ax.set_title(f"conv {layer // 2 + 1}: L2 norm of each filter")
        ax.set_xlabel("filter")
        ax.legend()
    axes[0].set_ylabel("||filter||")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(steps: int = 300, outdir: Path | str = "plots") -> dict[str, dict[str, float]]:
    data = make_data()
    models = {"plain": train(data, steps, False), "group lasso": train(data, steps, True)}
    results = {}
    print(
        f"{'training':<12} {'zero filters':>13} {'parameters':>17} "
        f"{'test acc':>9} {'after pruning':>14}"
    )
    for name, model in models.items():
        small = prune(model)
        zero = sum(int((model[i].weight.flatten(1) == 0).all(dim=1).sum()) for i in (0, 2))
        results[name] = {
            "zero_filters": zero,
            "parameters": sum(p.numel() for p in model.parameters()),
            "pruned_parameters": sum(p.numel() for p in small.parameters()),
            "accuracy": accuracy(model, data["test"]),
            "pruned_accuracy": accuracy(small, data["test"]),
            "max_output_change": (model(data["test"][0]) - small(data["test"][0]))
            .abs()
            .max()
            .item(),
        }
        r = results[name]
        print(
            f"{name:<12} {zero:>10} / {2 * FILTERS} {r['parameters']:>7} -> "
            f"{r['pruned_parameters']:<6} {r['accuracy']:>9.3f} {r['pruned_accuracy']:>14.3f}"
        )
    print(f"(the teacher that made the labels has 4 + 4 filters; group lasso factor {FACTOR})")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    plot(models, out / "prune_group_lasso.png")
    print(f"saved {out / 'prune_group_lasso.png'}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--outdir", default="plots")
    args = parser.parse_args()
    main(steps=args.steps, outdir=args.outdir)
