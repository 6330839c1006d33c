"""mkdocs hook: formulas become MathML when the site is built, so pages need no script and no
network to show them (every current browser renders MathML Core).

``pymdownx.arithmatex`` (generic mode) marks the formulas; this replaces each marked span or
div with the MathML that ``latex2mathml`` produces, and fails the build on a formula it cannot
convert.
"""

from __future__ import annotations

import html
import re

from latex2mathml.converter import convert

_INLINE = re.compile(r'<span class="arithmatex">\\\((.*?)\\\)</span>', re.S)
_BLOCK = re.compile(r'<div class="arithmatex">\\\[(.*?)\\\]</div>', re.S)


def _mathml(tex: str, display: str) -> str:
    try:
        return convert(html.unescape(tex).strip(), display=display)
    except Exception as exc:  # any conversion failure must stop the build, naming the formula
        raise ValueError(f"cannot convert the formula {tex!r} to MathML: {exc}") from exc


def on_page_content(content: str, **kwargs: object) -> str:
    content = _BLOCK.sub(lambda m: _mathml(m.group(1), "block"), content)
    return _INLINE.sub(lambda m: _mathml(m.group(1), "inline"), content)
