"""The evaluation report: teacher, student and baselines side by side, as JSON, Markdown and a PNG.

The evaluation stage fills a :class:`Report`; this module turns it into ``report.json`` (machine
readable, round-trips through :func:`report_from_dict`), ``report.md`` (the case-study table a
person reads) and ``report.png`` (bar charts), plus a few console lines for the end of a run.
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import matplotlib

# The machines this runs on have no display; select the file-only backend before anything
# else in matplotlib can pick an interactive one.
matplotlib.use("Agg")

__all__ = [
    "ModelResult",
    "PromotionCheck",
    "Report",
    "comparison",
    "report_to_dict",
    "report_from_dict",
    "render_markdown",
    "plot_report",
    "write_report",
    "headline_lines",
]

ROLE_ORDER = ("teacher", "student", "baseline", "reference_sft")
# Fixed per role so a reader can match bars across panels (and across reports) by colour alone.
ROLE_COLORS = {
    "teacher": "#4C72B0",
    "student": "#DD8452",
    "baseline": "#8C8C8C",
    "reference_sft": "#55A868",
}
_OTHER_COLOR = "#8172B3"

METRIC_LABELS = {
    "accuracy": "Accuracy",
    "agreement": "Agreement",
    "parse_rate": "Parse rate",
    "rouge_l": "ROUGE-L",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "bleu": "BLEU",
    "exact_match": "Exact match",
    "f1": "F1",
}
# Metrics reported on their own 0-100 scale rather than as a fraction.
_RAW_SCALE_METRICS = {"bleu"}

_MAX_SAMPLES = 5
_MAX_CELL_CHARS = 300


@dataclass
class ModelResult:
    """One evaluated model: its size, cost and quality on the held-out set."""

    role: str  # "teacher" | "student" | "baseline" | "reference_sft"
    name: str
    path: str
    parameters: int
    size_on_disk_mb: float
    weights_memory_mb: float  # parameters * bytes per parameter
    peak_memory_mb: float  # peak resident memory of the process that loaded the model and answered the set
    latency_p50_s: float  # seconds per response, prompts answered one at a time
    latency_p95_s: float
    throughput_tokens_per_s: float  # generated tokens per second when answering the set in batches
    n: int  # held-out records answered
    metrics: dict[str, float] = field(default_factory=dict)
    # Serving cost per 1,000 answers: a hosted model's token prices times its measured tokens; a local model's
    # serving machine's hourly price times its measured answering time. None when no price was configured.
    cost_per_1k_answers: Optional[float] = None
    hosted: bool = False  # answered through an endpoint: size and memory cannot be measured, parameters are declared


@dataclass
class PromotionCheck:
    """One gate the student must pass to replace the current model."""

    name: str
    value: float
    threshold: float
    comparison: str  # ">=", "<=" or ">"
    passed: bool


@dataclass
class Report:
    """Everything the evaluation stage found, ready to be written and shown."""

    pipeline: str
    task: str
    data_version: str
    created: str  # ISO-8601
    primary_metric: str
    models: list[ModelResult]  # teacher first, then student, baseline, reference_sft
    promote: bool
    checks: list[PromotionCheck]
    device: str
    samples: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _ratio(num: float, den: float) -> float | None:
    if not (_finite(num) and _finite(den)) or den == 0:
        return None
    return num / den


def _model(report: Report, role: str) -> ModelResult | None:
    return next((m for m in report.models if m.role == role), None)


def comparison(report: Report) -> dict[str, float]:
    """Student relative to teacher.

    Keys: ``param_ratio``, ``latency_ratio`` (student p50 / teacher p50), ``speedup`` (its inverse),
    ``memory_ratio`` (peak), ``weights_memory_ratio``, ``quality_retained`` (student / teacher on
    the primary metric), ``throughput_ratio`` and ``cost_ratio`` (per 1,000 answers). A key whose denominator is zero or missing is left
    out rather than reported as infinity; an empty dict if the teacher or student is absent.
    """
    teacher, student = _model(report, "teacher"), _model(report, "student")
    if teacher is None or student is None:
        return {}
    pm = report.primary_metric
    candidates = {
        "param_ratio": _ratio(student.parameters, teacher.parameters),
        "latency_ratio": _ratio(student.latency_p50_s, teacher.latency_p50_s),
        "speedup": _ratio(teacher.latency_p50_s, student.latency_p50_s),
        "memory_ratio": _ratio(student.peak_memory_mb, teacher.peak_memory_mb),
        "weights_memory_ratio": _ratio(student.weights_memory_mb, teacher.weights_memory_mb),
        "quality_retained": _ratio(student.metrics.get(pm), teacher.metrics.get(pm)),
        "throughput_ratio": _ratio(student.throughput_tokens_per_s, teacher.throughput_tokens_per_s),
        "cost_ratio": _ratio(student.cost_per_1k_answers, teacher.cost_per_1k_answers),
    }
    return {k: float(v) for k, v in candidates.items() if v is not None}


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------


def _json_safe(obj: Any) -> Any:
    # Strict JSON has no NaN/Infinity; a metric that could not be computed becomes null.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def report_to_dict(report: Report) -> dict:
    """A JSON-ready dict of the report, with ``"comparison": comparison(report)`` added.

    Non-finite floats become ``None`` so the result passes ``json.dumps(..., allow_nan=False)``.
    """
    data = dataclasses.asdict(report)
    data["comparison"] = comparison(report)
    return _json_safe(data)


def _float(x: Any) -> float:
    return float("nan") if x is None else float(x)


def report_from_dict(data: dict) -> Report:
    """Rebuild a :class:`Report` from :func:`report_to_dict` output (derived keys are ignored).

    Raises ``ValueError`` naming the missing or malformed key.
    """
    where = "report"
    try:
        models = []
        for i, m in enumerate(data["models"]):
            where = f"models[{i}]"
            models.append(
                ModelResult(
                    role=str(m["role"]),
                    name=str(m["name"]),
                    path=str(m["path"]),
                    parameters=int(m["parameters"]),
                    size_on_disk_mb=_float(m["size_on_disk_mb"]),
                    weights_memory_mb=_float(m["weights_memory_mb"]),
                    peak_memory_mb=_float(m["peak_memory_mb"]),
                    latency_p50_s=_float(m["latency_p50_s"]),
                    latency_p95_s=_float(m["latency_p95_s"]),
                    throughput_tokens_per_s=_float(m["throughput_tokens_per_s"]),
                    n=int(m["n"]),
                    metrics={str(k): _float(v) for k, v in (m.get("metrics") or {}).items()},
                    cost_per_1k_answers=None if m.get("cost_per_1k_answers") is None else float(m["cost_per_1k_answers"]),
                    hosted=bool(m.get("hosted", False)),
                )
            )
        checks = []
        for i, c in enumerate(data.get("checks") or []):
            where = f"checks[{i}]"
            checks.append(
                PromotionCheck(
                    name=str(c["name"]),
                    value=_float(c["value"]),
                    threshold=_float(c["threshold"]),
                    comparison=str(c["comparison"]),
                    passed=bool(c["passed"]),
                )
            )
        where = "report"
        return Report(
            pipeline=str(data["pipeline"]),
            task=str(data["task"]),
            data_version=str(data["data_version"]),
            created=str(data["created"]),
            primary_metric=str(data["primary_metric"]),
            models=models,
            promote=bool(data["promote"]),
            checks=checks,
            device=str(data["device"]),
            samples=[dict(s) for s in data.get("samples") or []],
        )
    except KeyError as e:
        raise ValueError(f"{where}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: malformed value ({e})") from None


# --------------------------------------------------------------------------------------------
# Formatting helpers shared by Markdown, plot and console
# --------------------------------------------------------------------------------------------


def metric_label(name: str) -> str:
    """Human-readable name of a metric key ("rouge_l" -> "ROUGE-L")."""
    return METRIC_LABELS.get(name, name.replace("_", " ").capitalize())


def _metric_names(report: Report) -> list[str]:
    """Union of metrics over models: primary first, then agreement, then the rest sorted."""
    names = {k for m in report.models for k in m.metrics}
    ordered = [k for k in (report.primary_metric, "agreement") if k in names]
    return ordered + sorted(names - set(ordered))


def _is_fraction_metric(report: Report, metric: str) -> bool:
    # Decided per column so one column never mixes "0.9" and "90.0%".
    if metric in _RAW_SCALE_METRICS:
        return False
    values = [m.metrics[metric] for m in report.models if _finite(m.metrics.get(metric))]
    return all(0.0 <= v <= 1.0 for v in values)


def _fmt_metric(value: float | None, fraction: bool, metric: str) -> str:
    if not _finite(value):
        return "n/a"
    if metric in _RAW_SCALE_METRICS:
        return f"{value:.1f}"
    if fraction:
        return f"{value * 100:.1f}%"
    return f"{value:.3g}"


def _fmt_params_m(parameters: int) -> str:
    # One decimal in millions, but tiny test models would all read "0.0".
    m = parameters / 1e6
    return f"{m:,.1f}" if m >= 0.1 or m == 0 else f"{m:.3f}"


def _fmt_params_short(parameters: int) -> str:
    if parameters >= 1e9:
        return f"{parameters / 1e9:.2f}B"
    if parameters >= 1e5:
        return f"{parameters / 1e6:.1f}M"
    return f"{parameters / 1e3:.1f}K"


def _fmt_num(value: float, decimals: int = 1) -> str:
    return f"{value:,.{decimals}f}" if _finite(value) else "n/a"


def _fmt_cost(value: Optional[float]) -> str:
    """A cost per 1,000 answers: cents matter for a small student, so keep three significant digits."""
    if not _finite(value):
        return "n/a"
    return f"{value:,.2f}" if value >= 10 else f"{value:.3g}"


def _fmt_hosted(model: "ModelResult", value: float) -> str:
    """Size and memory of a model: measured, or "hosted" where only an endpoint was seen."""
    return "hosted" if model.hosted and not _finite(value) else _fmt_num(value)


def _fmt_parameters(model: "ModelResult") -> str:
    if model.hosted:
        return f"{_fmt_params_m(model.parameters)} (declared)" if model.parameters else "hosted"
    return _fmt_params_m(model.parameters)


def _fmt_latency(value: float) -> str:
    if not _finite(value):
        return "n/a"
    # Small students answer in tens of milliseconds; keep three significant digits.
    return f"{value:.3f}" if value < 10 else f"{value:,.1f}"


def _fmt_check_value(value: float) -> str:
    if not _finite(value):
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


_FAILED_SIGN = {">=": "<", "<=": ">", ">": "<=", "<": ">=", "==": "!="}


def _pct(ratio: float) -> str:
    return f"{ratio * 100:.0f}%"


def _less_or_more(ratio: float, what: str) -> str:
    """0.15 -> '85% less latency'; 1.2 -> '20% more latency'."""
    change = (1 - ratio) * 100
    if round(change) == 0:
        return f"about the same {what}"
    return f"{abs(change):.0f}% {'less' if change > 0 else 'more'} {what}"


def _times(x: float) -> str:
    return f"{x:.1f}x" if x < 100 else f"{x:,.0f}x"


def _cell(text: Any, limit: int = _MAX_CELL_CHARS) -> str:
    """Make any text safe inside one Markdown table cell."""
    if text is None:
        return "—"
    s = str(text).strip()
    if len(s) > limit:
        s = s[: limit - 1].rstrip() + "…"
    s = s.replace("\\", "\\\\").replace("|", "\\|")
    s = s.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")
    return s or " "


def _table(header: list[str], rows: Iterable[list[str]], align: list[str] | None = None) -> list[str]:
    align = align or ["l"] * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _metric_in_sentence(name: str) -> str:
    label = metric_label(name)
    # Acronyms keep their case ("ROUGE-L", "F1"); ordinary words go lower case mid-sentence.
    return label if label[:2].isupper() else label.lower()


def _cost_phrase(report: Report, ratio: float) -> str:
    teacher, student = _model(report, "teacher"), _model(report, "student")
    assert teacher is not None and student is not None
    figures = f"{_fmt_cost(student.cost_per_1k_answers)} vs {_fmt_cost(teacher.cost_per_1k_answers)}"
    if ratio <= 0:
        return f"{figures}"
    return f"{figures}, {_times(1 / ratio)} cheaper" if ratio < 1 else f"{figures}, {_times(ratio)} dearer"


def _headline_phrase(report: Report, comp: dict[str, float]) -> str:
    parts = []
    if "latency_ratio" in comp:
        parts.append(_less_or_more(comp["latency_ratio"], "latency"))
    if "memory_ratio" in comp:
        parts.append(_less_or_more(comp["memory_ratio"], "memory"))
    if "quality_retained" in comp:
        parts.append(
            f"{_pct(comp['quality_retained'])} of the teacher's {_metric_in_sentence(report.primary_metric)} kept"
        )
    return ", ".join(parts)


def render_markdown(report: Report) -> str:
    """The human-readable ``report.md``: side-by-side table, student-vs-teacher headline,
    promotion checks and a few sample answers; links the plot ``report.png``."""
    comp = comparison(report)
    metrics = _metric_names(report)
    fractions = {k: _is_fraction_metric(report, k) for k in metrics}
    out: list[str] = []

    out.append(f"# Distillation report: {report.pipeline}")
    out.append("")
    out.append(
        f"**Task:** {report.task} · **Data version:** {report.data_version} · "
        f"**Date:** {report.created} · **Device:** {report.device}"
    )
    out.append("")

    # --- side-by-side table -------------------------------------------------------------
    out.append("## Models side by side")
    out.append("")
    header = [
        "Model",
        "Parameters (M)",
        "Size on disk (MB)",
        "Peak memory (MB)",
        "Latency p50 (s)",
        "Latency p95 (s)",
        "Throughput (tok/s)",
        "Cost / 1k answers",
    ]
    header += [metric_label(k) for k in metrics]
    rows = []
    for m in report.models:
        name = _cell(m.name)
        if m.role == "student":
            name = f"**{name}**"
        rows.append(
            [
                name,
                _fmt_parameters(m),
                _fmt_hosted(m, m.size_on_disk_mb),
                _fmt_hosted(m, m.peak_memory_mb),
                _fmt_latency(m.latency_p50_s),
                _fmt_latency(m.latency_p95_s),
                _fmt_num(m.throughput_tokens_per_s),
                _fmt_cost(m.cost_per_1k_answers),
            ]
            + [_fmt_metric(m.metrics.get(k), fractions[k], k) for k in metrics]
        )
    out += _table(header, rows, ["l"] + ["r"] * (len(header) - 1))
    out.append("")
    ns = {m.n for m in report.models}
    if len(ns) == 1:
        answered = f"each model answered the same {ns.pop()} held-out records"
    else:
        answered = "held-out records answered: " + ", ".join(f"{_cell(m.name)} {m.n}" for m in report.models)
    out.append(
        f"Latency is seconds per response with prompts answered one at a time; throughput is generated "
        f"tokens per second answering in batches; peak memory is the resident memory of the process "
        f"that loaded the model; {answered}."
        + (" Agreement is how often a model's answer matches the teacher's." if "agreement" in metrics else "")
        + (
            " A hosted model is measured as a client sees it, through its endpoint: latency includes the network, "
            "and its size and memory are not visible (parameters as declared)."
            if any(m.hosted for m in report.models) else ""
        )
        + (
            " Cost per 1,000 answers: token prices times measured tokens for a hosted model; the serving machine's "
            "hourly price times the measured answering time for a local one."
            if any(_finite(m.cost_per_1k_answers) for m in report.models) else ""
        )
    )
    out.append("")
    out.append("![Teacher, student and baselines compared](report.png)")
    out.append("")

    # --- headline ------------------------------------------------------------------------
    out.append("## Student vs teacher")
    out.append("")
    phrase = _headline_phrase(report, comp)
    if phrase:
        out.append(f"**{phrase[0].upper() + phrase[1:]}.**")
        out.append("")
    bullets = []
    if "param_ratio" in comp:
        bullets.append(f"Parameters: {_pct(comp['param_ratio'])} of the teacher's")
    if "speedup" in comp:
        bullets.append(f"Latency per response (p50): {_times(comp['speedup'])} faster than the teacher")
    if "memory_ratio" in comp:
        bullets.append(f"Peak memory: {_pct(comp['memory_ratio'])} of the teacher's")
    if "weights_memory_ratio" in comp:
        bullets.append(f"Weights memory: {_pct(comp['weights_memory_ratio'])} of the teacher's")
    if "throughput_ratio" in comp:
        bullets.append(f"Throughput: {_times(comp['throughput_ratio'])} the teacher's tokens per second")
    if "cost_ratio" in comp:
        bullets.append(f"Cost per 1,000 answers: {_cost_phrase(report, comp['cost_ratio'])}")
    if "quality_retained" in comp:
        bullets.append(
            f"{metric_label(report.primary_metric)}: {_pct(comp['quality_retained'])} of the teacher's kept"
        )
    if not bullets:
        bullets.append("No teacher/student pair to compare.")
    out += [f"- {b}" for b in bullets]
    out.append("")

    # --- promotion -----------------------------------------------------------------------
    out.append(f"## Promotion: {'PROMOTE' if report.promote else 'KEEP CURRENT'}")
    out.append("")
    if report.checks:
        out += _table(
            ["Check", "Value", "Threshold", "Result"],
            (
                [
                    _cell(c.name),
                    _fmt_check_value(c.value),
                    f"{_cell(c.comparison)} {_fmt_check_value(c.threshold)}",
                    "pass" if c.passed else "**FAIL**",
                ]
                for c in report.checks
            ),
            ["l", "r", "r", "l"],
        )
    else:
        out.append("No promotion checks were configured.")
    out.append("")

    # --- samples -------------------------------------------------------------------------
    samples = report.samples[:_MAX_SAMPLES]
    if samples:
        out.append("## Sample answers")
        out.append("")
        known = ["prompt", "reference", "teacher", "student", "baseline"]
        present = {k for s in samples for k, v in s.items() if v is not None}
        cols = [k for k in known if k in present]
        cols += sorted(present - set(known))
        out += _table(
            [metric_label(c) if c in METRIC_LABELS else c.replace("_", " ").capitalize() for c in cols],
            ([_cell(s.get(c)) for c in cols] for s in samples),
        )
        out.append("")

    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------


def _role_color(role: str) -> str:
    return ROLE_COLORS.get(role, _OTHER_COLOR)


def _quality_series(report: Report) -> list[tuple[str, bool, list[float | None]]]:
    """Primary metric and agreement on a 0-100 scale, each only if some model has it."""
    series = []
    for metric in dict.fromkeys([report.primary_metric, "agreement"]):
        values = [m.metrics.get(metric) for m in report.models]
        if not any(_finite(v) for v in values):
            continue
        percent = metric not in _RAW_SCALE_METRICS and _is_fraction_metric(report, metric)
        scale = 100.0 if percent else 1.0
        series.append((metric, percent, [v * scale if _finite(v) else None for v in values]))
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
            text = fmt(v) if _finite(v) else "n/a"
            x = v if _finite(v) else 0.0
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
        finite = [v for v in values if _finite(v)]
        max_value = max(finite) if finite else 1.0
        ax.barh(ys, [v if _finite(v) else 0.0 for v in values], height=0.7, color=colors)
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


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write through `data.atomic_writer`: readers see the old file or the complete new one, never a part."""
    from azdistill.data import atomic_writer

    with atomic_writer(Path(path), "wb") as handle:
        write(handle)
    return Path(path)


