"""Hugging Face ``Trainer`` with regcollect's penalties: change one name.

``RegularizedTrainer`` is ``transformers.Trainer`` whose training loss includes the model's
penalties, added exactly once per optimizer step, and whose logs show each penalty.
``RegularizationMixin`` does the same for a ``Trainer`` subclass you already use
(``class MyTrainer(RegularizationMixin, SFTTrainer)``). ``regularize`` registers a penalty on
exactly the parameters the Trainer's ``weight_decay`` decays.

The last example is ``Trainer(weight_decay=wd)`` itself, exactly (the weights equal bit for
bit, gradient accumulation included).

Examples:
    >>> from regcollect.integrations.transformers import RegularizedTrainer, regularize
    >>> regularize(model, rc.l2(1e-4))     # the Trainer's decay set  # doctest: +SKIP
    >>> trainer = RegularizedTrainer(model, args, train_dataset=ds)          # doctest: +SKIP
    >>> trainer.train()                                                      # doctest: +SKIP

    >>> args = TrainingArguments(..., weight_decay=0.0)                      # doctest: +SKIP
    >>> regularize(model, rc.l2(wd / 2))                                     # doctest: +SKIP
    >>> trainer = RegularizedTrainer(  # doctest: +SKIP
    ...     model=model, args=args, train_dataset=ds, regularization_in_step="decoupled")
"""

from __future__ import annotations

from typing import Any, Literal

from . import require

require("transformers", "transformers", __name__)

import torch  # noqa: E402
import transformers  # noqa: E402

from .._attach import add_regularizer  # noqa: E402
from .._checks import check_module  # noqa: E402
from .._collection.collection import Collection  # noqa: E402
from .._collection.handle import Handle  # noqa: E402
from .._context import active_collection  # noqa: E402
from .._stepping import attach_optimizer  # noqa: E402
from ..regularizers import RegularizerArg  # noqa: E402
from ..schedules import resume as resume_schedules  # noqa: E402

__all__ = ["RegularizationMixin", "RegularizedTrainer", "decay_parameter_names", "regularize"]

_IN_STEP = (None, "coupled", "decoupled")


def decay_parameter_names(model: torch.nn.Module) -> list[str]:
    """The names of the parameters ``transformers.Trainer`` gives its ``weight_decay``.

    Transformers' own rule (``Trainer.get_decay_parameter_names``), whatever the architecture:
    every parameter outside a ``LayerNorm`` whose name says neither bias nor norm, 0-D and 1-D
    ones included (CLIP's ``logit_scale``, ConvNeXt's layer scales), which ``rc.regularize``'s
    ``kernel=`` (rank >= 2, timm's rule) leaves out.

    Args:
        model: The model.

    Returns:
        Qualified parameter names, as ``model.named_parameters()`` spells them.
    """
    # An instance method that reads nothing of the Trainer: called without one.
    rule = transformers.Trainer.get_decay_parameter_names
    return list(rule(None, check_module(model)))  # type: ignore[arg-type]


def regularize(
    model: torch.nn.Module, regularizer: RegularizerArg, *, collection: Collection | None = None
) -> Handle:
    """Register ``regularizer`` on exactly the parameters ``Trainer(weight_decay=...)`` decays.

    With ``weight_decay=0`` in the ``TrainingArguments``, ``regularize(model, rc.l2(wd / 2))``
    and ``RegularizedTrainer(..., regularization_in_step="decoupled")`` train exactly as
    ``Trainer(weight_decay=wd)`` does; with the penalty in the loss (the default) it is the
    coupled L2 penalty on the same tensors, shown in the logs.

    Args:
        model: The model.
        regularizer: The penalty: anything ``rc.regularizers.get`` accepts except None.
        collection: The collection to register in (default: the active one).

    Returns:
        A ``Handle`` of what was registered; ``.remove()`` undoes it.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``regularizer`` is None or not a regularizer.

    Examples:
        >>> import transformers, regcollect as rc
        >>> from regcollect.integrations.transformers import regularize
        >>> config = transformers.CLIPConfig(  # doctest: +SKIP
        ...     text_config={"hidden_size": 8, "num_hidden_layers": 1},
        ...     vision_config={"hidden_size": 8, "num_hidden_layers": 1})
        >>> handle = regularize(transformers.CLIPModel(config), rc.l2(1e-4))  # doctest: +SKIP
        >>> "logit_scale" in [e.name for e in handle.entries]  # doctest: +SKIP
        True
    """
    names = decay_parameter_names(model)
    coll = active_collection(collection)
    return Handle.join([add_regularizer(model, n, regularizer, collection=coll) for n in names])


