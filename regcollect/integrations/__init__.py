"""Optional integrations with logging tools; each needs its own extra.

- ``regcollect.integrations.tensorboard`` (``pip install -e ".[tensorboard]"`` from a checkout)
- ``regcollect.integrations.lightning`` (``pip install -e ".[lightning]"`` from a checkout)
- ``regcollect.integrations.transformers`` (``pip install -e ".[transformers]"`` from a checkout)

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
            f"pip install {extra} (or, in the regcollect checkout, pip install -e '.[{extra}]')"
        ) from exc
