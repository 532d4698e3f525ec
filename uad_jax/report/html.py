"""`index.html`: every table and figure of the report in one offline page.

No network resource: inline CSS, figures as relative links to the PNG files of the report
folder (each links to its SVG). A small inline script checks after loading that every image
decoded (`complete && naturalWidth > 0`), marks each `<img>` with `data-loaded`, shows a
warning next to a broken one and sets `<body data-images-checked>`; the tests read these marks
from the DOM that headless Chromium renders.
"""

import html
import math

import pandas as pd

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
h3 { margin-top: 1.5em; }
table { border-collapse: collapse; font-size: 0.8em; margin: .5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; position: sticky; top: 0; }
tr.significant td { font-weight: 600; background: #fff4d6; }
figure { margin: 1em 0 2em; }
figure img { max-width: min(100%, 1000px); height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #444; max-width: 60em; }
.note { font-size: 0.85em; color: #555; max-width: 60em; }
.broken { color: #b00; font-weight: bold; }
details { margin: .5em 0; } summary { cursor: pointer; font-weight: 600; }
nav ul { columns: 2; }
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var images = document.querySelectorAll("img");
  var broken = 0;
  images.forEach(function (img) {
    var ok = img.complete && img.naturalWidth > 0;
    img.setAttribute("data-loaded", ok ? "true" : "false");
    if (!ok) {
      broken += 1;
      var warn = document.createElement("p");
      warn.className = "broken";
      warn.textContent = "figure failed to load: " + img.getAttribute("src");
      img.parentNode.insertBefore(warn, img);
    }
  });
  document.body.setAttribute("data-images-checked", String(images.length));
  document.body.setAttribute("data-images-broken", String(broken));
});
"""


def table_html(table: pd.DataFrame, significant=None) -> str:
  """An HTML table of strings (escaped); `significant` marks rows (bool per row)."""
  if table.empty:
    return "<p class='note'>(no rows)</p>"
  head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
  rows = []
  for i, row in enumerate(table.itertuples(index=False)):
    cls = " class='significant'" if significant is not None and significant[i] else ""
    cells = "".join(f"<td>{html.escape(_text(v))}</td>" for v in row)
    rows.append(f"<tr{cls}>{cells}</tr>")
  return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _text(value) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return ""
  return str(value)


def figure_html(fig, folder: str = "figures") -> str:
  """A figure block: PNG (links to the SVG), title and caption."""
  png = f"{folder}/{fig.name}.png"
  svg = f"{folder}/{fig.name}.svg"
  return (f"<figure id='fig-{html.escape(fig.name)}'><a href='{html.escape(svg)}'>"
          f"<img src='{html.escape(png)}' alt='{html.escape(fig.title)}'></a>"
          f"<figcaption><b>{html.escape(fig.title)}.</b> {html.escape(fig.caption)} "
          f"(<a href='{html.escape(png)}'>PNG</a>, <a href='{html.escape(svg)}'>SVG</a>)"
          "</figcaption></figure>")


def page(title: str, sections: list[tuple[str, str, str]], intro: str) -> str:
  """The whole document. sections: (anchor, heading, body HTML)."""
  nav = "".join(f"<li><a href='#{a}'>{html.escape(h)}</a></li>" for a, h, _ in sections)
  body = "".join(f"<section id='{a}'><h2>{html.escape(h)}</h2>{b}</section>"
                 for a, h, b in sections)
  return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
          f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
          f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
          f"<h1>{html.escape(title)}</h1>{intro}<nav><ul>{nav}</ul></nav>{body}"
          f"<script>{_SCRIPT}</script></body></html>\n")