# regularization_log -> the penalties() view it logs.
_LOGS: dict[str, Literal["total", "module", "entry"]] = {
    "total": "total",
    "per_module": "module",
    "per_parameter": "entry",
}


class RegularizationMixin:
    """Adds ``collection.loss(model)`` to the training loss and the penalties to the logs.

    - **Once per optimizer step.** The Trainer divides the loss by the gradient-accumulation
      steps unless it is already normalised over the whole accumulated batch (the model takes
      ``num_items_in_batch``, or a ``compute_loss_func`` is set); in that case the penalty is
      divided here, so that the accumulated micro-batches add up to one penalty either way.
    - **Training only.** Evaluation losses stay the data loss, as before (the model is in
      eval mode there; activity penalties are not recorded under ``no_grad``).
    - **Logs**: every time the Trainer logs the training loss, the penalties of the last
      ``loss()`` are added (one device-to-host copy): ``{prefix}total`` alone
      (``regularization_log="total"``, the default), with one ``{prefix}module/{module}`` per
      module holding penalties (``"per_module"``), or with one ``{prefix}penalty/{entry}`` per
      regularized tensor (``"per_parameter"``: a dozen keys per transformer layer).

    - **In the optimizer step**, with ``regularization_in_step="coupled"`` or
      ``"decoupled"``: the Trainer's optimizer is attached when it is created
      (``rc.attach_optimizer``); the penalties it applies stay in the logged loss without a
      gradient. ``"decoupled"`` with ``rc.l2(wd / 2)`` on ``decay_parameter_names`` is the
      Trainer's own AdamW ``weight_decay=wd``.

    Args:
        *args: The wrapped Trainer's positional arguments.
        regularization_collection: the collection to use (default: the active one).
        regularization_log_prefix: prefix of the logged penalty names (default ``"reg/"``).
        regularization_log: ``"total"`` (default), ``"per_module"`` or ``"per_parameter"``:
            what the logs get of the penalties.
        regularization_in_step: None (the penalty in the loss), ``"coupled"`` or
            ``"decoupled"`` (applied by the Trainer's optimizer, see ``rc.attach_optimizer``).
        **kwargs: The wrapped Trainer's keyword arguments.

    Raises:
        TypeError: ``regularization_log_prefix`` is not a string.
        ValueError: ``regularization_in_step`` is not None, ``"coupled"`` or ``"decoupled"``;
            ``regularization_log`` is none of its values.

    Examples:
        >>> import transformers
        >>> from regcollect.integrations.transformers import RegularizationMixin
        >>> class MyTrainer(RegularizationMixin, transformers.Trainer):
        ...     pass   # or any Trainer subclass you already use
        >>> [c.__name__ for c in MyTrainer.__mro__[:3]]
        ['MyTrainer', 'RegularizationMixin', 'Trainer']
    """

    def __init__(
        self,
        *args: Any,
        regularization_collection: Collection | None = None,
        regularization_log_prefix: str = "reg/",
        regularization_in_step: str | None = None,
        regularization_log: str = "total",
        **kwargs: Any,
    ) -> None:
        if not isinstance(regularization_log_prefix, str):
            raise TypeError(
                "regularization_log_prefix must be a string, "
                f"got {type(regularization_log_prefix).__name__}"
            )
        if regularization_in_step not in _IN_STEP:
            raise ValueError(
                f"regularization_in_step must be None, 'coupled' or 'decoupled', "
                f"got {regularization_in_step!r}"
            )
        self.regularization_collection = active_collection(regularization_collection)
        self.regularization_log_prefix = regularization_log_prefix
        self.regularization_in_step = regularization_in_step
        if regularization_log not in _LOGS:
            raise ValueError(
                f"regularization_log must be one of {', '.join(map(repr, _LOGS))}, "
                f"got {regularization_log!r}"
            )
        self.regularization_log = regularization_log
        super().__init__(*args, **kwargs)

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's optimizer, attached to the collection when
        ``regularization_in_step`` says so; loading a checkpoint's optimizer state into it
        (``train(resume_from_checkpoint=...)``) restores the coefficient schedules' steps.

        Args:
            *args: Passed on to ``Trainer.create_optimizer``.
            **kwargs: Passed on to ``Trainer.create_optimizer``.

        Returns:
            What ``Trainer.create_optimizer`` returns.
        """
        optimizer = super().create_optimizer(*args, **kwargs)  # type: ignore[misc]
        # Before the Trainer loads a checkpoint's optimizer state: that load restores the
        # coefficient schedules' steps (resume_from_checkpoint).
        resume_schedules(self.optimizer)  # type: ignore[attr-defined]
        if self.regularization_in_step is not None:
            attach_optimizer(
                self.optimizer,  # type: ignore[attr-defined]
                collection=self.regularization_collection,
                decoupled=self.regularization_in_step == "decoupled",
            )
        return optimizer

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The Trainer's loss, plus the model's penalties when training.

        Args:
            model: The model being trained (or evaluated).
            inputs: The batch.
            return_outputs: Whether to return ``(loss, outputs)``.
            num_items_in_batch: The Trainer's count of items over the accumulated batch.

        Returns:
            The loss, or ``(loss, outputs)``, as ``Trainer.compute_loss`` returns them.
        """
        result = super().compute_loss(  # type: ignore[misc]
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        penalty = self.regularization_collection.loss(model)
        if self._loss_scaled_for_accumulation(num_items_in_batch):
            penalty = penalty / self.current_gradient_accumulation_steps  # type: ignore[attr-defined]
        loss = loss + penalty.to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        """Whether the Trainer leaves the loss undivided by the accumulation steps (its own
        rule, ``Trainer.training_step``)."""
        fixed = getattr(self, "loss_is_scaled_for_ga", None)
        if fixed is not None:
            return bool(fixed)
        return bool(
            (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            or getattr(self, "compute_loss_func", None) is not None
        )

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the penalties of the last ``loss()`` to a training log.

        Args:
            logs: The values the Trainer logs.
            *args: Passed on to ``Trainer.log``.
            **kwargs: Passed on to ``Trainer.log``.
        """
        if "loss" in logs:  # a training log
            model = getattr(self, "model", None)
            scope = model if isinstance(model, torch.nn.Module) else None
            view = _LOGS[self.regularization_log]
            prefix = self.regularization_log_prefix
            logs = {
                **logs,
                **self.regularization_collection.penalties(scope, by=view, prefix=prefix),
            }
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


class RegularizedTrainer(RegularizationMixin, transformers.Trainer):
    """``transformers.Trainer`` with regcollect's penalties (see ``RegularizationMixin``).

    Args:
        *args: ``transformers.Trainer``'s positional arguments.
        regularization_collection: the collection to use (default: the active one).
        regularization_log_prefix: prefix of the logged penalty names (default ``"reg/"``).
        regularization_in_step: None (the penalty in the loss), ``"coupled"`` or
            ``"decoupled"`` (applied by the Trainer's optimizer).
        regularization_log: ``"total"`` (default), ``"per_module"`` or ``"per_parameter"``.
        **kwargs: ``transformers.Trainer``'s keyword arguments.

    Raises:
        TypeError: ``regularization_log_prefix`` is not a string.
        ValueError: ``regularization_in_step`` is not None, ``"coupled"`` or ``"decoupled"``;
            ``regularization_log`` is none of its values.

    Examples:
        >>> import regcollect as rc
        >>> from regcollect.integrations.transformers import RegularizedTrainer, regularize
        >>> regularize(model, rc.l2(1e-4))    # the Trainer's decay set  # doctest: +SKIP
        >>> trainer = RegularizedTrainer(model, args, train_dataset=ds)  # doctest: +SKIP
        >>> trainer.train()   # logs "reg/total" beside "loss"  # doctest: +SKIP
    """
