"""HTML building blocks of `compress report`: escaping, number formats, tables, embedded images and the page shell.

Everything is inline: CSS in a <style> element, images as data: URIs, no script, no font or stylesheet fetched from
anywhere (the Content-Security-Policy says so to the browser too). Every piece of text goes through `esc`; only
`Raw` values, built here from escaped parts, are inserted as they are.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field

from compress.outputs import signature


class Raw(str):
    """HTML that is already escaped (built by this module)."""


class Num(str):
    """A number already formatted as text (e.g. '87.5%'): escaped, right-aligned; `strong` for the chosen one."""

    strong: bool = False

    def __new__(cls, text: str, strong: bool = False):
        obj = super().__new__(cls, text)
        obj.strong = strong
        return obj


def esc(value) -> str:
    """Text (anything str() can print) escaped for HTML content and attribute values."""
    return html.escape(str(value), quote=True)


def fmt(value) -> str:
    """A number for people: ints with thousands separators, floats to 4 significant digits, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        if value == 0:
            return "0"
        if abs(value) >= 1e4 and value.is_integer():
            return f"{int(value):,}"
        return f"{value:.4g}"
    return str(value)


def fmt_bytes(n) -> str:
    """'20,288 B (19.8 KiB)'."""
    if n is None:
        return "–"
    n = int(n)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n:,} B ({n / size:.1f} {unit})"
    return f"{n:,} B"


def fmt_pct(value, digits: int = 1) -> str:
    """0.875 -> '87.5%'."""
    return "–" if value is None else f"{100 * float(value):.{digits}f}%"


def fmt_change(after, before) -> str:
    """Relative change 'after vs before' as a signed percentage ('+1.89%'), or a dash."""
    if after is None or before is None or not before:
        return "–"
    return f"{100.0 * (float(after) / float(before) - 1.0):+.2f}%".replace("-", "−")


def _cell(value) -> tuple[str, bool]:
    """(inner HTML, numeric?) of one table cell."""
    if isinstance(value, Raw):
        return str(value), False
    if isinstance(value, Num):
        text = esc(value)
        return (f"<strong>{text}</strong>" if value.strong else text), True
    if value is None:
        return "–", True
    if isinstance(value, int | float) and not isinstance(value, bool):
        return esc(fmt(value)), True
    return esc(value), False


