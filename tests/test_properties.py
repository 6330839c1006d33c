"""Property-based tests: random shapes, dtypes, coefficients and registration sequences."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import regcollect as rc
from regcollect._engine.plan import Plan

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}

shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)
coefficients = st.floats(0.0, 10.0, allow_nan=False, allow_infinity=False)
kinds = st.sampled_from(["l1", "l2", "l1_l2"])


def make(kind: str, a: float, b: float) -> rc.Regularizer:
    return {"l1": rc.l1(a), "l2": rc.l2(a), "l1_l2": rc.l1_l2(l1=a, l2=b)}[kind]


def formula(kind: str, a: float, b: float, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, gradient) in float64, straight from the documented formulas."""
    x = x.detach().double()
    l1, l2 = {"l1": (a, 0.0), "l2": (0.0, a), "l1_l2": (a, b)}[kind]
    return l1 * x.abs().sum() + l2 * (x * x).sum(), l1 * x.sign() + 2 * l2 * x


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(shapes, st.sampled_from(DTYPES), kinds, coefficients, coefficients),
        min_size=0,
        max_size=6,
    ),
    st.integers(0, 2**31 - 1),
)
def test_plan_values_and_gradients_equal_the_formulas(specs, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = [
        (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype).requires_grad_(True)
        for shape, dtype, *_ in specs
    ]
    regs = [make(kind, a, b) for (_, _, kind, a, b) in specs]
    result = Plan(tensors, regs)()
    expected = [formula(kind, a, b, t) for t, (_, _, kind, a, b) in zip(tensors, specs)]
    total = sum((v for v, _ in expected), torch.zeros((), dtype=torch.float64))
    tol = max((TOLERANCE[t.dtype] for t in tensors), default=1e-10)
    assert result.total.dtype in (torch.float32, torch.float64)
    assert result.total.item() == pytest.approx(total.item(), rel=tol, abs=tol)
    if not tensors:
        return
    grads = torch.autograd.grad(result.total, tensors, allow_unused=True)
    for grad, x, (_, want) in zip(grads, tensors, expected):
        assert grad is not None and grad.dtype == x.dtype and grad.shape == x.shape
        # The gradient is computed in the tensor's own dtype: compare at that precision.
        assert torch.allclose(
            grad.double(),
            want.to(x.dtype).double(),
            rtol=1e-2 if x.dtype in (torch.float16, torch.bfloat16) else 1e-6,
            atol=1e-6,
        )


@settings(max_examples=40, deadline=None)
@given(
    shapes.filter(lambda s: len(s) >= 1), st.sampled_from(DTYPES), kinds, coefficients, coefficients
)
def test_a_regularizer_called_alone_agrees_with_the_engine(shape, dtype, kind, a, b):
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    reg = make(kind, a, b)
    alone = reg(x)
    engine = Plan([x], [reg])().total
    assert (
        alone.dtype == engine.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    )
    assert alone.item() == pytest.approx(engine.item(), rel=1e-5, abs=1e-6)


class RegistrationMachine(RuleBasedStateMachine):
    """Random add / re-register / remove / delete / replace / freeze sequences.

    The model of the world: for each (layer id, param), the registration in force, each one
    remembering the one it replaced. Removing a handle whose registration is in force brings
    back what it replaced (skipping registrations whose handle was removed meanwhile);
    removing one already replaced retires it. A registration equal to the one in force, made
    through a handle still held, is the same set-up code run again: it takes over what that
    one replaced (removing it removes both); a layer's own declaration is always restored.
    After every step the collection must hold exactly the registrations in force, once each,
    and ``loss()`` must equal their sum.
    """

    def __init__(self) -> None:
        super().__init__()
        self.coll = rc.Collection()
        self.layers: list[torch.nn.Linear] = []
        self.handles: list[tuple[tuple[int, str], rc.Handle, dict]] = []
        self.current: dict[tuple[int, str], dict] = {}

    def _register(self, key, reg, handle=False):
        replaced = self.current.get(key)
        if replaced is not None and replaced["handle"] and replaced["reg"] == reg:
            replaced = replaced["replaced"]
        record = {"reg": reg, "replaced": replaced, "retired": False, "handle": handle}
        self.current[key] = record
        return record

    def _restore(self, record):
        while record is not None and record["retired"]:
            record = record["replaced"]
        return record

    @rule(kind=kinds, a=coefficients, b=coefficients, bias=st.booleans())
    def add_layer(self, kind, a, b, bias):
        layer = rc.nn.Linear(
            3,
            2,
            kernel_regularizer=make(kind, a, b),
            bias_regularizer=make(kind, b, a) if bias else None,
            collection=self.coll,
        )
        self.layers.append(layer)
        self._register((id(layer), "weight"), layer.kernel_regularizer)
        if bias:
            self._register((id(layer), "bias"), layer.bias_regularizer)

    @precondition(lambda self: self.layers)
    @rule(data=st.data(), kind=kinds, a=coefficients, param=st.sampled_from(["weight", "bias"]))
    def register_again(self, data, kind, a, param):
        layer = self.layers[data.draw(st.integers(0, len(self.layers) - 1))]
        reg = make(kind, a, a)
        handle = rc.add_regularizer(layer, param, reg, collection=self.coll)
        key = (id(layer), param)
        self.handles.append((key, handle, self._register(key, reg, handle=True)))

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def remove_handle(self, data):
        key, handle, record = self.handles.pop(data.draw(st.integers(0, len(self.handles) - 1)))
        handle.remove()
        if self.current.get(key) is record:
            restored = self._restore(record["replaced"])
            if restored is None:
                del self.current[key]
            else:
                self.current[key] = restored
        else:
            record["retired"] = True

    @precondition(lambda self: self.layers)
    @rule(data=st.data())
    def delete_layer(self, data):
        # Drawn by index: hypothesis keeps drawn values, which would keep the layer alive.
        layer = self.layers.pop(data.draw(st.integers(0, len(self.layers) - 1)))
        for key in [k for k in self.current if k[0] == id(layer)]:
            del self.current[key]
        self.handles = [h for h in self.handles if h[0][0] != id(layer)]
        del layer  # no reference cycle: freed at once (a full gc.collect() per step is slow)

    @precondition(lambda self: self.layers)
    @rule(data=st.data(), value=st.floats(-2, 2))
    def replace_weight(self, data, value):
        layer = self.layers[data.draw(st.integers(0, len(self.layers) - 1))]
        layer.weight = torch.nn.Parameter(torch.full((2, 3), value))

    @precondition(lambda self: self.layers)
    @rule(data=st.data(), frozen=st.booleans())
    def freeze(self, data, frozen):
        self.layers[data.draw(st.integers(0, len(self.layers) - 1))].bias.requires_grad_(not frozen)

    @invariant()
    def collection_matches_the_model(self):
        assert len(self.coll) == len(self.current)
        names = [e.name for e in self.coll.entries()]
        assert len(set(names)) == len(names)
        by_id = {id(layer): layer for layer in self.layers}
        for layer in self.layers:  # the attributes read through to the collection
            assert layer.kernel_regularizer == self.current[(id(layer), "weight")]["reg"]
        want = torch.zeros((), dtype=torch.float64)
        for (layer_id, param), record in self.current.items():
            tensor = getattr(by_id[layer_id], param)
            if tensor.requires_grad:
                want = want + record["reg"](tensor.detach().double())
        value = self.coll.loss(self.layers) if self.layers else self.coll.loss()
        assert value.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)


RegistrationMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=20, deadline=None
)
test_registration_sequences_keep_the_collection_consistent = RegistrationMachine.TestCase
