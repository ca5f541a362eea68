"""The report as people read it: `report.md` (the case-study table, the promotion checks, sample answers) and the
few console lines that end a run."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from azdistill.evaluation.error_bars import quality_cell, significance_headline, significance_section
from azdistill.evaluation.judge import render_judge_section
from azdistill.evaluation.promotion import CHALLENGER, CHAMPION, REJECTED, champion_metric_phrase, promotion_verdict
from azdistill.evaluation.report import (
    METRIC_LABELS,
    ModelResult,
    Report,
    comparison,
    format_metric,
    is_finite,
    is_fraction_metric,
    is_served,
    metric_in_sentence,
    metric_label,
    model_of,
)

_MAX_SAMPLES = 5
_MAX_CELL_CHARS = 300


def _metric_names(report: Report) -> list[str]:
    """Union of metrics over models: primary first, then agreement, then the rest sorted."""
    names = {k for m in report.models for k in m.metrics}
    ordered = [k for k in (report.primary_metric, "agreement") if k in names]
    return ordered + sorted(names - set(ordered))



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
    return f"{value:,.{decimals}f}" if is_finite(value) else "n/a"


def _fmt_cost(value: Optional[float]) -> str:
    """A cost per 1,000 answers: cents matter for a small student, so keep three significant digits."""
    if not is_finite(value):
        return "n/a"
    return f"{value:,.2f}" if value >= 10 else f"{value:.3g}"


def _fmt_hosted(model: "ModelResult", value: float) -> str:
    """Size and memory of a model: measured, or "hosted" where only an endpoint was seen."""
    return "hosted" if model.hosted and not is_finite(value) else _fmt_num(value)


def _fmt_parameters(model: "ModelResult") -> str:
    if model.hosted:
        return f"{_fmt_params_m(model.parameters)} (declared)" if model.parameters else "hosted"
    return _fmt_params_m(model.parameters)


def _fmt_latency(value: Optional[float]) -> str:
    if not is_finite(value):
        return "n/a"
    # Small students answer in tens of milliseconds; keep three significant digits.
    return f"{value:.3f}" if value < 10 else f"{value:,.1f}"


def _fmt_per_token(value: Optional[float]) -> str:
    # A token takes milliseconds: one more decimal than a whole response, so small models do not all read "0.003".
    return f"{value:.4f}" if is_finite(value) and value < 1 else _fmt_latency(value)


def _fmt_check_value(value: float) -> str:
    if not is_finite(value):
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"




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




def _cost_phrase(report: Report, ratio: float) -> str:
    teacher, student = model_of(report, "teacher"), model_of(report, "student")
    assert teacher is not None and student is not None
    figures = f"{_fmt_cost(student.cost_per_1k_answers)} vs {_fmt_cost(teacher.cost_per_1k_answers)}"
    if ratio <= 0:
        return f"{figures}"
    return f"{figures}, {_times(1 / ratio)} cheaper" if ratio < 1 else f"{figures}, {_times(ratio)} dearer"


def _headline_phrase(report: Report, comp: dict[str, float]) -> str:
    parts = []
    if "latency_ratio" in comp:
        parts.append(_less_or_more(comp["latency_ratio"], "latency per response (p50)"))
    if "memory_ratio" in comp:
        parts.append(_less_or_more(comp["memory_ratio"], "memory"))
    if "quality_retained" in comp:
        parts.append(
            f"{_pct(comp['quality_retained'])} of the teacher's {metric_in_sentence(report.primary_metric)} kept"
        )
    return ", ".join(parts)


def render_markdown(report: Report) -> str:
    """The human-readable ``report.md``: side-by-side table, student-vs-teacher headline,
    promotion checks and a few sample answers; links the plot ``report.png``."""
    metrics = _metric_names(report)
    out = _title_section(report)
    out += _models_section(report, metrics)
    out += _student_vs_teacher_section(report, comparison(report))
    out += significance_section(report)
    out += render_judge_section(report.judge)  # beside BLEU and ROUGE: the judge's wins, ties and losses
    out += _served_section(report)
    out += _promotion_section(report)
    out += _samples_section(report)
    return "\n".join(out)


def _title_section(report: Report) -> list[str]:
    """The title and the one line that says which task, data, date and device the report is about."""
    return [
        f"# Distillation report: {report.pipeline}",
        "",
        f"**Task:** {report.task} · **Data version:** {report.data_version} · "
        f"**Date:** {report.created} · **Device:** {report.device}",
        "",
    ]


def _models_section(report: Report, metrics: list[str]) -> list[str]:
    """The side-by-side table, the paragraph that says how each column was measured, and the plot."""
    header = [
        "Model",
        "Parameters (M)",
        "Size on disk (MB)",
        "Peak memory (MB)",
        "Latency per response p50 (s)",
        "Latency per response p95 (s)",
        "Time to first token p50 (s)",
        "Latency per output token p50 (s)",
        "Throughput (tok/s)",
        "Cost / 1k answers",
    ]
    header += [metric_label(k) for k in metrics]
    fractions = {k: is_fraction_metric(report, k) for k in metrics}
    rows = [_model_row(m, metrics, fractions) for m in report.models]
    out = ["## Models side by side", ""]
    out += _table(header, rows, ["l"] + ["r"] * (len(header) - 1))
    out.append("")
    out.append(_measurement_notes(report, metrics))
    out.append("")
    out.append("![Teacher, student and baselines compared](report.png)")
    out.append("")
    return out


def _model_row(m: ModelResult, metrics: list[str], fractions: dict[str, bool]) -> list[str]:
    """One model's cells of the side-by-side table; the student's name in bold, the row a reader looks for."""
    name = _cell(m.name)
    if m.role == "student":
        name = f"**{name}**"
    return [
        name,
        _fmt_parameters(m),
        _fmt_hosted(m, m.size_on_disk_mb),
        _fmt_hosted(m, m.peak_memory_mb),
        _fmt_latency(m.latency_p50_s),
        _fmt_latency(m.latency_p95_s),
        _fmt_latency(m.ttft_p50_s),
        _fmt_per_token(m.latency_per_token_p50_s),
        _fmt_num(m.throughput_tokens_per_s),
        _fmt_cost(m.cost_per_1k_answers),
    ] + [quality_cell(m, k, fractions[k]) for k in metrics]


def _measurement_notes(report: Report, metrics: list[str]) -> str:
    """How latency, throughput, memory (and agreement, hosted models, cost where the table shows them) were measured."""
    ns = {m.n for m in report.models}
    if len(ns) == 1:
        answered = f"each model answered the same {ns.pop()} held-out records"
    else:
        answered = "held-out records answered: " + ", ".join(f"{_cell(m.name)} {m.n}" for m in report.models)
    return (
        f"Latency is timed with prompts answered one at a time: seconds per response, seconds to the answer's first "
        f"token, and per output token (a response's seconds over the tokens it generated, so a model that answers at "
        f"length is not called slow for it); throughput is generated "
        f"tokens per second answering in batches; peak memory is the resident memory of the process "
        f"that loaded the model; {answered}."
        + (" Agreement is how often a model's answer matches the teacher's." if "agreement" in metrics else "")
        + (
            " In brackets: the 95% bootstrap confidence interval over the held-out items."
            if any(m.intervals for m in report.models) else ""
        )
        + (
            " A hosted model is measured as a client sees it, through its endpoint: latency includes the network, "
            "and its size and memory are not visible (parameters as declared)."
            if any(m.hosted for m in report.models) else ""
        )
        + (
            " Cost per 1,000 answers: token prices times measured tokens for a hosted model; the serving machine's "
            "hourly price times the measured answering time for a local one."
            if any(is_finite(m.cost_per_1k_answers) for m in report.models) else ""
        )
        + _latency_gaps(report)
    )


def _latency_gaps(report: Report) -> str:
    """Why a row's time to first token or per-token latency reads "n/a", for the kinds of row that have them."""
    notes = []
    if any(m.hosted and is_finite(m.latency_p50_s) and not is_finite(m.ttft_p50_s) for m in report.models):
        notes.append(
            " A hosted model's time to first token is not measured: the endpoint client asks without streaming, so the "
            "first token arrives with the whole answer."
        )
    if any(not m.hosted and is_finite(m.ttft_p50_s) and m.latency_per_token_p50_s is None for m in report.models):
        notes.append(
            " A teacher that scores the labels answers in one piece: its first token is its whole answer, and it "
            "generates no tokens to time one by one."
        )
    return "".join(notes)


