"""The package's structure, counted from its source by ``tests/architecture.py`` (AST only,
no import): the numbers issue 36 set, and the picture ``docs/architecture.md`` shows."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import architecture

RESULT = architecture.scan()


def test_no_private_name_is_reached_across_packages():
    assert RESULT["private_reaches"] == []


def test_no_import_cycle_between_modules_or_packages():
    assert RESULT["cycles"] == [] and RESULT["package_cycles"] == []


def test_no_sys_modules_write_and_no_heap_scan():
    assert RESULT["sys_modules_writes"] == [] and RESULT["gc_scans"] == []


def test_functions_and_modules_stay_short():
    assert RESULT["long_functions"] == []
    assert RESULT["long_modules"] == []


def test_the_architecture_page_shows_the_real_import_graph():
    page = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    shown = re.search(r"```text\n(.*?)\n```", page, re.S)
    assert shown is not None
    assert shown.group(1) == architecture.picture(RESULT["graph"])  # type: ignore[arg-type]


# -- a new penalty touches one place: this file -------------------------------------------------


def test_a_new_penalty_with_its_kernel_is_defined_in_one_place():
    """``c * sum(log(1 + x**2))`` (a log-sum penalty, sparsity-inducing like L1 but smooth),
    with a kernel and a step term defined here only: its value through rc.loss(), its gradient,
    and the attached step (coupled) equal to the gradient written by hand."""
    import torch

    import regcollect as rc
    from regcollect._penalties.base import Term
    from regcollect._penalties.kernel import Kernel, register_kernel

    class LogSum(rc.Regularizer):
        def __init__(self, c=0.01):
            self.c = c

        def __call__(self, x):
            return self.c * torch.log1p(x.float() ** 2).sum()

        def get_config(self):
            return {"c": self.c}

    class LogSumTerm(Term):
        local = True  # elementwise: applies shard by shard

        def coupled_(self, coef, params, grads, where, *, sign, grad_scale):
            for p, g in zip(params, grads):
                g.add_(sign * coef * 2 * p / (1 + p * p) * (grad_scale or 1.0))

    class LogSumKernel(Kernel):
        def terms(self, reg):
            return ((LogSumTerm(), reg.c),)

    register_kernel(LogSum, LogSumKernel())

    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 3)
    coll = rc.Collection()
    rc.add_regularizer(layer, "weight", LogSum(0.5), collection=coll)
    w = layer.weight.detach().clone()
    assert coll.loss().item() == torch.log1p(w**2).sum().mul(0.5).item()
    (grad,) = torch.autograd.grad(coll.loss(), [layer.weight])
    assert torch.allclose(grad, 0.5 * 2 * w / (1 + w * w))
    opt = torch.optim.SGD([layer.weight], lr=0.1)
    rc.attach_optimizer(opt, collection=coll)
    layer.weight.grad = torch.zeros_like(w)
    opt.step()
    assert torch.allclose(layer.weight.detach(), w - 0.1 * 0.5 * 2 * w / (1 + w * w))


def test_a_term_no_grouped_kernel_computes_is_refused_at_registration():
    """A term with ``p = 0.5``: the grouped kernels compute p = 1 and 2 only, so registering
    it is a clear error, not a failure at the first loss()."""
    import pytest
    import torch

    import regcollect as rc
    from regcollect._penalties.base import Term
    from regcollect._penalties.kernel import Kernel, register_kernel

    class Root(rc.Regularizer):
        def __call__(self, x):
            return x.abs().sqrt().sum()

    class RootTerm(Term):
        p = 0.5

    class RootKernel(Kernel):
        def terms(self, reg):
            return ((RootTerm(), 1.0),)

    register_kernel(Root, RootKernel())
    with pytest.raises(ValueError, match=r"weight': RootTerm has p = 0.5.*1 or 2"):
        rc.add_regularizer(torch.nn.Linear(2, 2), "weight", Root(), collection=rc.Collection())
