"""Doctest collection of the package: skip integration modules whose package is missing."""

import importlib.util

collect_ignore = [
    f"regcollect/integrations/{name}.py"
    for name in ("tensorboard", "lightning")
    if importlib.util.find_spec(name) is None
]
