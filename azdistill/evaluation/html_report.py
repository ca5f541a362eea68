"""`report.html`: the report as MLflow's artifact viewer shows it, one self-contained page (the plot embedded as a PNG,
tables with their full headers, no external CSS or JS), made from `report.md`'s own text so the two never differ."""

from __future__ import annotations

import base64
from html import escape

from azdistill.evaluation.markdown import render_markdown
from azdistill.evaluation.report import Report

PLOT_FILE = "report.png"  # the image report.md links to, beside it

# MLflow shows an .html artifact in a sandboxed iframe of its own page: nothing outside the file can be fetched, so
# the style is inline. Tables scroll sideways rather than squeezing or cutting their headers.
_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; font-size: 14px; line-height: 1.45;
       color: #1f2328; margin: 16px 24px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
.table { overflow-x: auto; margin: 8px 0 12px; }
table { border-collapse: collapse; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; vertical-align: top; }
th { background: #f6f8fa; white-space: normal; min-width: 5em; }
td { max-width: 40em; overflow-wrap: break-word; }
th:first-child, td:first-child { min-width: 14em; }
img { max-width: 100%; height: auto; }
code { background: #f6f8fa; padding: 1px 4px; border-radius: 4px; }
"""


def render_html(report: Report, plot_png: bytes) -> str:
    """`report.md` as one HTML page, with `plot_png` (the bytes of `report.png`) in place of its link to the plot.

    Converted by markdown-it-py (CommonMark with tables), which the lock already holds (rich uses it), with raw HTML
    off, so a model's answer quoted in the report cannot add markup to the page. The one piece of HTML the Markdown
    writes on purpose, `<br>` for a line break inside a table cell, is put back after the conversion.
    """
    from markdown_it import MarkdownIt

    converter = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = converter.parse(render_markdown(report))
    plot = "data:image/png;base64," + base64.b64encode(plot_png).decode("ascii")
    for token in tokens:
        for child in token.children or []:
            if child.type == "image" and child.attrGet("src") == PLOT_FILE:
                child.attrSet("src", plot)
    body = converter.renderer.render(tokens, converter.options, {})
    body = body.replace("&lt;br&gt;", "<br>")
    body = body.replace("<table>", '<div class="table"><table>').replace("</table>", "</table></div>")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>Distillation report: {escape(report.pipeline)}</title>\n"
        f"<style>{_STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n"
    )