def _student_vs_teacher_section(report: Report, comp: dict[str, float]) -> list[str]:
    """The headline sentence and one bullet per ratio of student to teacher that could be worked out."""
    out = ["## Student vs teacher", ""]
    phrase = _headline_phrase(report, comp)
    if phrase:
        out.append(f"**{phrase[0].upper() + phrase[1:]}.**")
        out.append("")
    bullets = []
    if "param_ratio" in comp:
        bullets.append(f"Parameters: {_pct(comp['param_ratio'])} of the teacher's")
    if "speedup" in comp:
        bullets.append(f"Latency per response (p50): {_times(comp['speedup'])} faster than the teacher")
    if comp.get("ttft_ratio", 0) > 0:
        bullets.append(f"Time to first token (p50): {_faster_or_slower(comp['ttft_ratio'])} than the teacher")
    if comp.get("latency_per_token_ratio", 0) > 0:
        bullets.append(f"Latency per output token (p50): {_faster_or_slower(comp['latency_per_token_ratio'])} than the teacher")
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
    return out


def _faster_or_slower(ratio: float) -> str:
    """A positive ratio of seconds, student over teacher, as people say it: 0.25 -> "4.0x faster", 2 -> "2.0x slower"."""
    return f"{_times(1 / ratio)} faster" if ratio <= 1 else f"{_times(ratio)} slower"


