"""Regularizer objects of other libraries that are regcollect's own under another class:
Keras's, whose names and configs ``rc.serialize`` follows."""

from __future__ import annotations

import math
import struct
from typing import Any

from .._state import REGULARIZER_CLASSES

__all__ = ["keras_config"]


# The packages whose regularizer classes rc's registered names follow (Keras's names and
# configs): an object of one of their classes is the rc regularizer of that name.
_KERAS_PACKAGES = ("keras", "tf_keras")


def keras_config(identifier: object) -> dict[str, Any] | None:
    """The ``{"class_name", "config"}`` of a Keras ``L1``/``L2``/``L1L2``/
    ``OrthogonalRegularizer`` object, for ``deserialize`` to make the rc regularizer with the
    same formula and coefficients; None for anything else, such as a user's own subclass."""
    cls = type(identifier)
    get_config = getattr(identifier, "get_config", None)
    if cls.__module__.partition(".")[0] not in _KERAS_PACKAGES or not callable(get_config):
        return None
    if REGULARIZER_CLASSES.get(cls.__name__) is None:
        return None
    config = {k: _as_written(v) for k, v in dict(get_config()).items()}
    return {"class_name": cls.__name__, "config": config}


def _as_written(value: object) -> object:
    """A coefficient Keras held in float32 (``L1(0.02)`` reports 0.019999999552965164) as the
    shortest decimal with the same float32 value: the number the user wrote."""
    if type(value) is not float or not math.isfinite(value):
        return value

    def f32(v: float) -> float:
        return float(struct.unpack("f", struct.pack("f", v))[0])

    if f32(value) != value:
        return value  # a float64 value: kept as it is
    for digits in range(1, 10):
        short = float(f"{value:.{digits}g}")
        if f32(short) == value:
            return short
    return value
