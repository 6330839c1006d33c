"""A Lightning callback that logs every penalty of the last ``rc.loss()``, and restores the
coefficient schedules' steps when Lightning resumes from a checkpoint.

Add the penalty yourself in ``training_step`` (Lightning backpropagates what you return), and
let the callback report it:

Examples:
    >>> import lightning as L                                  # doctest: +SKIP
    >>> class Model(L.LightningModule):                        # doctest: +SKIP
    ...     def training_step(self, batch, batch_idx):
    ...         x, y = batch
    ...         return self.criterion(self(x), y) + rc.loss()
    >>> trainer = L.Trainer(callbacks=[RegularizationLogger()])  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from . import require

require("lightning", "lightning", __name__)

import lightning.pytorch as pl  # noqa: E402

from .._collection.collection import Collection  # noqa: E402
from .._context import active_collection  # noqa: E402
from ..schedules import resume as resume_schedules  # noqa: E402

__all__ = ["RegularizationLogger"]


class RegularizationLogger(pl.Callback):
    """Logs ``{prefix}total`` and ``{prefix}penalty/{entry name}`` with ``log_dict`` while
    training; resumes the coefficient schedules with the optimizers' state (``fit(ckpt_path=...)``).

    Values are those of the last ``rc.loss()``: one device-to-host copy, no recomputation and
    no collective under DDP/FSDP (every rank holds the same values). The callback reads them
    only on the steps the trainer writes logs (``Trainer(log_every_n_steps=...)``), so it adds
    no synchronisation to the other steps.

    Args:
        prefix: Prefix of the logged names.
        scope: As for ``rc.loss``.
        collection: The collection (default: the active one).
        prog_bar: Also show the values in the progress bar.

    Raises:
        TypeError: ``prefix`` is not a string, or ``collection`` not a ``Collection``.

    Examples:
        >>> from regcollect.integrations.lightning import RegularizationLogger
        >>> logger = RegularizationLogger(prefix="reg/")
        >>> # lightning.Trainer(callbacks=[logger]); the LightningModule adds rc.loss(self)
        >>> logger.prefix
        'reg/'
    """

    def __init__(
        self,
        *,
        prefix: str = "reg/",
        scope: str | None = None,
        collection: Collection | None = None,
        prog_bar: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string, got {prefix!r}")
        if collection is not None and not isinstance(collection, Collection):
            raise TypeError(
                f"collection must be a regcollect.Collection, got {type(collection).__name__}"
            )
        self.prefix, self.scope, self.prog_bar = prefix, scope, prog_bar
        self.collection = collection

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Restore the coefficient schedules' steps from the optimizers' state, which Lightning
        has loaded by now when it resumes (``fit(ckpt_path=...)``).

        Args:
            trainer: The Lightning ``Trainer``; its ``optimizers`` are resumed.
            pl_module: Unused.
        """
        for optimizer in getattr(trainer, "optimizers", ()):
            resume_schedules(optimizer)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log the last ``loss()``'s penalties on the steps the trainer writes logs.

        Args:
            trainer: The Lightning ``Trainer``.
            pl_module: The ``LightningModule``; ``log_dict`` is called on it.
            outputs: Unused.
            batch: Unused.
            batch_idx: Unused.
        """
        connector = getattr(trainer, "_logger_connector", None)
        if not getattr(connector, "should_update_logs", True):
            return
        values = active_collection(self.collection).penalties(self.scope, prefix=self.prefix)
        if len(values) <= 1:  # no loss() computed yet: only the "total" key
            return
        pl_module.log_dict(
            values,
            on_step=True,
            on_epoch=False,
            prog_bar=self.prog_bar,
        )
