"""HTML for token windows shaded by activation (no Streamlit import: notebooks use it too)."""

from __future__ import annotations

import html

_WINDOW = "font-family:monospace;font-size:0.85em;line-height:1.9;white-space:normal"  # the window's div
_TOKEN = "border-radius:2px;padding:0 1px"  # every token's span
_AT = "outline:1.5px solid #333"  # the example's own token
#: the styles ``tokens_html(..., classed=True)`` leaves to a stylesheet (``saelab export`` writes it once)
TOKENS_CSS = f".tw{{{_WINDOW}}}.tw span{{{_TOKEN}}}.tw .at{{{_AT}}}"


def tokens_html(tokens: list[str], acts: list[float], pos: int | None, scale: float, classed: bool = False) -> str:
    """Tokens as inline spans shaded by activation (orange positive, blue negative); hovering one
    shows its value; the example's own token is outlined. ``classed``: the styles every span shares come
    from ``TOKENS_CSS`` (class ``tw``) instead of each span's own style attribute, for a page of many windows."""
    out = []
    scale = scale if scale and scale > 0 else max((abs(a) for a in acts), default=1.0) or 1.0
    for i, (t, a) in enumerate(zip(tokens, acts)):
        alpha = min(abs(a) / scale, 1.0)
        rgb = "255,140,0" if a >= 0 else "30,120,255"
        shade = f"background:rgba({rgb},{alpha:.2f});" if alpha >= 0.005 else ""  # else it would print as 0.00
        text = html.escape(t).replace("\n", "↵").replace(" ", "&nbsp;") or "&nbsp;"
        if classed:
            style = f' style="{shade}"' if shade else ""
            out.append(f'<span title="{a:.3f}"{" class=at" if i == pos else ""}{style}>{text}</span>')
        else:
            border = f"{_AT};" if i == pos else ""
            out.append(f'<span title="{a:.3f}" style="{shade}{border}{_TOKEN}">{text}</span>')
    return ('<div class="tw">' if classed else f'<div style="{_WINDOW}">') + "".join(out) + "</div>"
