"""`report.png`: bar charts of quality, latency, memory and size per model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import matplotlib

from azdistill.evaluation.report import RAW_SCALE_METRICS, Report, atomic_write, is_finite, is_fraction_metric, metric_label

# The machines this runs on have no display; select the file-only backend before anything
# else in matplotlib can pick an interactive one.
matplotlib.use("Agg")

# Fixed per role so a reader can match bars across panels (and across reports) by colour alone.
ROLE_COLORS = {
    "teacher": "#4C72B0",
    "student": "#DD8452",
    "baseline": "#8C8C8C",
    "reference_sft": "#55A868",
}
_OTHER_COLOR = "#8172B3"




def _role_color(role: str) -> str:
    return ROLE_COLORS.get(role, _OTHER_COLOR)


def _quality_series(report: Report) -> list[tuple[str, bool, list[float | None]]]:
    """Primary metric and agreement on a 0-100 scale, each only if some model has it."""
    series = []
    for metric in dict.fromkeys([report.primary_metric, "agreement"]):
        values = [m.metrics.get(metric) for m in report.models]
        if not any(is_finite(v) for v in values):
            continue
        percent = metric not in RAW_SCALE_METRICS and is_fraction_metric(report, metric)
        scale = 100.0 if percent else 1.0
        series.append((metric, percent, [v * scale if is_finite(v) else None for v in values]))
    return series


def _build_figure(report: Report):
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    models = report.models
    labels = [m.name for m in models]
    colors = [_role_color(m.role) for m in models]
    ys = list(range(len(models)))
    quality = _quality_series(report)

    panels: list[tuple[str, str, list[float | None], Callable[[float], str]]] = [
        ("Latency per response (p50)", "seconds", [m.latency_p50_s for m in models], lambda v: f"{v:.3g} s"),
        ("Peak memory", "MB", [m.peak_memory_mb for m in models], lambda v: f"{v:,.0f} MB"),
        ("Parameters", "millions", [m.parameters / 1e6 for m in models], lambda v: f"{v:,.1f}M"),
    ]
    n_panels = len(panels) + (1 if quality else 0)
    # 2x2 for four panels; three sit in one row rather than leaving a hole.
    ncols = 2 if n_panels == 4 else n_panels
    nrows = math.ceil(n_panels / ncols)
    # Height grows with the number of models so bars and labels never crowd.
    fig = Figure(figsize=(13, 1.2 + nrows * (0.55 * len(models) + 1.5)), dpi=110)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()

    def finish(ax, title, xlabel, max_value):
        ax.set_title(title, fontsize=11, fontweight="bold", loc="left")
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_yticks(ys)
        ax.set_yticklabels(labels, fontsize=9)
        # Shared y axis: inverting twice would flip it back, so only once (teacher on top).
        if not ax.yaxis_inverted():
            ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        # Room on the right for the value labels.
        ax.set_xlim(0, (max_value or 1.0) * 1.28)
        ax.tick_params(axis="x", labelsize=8)

    def value_labels(ax, y_positions, values, fmt, max_value):
        for y, v in zip(y_positions, values):
            text = fmt(v) if is_finite(v) else "n/a"
            x = v if is_finite(v) else 0.0
            ax.text(x + (max_value or 1.0) * 0.015, y, text, va="center", fontsize=8)

    idx = 0
    if quality:
        ax = axes[idx]
        idx += 1
        height = 0.8 / len(quality)
        hatches = ["", "///"]
        max_value = max(v for _, _, vals in quality for v in vals if v is not None)
        scale_max = 100.0 if max_value <= 100 else max_value
        for j, (metric, percent, values) in enumerate(quality):
            offset = (j - (len(quality) - 1) / 2) * height
            ypos = [y + offset for y in ys]
            ax.barh(
                ypos,
                [v if v is not None else 0.0 for v in values],
                height=height * 0.92,
                color=colors,
                hatch=hatches[j % 2],
                edgecolor="white",
                alpha=1.0 if j == 0 else 0.65,
            )
            fmt = (lambda v: f"{v:.1f}%") if percent else (lambda v: f"{v:.3g}")
            value_labels(ax, ypos, values, fmt, scale_max)
        # The title doubles as the legend: fewer boxes to overlap the bars.
        names = " (solid) and ".join(metric_label(m) for m, _, _ in quality)
        if len(quality) > 1:
            names += " (hatched)"
        finish(ax, f"Quality: {names}", "score (0-100, higher is better)", scale_max)
        if scale_max == 100.0:
            ax.set_xticks(range(0, 101, 20))

    for title, unit, values, fmt in panels:
        ax = axes[idx]
        idx += 1
        finite = [v for v in values if is_finite(v)]
        max_value = max(finite) if finite else 1.0
        ax.barh(ys, [v if is_finite(v) else 0.0 for v in values], height=0.7, color=colors)
        value_labels(ax, ys, values, fmt, max_value)
        finish(ax, title, f"{unit} (lower is better)" if title != "Parameters" else unit, max_value)

    for ax in axes[idx:]:
        ax.set_visible(False)

    # One legend for the role colours, shared by every panel.
    roles = list(dict.fromkeys(m.role for m in models))
    fig.legend(
        handles=[Patch(facecolor=_role_color(r), label=r.replace("_", " ")) for r in roles],
        loc="upper right",
        ncol=len(roles),
        fontsize=9,
        frameon=False,
    )
    fig.suptitle(
        f"{report.pipeline} · {report.task} · data {report.data_version}",
        x=0.01,
        ha="left",
        fontsize=12,
        fontweight="bold",
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def plot_report(report: Report, path: Path) -> Path:
    """Write one PNG with horizontal bar charts (quality, latency p50, peak memory, parameters),
    one bar per model, coloured by role. Returns ``path``."""
    fig = _build_figure(report)
    # format= because the temp file's suffix is not ".png".
    return atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=110))