def table(headers: list[str], rows: list[list], cls: str = "", mono: tuple[int, ...] = ()) -> Raw:
    """A table; number cells (int, float, Num, None) right-aligned, and their column headers with them.
    `mono`: column indices shown in a monospace font (layer names, paths)."""
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = []
    for i in range(len(headers)):
        col = [(row[i], cells[r][i][1]) for r, row in enumerate(rows) if i < len(row)]
        numeric.append(bool(col) and all(n for _, n in col) and any(v is not None for v, _ in col))
    head = "".join(f'<th{" class=num" if numeric[i] else ""}>{esc(h)}</th>' for i, h in enumerate(headers))
    body = []
    for row in cells:
        tds = []
        for i, (text, is_num) in enumerate(row):
            classes = (["num"] if is_num else []) + (["mono"] if i in mono else [])
            attr = f' class="{" ".join(classes)}"' if classes else ""
            tds.append(f"<td{attr}>{text}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    klass = f' class="{esc(cls)}"' if cls else ""
    return Raw(f'<div class="scroll"><table{klass}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
               "</table></div>")


def facts(pairs: list[tuple[str, object]]) -> Raw:
    """A two-column key/value table; pairs whose value is None are left out."""
    rows = [[k, v] for k, v in pairs if v is not None and v != ""]
    if not rows:
        return Raw("")
    body = "".join(f"<tr><th>{esc(k)}</th><td{' class=num' if _cell(v)[1] else ''}>{_cell(v)[0]}</td></tr>"
                   for k, v in rows)
    return Raw(f'<table class="kv"><tbody>{body}</tbody></table>')


def png(data: bytes, alt: str) -> Raw:
    """An <img> with the PNG embedded as a base64 data: URI."""
    b64 = base64.b64encode(data).decode("ascii")
    return Raw(f'<img src="data:image/png;base64,{b64}" alt="{esc(alt)}">')


def badge(passed: bool | None) -> Raw:
    """PASSED / FAILED / not checked, coloured."""
    if passed is None:
        return Raw('<span class="badge">not checked</span>')
    return Raw('<span class="badge pass">PASSED</span>' if passed else '<span class="badge fail">FAILED</span>')


def verdict(passed: bool, failures: list[str] | None = None) -> Raw:
    """'pass' or 'FAIL: why' for a table cell."""
    if passed:
        return Raw('<span class="pass">pass</span>')
    why = ": " + ", ".join(failures) if failures else ""
    return Raw(f'<span class="fail">FAIL{esc(why)}</span>')


def details(summary: str, body: str) -> Raw:
    """A collapsed block (no script needed) for long tables."""
    return Raw(f"<details><summary>{esc(summary)}</summary>{body}</details>")


def h3(text: str) -> Raw:
    return Raw(f"<h3>{esc(text)}</h3>")


def para(text: str, cls: str = "") -> Raw:
    klass = f' class="{esc(cls)}"' if cls else ""
    return Raw(f"<p{klass}>{esc(text)}</p>")


def bullets(items: list[str], cls: str = "note") -> Raw:
    if not items:
        return Raw("")
    return Raw(f'<ul class="{esc(cls)}">' + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>")


@dataclass
class Section:
    """One input's part of the page."""

    kind: str
    title: str
    source: str
    summary: str = ""
    verdict: bool | None = None  # gate / validation: shown as a badge beside the title
    body: list[str] = field(default_factory=list)
    plots: int = 0

    def add(self, *parts: str) -> None:
        self.body.extend(p for p in parts if p)


CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #fff; color: #1f2328;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1040px; margin: 0 auto; padding: 28px 32px 64px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 6px 0 0; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.meta { color: #656d76; font-size: 13px; margin: 0 0 10px; }
nav ol { margin: 4px 0 0; padding-left: 22px; font-size: 14px; }
nav a { color: #0b57d0; text-decoration: none; }
nav .src { display: inline; margin-left: 6px; }
section { border-top: 1px solid #d0d7de; margin-top: 30px; padding-top: 10px; }
.src { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace; color: #656d76;
       margin: 2px 0 8px; word-break: break-all; }
.summary { margin: 6px 0 12px; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 6px 0 16px; font-size: 13px; }
th, td { padding: 3px 10px; text-align: left; vertical-align: top; border-bottom: 1px solid #e6e9ec; }
thead th { background: #f4f6f8; font-weight: 600; border-bottom: 1px solid #c8d0d8; white-space: nowrap; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.mono { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace; }
table.kv th { background: none; font-weight: normal; color: #57606a; padding-left: 0; white-space: nowrap; }
table.kv td.num { text-align: left; }
.pass { color: #1a7f37; font-weight: 600; }
.fail { color: #cf222e; font-weight: 600; }
.badge { display: inline-block; vertical-align: middle; margin-left: 8px; padding: 0 9px; border-radius: 10px;
         font-size: 12px; font-weight: 600; background: #eaeef2; color: #57606a; }
.badge.pass { background: #dafbe1; color: #1a7f37; }
.badge.fail { background: #ffebe9; color: #cf222e; }
img { display: block; max-width: 100%; height: auto; margin: 8px 0 16px; border: 1px solid #eaeef2; }
details { margin: 4px 0 14px; }
details > summary { cursor: pointer; color: #424a53; font-size: 14px; margin-bottom: 4px; }
.note { color: #57606a; font-size: 13px; }
ul.note { margin: 4px 0 12px; padding-left: 20px; }
footer { margin-top: 40px; color: #8c959f; font-size: 12px; }
"""

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def page(title: str, meta: str, sections: list[Section]) -> str:
    """The whole document."""
    nav = "".join(f'<li><a href="#s{i}">{esc(s.title)}</a><span class="src">{esc(s.source)}</span></li>'
                  for i, s in enumerate(sections, 1))
    parts = []
    for i, s in enumerate(sections, 1):
        mark = badge(s.verdict) if s.kind in ("gate", "validation") else ""
        parts.append(f'<section id="s{i}"><h2>{i}. {esc(s.title)}{mark}</h2>'
                     f'<p class="src">{esc(s.source)}</p>'
                     + (f'<p class="summary">{esc(s.summary)}</p>' if s.summary else "")
                     + "".join(s.body) + "</section>")
    return ("<!DOCTYPE html>\n" f"<!-- {signature()} -->\n" "<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            f'<header><h1>{esc(title)}</h1><p class="meta">{esc(meta)}</p><nav><ol>{nav}</ol></nav></header>\n'
            + "\n".join(parts)
            + "\n<footer>Written by compress report: one self-contained file, no scripts, nothing fetched.</footer>"
            "\n</main>\n</body>\n</html>\n")