def _served_comparison(report: Report, served: ModelResult) -> str:
    """A served model against the teacher, both as a client sees them: latency per response, agreement, cost."""
    teacher = model_of(report, "teacher")
    parts = [f"p50 {_fmt_latency(served.latency_p50_s)} s"]
    if teacher is not None and is_finite(teacher.latency_p50_s):
        parts[0] += f" vs the teacher's {_fmt_latency(teacher.latency_p50_s)} s"
        measured = is_finite(served.latency_p50_s) and served.latency_p50_s > 0
        speedup = teacher.latency_p50_s / served.latency_p50_s if measured else None
        if speedup:
            parts[0] += f" ({_times(speedup)} faster)" if speedup >= 1 else f" ({_times(1 / speedup)} slower)"
    if is_finite(served.metrics.get("agreement")):
        parts.append(f"agreement with the teacher {served.metrics['agreement'] * 100:.1f}%")
    if teacher is not None and is_finite(served.cost_per_1k_answers) and is_finite(teacher.cost_per_1k_answers):
        costs = f"{_fmt_cost(served.cost_per_1k_answers)} vs {_fmt_cost(teacher.cost_per_1k_answers)}"
        parts.append(f"cost per 1,000 answers {costs}")
    return ", ".join(parts)


def _served_section(report: Report) -> list[str]:
    """One bullet per served model (`evaluation.served`) against the teacher; nothing when none was measured."""
    served = [m for m in report.models if is_served(m.role)]
    if not served:
        return []
    out = ["## Served models vs teacher", ""]
    out += [f"- {_cell(m.name)}: {_served_comparison(report, m)}" for m in served]
    out += ["", "Measured through their endpoints like a hosted teacher; they take no part in the promotion checks.", ""]
    return out


def _promotion_section(report: Report) -> list[str]:
    """The decision in the registry's words, what the registry will do with it, and each promotion check with its
    value, threshold and result."""
    verdict, what = promotion_verdict(report)
    out = [f"## Promotion: {verdict}", ""]
    if verdict == "PROMOTE":
        passed = f"Passed all {len(report.checks)} promotion checks" if report.checks else "No checks to fail"
        out.append(
            f"{passed}: the registered student becomes {CHAMPION} if there is none yet or its "
            f"{champion_metric_phrase(report)} beats the current {CHAMPION}'s; otherwise it stays a {CHALLENGER}."
        )
    else:
        out.append(
            f"{what[0].upper() + what[1:]}. The registered student is tagged {REJECTED} and does not become {CHAMPION}; "
            f"the current {CHAMPION}, if any, stays."
        )
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
    return out


