"""What the engine promises on a GPU: no host synchronisation in ``rc.loss()`` and its backward,
whole training steps captured in CUDA graphs, mixed precision to float64 accuracy.

Skipped without a GPU (CI has none); the tests that take a ``device`` elsewhere in the suite
run on CUDA too where one is present.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import regcollect as rc
from regcollect._engine.plan import Plan
from regcollect._penalties.kernel import kernel_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")

# Documented (docs/performance.md): 16 or more small CPU tensors of one shape are stacked.
STACK_MIN = 16


@contextlib.contextmanager
def no_sync():
    """Any operation that makes the host wait for the GPU raises inside this block."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def l2_reference(tensors, coef):
    return sum(coef * (t.detach().double() ** 2).sum() for t in tensors)


# Every kind of regularizer; activity ones on the layer output.
KINDS = {
    "l1": {"kernel_regularizer": rc.l1(0.01), "bias_regularizer": rc.l1(0.02)},
    "l2": {"kernel_regularizer": rc.l2(0.01), "bias_regularizer": rc.l2(0.02)},
    "l1_l2": {"kernel_regularizer": rc.l1_l2(0.01, 0.02)},
    "orthogonal rows": {"kernel_regularizer": rc.orthogonal(0.1)},
    "orthogonal columns": {"kernel_regularizer": rc.Orthogonal(0.1, "columns")},
    "custom": {"kernel_regularizer": rc.regularizers.get(lambda w: 1e-3 * w.pow(4).sum())},
    "activity l1": {"activity_regularizer": rc.l1(1e-3)},
    "activity l2": {"activity_regularizer": rc.l2(1e-3)},
    "activity orthogonal": {"activity_regularizer": rc.orthogonal(1e-2)},
}


def reference_penalties(model, regs):
    """float64 value of each entry, computed from the layers' tensors (outputs for activity)."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, rc.nn.Linear):
            continue
        for attr, reg in regs.items():
            if attr == "activity_regularizer":
                continue
            param = "weight" if attr == "kernel_regularizer" else "bias"
            # Keras's orthogonal modes apply to a Linear weight's transpose (Keras's layout)
            applied = kernel_of(reg).bind(reg, module, param)
            out[f"{name}.{param}"] = applied(getattr(module, param).detach().double()).item()
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_loss_and_backward_never_synchronise(kind):
    regs = KINDS[kind]
    model = torch.nn.Sequential(
        rc.nn.Linear(32, 32, **regs), torch.nn.ReLU(), rc.nn.Linear(32, 8, **regs)
    ).to(CUDA)
    x = torch.randn(16, 32, device=CUDA)
    with no_sync():  # the first call builds the plan: it must not synchronise either
        for _ in range(3):
            rc.loss(model)  # a model scope, nothing pending: no sync either
            out = model(x)
            total = out.square().mean() + rc.loss()
            total.backward()
    # Read the values afterwards (a summary is allowed to copy to the host once).
    got = rc.penalties()
    for name, value in reference_penalties(model, regs).items():
        assert got[name] == pytest.approx(value, rel=1e-5), name
    if "activity_regularizer" in regs:
        reg = regs["activity_regularizer"]
        hidden = torch.nn.functional.linear(x, model[0].weight, model[0].bias).detach()
        want = reg(hidden.double()).item() / len(x)
        assert got["0:activity"] == pytest.approx(want, rel=1e-5)


def test_many_small_tensors_half_precision_and_scopes_never_synchronise():
    layers = torch.nn.ModuleList(
        rc.nn.Linear(8, 8, kernel_regularizer=rc.l2(1e-2), bias_regularizer=rc.l1(1e-3))
        for _ in range(2 * STACK_MIN)
    ).to(CUDA)
    half = rc.nn.Linear(64, 64, kernel_regularizer=rc.l1_l2(1e-3, 1e-3), dtype=torch.bfloat16)
    half.to(CUDA)
    with no_sync():
        for scope in (layers, half, [layers, half]):
            rc.loss(scope).backward()
    want = l2_reference([layer.weight for layer in layers], 1e-2)
    want += sum(1e-3 * layer.bias.detach().double().abs().sum() for layer in layers)
    assert rc.penalties(layers)["total"] == pytest.approx(want.item(), rel=1e-5)
    w = half.weight.detach().double()
    want_half = 1e-3 * w.abs().sum() + 1e-3 * (w**2).sum()
    assert rc.penalties(half)["total"] == pytest.approx(want_half.item(), rel=1e-5)


def test_small_cuda_tensors_are_not_stacked_and_equal_the_loop():
    tensors = [torch.randn(3, 3, device=CUDA, requires_grad=True) for _ in range(STACK_MIN + 4)]
    total = Plan(tensors, [rc.l2(0.1)] * len(tensors))().total
    assert total.item() == pytest.approx(l2_reference(tensors, 0.1).item(), rel=1e-6)
    grads = torch.autograd.grad(total, tensors)
    for g, t in zip(grads, tensors):
        assert torch.allclose(g, 0.2 * t)
    # One foreach node, no stacked copy: a gradient tensor each, not rows of one.
    assert len({g.untyped_storage().data_ptr() for g in grads}) == len(tensors)


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        rc.nn.Linear(32, 64, kernel_regularizer=rc.l2(1e-2), bias_regularizer=rc.l1(1e-3)),
        torch.nn.ReLU(),
        rc.nn.Linear(
            64, 64, kernel_regularizer=rc.orthogonal(1e-2), activity_regularizer=rc.l2(1e-3)
        ),
        torch.nn.ReLU(),
        rc.nn.Linear(64, 4, kernel_regularizer=rc.l1_l2(1e-3, 1e-2)),
    ).to(CUDA)


def eager_run(model, batches, steps):
    """Loss and penalties of each step of plain eager training, and the final weights."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses, penalties = [], []
    for i in range(steps):
        x, y = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y) + rc.loss(model)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        penalties.append(rc.penalties(model))
    return losses, penalties, [p.detach().clone() for p in model.parameters()]


