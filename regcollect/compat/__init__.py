"""Compatibility layers for code written against other frameworks."""

from . import v1

__all__ = ["v1"]
