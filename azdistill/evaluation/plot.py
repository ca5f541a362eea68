"""`report.png`: bar charts of quality, latency (per response, and to the first token where measured), memory and size
per model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import matplotlib

from azdistill.evaluation.report import (
    RAW_SCALE_METRICS,
    Report,
    atomic_write,
    is_finite,
    is_fraction_metric,
    is_served,
    metric_label,
)

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
# Every served model shares one colour and one legend entry; the names down the side tell them apart.
SERVED_COLOR = "#C44E52"

# A panel of one measurement: title, unit on the x axis, one value per model, how a bar's value label reads, and
# optionally a second measurement in the same unit, drawn hatched beside the first (the panel's title then, and
# one value per model).
Panel = tuple[str, str, list[float | None], Callable[[float], str], Optional[tuple[str, list[float | None]]]]




def _role_color(role: str) -> str:
    return SERVED_COLOR if is_served(role) else ROLE_COLORS.get(role, _OTHER_COLOR)


def _legend_entry(role: str) -> str:
    return "served" if is_served(role) else role


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
    """The figure `report.png` holds: a quality panel (when some model has a quality figure), then latency, peak
    memory and parameters, one bar per model in each; one legend of the role colours and a title for the whole."""
    models = report.models
    quality = _quality_series(report)
    panels = _measurement_panels(report)
    fig, axes = _figure_with_axes(len(panels) + (1 if quality else 0), len(models))
    index = 0
    if quality:
        _draw_quality_panel(axes[index], report, quality)
        index += 1
    for panel in panels:
        _draw_measurement_panel(axes[index], report, panel)
        index += 1
    for ax in axes[index:]:
        ax.set_visible(False)
    _add_legend_and_title(fig, report)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def _measurement_panels(report: Report) -> list[Panel]:
    """The panels every report has, whatever the task: latency (per response, with the time to first token hatched
    beside it where some model has one), peak memory and parameters."""
    models = report.models
    first_tokens = [m.ttft_p50_s for m in models]
    first_token = ("Latency p50: response (solid), first token (hatched)", first_tokens) \
        if any(is_finite(v) for v in first_tokens) else None
    return [
        ("Latency per response (p50)", "seconds", [m.latency_p50_s for m in models], lambda v: f"{v:.3g} s", first_token),
        ("Peak memory", "MB", [m.peak_memory_mb for m in models], lambda v: f"{v:,.0f} MB", None),
        ("Parameters", "millions", [m.parameters / 1e6 for m in models], lambda v: f"{v:,.1f}M", None),
    ]


def _figure_with_axes(panel_count: int, model_count: int):
    """An empty figure sized for the panels and models, and its axes in reading order (a grid of them, flattened)."""
    from matplotlib.figure import Figure

    # 2x2 for four panels; three sit in one row rather than leaving a hole.
    ncols = 2 if panel_count == 4 else panel_count
    nrows = math.ceil(panel_count / ncols)
    # Height grows with the number of models so bars and labels never crowd.
    fig = Figure(figsize=(13, 1.2 + nrows * (0.55 * model_count + 1.5)), dpi=110)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
    return fig, axes


def _draw_quality_panel(ax, report: Report, quality: list[tuple[str, bool, list[float | None]]]) -> None:
    """Side-by-side bars per model for the primary metric (solid) and agreement (hatched), on a 0-100 scale."""
    models = report.models
    colors = [_role_color(m.role) for m in models]
    ys = list(range(len(models)))
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
        _value_labels(ax, ypos, values, fmt, scale_max)
    # The title doubles as the legend: fewer boxes to overlap the bars.
    names = " (solid) and ".join(metric_label(m) for m, _, _ in quality)
    if len(quality) > 1:
        names += " (hatched)"
    _finish_panel(ax, report, f"Quality: {names}", "score (0-100, higher is better)", scale_max)
    if scale_max == 100.0:
        ax.set_xticks(range(0, 101, 20))


def _draw_measurement_panel(ax, report: Report, panel: Panel) -> None:
    """One bar per model for one measurement (two side by side, the second hatched, when the panel has a second); a
    missing value draws no bar and reads "n/a"."""
    title, unit, values, fmt, second = panel
    models = report.models
    colors = [_role_color(m.role) for m in models]
    series = [values] + ([second[1]] if second else [])
    finite = [v for vals in series for v in vals if is_finite(v)]
    max_value = max(finite) if finite else 1.0
    height = 0.7 / len(series)
    for j, vals in enumerate(series):
        ypos = [y + (j - (len(series) - 1) / 2) * height for y in range(len(models))]
        paired = {"height": height * 0.92, "hatch": "///" if j else "", "edgecolor": "white", "alpha": 0.65 if j else 1.0}
        ax.barh(ypos, [v if is_finite(v) else 0.0 for v in vals], color=colors, **(paired if second else {"height": height}))
        _value_labels(ax, ypos, vals, fmt, max_value)
    if second:
        title = second[0]
    _finish_panel(ax, report, title, f"{unit} (lower is better)" if title != "Parameters" else unit, max_value)


def _finish_panel(ax, report: Report, title: str, xlabel: str, max_value: float) -> None:
    """Title, axis labels (the model names down the side), grid and room for the value labels, the same in every panel."""
    ax.set_title(title, fontsize=11, fontweight="bold", loc="left")
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_yticks(list(range(len(report.models))))
    ax.set_yticklabels([m.name for m in report.models], fontsize=9)
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


def _value_labels(
    ax, y_positions: list[float], values: list[float | None], fmt: Callable[[float], str], max_value: float
) -> None:
    """Each bar's value written just past its end ("n/a" at zero where the value is missing)."""
    for y, v in zip(y_positions, values):
        text = fmt(v) if is_finite(v) else "n/a"
        x = v if is_finite(v) else 0.0
        ax.text(x + (max_value or 1.0) * 0.015, y, text, va="center", fontsize=8)


def _add_legend_and_title(fig, report: Report) -> None:
    """One legend for the role colours, shared by every panel, and the figure's title: pipeline, task, data."""
    from matplotlib.patches import Patch

    entries = dict.fromkeys((_legend_entry(m.role), _role_color(m.role)) for m in report.models)
    fig.legend(
        handles=[Patch(facecolor=color, label=entry.replace("_", " ")) for entry, color in entries],
        loc="upper right",
        ncol=len(entries),
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


def plot_report(report: Report, path: Path) -> Path:
    """Write one PNG with horizontal bar charts (quality, latency p50, peak memory, parameters),
    one bar per model, coloured by role. Returns ``path``."""
    fig = _build_figure(report)
    # format= because the temp file's suffix is not ".png".
    return atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=110))
