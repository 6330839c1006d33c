"""What do activity penalties cost per training step, against writing them by hand?

One process, interleaved repetitions, medians; prints ratios. No assertion: timings belong here.

    python benchmarks/bench_activity.py [--repeats 30] [--threads 1]

Scenarios (CPU, float32):
1. every layer: a 12-layer MLP, 256 wide, batch 64, an ``rc.l2`` activity penalty on each
   layer's output; forward + ``rc.loss()`` + backward, against the same MLP whose forward
   returns the hidden states and a hand-written ``sum(c * h.pow(2).sum() / batch)``.
2. one deep layer: the same MLP nested in 4 containers, one activity penalty on one layer
   (the hooks sit on the layer and its 5 holders); against the plain MLP with that layer's
   penalty written by hand.
3. the hooks alone: forward passes (no gradient computed) of scenario 1's model against the
   plain MLP's, under ``torch.no_grad()`` (nothing recorded) and with gradients on.
4. registering: n blocks of ``Sequential(rc.nn.Linear(4, 4, activity_regularizer=...), ReLU)``
   built into one Sequential, the first forward pass (which places the holders' hooks) and
   ``handle.remove()`` of an ``rc.regularize(activity=...)`` over them, for n = 250 to 2000:
   the seconds should grow like n.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from timing import measure  # benchmarks/timing.py, beside this script

import regcollect as rc

WIDTH, DEPTH, BATCH, C = 256, 12, 64, 1e-4


def report(title: str, medians: dict[str, float], base: str) -> None:
    print(f"\n## {title}")
    for name, seconds in medians.items():
        print(f"{name:<46} {seconds * 1e3:8.3f} ms   {seconds / medians[base]:5.2f}x of {base}")


class Hand(torch.nn.Module):
    """The plain MLP; ``forward`` also returns the hidden states whose penalty is wanted."""

    def __init__(self, watched: set[int]) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH))
        self.watched = watched

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        hidden = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.watched:
                hidden.append(x)
            x = torch.relu(x)
        return x, hidden


def ours(watched: set[int], nest: int) -> tuple[torch.nn.Module, rc.Collection]:
    coll = rc.Collection()
    layers = [
        rc.nn.Linear(
            WIDTH, WIDTH, activity_regularizer=rc.l2(C) if i in watched else None, collection=coll
        )
        for i in range(DEPTH)
    ]
    body: torch.nn.Module = torch.nn.Sequential(
        *[m for pair in zip(layers, [torch.nn.ReLU()] * DEPTH) for m in pair]
    )
    for _ in range(nest):
        body = torch.nn.Sequential(body)
    return body, coll


def scenario(watched: set[int], nest: int, repeats: int, title: str) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(BATCH, WIDTH)
    model, coll = ours(watched, nest)
    hand = Hand(watched)

    def step_ours() -> None:
        (model(x).pow(2).mean() + coll.loss()).backward()

    def step_hand() -> None:
        out, hidden = hand(x)
        penalty = sum(C * h.pow(2).sum() / BATCH for h in hidden)
        (out.pow(2).mean() + penalty).backward()

    medians = measure({"hand-written": step_hand, "regcollect": step_ours}, repeats, 5)
    report(title, medians, "hand-written")
    return medians


def hooks_alone(repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(BATCH, WIDTH)
    model, _ = ours(set(range(DEPTH)), 0)
    plain = torch.nn.Sequential(
        *[m for _ in range(DEPTH) for m in (torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU())]
    )

    def forward(m: torch.nn.Module, grad: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.set_grad_enabled(grad):
                m(x)

        return run

    medians = measure(
        {
            "plain, no_grad": forward(plain, False),
            "regcollect, no_grad": forward(model, False),
            "plain, gradients on": forward(plain, True),
            "regcollect, gradients on (records)": forward(model, True),
        },
        repeats,
        10,
    )
    report("3. forward passes alone (12 hooked layers)", medians, "plain, no_grad")
    return medians


def registering() -> None:
    print("\n## 4. registering n activity regularizers (seconds; should grow like n)")
    for n in (250, 500, 1000, 2000):
        start = time.perf_counter()
        blocks = torch.nn.Sequential(
            *[
                torch.nn.Sequential(
                    rc.nn.Linear(4, 4, activity_regularizer=rc.l2(C)), torch.nn.ReLU()
                )
                for _ in range(n)
            ]
        )
        built = time.perf_counter()
        blocks(torch.randn(2, 4))
        forward = time.perf_counter()
        plain = torch.nn.Sequential(
            *[torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()) for _ in range(n)]
        )
        handle = rc.regularize(plain, activity=rc.l2(C), include=["*.0"])
        plain(torch.randn(2, 4))
        before_remove = time.perf_counter()
        handle.remove()
        removed = time.perf_counter()
        print(
            f"n={n:5d}: build {built - start:6.2f}   first forward {forward - built:6.2f}   "
            f"remove {removed - before_remove:6.2f}"
        )
        rc.get_collection().remove(blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU")
    every = scenario(set(range(DEPTH)), 0, args.repeats, "1. an activity penalty on every layer")
    deep = scenario({DEPTH // 2}, 4, args.repeats, "2. one activity penalty, 4 containers deep")
    hooks_alone(args.repeats)
    registering()
    print(
        f"\nsummary: every layer {every['regcollect'] / every['hand-written']:.2f}x, "
        f"one deep layer {deep['regcollect'] / deep['hand-written']:.2f}x of the hand-written step"
    )


if __name__ == "__main__":
    main()
