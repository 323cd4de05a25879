"""HTML for token windows shaded by activation (no Streamlit import: notebooks use it too)."""

from __future__ import annotations

import html


def tokens_html(tokens: list[str], acts: list[float], pos: int | None, scale: float) -> str:
    """Tokens as inline spans shaded by activation (orange positive, blue negative); hovering one
    shows its value; the example's own token is outlined."""
    out = []
    scale = scale if scale and scale > 0 else max((abs(a) for a in acts), default=1.0) or 1.0
    for i, (t, a) in enumerate(zip(tokens, acts)):
        alpha = min(abs(a) / scale, 1.0)
        rgb = "255,140,0" if a >= 0 else "30,120,255"
        border = "outline:1.5px solid #333;" if i == pos else ""
        text = html.escape(t).replace("\n", "↵").replace(" ", "&nbsp;") or "&nbsp;"
        out.append(f'<span title="{a:.3f}" style="background:rgba({rgb},{alpha:.2f});{border}'
                   f'border-radius:2px;padding:0 1px">{text}</span>')
    return ('<div style="font-family:monospace;font-size:0.85em;line-height:1.9;white-space:normal">'
            + "".join(out) + "</div>")