def _samples_section(report: Report) -> list[str]:
    """A few prompts with every model's answer side by side; nothing when the report has no samples."""
    samples = report.samples[:_MAX_SAMPLES]
    if not samples:
        return []
    known = ["prompt", "reference", "teacher", "student", "baseline"]
    present = {k for s in samples for k, v in s.items() if v is not None}
    cols = [k for k in known if k in present]
    cols += sorted(present - set(known))
    # A served model's column is headed by its name: its role is that name made into a metric prefix.
    served_names = {m.role: m.name for m in report.models if is_served(m.role)}
    out = ["## Sample answers", ""]
    out += _table(
        [
            _cell(served_names[c]) if c in served_names
            else metric_label(c) if c in METRIC_LABELS
            else c.replace("_", " ").capitalize()
            for c in cols
        ],
        ([_cell(s.get(c)) for c in cols] for s in samples),
    )
    out.append("")
    return out


def _felt_latency_line(teacher: ModelResult, student: ModelResult) -> str:
    """"first token 0.050 s vs 0.120 s, per output token 0.0100 s vs 0.0200 s (p50, student vs teacher)", for the
    figures the student has; "" when it has neither (a report from before they were measured)."""
    parts = []
    for label, own, theirs, fmt in (
        ("first token", student.ttft_p50_s, teacher.ttft_p50_s, _fmt_latency),
        ("per output token", student.latency_per_token_p50_s, teacher.latency_per_token_p50_s, _fmt_per_token),
    ):
        if is_finite(own):
            parts.append(f"{label} {fmt(own)} s vs {fmt(theirs) + ' s' if is_finite(theirs) else 'n/a'}")
    return ", ".join(parts) + " (p50, student vs teacher)" if parts else ""


def headline_lines(report: Report) -> list[str]:
    """A few plain-text lines summarising the run for the console."""
    comp = comparison(report)
    teacher, student = model_of(report, "teacher"), model_of(report, "student")
    baseline = model_of(report, "baseline")
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
        felt = _felt_latency_line(teacher, student)
        if felt:
            lines.append(felt)

        mem = []
        if is_finite(student.peak_memory_mb) and is_finite(teacher.peak_memory_mb):
            mem.append(f"peak memory {student.peak_memory_mb:,.0f} MB vs {teacher.peak_memory_mb:,.0f} MB")
            if "memory_ratio" in comp:
                mem[-1] += f" ({_less_or_more(comp['memory_ratio'], 'memory').replace(' memory', '')})"
        if "throughput_ratio" in comp:
            mem.append(f"throughput {_times(comp['throughput_ratio'])} the teacher's")
        if mem:
            lines.append("; ".join(mem))
        if "cost_ratio" in comp:
            lines.append(f"cost per 1,000 answers: {_cost_phrase(report, comp['cost_ratio'])} (student vs teacher)")

    if student and is_finite(student.metrics.get("agreement")):
        line = f"agreement with teacher: {student.metrics['agreement'] * 100:.1f}%"
        interval = student.intervals.get("agreement")
        if interval is not None and all(is_finite(bound) for bound in interval):
            line += f" [95% interval {interval[0] * 100:.1f}-{interval[1] * 100:.1f}]"
        if baseline and is_finite(baseline.metrics.get("agreement")):
            line += f" (baseline {baseline.metrics['agreement'] * 100:.1f}%)"
        lines.append(line)
    lines += [f"{m.name}: {_served_comparison(report, m)}" for m in report.models if is_served(m.role)]

    pm = report.primary_metric
    if pm and pm != "agreement":
        fraction = is_fraction_metric(report, pm)
        # Student first: it is the model this line is about.
        rank = {"student": 0, "teacher": 1, "baseline": 2, "reference_sft": 3}
        ordered = sorted(
            (m for m in report.models if is_finite(m.metrics.get(pm))), key=lambda m: rank.get(m.role, 4)
        )
        if ordered:
            shown = ", ".join(
                f"{m.name if is_served(m.role) else m.role.replace('_', ' ')} {format_metric(m.metrics[pm], fraction, pm)}"
                for m in ordered
            )
            lines.append(f"{pm}: {shown}")
    lines += significance_headline(report)

    verdict, what = promotion_verdict(report)
    if verdict != "PROMOTE":
        lines.append(f"promotion: {verdict}: {what}")
    elif not report.checks:
        lines.append(f"promotion: {verdict}: {what} (no checks configured)")
    else:
        lines.append(f"promotion: {verdict}: {what} (all {len(report.checks)} checks passed)")
    return lines
