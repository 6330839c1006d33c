"""What differs between the torch versions regcollect supports, in one place.

The rest of the package asks this module, never ``torch.__version__`` or ``hasattr(torch, ...)``.
The supported range is ``pyproject.toml``'s ``torch`` requirement; ``.ci/run`` runs the suite on
its floor and on the newest torch the index serves.
"""

from __future__ import annotations

import re
import sys
import types
from typing import Any

import torch
import torch.fx

__all__ = [
    "COMPILED_LOSS_WITHOUT_GRAPH_BREAKS",
    "CONSTANT_FUNCTIONS_TAKE_OBJECTS",
    "EXPORT_IS_SEEN",
    "TORCH_VERSION",
    "calls_under_way",
    "in_backward",
    "is_compiling",
    "is_tracing",
    "parse_version",
]


def parse_version(text: str) -> tuple[int, int, int]:
    """``"2.13.0+cpu"`` -> ``(2, 13, 0)``; pre-release and local parts are ignored.

    Compared as tuples: comparing the strings puts ``"2.9"`` after ``"2.13"``.
    """
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        raise ValueError(f"torch version must look like 'MAJOR.MINOR[.PATCH]', got {text!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


TORCH_VERSION = parse_version(torch.__version__)

# Dynamo passes objects (a collection, a model) to a function marked constant from torch 2.13 on;
# older versions reject them ("is not a constant", seen on 2.11). There the function is traced
# like any other: the same values, with graph breaks at the scope's regular expressions.
CONSTANT_FUNCTIONS_TAKE_OBJECTS = TORCH_VERSION >= (2, 13)

# A compiled step with loss() in it traces as one graph from torch 2.13 on (checked on 2.13 and
# 2.14). On the floor, 2.6, dynamo breaks the graph where the engine looks a penalty's kernel up
# on its class, and at a scope's regular expressions: the values are the same as eager. The
# versions between are not checked in CI and are not promised to trace without breaks.
COMPILED_LOSS_WITHOUT_GRAPH_BREAKS = TORCH_VERSION >= (2, 13)

# torch.compiler.is_compiling is public from torch 2.3 on (dynamo's own flag is older). It is
# bound here, not wrapped, so dynamo sees the function it folds to a constant while tracing.
is_compiling = torch.compiler.is_compiling


# torch.compiler.is_exporting is public from torch 2.7 on. On 2.6 a strict torch.export looks
# like torch.compile from inside the model (is_compiling() only): forward hooks then run as
# in a compiled step, and the fake values they leave are dropped when read (_activity).
EXPORT_IS_SEEN = hasattr(torch.compiler, "is_exporting")
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def is_tracing() -> bool:
    """Whether ``torch.jit.trace``, ``torch.export`` or ``torch.fx.symbolic_trace`` is running
    the model to look at it (not to train it): forward hooks then record nothing."""
    return bool(torch.jit.is_tracing() or _is_exporting() or _is_fx_tracing())


# The flag torch.fx.symbolic_trace sets (there is no public one); newer torch warns on the
# older name, which also answers for torch.export.
_is_fx_tracing = getattr(
    torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing
)


def in_backward() -> bool:
    """Whether this thread is inside a backward pass (a forward pass run now is activation
    checkpointing recomputing). Eager only: torch has no public flag for it, so this reads
    the autograd engine's current node, as ``torch.utils.checkpoint`` itself does."""
    return torch._C._current_autograd_node() is not None


def calls_under_way(code: types.CodeType, local: str) -> list[Any]:
    """The local variable ``local`` of every frame of ``code`` under way in this thread,
    innermost first: which torch wrappers are running now (``Module.__call__``'s, whose
    ``self`` is the module; ``Optimizer.step``'s, whose ``args[0]`` is the optimizer)."""
    out = []
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            out.append(frame.f_locals.get(local))
        frame = frame.f_back
    return out
