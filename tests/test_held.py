"""The hand-off of a penalty's gradient to an engine that holds parameters in parts
(``regcollect._distributed.held``), in one process: an engine of one rank whose "reduction" is the
parameter's own gradient accumulation. tests/distributed runs the real engines (FSDP1 with
flat parameters, DeepSpeed ZeRO-3) on 2 ranks."""

from __future__ import annotations

import pytest
import torch

from regcollect._distributed.held import Held, Part


class OneRank(Held):
    """The whole parameter is this rank's part, and nothing reduces its gradient."""

    engine = "a test engine"

    def __init__(self, param: torch.Tensor, name: str) -> None:
        super().__init__(param, 0, param.numel(), 1, None, name)

    def local(self) -> torch.Tensor:
        param = self._param()
        assert param is not None
        return param.detach().view(-1)


def penalty(parts: list[Part]) -> torch.Tensor:
    return torch.stack([0.5 * (p.current() ** 2).sum() for p in parts]).sum()


def test_the_gradient_reaches_the_parameter_with_the_forward_pass_gradient():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    held = OneRank(w, "'w'")
    parts = [Part(held, 0, 5), Part(held, 5, 12)]  # two entries in one held parameter
    x = torch.randn(4)
    out = (w @ x).square().sum()  # the forward pass first
    (out + penalty(parts)).backward()
    want = 2 * (w.detach() @ x)[:, None] * x[None, :] + w.detach()
    assert torch.allclose(w.grad, want, atol=1e-6)
    assert held.pending is None


def test_a_penalty_whose_gradient_comes_late_is_an_error_and_leaves_nothing_behind():
    """loss() before the forward pass: the penalty's nodes are older, autograd runs them
    after the parameters' gradients were handed on. Two late parameters: both are named, both
    are cleared, and the next step in the right order is exact."""
    torch.manual_seed(0)
    w, v = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(4))
    parts = [Part(OneRank(w, "'w'"), 0, 12), Part(OneRank(v, "'v'"), 0, 4)]
    x = torch.randn(4)
    early = penalty(parts)
    out = (w @ (x * v)).square().sum()
    with pytest.raises(RuntimeError) as error:
        (out + early).backward()
    message = str(error.value)
    assert "the penalty's gradient for 'v', 'w' arrived after a test engine had reduced" in message
    assert "compute rc.loss() after the model's forward pass" in message
    assert all(p.held.pending is None for p in parts)
    w.grad = v.grad = None
    out = (w @ (x * v)).square().sum()
    (out + penalty(parts)).backward()
    g_w, g_v = torch.autograd.grad((w @ (x * v)).square().sum(), [w, v])
    assert torch.allclose(w.grad, g_w + w.detach(), atol=1e-6)
    assert torch.allclose(v.grad, g_v + v.detach(), atol=1e-6)


class Boom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        raise ValueError("boom")


def test_a_backward_that_fails_midway_carries_nothing_into_the_next_step():
    """The penalty's gradient was stashed, then the backward pass failed before the engine
    took it: the next loss() starts clean instead of adding the stale gradient."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    held = OneRank(w, "'w'")
    x = torch.randn(4)
    failing = Boom.apply(w @ x).sum()  # older than the penalty: fails after its stash
    with pytest.raises(ValueError, match="boom"):
        (failing + penalty([Part(held, 0, 12)])).backward()
    w.grad = None
    out = (w @ x).square().sum()
    (out + penalty([Part(held, 0, 12)])).backward()
    want = 2 * (w.detach() @ x)[:, None] * x[None, :] + w.detach()
    assert torch.allclose(w.grad, want, atol=1e-6)
