"""The spread over seeds: N evaluation reports of students trained with different seeds, summarised per model row
and quality metric as mean, standard deviation, minimum and maximum (`seeds.json`, `seeds.md`, one console line).

One seed's figure cannot tell a real gain from the luck of one initialisation and data order; the spread over
seeds can. The standard deviation is the sample one (n - 1 in the denominator), the usual estimate of how much a
figure moves from one training run to the next; with a single seed it is undefined (None).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Optional

from azdistill.evaluation.report import RAW_SCALE_METRICS, Report, is_finite, metric_label

# Roles whose model does not change with the student's seed: the same answers in every seed, so a spread of 0
# says nothing about them (the reference-trained baseline is trained once, with the first seed).
SEED_INDEPENDENT_ROLES = ("teacher", "baseline", "reference_sft")


@dataclass
class Spread:
    """One quality metric of one model row over the seeds."""

    role: str
    name: str
    metric: str
    n: int  # seeds with a finite value of this metric
    mean: float
    sd: Optional[float]  # sample standard deviation; None with fewer than two values
    low: float
    high: float
    fraction: bool  # shown as a percentage (a 0-1 figure) rather than on its own scale


@dataclass
class SeedsSummary:
    """The spread of every model row's quality metrics over the seeds, and each seed's own figures."""

    seeds: list[int]
    primary_metric: str
    spreads: list[Spread]
    # One entry per seed: {"seed": 43, "metrics": {role: {metric: value}}}, in the order of `seeds`.
    per_seed: list[dict] = field(default_factory=list)

    def spread(self, role: str, metric: str) -> Optional[Spread]:
        return next((s for s in self.spreads if s.role == role and s.metric == metric), None)


def summarise_seeds(reports: dict[int, Report]) -> SeedsSummary:
    """Summarise the reports of one run per seed (seed -> report; the first one names the rows and the primary
    metric). Rows and metrics appear in the first report's order; a value that is missing or not finite in a seed
    (a metric that could not be computed) is left out of that row's figures, and `n` says how many remain."""
    if not reports:
        raise ValueError("no reports to summarise")
    seeds = list(reports)
    first = reports[seeds[0]]
    per_seed = [
        # A figure that could not be computed is None here, so seeds.json stays strict JSON.
        {"seed": seed, "metrics": {model.role: _finite_or_none(model.metrics) for model in reports[seed].models}}
        for seed in seeds
    ]
    spreads = []
    for model in first.models:
        for metric in model.metrics:
            values = [row["metrics"].get(model.role, {}).get(metric) for row in per_seed]
            finite = [float(value) for value in values if is_finite(value)]
            if finite:
                spreads.append(_spread(model.role, model.name, metric, finite))
    return SeedsSummary(seeds, first.primary_metric, spreads, per_seed)


def _finite_or_none(metrics: dict[str, float]) -> dict[str, Optional[float]]:
    return {name: value if is_finite(value) else None for name, value in metrics.items()}


def _spread(role: str, name: str, metric: str, values: list[float]) -> Spread:
    sd = statistics.stdev(values) if len(values) > 1 else None
    fraction = metric not in RAW_SCALE_METRICS and all(0.0 <= value <= 1.0 for value in values)
    low, high = min(values), max(values)
    # Within the range, as a mean is: fmean of three equal 0.8625s is a hair above 0.8625, and '86.3% (86.2-86.2)' would
    # show a mean outside its own range.
    mean = min(max(statistics.fmean(values), low), high)
    return Spread(role, name, metric, len(values), mean, sd, low, high, fraction)


def seeds_to_dict(summary: SeedsSummary) -> dict:
    """`seeds.json`: the seeds, the primary metric, every spread and each seed's figures (strict JSON)."""
    return asdict(summary)


def student_seed_metrics(summary: SeedsSummary) -> dict[str, float]:
    """What the pipeline's MLflow run logs: `student_<metric>_seed_mean` and `student_<metric>_seed_sd`."""
    metrics: dict[str, float] = {}
    for spread in summary.spreads:
        if spread.role == "student":
            metrics[f"student_{spread.metric}_seed_mean"] = spread.mean
            if spread.sd is not None:
                metrics[f"student_{spread.metric}_seed_sd"] = spread.sd
    return metrics


def format_spread(spread: Spread) -> str:
    """'91.2% +- 1.3 (89.8-92.5)': mean, standard deviation and range, in percentage points for a 0-1 figure."""
    scale, unit, digits = _scale(spread)
    sd = "n/a" if spread.sd is None else format(spread.sd * scale, digits)
    low, high = format(spread.low * scale, digits), format(spread.high * scale, digits)
    return f"{format(spread.mean * scale, digits)}{unit} +- {sd} ({low}-{high})"


def _scale(spread: Spread) -> tuple[float, str, str]:
    """How a metric's figures are shown: (factor, unit, format), as report.md shows that metric."""
    if spread.fraction:
        return 100.0, "%", ".1f"
    return 1.0, "", ".1f" if spread.metric in RAW_SCALE_METRICS else ".3g"


def _in_sentence(metric: str) -> str:
    """A metric's name inside a line: 'agreement', 'exact match', but 'ROUGE-L' and 'F1' keep their case."""
    label = metric_label(metric)
    return label.lower() if label == label.capitalize() and label.replace(" ", "").isalpha() else label


def seeds_headline(summary: SeedsSummary) -> Optional[str]:
    """The console line for the student: 'over 3 seeds: agreement 91.2% +- 1.3 (89.8-92.5), accuracy ...'
    (agreement, then the primary metric); None when the student has neither."""
    shown = []
    for metric in dict.fromkeys(["agreement", summary.primary_metric]):
        spread = summary.spread("student", metric)
        if spread is not None:
            shown.append(f"{_in_sentence(metric)} {format_spread(spread)}")
    if not shown:
        return None
    return f"over {len(summary.seeds)} seeds: " + ", ".join(shown)


def render_seeds_markdown(summary: SeedsSummary) -> str:
    """`seeds.md`: one table of mean +- sd and range per model row and metric, then one row per seed."""
    seeds = ", ".join(str(seed) for seed in summary.seeds)
    lines = [
        f"# Spread over {len(summary.seeds)} seeds",
        "",
        f"The student was trained and evaluated once per seed ({seeds}); the table gives each quality figure's mean, "
        "sample standard deviation and range over those runs (percentage points for percentages). The teacher and "
        "the baselines are the same models in every seed (the reference-trained baseline is trained once, with the "
        "first seed), so their spread is 0 by construction: only the student's spread measures seed-to-seed noise.",
        "",
        "| model | metric | mean +- sd (min-max) | seeds |",
        "|---|---|---|---:|",
    ]
    lines += [
        f"| {spread.name} | {metric_label(spread.metric)} | {format_spread(spread)} | {spread.n} |" for spread in summary.spreads
    ]
    lines += ["", "## Each seed", ""]
    student = [spread for spread in summary.spreads if spread.role == "student"]
    lines += ["| seed | " + " | ".join(f"student {metric_label(s.metric)}" for s in student) + " |"]
    lines += ["|---:|" + "---:|" * len(student)]
    for row in summary.per_seed:
        values = row["metrics"].get("student", {})
        cells = [_format_value(values.get(spread.metric), spread) for spread in student]
        lines.append(f"| {row['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _format_value(value: Optional[float], spread: Spread) -> str:
    if not is_finite(value):
        return "n/a"
    scale, unit, digits = _scale(spread)
    return f"{format(value * scale, digits)}{unit}"
