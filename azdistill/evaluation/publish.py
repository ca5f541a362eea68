"""Writing a report's four files: `report.json` (machine readable), `report.md`, `report.html` (the same text as one
self-contained page, for MLflow's artifact viewer) and `report.png`."""

from __future__ import annotations

from pathlib import Path

from azdistill.evaluation.html_report import render_html
from azdistill.evaluation.markdown import render_markdown
from azdistill.evaluation.plot import plot_report
from azdistill.evaluation.report import Report, atomic_write, report_to_dict


def write_report(report: Report, out_dir: Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``report.html`` and ``report.png`` into ``out_dir`` (created if needed),
    each atomically. Returns ``{"json": ..., "markdown": ..., "html": ..., "plot": ...}``."""
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # JSON last: tools that poll for report.json then find the others already in place. The plot first: the HTML
    # page embeds it.
    plot = plot_report(report, out_dir / "report.png")
    markdown = atomic_write(out_dir / "report.md", lambda f: f.write(render_markdown(report).encode("utf-8")))
    page = render_html(report, plot.read_bytes())
    html = atomic_write(out_dir / "report.html", lambda f: f.write(page.encode("utf-8")))
    text = json.dumps(report_to_dict(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    js = atomic_write(out_dir / "report.json", lambda f: f.write(text.encode("utf-8")))
    return {"json": js, "markdown": markdown, "html": html, "plot": plot}
