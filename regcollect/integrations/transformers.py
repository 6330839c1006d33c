"""Hugging Face ``Trainer`` with regcollect's penalties: change one name.

``RegularizedTrainer`` is ``transformers.Trainer`` whose training loss includes the model's
penalties, added exactly once per optimizer step, and whose logs show each penalty.
``RegularizationMixin`` does the same for a ``Trainer`` subclass you already use
(``class MyTrainer(RegularizationMixin, SFTTrainer)``).

Examples:
    >>> from regcollect.integrations.transformers import RegularizedTrainer  # doctest: +SKIP
    >>> rc.regularize(model, kernel=rc.l2(1e-4), embeddings=rc.l2(1e-4))     # doctest: +SKIP
    >>> trainer = RegularizedTrainer(model=model, args=args, train_dataset=ds)  # doctest: +SKIP
    >>> trainer.train()                                                      # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from . import require

require("transformers", "transformers", __name__)

import torch  # noqa: E402
import transformers  # noqa: E402

from .._collection import Collection  # noqa: E402
from .._context import active_collection  # noqa: E402

__all__ = ["RegularizationMixin", "RegularizedTrainer"]


class RegularizationMixin:
    """Adds ``collection.loss(model)`` to the training loss and the penalties to the logs.

    - **Once per optimizer step.** The Trainer divides the loss by the gradient-accumulation
      steps unless it is already normalised over the whole accumulated batch (the model takes
      ``num_items_in_batch``, or a ``compute_loss_func`` is set); in that case the penalty is
      divided here, so that the accumulated micro-batches add up to one penalty either way.
    - **Training only.** Evaluation losses stay the data loss, as before (the model is in
      eval mode there; activity penalties are not recorded under ``no_grad``).
    - **Logs**: every time the Trainer logs the training loss, ``{prefix}{entry}`` and
      ``{prefix}total`` from the last ``loss()`` are added (one device-to-host copy).

    Args:
        *args: The wrapped Trainer's positional arguments.
        regularization_collection: the collection to use (default: the active one).
        regularization_log_prefix: prefix of the logged penalty names (default ``"reg/"``).
        **kwargs: The wrapped Trainer's keyword arguments.

    Raises:
        TypeError: ``regularization_log_prefix`` is not a string.

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
        **kwargs: Any,
    ) -> None:
        if not isinstance(regularization_log_prefix, str):
            raise TypeError(
                "regularization_log_prefix must be a string, "
                f"got {type(regularization_log_prefix).__name__}"
            )
        self.regularization_collection = active_collection(regularization_collection)
        self.regularization_log_prefix = regularization_log_prefix
        super().__init__(*args, **kwargs)

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
            values = self.regularization_collection.penalties(scope)
            prefix = self.regularization_log_prefix
            logs = {**logs, **{f"{prefix}{name}": value for name, value in values.items()}}
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


class RegularizedTrainer(RegularizationMixin, transformers.Trainer):
    """``transformers.Trainer`` with regcollect's penalties (see ``RegularizationMixin``).

    Args:
        *args: ``transformers.Trainer``'s positional arguments.
        regularization_collection: the collection to use (default: the active one).
        regularization_log_prefix: prefix of the logged penalty names (default ``"reg/"``).
        **kwargs: ``transformers.Trainer``'s keyword arguments.

    Raises:
        TypeError: ``regularization_log_prefix`` is not a string.

    Examples:
        >>> import regcollect as rc
        >>> from regcollect.integrations.transformers import RegularizedTrainer
        >>> rc.regularize(model, kernel=rc.l2(1e-4), embeddings=rc.l2(1e-4))  # doctest: +SKIP
        >>> trainer = RegularizedTrainer(model=model, args=args, train_dataset=ds)  # doctest: +SKIP
        >>> trainer.train()   # logs "reg/total" and each penalty  # doctest: +SKIP
    """
