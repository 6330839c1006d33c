"""Keras's ``OrthogonalRegularizer``: its value, and the kernel layout a ported model needs.

Its own module, as each penalty with more than a formula: the mode names, the layouts they
name (the transpose for Keras's ``(in, units)`` kernels, the output filters of transposed
convolutions: ``Rearranged``) and the autocast guard live together here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from .._checks import keywords_checked
from .base import Regularizer, accumulation_dtype, check_tensor, zero_like
from .coefficients import CoefficientArg, coefficient, scale
from .kernel import Kernel, register_kernel

__all__ = ["Orthogonal", "OrthogonalRegularizer", "Rearranged", "output_filters"]


class Orthogonal(Regularizer):
    """Keras ``OrthogonalRegularizer``: pushes vectors of a kernel towards orthogonality.

    ``factor * 0.5 * sum(abs(P * (1 - I))) / (s * (s - 1) / 2)`` where ``P`` is the Gram matrix
    of the ``s`` L2-normalised vectors the mode picks. Tensors of rank > 2 are flattened to
    ``(shape[0], -1)``; ``s == 1`` gives 0.

    Modes:

    - ``"outputs"``: one vector per output unit or filter (the rows of a torch weight, whose
      layout is ``(out, in, ...)``); ``"inputs"``: one per input (its columns). Named by what
      they make orthogonal, these mean the same on every layer.
    - ``"rows"`` (the default) and ``"columns"``: Keras's names, the rows or columns **of the
      kernel as Keras holds it**, so that a ported model gives Keras's numbers. On a tensor
      called directly, and on convolution and embedding weights (laid out alike in both), they
      are the tensor's rows and columns. A Keras ``Dense`` or recurrent kernel is
      ``(in, units)``, the transpose of torch's ``(units, in)`` weight; on the weights of
      ``Linear`` and recurrent layers, ``loss()`` therefore applies them to the transpose:
      ``"rows"`` there makes the input vectors orthogonal (``"inputs"``) and ``"columns"``
      the output units (``"outputs"``), as in Keras.

    Args:
        factor: The coefficient (a float >= 0 or a schedule).
        mode: ``"rows"``, ``"columns"``, ``"outputs"`` or ``"inputs"``.

    Raises:
        ValueError: An unknown ``mode``, or a negative, NaN or infinite ``factor``.

    Examples:
        >>> float(Orthogonal(1.0)(torch.tensor([[1.0, 0.0], [1.0, 0.0]])))  # two equal rows
        1.0
    """

    MODES = ("rows", "columns", "outputs", "inputs")

    @keywords_checked
    def __init__(self, factor: CoefficientArg = 0.01, mode: str = "rows") -> None:
        self.factor = coefficient("factor", factor)
        if mode not in self.MODES:
            raise ValueError(
                f'mode must be "rows" or "columns" (Keras\'s names) or "outputs" or "inputs", '
                f"got {mode!r}"
            )
        self.mode = mode

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = check_tensor(x, "Orthogonal")
        _check_rank(x)
        if x.numel() == 0:  # no rows or no columns: nothing to make orthogonal
            return zero_like(x) + 0.0 * x.sum()
        x = x.reshape(x.shape[0], -1).to(accumulation_dtype(x.dtype))
        if self.mode in ("columns", "inputs"):
            x = x.t()
        size = x.shape[0]
        if size < 2:
            # Keras divides by zero pairs here and returns NaN; one vector is trivially orthogonal.
            return zero_like(x) + 0.0 * x.sum()
        # Keras normalises with max(norm, epsilon); F.normalize does the same with eps=1e-12.
        x = torch.nn.functional.normalize(x, p=2.0, dim=1, eps=1e-12)
        if x.device.type in ("cuda", "cpu"):
            # In float32 at least, as every penalty: autocast would run the Gram matrix in
            # bfloat16/float16 (a ported bf16 model read 1.6e-4 relative off).
            with torch.autocast(x.device.type, enabled=False):
                product = x @ x.t()
        else:
            product = x @ x.t()
        off_diagonal = product * (1.0 - torch.eye(size, dtype=x.dtype, device=x.device))
        num_pairs = size * (size - 1.0) / 2.0
        return scale(self.factor, x) * 0.5 * off_diagonal.abs().sum() / num_pairs

    def get_config(self) -> dict[str, Any]:
        return {"factor": self.factor, "mode": self.mode}


OrthogonalRegularizer = Orthogonal


def _check_rank(x: torch.Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(
            f"Orthogonal expects a tensor of rank >= 2 (a kernel), got shape {tuple(x.shape)}"
        )


class _OrthogonalKernel(Kernel):
    """A formula (called on each tensor), with a rank check and Keras's kernel layout."""

    def check(self, reg: Any, x: torch.Tensor) -> None:
        _check_rank(x)

    def bind(self, reg: Any, module: torch.nn.Module | None, name: str | None) -> Regularizer:
        if type(reg) is not Orthogonal or name is None or not name.startswith("weight"):
            return reg  # type: ignore[no-any-return]
        # Keras's "rows"/"columns" name the vectors of the kernel as Keras holds it: a
        # Dense or recurrent kernel is (in, units), torch's Linear/RNN weight (units, in).
        if reg.mode in ("rows", "columns") and isinstance(
            module, (torch.nn.Linear, torch.nn.RNNBase)
        ):
            return Rearranged(reg, torch.t)
        # "outputs"/"inputs" mean the same on every layer: a transposed convolution's weight
        # is (in, out / groups, *kernel), its output filters are not its rows.
        if reg.mode in ("outputs", "inputs") and isinstance(
            module, torch.nn.modules.conv._ConvTransposeNd
        ):
            return Rearranged(reg, functools.partial(output_filters, groups=module.groups))
        return reg  # type: ignore[no-any-return]


register_kernel(Orthogonal, _OrthogonalKernel())


def output_filters(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A transposed convolution's weight ``(in, out / groups, *kernel)`` as one row per
    output channel, ``(out, in / groups * prod(kernel))``, as a convolution's weight is."""
    in_channels, out_per_group = weight.shape[:2]
    per_group = weight.reshape(groups, in_channels // groups, out_per_group, -1)
    return per_group.transpose(1, 2).reshape(groups * out_per_group, -1)


class Rearranged(Regularizer):
    """``regularizer`` applied to a weight laid out as it expects (``arrange(weight)``).

    What ``loss()`` evaluates for an ``Orthogonal`` whose mode names a layout other than the
    weight's: Keras's kernel layout on a ``Linear`` or recurrent weight (the transpose), the
    output filters of a transposed convolution; see the orthogonal kernel's ``bind``. Not
    registered, never stored: entries keep the regularizer the user gave.
    """

    def __init__(
        self, regularizer: Regularizer, arrange: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        self.regularizer = regularizer
        self.arrange = arrange

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.regularizer(self.arrange(x))

    def __repr__(self) -> str:
        return repr(self.regularizer)