def batches():
    g = torch.Generator(device="cpu").manual_seed(1)
    return [
        (
            torch.randn(16, 32, generator=g).to(CUDA),
            torch.randint(0, 4, (16,), generator=g).to(CUDA),
        )
        for _ in range(3)
    ]


def test_a_whole_training_step_captured_in_a_cuda_graph_equals_eager():
    data = batches()
    model = make_model()
    reference = copy.deepcopy(model)  # registers the same regularizers on the copy
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    static_x, static_y = (t.clone() for t in data[0])

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(static_x), static_y) + rc.loss(model)
        loss.backward()
        opt.step()
        return loss

    # The recipe of the CUDA-graphs docs: warm up on a side stream (these are real steps,
    # which the eager reference repeats), then capture one step and replay it.
    losses = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            static_x.copy_(data[i % 3][0])
            static_y.copy_(data[i % 3][1])
            losses.append(step().item())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = step()
    penalties = []
    for i in range(3, 9):
        static_x.copy_(data[i % 3][0])
        static_y.copy_(data[i % 3][1])
        graph.replay()
        losses.append(static_loss.item())
        penalties.append(rc.penalties(model))  # the captured step's values, replayed
    want_losses, want_penalties, want_params = eager_run(reference, data, 9)
    assert losses == pytest.approx(want_losses, rel=1e-5)
    for got, want in zip(penalties, want_penalties[3:]):
        assert got == pytest.approx(want, rel=1e-5)
    for got, want in zip(model.parameters(), want_params):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_torch_compile_reduce_overhead_step_equals_eager():
    data = batches()
    model = make_model()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    @torch.compile(mode="reduce-overhead")
    def forward(x, y):
        return torch.nn.functional.cross_entropy(model(x), y) + rc.loss(model)

    losses, penalties = [], []
    for i in range(9):
        x, y = data[i % 3]
        opt.zero_grad(set_to_none=True)
        loss = forward(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        penalties.append(rc.penalties(model))
    want_losses, want_penalties, want_params = eager_run(reference, data, 9)
    assert losses == pytest.approx(want_losses, rel=1e-5)
    for got, want in zip(penalties, want_penalties):
        assert got == pytest.approx(want, rel=1e-5)
    for got, want in zip(model.parameters(), want_params):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def float64_penalties(model, x):
    """The penalties of ``make_model()`` computed in float64 from its weights and the
    activations autocast produced (the activity penalty sees the low-precision output)."""
    w = [m.weight.detach().double() for m in (model[0], model[2], model[4])]
    linear = torch.nn.functional.linear  # not the layers: they would record another pass
    hidden = linear(
        linear(x, model[0].weight, model[0].bias).relu(), model[2].weight, model[2].bias
    )
    hidden = hidden.detach().double()
    return {
        "0.weight": 1e-2 * (w[0] ** 2).sum().item(),
        "0.bias": 1e-3 * model[0].bias.detach().double().abs().sum().item(),
        "2.weight": rc.orthogonal(1e-2)(w[1].t()).item(),  # Keras's "rows" of a Dense kernel
        "2:activity": 1e-3 * (hidden**2).sum().item() / len(x),
        "4.weight": (1e-3 * w[2].abs().sum() + 1e-2 * (w[2] ** 2).sum()).item(),
    }


def test_bf16_autocast_penalties_equal_a_float64_reference():
    model = make_model()
    x, _ = batches()[0]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
        total = rc.loss(model)
    assert out.dtype == torch.bfloat16 and total.dtype == torch.float32
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = float64_penalties(model, x)
    got = rc.penalties(model)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-5), name
    assert total.item() == pytest.approx(sum(want.values()), rel=1e-5)


