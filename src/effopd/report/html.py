"""HTML building blocks: every string that reaches the page passes through :func:`esc`, every
plot becomes a base64 ``data:`` PNG, and the style sheet is inline, so the file opens offline.

The page forbids every external resource through its Content-Security-Policy: a stray link to
the network would show up as a console error in a browser rather than as a silent fetch.
"""

from __future__ import annotations

import base64
import html
import io
import math

from effopd.report.load import is_number

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #1d2330; background: #f6f7f9; margin: 0; }
header, main { max-width: 1800px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 18px; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 20px; margin: 0 0 8px; border-bottom: 2px solid #d5dae3; padding-bottom: 4px; }
h3 { font-size: 16px; margin: 12px 0 6px; }
nav { margin: 10px 0 16px; }
nav a { margin-right: 14px; color: #2456a6; text-decoration: none; white-space: nowrap; }
section { background: #fff; border: 1px solid #dde2ea; border-radius: 6px; padding: 14px 18px; margin: 0 0 18px; }
.grid { display: grid; gap: 14px; grid-template-columns: repeat(var(--cols), minmax(0, 1fr)); }
.cell { min-width: 0; }
.runlabel { font-weight: 600; color: #3a4353; margin: 2px 0 4px; }
figure { margin: 6px 0 14px; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { color: #4a5263; font-size: 14px; margin-top: 4px; }
.note { color: #6b5a12; background: #fff8dc; border-left: 4px solid #e0c341; padding: 6px 10px; margin: 6px 0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13.5px; margin: 4px 0 10px; }
th, td { border: 1px solid #dde2ea; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #eef1f6; }
td.l, th.l { text-align: left; }
.yes { color: #fff; background: #23824a; }
.no { color: #fff; background: #b03a2e; }
.unknown { color: #fff; background: #7b8190; }
.badge { display: inline-block; font-weight: 700; border-radius: 4px; padding: 1px 8px; min-width: 4.5em; text-align: center; }
.verdict td { text-align: left; }
.rec { font-weight: 600; margin-top: 4px; }
pre { background: #f3f4f7; padding: 8px; overflow-x: auto; font-size: 12.5px; }
details summary { cursor: pointer; color: #2456a6; }
"""


def esc(x) -> str:
    """Text for HTML: escaped, quotes included."""
    return html.escape(str(x), quote=True)


def fmt(x) -> str:
    """A number for a table (``—`` when missing or not finite); already safe for HTML."""
    if not is_number(x) or not math.isfinite(x):
        return "—"
    if isinstance(x, int):
        return str(x)
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.2e}"
    return f"{x:.4g}"


def pct(x) -> str:
    return f"{100 * x:.1f}%" if is_number(x) and math.isfinite(x) else "—"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def png_data_uri(fig, dpi: int = 110) -> str:
    """Render a matplotlib Figure to a ``data:image/png;base64,...`` URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image(fig, alt: str) -> str:
    return f'<img src="{png_data_uri(fig)}" alt="{esc(alt)}">'


def figure(cells: list[str], caption: str, labels: list[str] | None = None) -> str:
    """One plot (one per run, side by side when several) with its one-sentence caption."""
    return f"<figure>{grid(cells, labels)}<figcaption>{esc(caption)}</figcaption></figure>"


def grid(cells: list[str], labels: list[str] | None = None) -> str:
    """Cells in one row of equal columns, each under its run label (no labels for one cell)."""
    if len(cells) == 1 and not labels:
        return cells[0]
    labels = labels or [""] * len(cells)
    body = "".join(f'<div class="cell"><div class="runlabel">{esc(l)}</div>{c}</div>' for l, c in zip(labels, cells))
    return f'<div class="grid" style="--cols: {len(cells)}">{body}</div>'


def table(header: list[str], rows: list[list], left: int = 1) -> str:
    """A table of escaped text; numbers are formatted with :func:`fmt`. The first ``left``
    columns are left-aligned (labels)."""

    def cell(tag, i, v):
        cls = ' class="l"' if i < left else ""
        text = "—" if v is None else fmt(v) if is_number(v) else esc(v)
        return f"<{tag}{cls}>{text}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def section(sid: str, title: str, body: str, intro: str | None = None) -> str:
    intro_html = f"<p>{esc(intro)}</p>" if intro else ""
    return f'<section id="{esc(sid)}"><h2>{esc(title)}</h2>{intro_html}{body}</section>'


def page(title: str, header_html: str, nav: list[tuple[str, str]], sections: list[str]) -> str:
    links = " ".join(f'<a href="#{esc(sid)}">{esc(t)}</a>' for sid, t in nav)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body><header>{header_html}"
        f"<nav>{links}</nav></header>\n<main>\n" + "\n".join(sections) + "\n</main></body></html>\n"
    )
