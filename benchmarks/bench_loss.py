"""How much does rc.loss() cost per training step, against what people use today?

One process, interleaved repetitions, medians; prints ratios. No assertion anywhere: timings
belong here, not in tests.

    pip install keras   # optional, for the Keras 3 (torch backend) comparison
    python benchmarks/bench_loss.py [--repeats 30] [--threads 1] [--device cpu|cuda] [--real-size N]

Scenarios:
1. many-small: 100 Linear(64, 64), kernel l2(1e-3) and bias l1(1e-4) (200 entries), forward +
   backward of the total penalty, against the Python loop users write and Keras 3.
2. large: 33 tensors, 25.8M parameters, l2, against the optimizer's multi-tensor weight decay
   (torch._foreach_add_(grads, params, alpha=2c)); on CPU it runs again at the very end with
   glibc's malloc told to keep freed memory (2b), which shows what page faults cost.
3. training step: 4-layer 1024-wide MLP, batch 256, forward + backward + SGD step, rc.l2 on the
   kernels against SGD(weight_decay=...): overhead in %; on CUDA also both steps captured in
   CUDA graphs (what is left without the host's work).
5. fused step (rc.attach_optimizer): the penalty inside SGD's step against
   SGD(weight_decay), with and without the rc.loss() value call, on scenario 2's tensors and on
   100 small layers against weight_decay parameter groups; and the peak memory one step holds
   beyond the weights and gradients (L2 and proximal L1 attached, SGD(weight_decay), and the
   same penalty's backward through autograd).
6. beyond the peers: rc.L2SP against rc.l2 on scenario 1's kernels and on scenario 2's tensors
   (forward + backward; the issue's bound is 1.5x), and rc.GroupLasso on the same tensors.
4. real size (CUDA by default, `--real-size BATCH` elsewhere): ResNet-50 and ViT-B/16 built
   without weights (benchmarks/models.py), a bf16-autocast training step against
   SGD(weight_decay) on the same kernels, and the penalty alone against the weight-decay update.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

os.environ.setdefault("KERAS_BACKEND", "torch")

import torch
from memory import peak_bytes  # benchmarks/memory.py, beside this script
from timing import measure  # benchmarks/timing.py, beside this script

import regcollect as rc


def report(title: str, medians: dict[str, float], base: str) -> None:
    print(f"\n## {title}")
    for name, seconds in medians.items():
        ratio = medians[name] / medians[base]
        print(f"{name:<44} {seconds * 1e3:9.3f} ms   {ratio:6.2f}x of {base}")


def many_small(repeats: int, device: torch.device) -> dict[str, float]:
    coll = rc.Collection()
    layers = torch.nn.ModuleList(  # one model of 100 layers
        rc.nn.Linear(
            64,
            64,
            kernel_regularizer=rc.l2(1e-3),
            bias_regularizer=rc.l1(1e-4),
            collection=coll,
            device=device,
        )
        for _ in range(100)
    )

    def regcollect_step() -> None:
        coll.loss().backward()

    def python_loop() -> None:  # what users write today
        total = sum(1e-3 * torch.norm(layer.weight) ** 2 for layer in layers)
        total = total + sum(1e-4 * torch.norm(layer.bias, 1) for layer in layers)
        total.backward()

    candidates: dict[str, Callable[[], object]] = {
        "regcollect rc.loss()": regcollect_step,
        "python loop (torch.norm)": python_loop,
    }
    try:
        import keras

        if keras.backend.backend() != "torch":
            raise ImportError(f"keras backend is {keras.backend.backend()}, not torch")
        model = keras.Sequential(
            [keras.Input((64,))]
            + [
                keras.layers.Dense(
                    64,
                    kernel_regularizer=keras.regularizers.l2(1e-3),
                    bias_regularizer=keras.regularizers.l1(1e-4),
                )
                for _ in range(100)
            ]
        )

        def keras_losses() -> None:
            sum(model.losses).backward()

        candidates["keras 3 sum(model.losses), torch backend"] = keras_losses
    except Exception as exc:  # keras is optional
        print(f"(keras comparison skipped: {type(exc).__name__}: {exc})")
    medians = measure(candidates, repeats, inner=20, device=device)
    report(
        "1. many-small: 100 x Linear(64, 64), 200 entries, forward + backward",
        medians,
        "regcollect rc.loss()",
    )
    return medians


def large_parameters(device: torch.device) -> list[torch.nn.Parameter]:
    """Scenario 2's tensors: the kernels of a ResNet-34-like network and a 1000-way head,
    33 tensors, 25.8M parameters."""
    shapes: list[tuple[int, ...]] = []
    for c_in, c_out, n in (
        (64, 64, 8),
        (64, 128, 1),
        (128, 128, 7),
        (128, 256, 1),
        (256, 256, 6),
        (256, 512, 1),
        (512, 512, 8),
    ):
        shapes += [(c_out, c_in, 3, 3)] * n
    shapes.append((1000, 512))
    return [torch.nn.Parameter(torch.randn(s, device=device) * 0.01) for s in shapes]


def collection_of(
    params: list[torch.nn.Parameter], regularizer: rc.Regularizer
) -> tuple[rc.Collection, torch.nn.Module]:
    """A collection with ``regularizer`` on each of ``params``, and the module holding them
    (keep it: entries hold their module weakly)."""
    coll = rc.Collection()
    holder = torch.nn.Module()
    for i, p in enumerate(params):
        holder.register_parameter(f"p{i}", p)
        rc.add_regularizer(holder, f"p{i}", regularizer, collection=coll)
    return coll, holder


def large(repeats: int, device: torch.device) -> dict[str, float]:
    params = large_parameters(device)
    total = sum(p.numel() for p in params)
    coll, _holder = collection_of(params, rc.l2(1e-4))
    for p in params:
        p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]

    def regcollect_step() -> None:
        coll.loss().backward()

    def weight_decay() -> None:  # what SGD/Adam(foreach=True) do for weight_decay
        torch._foreach_add_(grads, params, alpha=2 * 1e-4)

    scale = torch.tensor(2e-4, device=device)

    def fresh_gradients() -> None:  # the backward's own kernel, without autograd around it
        torch._foreach_mul(params, scale)

    medians = measure(
        {
            "regcollect rc.loss() fwd+bwd": regcollect_step,
            "optimizer foreach weight decay": weight_decay,
            "  of which: forward alone, rc.loss()": coll.loss,
            "  of which: fresh 2c*w tensors, _foreach_mul": fresh_gradients,
        },
        repeats,
        inner=3,
        device=device,
    )
    report(
        f"2. large: {len(params)} tensors, {total / 1e6:.1f}M parameters, l2",
        medians,
        "optimizer foreach weight decay",
    )
    return medians


def beyond(repeats: int, device: torch.device) -> dict[str, float]:
    """L2-SP and group lasso against plain L2, on many small kernels and on large ones."""
    medians: dict[str, float] = {}
    cases = {
        "many-small": [
            torch.nn.Parameter(torch.randn(64, 64, device=device) * 0.1) for _ in range(100)
        ],
        "large": large_parameters(device),
    }
    for case, params in cases.items():
        holder = torch.nn.Module()
        colls = {name: rc.Collection() for name in ("l2", "l2sp", "group lasso")}
        for i, p in enumerate(params):
            holder.register_parameter(f"p{i}", p)
            rc.add_regularizer(holder, f"p{i}", rc.l2(1e-4), collection=colls["l2"])
            rc.add_regularizer(holder, f"p{i}", rc.L2SP(1e-4), collection=colls["l2sp"])
            rc.add_regularizer(
                holder, f"p{i}", rc.GroupLasso(1e-4), collection=colls["group lasso"]
            )
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * 0.01)  # fine-tuned: away from the reference

        def step(coll: rc.Collection, params: list[torch.nn.Parameter] = params) -> None:
            for p in params:
                p.grad = None
            coll.loss().backward()

        candidates: dict[str, Callable[[], object]] = {
            f"{case}: {name} fwd+bwd": (lambda coll=coll: step(coll))
            for name, coll in colls.items()
        }
        result = measure(
            candidates, repeats, inner=20 if case == "many-small" else 3, device=device
        )
        total = sum(p.numel() for p in params)
        report(
            f"6. {case}: {len(params)} tensors, {total / 1e6:.2f}M parameters, L2-SP / group "
            "lasso against L2",
            result,
            f"{case}: l2 fwd+bwd",
        )
        medians.update(result)
    return medians


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory instead of returning it to the OS.

    Process-wide and irreversible, so it runs last. It is what jemalloc or tcmalloc (which
    PyTorch's CPU tuning guide recommends) do by default, and what MALLOC_TRIM_THRESHOLD_ and
    MALLOC_MMAP_THRESHOLD_ set from the environment. Returns False where libc is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_trim_threshold, 2**31 - 1)) and bool(mallopt(m_mmap_threshold, 2**25))


def training_step(repeats: int, device: torch.device) -> dict[str, float]:
    def mlp() -> torch.nn.Sequential:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(1024, 1024),
            torch.nn.ReLU(),
            torch.nn.Linear(1024, 1024),
            torch.nn.ReLU(),
            torch.nn.Linear(1024, 1024),
            torch.nn.ReLU(),
            torch.nn.Linear(1024, 10),
        ).to(device)

    x = torch.randn(256, 1024, device=device)
    y = torch.randint(0, 10, (256,), device=device)
    wd = 1e-4
    plain = mlp()
    # weight_decay on the kernels only, the same set regcollect regularizes
    decay = [p for p in plain.parameters() if p.dim() >= 2]
    rest = [p for p in plain.parameters() if p.dim() < 2]
    opt_plain = torch.optim.SGD(
        [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}], lr=1e-3
    )
    ours = mlp()
    coll = rc.Collection()
    rc.regularize(ours, kernel=rc.l2(wd / 2), collection=coll)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=1e-3)

    def step_plain() -> None:
        opt_plain.zero_grad()
        torch.nn.functional.cross_entropy(plain(x), y).backward()
        opt_plain.step()

    def step_ours() -> None:
        opt_ours.zero_grad()
        (torch.nn.functional.cross_entropy(ours(x), y) + coll.loss()).backward()
        opt_ours.step()

    candidates: dict[str, Callable[[], object]] = {
        "SGD(weight_decay) step": step_plain,
        "rc.loss() + SGD step": step_ours,
    }
    if device.type == "cuda":
        # The same steps captured in CUDA graphs: what is left once the host cost is gone.
        candidates["SGD(weight_decay) step, CUDA graph"] = cuda_graph(step_plain, opt_plain)
        candidates["rc.loss() + SGD step, CUDA graph"] = cuda_graph(step_ours, opt_ours)
    medians = measure(candidates, repeats, inner=2, device=device)
    report("3. training step: 4 x 1024 MLP, batch 256", medians, "SGD(weight_decay) step")
    if device.type == "cuda":
        graphed = "rc.loss() + SGD step, CUDA graph"
        plain_graphed = medians["SGD(weight_decay) step, CUDA graph"]
        print(f"overhead in CUDA graphs: {100 * (medians[graphed] / plain_graphed - 1):+.1f}%")
    overhead = medians["rc.loss() + SGD step"] / medians["SGD(weight_decay) step"] - 1
    print(f"overhead of rc.loss() over weight_decay: {100 * overhead:+.1f}%")
    return medians


def fused_step(repeats: int, device: torch.device) -> dict[str, float]:
    """rc.attach_optimizer: the penalty applied inside SGD's step, against weight_decay."""
    out: dict[str, float] = {}
    # 5a. the large case: 33 tensors, 25.8M parameters, gradients already there.
    wd = 1e-4

    def tensors() -> list[torch.nn.Parameter]:
        torch.manual_seed(0)
        params = large_parameters(device)
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        return params

    plain = tensors()
    opt_plain = torch.optim.SGD(plain, lr=1e-3, weight_decay=wd)
    ours = tensors()
    coll, _holder = collection_of(ours, rc.l2(wd / 2))
    opt_ours = torch.optim.SGD(ours, lr=1e-3)
    rc.attach_optimizer(opt_ours, collection=coll)

    def with_loss() -> None:
        coll.loss()  # the value, for the printed loss; no autograd work
        opt_ours.step()

    # What the figures are made of: the step without any decay, the value alone, and (on the
    # CPU, where SGD defaults to a loop over tensors) SGD's multi-tensor form, CUDA's default.
    bare = tensors()
    opt_bare = torch.optim.SGD(bare, lr=1e-3)
    candidates: dict[str, Callable[[], object]] = {
        "SGD(weight_decay) step": opt_plain.step,
        "rc.loss() + step, attached": with_loss,
        "step alone, attached": opt_ours.step,
        "  of which: SGD step without weight decay": opt_bare.step,
        "  rc.loss() alone (the value), attached": coll.loss,
    }
    if device.type == "cpu":
        foreach = tensors()
        opt_foreach = torch.optim.SGD(foreach, lr=1e-3, weight_decay=wd, foreach=True)
        candidates["SGD(weight_decay, foreach=True) step"] = opt_foreach.step
    medians = measure(candidates, repeats, inner=3, device=device)
    report(
        "5a. fused step: 33 tensors, 25.8M parameters, l2 inside SGD's step",
        medians,
        "SGD(weight_decay) step",
    )
    out.update({f"large: {k}": v for k, v in medians.items()})

    # Peak memory of one step beyond the weights, gradients and optimizer state, against the
    # same penalty through autograd (its backward into the existing gradients).
    l1 = tensors()
    l1_coll, _l1_holder = collection_of(l1, rc.l1(wd))
    opt_l1 = torch.optim.SGD(l1, lr=1e-3)
    rc.attach_optimizer(opt_l1, decoupled=True, collection=l1_coll)
    autograd = tensors()
    autograd_coll, _autograd_holder = collection_of(autograd, rc.l2(wd / 2))
    opt_l1.step()
    peaks = {
        "SGD(weight_decay) step": peak_bytes(opt_plain.step, device),
        "step, l2 attached": peak_bytes(opt_ours.step, device),
        "step, l1 attached (proximal)": peak_bytes(opt_l1.step, device),
        "rc.loss() backward, through autograd": peak_bytes(
            lambda: autograd_coll.loss().backward(), device
        ),
    }
    print(
        "\npeak memory held during the call (parameters: "
        f"{sum(p.numel() * p.element_size() for p in plain) / 2**20:.1f} MiB)"
    )
    for name, peak in peaks.items():
        print(f"{name:<44} {peak / 2**20:9.1f} MiB")
    out.update({f"large peak MiB: {k}": v / 2**20 for k, v in peaks.items()})
    del l1, autograd, opt_l1

    # 5b. many small: 100 x Linear(64, 64), weight decay on the kernels only.
    def layers() -> torch.nn.ModuleList:
        torch.manual_seed(0)
        model = torch.nn.ModuleList(torch.nn.Linear(64, 64, device=device) for _ in range(100))
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        return model

    groups = layers()
    opt_groups = torch.optim.SGD(
        [
            {"params": [m.weight for m in groups], "weight_decay": wd},
            {"params": [m.bias for m in groups], "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    small = layers()
    small_coll = rc.Collection()
    rc.regularize(small, kernel=rc.l2(wd / 2), collection=small_coll)
    opt_small = torch.optim.SGD(small.parameters(), lr=1e-3)
    rc.attach_optimizer(opt_small, collection=small_coll)

    def small_with_loss() -> None:
        small_coll.loss()
        opt_small.step()

    medians = measure(
        {
            "SGD(weight_decay), parameter groups": opt_groups.step,
            "rc.loss() + step, attached": small_with_loss,
            "step alone, attached": opt_small.step,
        },
        repeats,
        inner=10,
        device=device,
    )
    report(
        "5b. fused step: 100 x Linear(64, 64), l2 on the kernels",
        medians,
        "SGD(weight_decay), parameter groups",
    )
    out.update({f"small: {k}": v for k, v in medians.items()})
    return out


def cuda_graph(step: Callable[[], None], opt: torch.optim.Optimizer) -> Callable[[], None]:
    """``step`` captured in a CUDA graph (the recipe of PyTorch's CUDA-graphs notes): warmed
    up on a side stream, captured once; the returned callable replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def real_size(repeats: int, device: torch.device, batch: int) -> dict[str, float]:
    """ResNet-50 and ViT-B/16 (no weights): a whole training step with rc.l2 on the kernels
    against SGD(weight_decay) on the same parameters, and the penalty alone against the
    optimizer's weight-decay update. bf16 autocast on CUDA, as such models are trained."""
    from models import resnet50, vit_b16

    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    wd = 1e-4
    out: dict[str, float] = {}
    for name, build in (("ResNet-50", resnet50), ("ViT-B/16", vit_b16)):
        torch.manual_seed(0)
        plain = build().to(device)
        ours = build().to(device)
        ours.load_state_dict(plain.state_dict())
        coll = rc.Collection()
        rc.regularize(ours, kernel=rc.l2(wd / 2), collection=coll)
        params = [e.resolve() for e in coll.entries()]
        # weight_decay on exactly the tensors regcollect regularizes (same names in both)
        kernels = {n for n, p in ours.named_parameters() if any(p is q for q in params)}
        decay = [p for n, p in plain.named_parameters() if n in kernels]
        rest = [p for n, p in plain.named_parameters() if n not in kernels]
        opt_plain = torch.optim.SGD(
            [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}],
            lr=1e-3,
            momentum=0.9,
        )
        opt_ours = torch.optim.SGD(ours.parameters(), lr=1e-3, momentum=0.9)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

        def step_plain(model=plain, opt=opt_plain, amp=autocast) -> None:
            opt.zero_grad()
            with amp:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

        def step_ours(model=ours, opt=opt_ours, amp=autocast, coll=coll) -> None:
            opt.zero_grad()
            with amp:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            (loss + coll.loss()).backward()
            opt.step()

        for p in params:
            p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]

        def penalty(coll=coll) -> None:
            coll.loss().backward()

        def weight_decay(grads=grads, params=params) -> None:
            torch._foreach_add_(grads, params, alpha=wd)

        count = sum(p.numel() for p in params) / 1e6
        medians = measure(
            {
                "SGD(weight_decay) step": step_plain,
                "rc.loss() + SGD step": step_ours,
                "penalty alone: rc.loss() fwd+bwd": penalty,
                "penalty alone: foreach weight decay": weight_decay,
            },
            repeats,
            inner=2,
            device=device,
        )
        report(
            f"4. {name}, batch {batch}, {len(params)} kernels ({count:.1f}M parameters)",
            medians,
            "SGD(weight_decay) step",
        )
        for key, value in medians.items():
            out[f"{name}: {key}"] = value
    return out


def beyond_summary(medians: dict[str, float]) -> None:
    for case in ("many-small", "large"):
        l2 = medians[f"{case}: l2 fwd+bwd"]
        print(
            f"{case}: L2-SP {medians[f'{case}: l2sp fwd+bwd'] / l2:.2f}x, group lasso "
            f"{medians[f'{case}: group lasso fwd+bwd'] / l2:.2f}x plain L2's time"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description="rc.loss() benchmark")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--real-size",
        type=int,
        default=None,
        metavar="BATCH",
        help="run scenario 4 (ResNet-50, ViT-B/16) at this batch size (default: 64 on CUDA, "
        "not run on the CPU)",
    )
    parser.add_argument(
        "--only", choices=["beyond"], default=None, help="run only scenario 6 (L2-SP, group lasso)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"torch {torch.__version__}, device {device} ({name}), threads "
        f"{torch.get_num_threads()}, repeats {args.repeats} (medians)"
    )
    if args.only == "beyond":
        beyond_summary(beyond(args.repeats, device))
        return
    small = many_small(args.repeats, device)
    big = large(args.repeats, device)
    step = training_step(args.repeats, device)
    base = small["regcollect rc.loss()"]
    print("\n## summary")
    print(
        f"many-small: {small['python loop (torch.norm)'] / base:.2f}x faster than the loop", end=""
    )
    keras_key = "keras 3 sum(model.losses), torch backend"
    print(f", {small[keras_key] / base:.2f}x faster than Keras" if keras_key in small else "")
    print(
        f"large: {big['regcollect rc.loss() fwd+bwd'] / big['optimizer foreach weight decay']:.2f}x"
        " the optimizer's weight-decay update"
    )
    plain, ours = step["SGD(weight_decay) step"], step["rc.loss() + SGD step"]
    print(f"training step overhead: {100 * (ours / plain - 1):+.1f}%")
    fused = fused_step(args.repeats, device)
    big_plain = fused["large: SGD(weight_decay) step"]
    small_plain = fused["small: SGD(weight_decay), parameter groups"]
    big_loss = fused["large: rc.loss() + step, attached"] / big_plain
    big_alone = fused["large: step alone, attached"] / big_plain
    small_loss = fused["small: rc.loss() + step, attached"] / small_plain
    small_alone = fused["small: step alone, attached"] / small_plain
    print(
        f"fused step, large: rc.loss() + step {big_loss:.2f}x, step alone {big_alone:.2f}x "
        f"SGD(weight_decay); many-small: {small_loss:.2f}x / {small_alone:.2f}x"
    )
    peak = {k.split(": ", 1)[1]: v for k, v in fused.items() if k.startswith("large peak")}
    print(
        "fused step, large, peak memory: "
        + ", ".join(f"{name} {mib:.1f} MiB" for name, mib in peak.items())
    )
    beyond_summary(beyond(args.repeats, device))
    batch = args.real_size if args.real_size is not None else (64 if device.type == "cuda" else 0)
    if batch:
        real = real_size(args.repeats, device, batch)
        for model in ("ResNet-50", "ViT-B/16"):
            plain, ours = (
                real[f"{model}: SGD(weight_decay) step"],
                real[f"{model}: rc.loss() + SGD step"],
            )
            alone = real[f"{model}: penalty alone: rc.loss() fwd+bwd"]
            update = real[f"{model}: penalty alone: foreach weight decay"]
            print(
                f"{model}: training step overhead {100 * (ours / plain - 1):+.1f}%, "
                f"penalty alone {alone / update:.2f}x the weight-decay update"
            )
    if device.type == "cpu" and keep_freed_memory():
        print("\n## 2b. large again, malloc keeping freed memory (no page faults on fresh tensors)")
        kept = large(args.repeats, device)
        print(
            f"large, malloc keeping freed memory: "
            f"{kept['regcollect rc.loss() fwd+bwd'] / kept['optimizer foreach weight decay']:.2f}x"
            " the optimizer's weight-decay update"
        )


if __name__ == "__main__":
    main()
