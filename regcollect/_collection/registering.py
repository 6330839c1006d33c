"""A collection's public registration methods, as ``Module.register_*`` are a module's: what
layers, ``rc.add_regularizer``, ``rc.regularize``, plans and ``compat.v1`` register through,
and ``attach_optimizer``.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .._optim import following as _following
from .._optim.attach import OptimizerAttachment, held_by
from .._optim.groups import GroupDecay, build, declared_l2, parameters
from .._optim.wrappers import stepped
from .._penalties.base import Regularizer
from .entries import Entry
from .guards import install_group_hook
from .handle import Handle
from .registry import Registry

__all__ = ["Registering"]


class Registering:
    """The registration half of ``regcollect.Collection``: entries, and optimizers that apply
    its penalties in their step."""

    _registry: Registry
    _attachments: list[OptimizerAttachment]
    _decay: GroupDecay

    def register(
        self, module: torch.nn.Module, param: str, regularizer: Regularizer, *, prefix: str = ""
    ) -> Handle:
        """Regularize ``module``'s parameter ``param`` (as ``Module.register_parameter`` adds
        one): one regularizer per parameter, so this replaces any earlier one.

        Args:
            module: The module holding the parameter.
            param: The parameter's name in ``module`` (``"weight"``).
            regularizer: A ``Regularizer`` (``regcollect.regularizers.get`` makes one).
            prefix: The scope prefix of the entry's name (``"decoder/"``).

        Returns:
            A handle; ``.remove()`` undoes exactly this registration.

        Raises:
            ValueError: ``module`` has no parameter ``param``; the regularizer cannot apply to
                it; a tied parameter already has another regularizer.
            TypeError: ``module`` is not a module, or ``regularizer`` not a ``Regularizer``.

        Examples:
            >>> import torch, regcollect as rc
            >>> coll = rc.Collection()
            >>> layer = torch.nn.Linear(2, 2)
            >>> handle = coll.register(layer, "weight", rc.l2(0.5))
            >>> coll.find(layer, "weight").regularizer
            L2(l2=0.5)
        """
        return self._registry.add_weight(module, param, regularizer, prefix=prefix)

    def register_activity(
        self, module: torch.nn.Module, regularizer: Regularizer, *, prefix: str = ""
    ) -> Handle:
        """Regularize ``module``'s output: ``regularizer(output) / batch_size`` per call (see
        the activity rule in ``regcollect._collection.activity``).

        Args:
            module: The module whose output is regularized.
            regularizer: A ``Regularizer``.
            prefix: The scope prefix of the entry's name.

        Returns:
            A handle; ``.remove()`` undoes exactly this registration.
        """
        return self._registry.add_activity(module, regularizer, prefix=prefix)

    def register_tensor(
        self, tensor: torch.Tensor, regularizer: Regularizer, name: str, *, prefix: str = ""
    ) -> Handle:
        """Regularize a bare tensor (held weakly) under ``name``: TF1's
        ``apply_regularization`` on a list of weights.

        Args:
            tensor: The tensor.
            regularizer: A ``Regularizer``.
            name: The entry's name.
            prefix: The scope prefix of the entry's name.

        Returns:
            A handle; ``.remove()`` undoes exactly this registration.
        """
        return self._registry.add_tensor(tensor, regularizer, name, prefix=prefix)

    def find(self, module: torch.nn.Module, param: str | None = None) -> Entry | None:
        """The entry on ``module``'s parameter ``param`` (None: on its output), if any.

        Args:
            module: The module.
            param: A parameter name, or None for the module's activity entry.

        Returns:
            The entry, or None.
        """
        return self._registry.entry_for(module, param)

    def unregister(self, entry: Entry) -> bool:
        """Remove ``entry`` if it is still registered here (not replaced since).

        Args:
            entry: An entry of this collection.

        Returns:
            Whether it was removed.
        """
        return self._registry._discard(entry) is not None

    def attach_optimizer(self, optimizer: Any, *, decoupled: bool = False) -> Handle:
        """``rc.attach_optimizer(optimizer, decoupled=..., collection=self)``: apply this
        collection's L1/L2/L1L2 (and L2-SP, group lasso) weight penalties in the step of
        ``optimizer`` (see there).

        Args:
            optimizer: An optimizer, or a wrapper that steps one.
            decoupled: AdamW's decay and proximal L1 (True), or the gradient (False).

        Returns:
            A handle; ``.remove()`` gives the penalties back to autograd.

        Raises:
            TypeError: ``optimizer`` is not an optimizer nor a wrapper of one; ``decoupled``
                is not a bool.
            ValueError: See ``rc.attach_optimizer``.
        """
        optimizer = stepped(optimizer)
        if not isinstance(decoupled, bool):
            raise TypeError(f"decoupled must be True or False, got {decoupled!r}")
        attachment = OptimizerAttachment(
            optimizer, **_attachment_view(weakref.ref(self)), owner=id(self), decoupled=decoupled
        )
        with self._registry.lock:
            # Attaching an optimizer again (set-up code run twice) replaces its attachment, so
            # the step applies each penalty once; those of collected optimizers are dropped.
            for old in [a for a in self._attachments if a.optimizer() in (None, optimizer)]:
                old.remove()
                self._attachments.remove(old)
            self._attachments.append(attachment)
        # Known from now on: loading its state (resuming a run) restores the schedules.
        _following.resume(optimizer)

        def undo() -> None:
            attachment.remove()
            with self._registry.lock:
                if attachment in self._attachments:
                    self._attachments.remove(attachment)

        return Handle([], undo)

    def param_groups(self, model_or_params: Any, **group_defaults: Any) -> list[dict[str, Any]]:
        """``rc.param_groups(model_or_params, collection=self, **group_defaults)``: parameter
        groups whose ``weight_decay`` applies this collection's lone L2 penalties (see there).

        Args:
            model_or_params: A module, or an iterable of its parameters.
            **group_defaults: Options every group gets (``lr=...``).

        Returns:
            The groups, for any optimizer's constructor.

        Raises:
            TypeError: ``model_or_params`` is neither a module nor an iterable of tensors.
            ValueError: ``group_defaults`` sets ``params`` or ``weight_decay``.
        """
        params = parameters(model_or_params)
        groups, decayed = build(params, declared_l2(self._registry.ordered), group_defaults)
        with self._registry.lock:
            self._decay.add(decayed)
        install_group_hook()
        return groups

    def _held_by_attachments(self) -> set[int]:
        return held_by(self._attachments)

    def _held_by_optimizers(self) -> set[int]:
        """The parameters whose penalties an optimizer applies (attached, or through the
        ``weight_decay`` of ``param_groups``): ``loss()`` gives them no gradient."""
        held = held_by(self._attachments)
        if len(self._decay):
            held |= self._decay.ids(declared_l2(self._registry.ordered))
        return held


def _attachment_view(ref: weakref.ref[Any]) -> dict[str, Any]:
    """What an optimizer attachment reads of its collection, held weakly (an optimizer
    keeps its hooks, and they must not keep the collection alive)."""

    def entries() -> list[Entry]:
        coll = ref()
        return [] if coll is None else coll.entries()

    def key() -> tuple[Any, ...] | None:
        coll = ref()
        return None if coll is None else (coll._registry.version, coll._attachment_key())

    def others(me: OptimizerAttachment) -> set[int]:
        coll = ref()
        return set() if coll is None else held_by(a for a in coll._attachments if a is not me)

    return {"entries": entries, "key": key, "others": others}
