"""Optional integrations with logging tools; each needs its own extra.

- ``regcollect.integrations.tensorboard`` (``pip install regcollect[tensorboard]``)
- ``regcollect.integrations.lightning`` (``pip install regcollect[lightning]``)
- ``regcollect.integrations.transformers`` (``pip install regcollect[transformers]``)

They are not imported by ``import regcollect``.
"""

from __future__ import annotations

import importlib


def require(package: str, extra: str, module: str) -> None:
    """Import ``package`` or raise an ImportError that says which extra to install."""
    try:
        importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(
            f"{module} needs the {package!r} package, which is not installed: "
            f"pip install 'regcollect[{extra}]' (or pip install {extra})"
        ) from exc