def plot_report(report: Report, path: Path) -> Path:
    """Write one PNG with horizontal bar charts (quality, latency p50, peak memory, parameters),
    one bar per model, coloured by role. Returns ``path``."""
    fig = _build_figure(report)
    # format= because the temp file's suffix is not ".png".
    return _atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=110))


# --------------------------------------------------------------------------------------------
# Files and console
# --------------------------------------------------------------------------------------------


def write_report(report: Report, out_dir: Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``out_dir`` (created if needed),
    each atomically. Returns ``{"json": ..., "markdown": ..., "plot": ...}``."""
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # JSON last: tools that poll for report.json then find the other two already in place.
    plot = plot_report(report, out_dir / "report.png")
    markdown = _atomic_write(out_dir / "report.md", lambda f: f.write(render_markdown(report).encode("utf-8")))
    text = json.dumps(report_to_dict(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    js = _atomic_write(out_dir / "report.json", lambda f: f.write(text.encode("utf-8")))
    return {"json": js, "markdown": markdown, "plot": plot}


def headline_lines(report: Report) -> list[str]:
    """A few plain-text lines summarising the run for the console."""
    comp = comparison(report)
    teacher, student = _model(report, "teacher"), _model(report, "student")
    baseline = _model(report, "baseline")
    lines: list[str] = []

    if teacher and student:
        parts = [f"student: {_fmt_params_short(student.parameters)} params"]
        if "param_ratio" in comp:
            parts[0] += f" ({_pct(comp['param_ratio'])} of teacher)"
        if "speedup" in comp:
            s = comp["speedup"]
            word = f"{_times(s)} faster" if s >= 1 else f"{_times(1 / s)} slower"
            parts.append(
                f"{word} per response (p50 {student.latency_p50_s:.2f} s vs {teacher.latency_p50_s:.2f} s)"
            )
        lines.append(", ".join(parts))

        mem = []
        if _finite(student.peak_memory_mb) and _finite(teacher.peak_memory_mb):
            mem.append(f"peak memory {student.peak_memory_mb:,.0f} MB vs {teacher.peak_memory_mb:,.0f} MB")
            if "memory_ratio" in comp:
                mem[-1] += f" ({_less_or_more(comp['memory_ratio'], 'memory').replace(' memory', '')})"
        if "throughput_ratio" in comp:
            mem.append(f"throughput {_times(comp['throughput_ratio'])} the teacher's")
        if mem:
            lines.append("; ".join(mem))
        if "cost_ratio" in comp:
            lines.append(f"cost per 1,000 answers: {_cost_phrase(report, comp['cost_ratio'])} (student vs teacher)")

    if student and _finite(student.metrics.get("agreement")):
        line = f"agreement with teacher: {student.metrics['agreement'] * 100:.1f}%"
        if baseline and _finite(baseline.metrics.get("agreement")):
            line += f" (baseline {baseline.metrics['agreement'] * 100:.1f}%)"
        lines.append(line)

    pm = report.primary_metric
    if pm and pm != "agreement":
        fraction = _is_fraction_metric(report, pm)
        # Student first: it is the model this line is about.
        rank = {"student": 0, "teacher": 1, "baseline": 2, "reference_sft": 3}
        ordered = sorted(
            (m for m in report.models if _finite(m.metrics.get(pm))), key=lambda m: rank.get(m.role, 4)
        )
        if ordered:
            shown = ", ".join(
                f"{m.role.replace('_', ' ')} {_fmt_metric(m.metrics[pm], fraction, pm)}" for m in ordered
            )
            lines.append(f"{pm}: {shown}")

    decision = "PROMOTE" if report.promote else "KEEP CURRENT"
    failed = [c for c in report.checks if not c.passed]
    if not report.checks:
        lines.append(f"promotion: {decision} (no checks configured)")
    elif not failed:
        lines.append(f"promotion: {decision} (all {len(report.checks)} checks passed)")
    else:
        why = "; ".join(
            f"{c.name} {_fmt_check_value(c.value)} {_FAILED_SIGN.get(c.comparison, 'vs')} "
            f"{_fmt_check_value(c.threshold)}"
            for c in failed
        )
        lines.append(f"promotion: {decision} (failed: {why})")
    return lines