def test_fp16_grad_scaler_penalty_and_gradient_equal_a_float64_reference():
    model = make_model()
    x, _ = batches()[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
    with torch.autocast("cuda", dtype=torch.float16):
        model(x)  # records the activity penalty in float16
        want = float64_penalties(model, x)
    total = rc.loss(model)  # outside autocast, as the docs say
    scaler.scale(total).backward()
    scaler.unscale_(opt)
    got = rc.penalties(model)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-5), name
    # After unscaling, the gradient of the last kernel is its penalty's alone (the activity
    # penalty is upstream of it): 1e-3 sign(w) + 2 * 1e-2 w, against float64.
    w4 = model[4].weight.detach().double()
    want_grad = 1e-3 * torch.sign(w4) + 2e-2 * w4
    assert torch.allclose(model[4].weight.grad.double(), want_grad, rtol=1e-5, atol=1e-9)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**16  # no inf/NaN: the step was taken, the scale kept


def test_large_float32_tensor_value_to_float64_accuracy():
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(4096, 1024, device=CUDA))
    rc.add_regularizer(layer, "weight", rc.l2(0.05))
    want = l2_reference([layer.weight], 0.05).item()
    assert rc.loss().item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("decoupled", [False, True])
def test_attached_optimizer_step_never_synchronises_and_equals_cpu(decoupled):
    def run(device):
        torch.manual_seed(0)
        coll = rc.Collection()
        model = torch.nn.Sequential(
            rc.nn.Linear(8, 8, kernel_regularizer=rc.l1_l2(1e-2, 1e-2), collection=coll),
            torch.nn.Tanh(),
            rc.nn.Linear(
                8, 2, kernel_regularizer=rc.l1(1e-2), bias_regularizer=rc.l2(0.1), collection=coll
            ),
        ).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        rc.attach_optimizer(opt, decoupled=decoupled, collection=coll)
        x = torch.randn(4, 8).to(device)
        context = no_sync() if device.type == "cuda" else contextlib.nullcontext()
        with context:
            for _ in range(3):
                opt.zero_grad()
                (model(x).square().mean() + coll.loss()).backward()
                opt.step()
        return [p.detach().cpu() for p in model.parameters()]

    for got, want in zip(run(CUDA), run(torch.device("cpu"))):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
def test_an_attached_capturable_optimizer_with_a_device_learning_rate_never_syncs(decoupled):
    """The step hooks read no tensor on the host: a CUDA learning rate stays on the GPU
    (capturable Adam), and the decoupled L2 decay and L1 proximal step use it there. The
    result equals the same step with a float learning rate."""

    def build(lr):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        model = model.to(CUDA)
        coll = rc.Collection()
        rc.regularize(model, kernel=rc.l2(0.05), bias=rc.l1(0.01), collection=coll)
        opt = torch.optim.Adam(model.parameters(), lr=lr, capturable=True)
        rc.attach_optimizer(opt, decoupled=decoupled, collection=coll)
        return model, opt

    x, y = torch.randn(4, 8, device=CUDA), torch.randn(4, 2, device=CUDA)
    results = []
    for lr in (torch.tensor(0.01, device=CUDA), 0.01):
        model, opt = build(lr)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            with no_sync() if isinstance(lr, torch.Tensor) else contextlib.nullcontext():
                opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
