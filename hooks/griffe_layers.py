"""Griffe extension for the API reference: the layers of ``regcollect.nn``.

Each layer builds its docstring (Args, Raises, Examples) and its signature (the ``torch.nn``
twin's arguments plus the keyword-only regularizer arguments) from its targets when the class
is created, so ``help()``, IDEs and ``inspect.signature`` show them. Static analysis sees only
the one-line source docstring and the mixin's ``__init__(*args, collection, **kwargs)``: this
takes both from the imported class instead, for the layer classes only.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import griffe


def _parameter(p: inspect.Parameter) -> griffe.Parameter:
    kind = griffe.ParameterKind(p.kind.description)
    annotation = None
    if p.annotation is not inspect.Parameter.empty:
        annotation = p.annotation if isinstance(p.annotation, str) else repr(p.annotation)
    default = None if p.default is inspect.Parameter.empty else repr(p.default)
    return griffe.Parameter(p.name, annotation=annotation, kind=kind, default=default)


class RuntimeLayerDocs(griffe.Extension):
    def on_class_members(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        if cls.parent is None or cls.parent.path != "regcollect.nn":
            return
        runtime = getattr(importlib.import_module("regcollect.nn"), cls.name, None)
        if "_rc_example" not in vars(runtime or object):  # the layers _layer_doc documents
            return
        old = cls.docstring  # parsed the way the handler's options say (Google style)
        cls.docstring = griffe.Docstring(
            inspect.getdoc(runtime) or "",
            parent=cls,
            parser=old.parser if old else "google",
            parser_options=old.parser_options if old else None,
        )
        init = griffe.Function("__init__", parent=cls)
        init.parameters = griffe.Parameters(
            griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword),
            *(_parameter(p) for p in inspect.signature(runtime).parameters.values()),
        )
        cls.set_member("__init__", init)
