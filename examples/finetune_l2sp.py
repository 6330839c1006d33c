"""Fine-tuning with little data: nothing, L2 towards zero, or L2-SP towards the pretrained weights.

Needs the examples extra (tqdm, matplotlib): ``pip install -e ".[examples]"``.

Two related synthetic tasks share the features of a hidden "teacher" network and differ in how
classes are read from them. A small MLP is pretrained on the source task (plenty of data),
then its head is replaced and the whole network is fine-tuned on the target task from 60
examples, three ways:

- **nothing**: the backbone drifts wherever the 60 examples pull it;
- **L2** (``rc.l2`` on the kernels): pulls every weight towards zero, which erases what
  pretraining learned as surely as it limits overfitting;
- **L2-SP** (``rc.L2SP``, Li et al. 2018) on the backbone: pulls the weights towards their
  pretrained values instead; the new head, which has no pretrained value, gets plain L2.

Prints a table (target test accuracy, relative distance of the backbone from the pretrained
weights) and saves ``finetune_l2sp.png``:

    python examples/finetune_l2sp.py [--steps 300] [--outdir plots]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

try:
    from tqdm import tqdm
except ModuleNotFoundError as missing:  # named here, not as a bare "No module named 'tqdm'"
    raise SystemExit(
        f'{__file__} needs {missing.name}: pip install -e ".[examples]" (tqdm, matplotlib)'
    ) from missing

import regcollect as rc

INPUTS, HIDDEN, CLASSES = 20, 64, 5
SOURCE_SAMPLES, TARGET_SAMPLES, TEST_SAMPLES = 4000, 60, 2000
STRENGTH = 0.01  # one coefficient for both penalties, so that only their target differs


def tasks(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Source train, target train and target test sets: labels are two different readouts
    of one teacher's features."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(INPUTS, 32, generator=g) / INPUTS**0.5
    source_readout = torch.randn(32, CLASSES, generator=g)
    target_readout = source_readout + 0.7 * torch.randn(32, CLASSES, generator=g)

    def sample(n: int, readout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, INPUTS, generator=g)
        return x, (torch.tanh(x @ w1) @ readout).argmax(dim=1)

    return {
        "source": sample(SOURCE_SAMPLES, source_readout),
        "target": sample(TARGET_SAMPLES, target_readout),
        "test": sample(TEST_SAMPLES, target_readout),
    }


def backbone() -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(INPUTS, HIDDEN),
        torch.nn.Tanh(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.Tanh(),
    )


def fit(model, data, steps, lr, coll=None, desc="") -> None:
    x, y = data
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in tqdm(range(steps), desc=desc, leave=False):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if coll is not None:
            loss = loss + coll.loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def accuracy(model, data) -> float:
    x, y = data
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def distance(model: torch.nn.Module, start: dict[str, torch.Tensor]) -> float:
    """``||w - w0|| / ||w0||`` over the backbone's kernels."""
    num = sum(((model[0][i].weight.detach() - start[f"{i}.weight"]) ** 2).sum() for i in (0, 2))
    den = sum((start[f"{i}.weight"] ** 2).sum() for i in (0, 2))
    return float((num / den) ** 0.5)


def finetune(pretrained, data, how, steps):
    torch.manual_seed(1)
    model = torch.nn.Sequential(copy.deepcopy(pretrained), torch.nn.Linear(HIDDEN, CLASSES))
    coll = rc.Collection()
    if how == "L2":
        rc.regularize(model, kernel=rc.l2(STRENGTH), collection=coll)
    elif how == "L2-SP":
        rc.regularize(model[0], kernel=rc.L2SP(STRENGTH), collection=coll)  # pretrained part
        rc.regularize(model[1], kernel=rc.l2(STRENGTH), collection=coll)  # the new head
    fit(model, data["target"], steps, lr=1e-2, coll=coll, desc=how)
    return model


def plot(results: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(results)
    for ax, key, label in (
        (axes[0], "accuracy", "target test accuracy"),
        (axes[1], "distance", "backbone distance from pretrained (relative)"),
    ):
        values = [results[n][key] for n in names]
        bars = ax.bar(names, values, color=["tab:gray", "tab:blue", "tab:green"])
        ax.bar_label(bars, fmt="%.3f")
        ax.set_title(label)
    axes[0].set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(steps: int = 300, outdir: Path | str = "plots") -> dict[str, dict[str, float]]:
    data = tasks()
    torch.manual_seed(0)
    pretrained = backbone()
    source_model = torch.nn.Sequential(pretrained, torch.nn.Linear(HIDDEN, CLASSES))
    fit(source_model, data["source"], 2 * steps, lr=1e-2, desc="pretraining")
    start = {k: v.clone() for k, v in pretrained.state_dict().items()}
    results = {}
    print(f"{'fine-tuning':<10} {'target test acc':>16} {'backbone distance':>18}")
    for how in ("nothing", "L2", "L2-SP"):
        model = finetune(pretrained, data, how, steps)
        results[how] = {
            "accuracy": accuracy(model, data["test"]),
            "distance": distance(model, start),
        }
        r = results[how]
        print(f"{how:<10} {r['accuracy']:>16.3f} {r['distance']:>18.3f}")
    print(
        f"(pretrained source accuracy {accuracy(source_model, data['source']):.3f}; "
        f"{TARGET_SAMPLES} target examples; distance ||w - w0|| / ||w0|| of the backbone kernels)"
    )
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "finetune_l2sp.png")
    print(f"saved {out / 'finetune_l2sp.png'}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--outdir", default="plots")
    args = parser.parse_args()
    main(steps=args.steps, outdir=args.outdir)
