"""Retrains in the terminal: the pipeline runs of a config side by side, and two runs compared metric by metric.

`azdistill runs list` and `azdistill runs compare` show what the MLflow UI shows on the experiment page and in
its compare view: one row per pipeline run (its data version, the student's headline metrics, the registered
version and whether it is the champion), and for two runs every metric with the change between them plus the
settings that differ. Everything is read from the tracking store with `MlflowClient`; nothing is written.

The store is the config's own (local SQLite by default) or, with `--workspace`, an Azure ML workspace's MLflow
(`workspace_tracking_uri`), where a submitted pipeline leaves the same shape: the pipeline job is the parent run,
its steps are child runs (the evaluate step's carries the metrics and the config as params), and each registered
version names its pipeline job in the `azdistill.job` tag. There the champion is a version tag, not an alias
(see `azdistill.registry.champion_among`); both read the same here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Optional
from urllib.parse import quote

from azdistill.errors import UserError
from azdistill.tracking.headline import is_model_metric
from azdistill.tracking.registry import CHAMPION_ALIAS, DECISION_TAG, REASON_TAG, REPLACED_BY_TAG, champion_among
from azdistill.tracking.store import require_runs
from azdistill.tracking.tracker import STAGE_TAG, SUMMARY_STAGES

PARENT_TAG = "mlflow.parentRunId"
PIPELINE_TAG = "azdistill.pipeline"
# On a version the Azure ML register step registered: the pipeline job (its MLflow run id) it ran in. Such a
# version has no MLflow run link of its own (azure/injob.py student_tags).
JOB_TAG = "azdistill.job"
# Metric name endings where less is better; every other metric is a score (higher is better) or neutral.
LOWER_IS_BETTER = (
    "_latency_p50_s", "_latency_p95_s", "_ttft_p50_s", "_latency_per_token_p50_s", "_peak_memory_mb", "_loss", "stage_seconds_",
    # The pipeline run's headline ratios, student / teacher.
    "_latency_ratio", "_ttft_ratio", "_per_token_ratio", "_memory_ratio", "_cost_ratio",
)
NEUTRAL = ("_parameters", "_param_ratio", "promote")
# Student metrics that measure cost, not quality; shown in their own column of `runs list`.
COST_SUFFIXES = ("_latency_p50_s", "_latency_p95_s", "_ttft_p50_s", "_latency_per_token_p50_s", "_throughput_tokens_per_s",
                 "_peak_memory_mb", "_parameters")
UI_PORT = 5000  # where `azdistill ui` serves by default
UI_ADDRESS = f"http://127.0.0.1:{UI_PORT}"
STATUS_WORDS = {"FINISHED": "done", "RUNNING": "running", "FAILED": "[red]failed[/]", "KILLED": "[red]killed[/]", "SCHEDULED": "scheduled"}


@dataclass
class RunSummary:
    """One pipeline run (a retrain) as the terminal shows it."""

    run_id: str
    name: str
    status: str
    start_time: Optional[int]  # milliseconds since the epoch
    end_time: Optional[int]
    experiment_id: str
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    version: Optional[str] = None  # the registered student version this run produced
    registry_state: Optional[str] = None  # "champion", "challenger", "rejected" or "former champion"
    registry_reason: Optional[str] = None

    @property
    def data_version(self) -> str:
        return self.tags.get("azdistill.data_version", "?")

    @property
    def started(self) -> str:
        if not self.start_time:
            return "?"
        return datetime.fromtimestamp(self.start_time / 1000).strftime("%Y-%m-%d %H:%M")

    @property
    def started_short(self) -> str:
        return self.started[5:] if self.start_time else "?"  # month, day and time: a table column stays narrow

    @property
    def duration_s(self) -> Optional[float]:
        if not (self.start_time and self.end_time):
            return None
        return (self.end_time - self.start_time) / 1000


def open_client(tracking_uri: str):
    """A client on `tracking_uri`; a local SQLite store that does not exist yet is a user error."""
    require_runs(tracking_uri)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _experiment_id(client: Any, experiment_name: str) -> str:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        names = sorted(item.name for item in client.search_experiments())
        known = f"; experiments in this store: {', '.join(names)}" if names else ""
        raise UserError(f"no experiment '{experiment_name}' in the tracking store{known}")
    return experiment.experiment_id


def _all_runs(client: Any, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _registry_entries(client: Any, model_name: Optional[str]) -> list[tuple[str, str, str, str]]:
    """(run id, version, state, reason) for every registered version of `model_name`, oldest version first.

    The run id is MLflow's link to the run that logged the version, else (registered by the Azure ML register
    step) its pipeline job from the `azdistill.job` tag; "" when it has neither.
    """
    from mlflow.exceptions import MlflowException

    if not model_name:
        return []
    try:
        versions = list(client.search_model_versions(f"name='{model_name}'"))
        aliases = client.get_registered_model(model_name).aliases if versions else {}
    except MlflowException as error:
        if getattr(error, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    champion = champion_among(versions, aliases)
    entries = []
    for version in sorted(versions, key=lambda item: int(item.version)):  # a rerun's later version wins
        tags = version.tags or {}
        if str(version.version) == champion:
            state = CHAMPION_ALIAS
        elif tags.get(REPLACED_BY_TAG):
            state = "former champion"
        else:
            state = tags.get(DECISION_TAG, "registered")
            state = "challenger" if state == CHAMPION_ALIAS else state
        reason = tags.get(REASON_TAG, "")
        if state == "former champion":
            reason = f"replaced by version {tags[REPLACED_BY_TAG]}"
        entries.append((version.run_id or tags.get(JOB_TAG, ""), str(version.version), state, reason))
    return entries


def list_runs(client: Any, experiment_name: str, model_name: Optional[str] = None) -> list[RunSummary]:
    """The pipeline runs of an experiment, newest first, with their evaluation metrics and registry state.

    A row's metrics are its evaluate stage run's (the evaluation, which stays on that run) with the pipeline run's
    own (its headline metrics and stage times; older runs also hold a copy of the evaluation) over them; its params
    are the config's. An Azure ML pipeline job, whose steps log only to their own runs, reads the same. A version
    registered from a step run counts for that step's pipeline run.
    """
    experiment_id = _experiment_id(client, experiment_name)
    runs = _all_runs(client, experiment_id)
    summary_metrics: dict[str, dict[str, float]] = {}
    summary_params: dict[str, dict[str, str]] = {}
    parent_of: dict[str, str] = {}
    for run in runs:
        parent = run.data.tags.get(PARENT_TAG)
        if parent:
            parent_of[run.info.run_id] = parent
        if parent and run.data.tags.get(STAGE_TAG) in SUMMARY_STAGES:
            summary_metrics.setdefault(parent, {}).update(run.data.metrics)
            summary_params.setdefault(parent, {}).update(run.data.params)
    registry: dict[str, tuple[str, str, str]] = {}
    for run_id, version, state, reason in _registry_entries(client, model_name):
        if run_id:
            registry[parent_of.get(run_id, run_id)] = (version, state, reason)
    rows = []
    for run in runs:
        tags = run.data.tags
        if PARENT_TAG in tags or PIPELINE_TAG not in tags:
            continue
        version, state, reason = registry.get(run.info.run_id, (None, None, None))
        rows.append(
            RunSummary(
                run_id=run.info.run_id,
                name=run.info.run_name or run.info.run_id,
                status=run.info.status,
                start_time=run.info.start_time,
                end_time=run.info.end_time,
                experiment_id=experiment_id,
                tags=dict(tags),
                params={**summary_params.get(run.info.run_id, {}), **run.data.params},
                metrics={**summary_metrics.get(run.info.run_id, {}), **run.data.metrics},
                version=version,
                registry_state=state,
                registry_reason=reason,
            )
        )
    return rows


def resolve_run(runs: list[RunSummary], ref: str, model_name: Optional[str] = None) -> RunSummary:
    """Find a pipeline run by run id, a unique run id prefix (`#` before it allowed, as run names show it), run
    name (the newest of that name), data version (`data-v3`: the newest run on it), registered version (`v3`) or
    alias (`@champion`)."""
    if ref.startswith("@"):
        alias = ref[1:]
        if alias != CHAMPION_ALIAS:
            raise UserError(f"{ref}: the only alias azdistill sets is @{CHAMPION_ALIAS}")
        matches = [run for run in runs if run.registry_state == CHAMPION_ALIAS]
        if not matches:
            raise UserError(f"{ref}: '{model_name}' has no {CHAMPION_ALIAS} yet")
        return matches[0]
    if ref[:1] in "vV" and ref[1:].isdigit():
        matches = [run for run in runs if run.version == ref[1:]]
        if not matches:
            known = ", ".join(f"v{run.version}" for run in runs if run.version) or "none"
            raise UserError(f"{ref}: no run in this experiment registered version {ref[1:]} of '{model_name}' (registered: {known})")
        return matches[0]
    prefix = ref[1:] if ref.startswith("#") else ref
    for match in (
        [run for run in runs if run.run_id == ref],
        [run for run in runs if run.name == ref],  # newest first: a rerun of the same data version wins
        [run for run in runs if len(prefix) >= 4 and run.run_id.startswith(prefix)],
        [run for run in runs if ref.startswith("data-v") and run.data_version == ref[len("data-v"):]][:1],  # the newest
    ):
        if len(match) == 1 or (match and match[0].name == ref):
            return match[0]
        if len(match) > 1:
            raise UserError(f"{ref}: matches several runs ({', '.join(run.run_id[:8] for run in match)}); give more of the id")
    names = ", ".join(dict.fromkeys(run.name for run in runs)) or "none"
    raise UserError(f"{ref}: no pipeline run with that id or name (runs: {names})")


# ---------------------------------------------------------------------------------------------------
# Presentation


def direction(metric: str) -> int:
    """+1 if a higher value of `metric` is better, -1 if lower is, 0 if neither."""
    if any(metric.endswith(suffix) or metric.startswith(suffix) for suffix in NEUTRAL):
        return 0
    if any(metric.endswith(suffix) or metric.startswith(suffix) for suffix in LOWER_IS_BETTER):
        return -1
    return 1


def format_value(value: Optional[float]) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"
    return f"{value:.4g}"


def quality_metrics(rows: list[RunSummary], champion_metric: str, limit: int = 2) -> list[str]:
    """The student quality metrics to show as columns: the champion metric first, then agreement, then others."""
    names = {
        name for row in rows for name in row.metrics
        if is_model_metric(name) and not name.endswith(COST_SUFFIXES)
    }
    first = list(dict.fromkeys(name for name in (f"student_{champion_metric}", "student_agreement") if name in names))
    return (first + sorted(names - set(first), key=lambda name: (name == "student_parse_rate", name)))[:limit]


def ui_address(port: int = UI_PORT) -> str:
    """Where `azdistill ui --port <port>` serves."""
    return f"http://127.0.0.1:{port}"


def ui_experiment_url(experiment_id: str, address: str = UI_ADDRESS) -> str:
    """The experiment's runs page. The MLflow 3 UI opens an experiment on its GenAI overview unless told
    this is model training."""
    return f"{address}/#/experiments/{experiment_id}?workflowType=machine_learning"


def ui_model_url(model_name: str, address: str = UI_ADDRESS) -> str:
    return f"{address}/#/models/{quote(model_name)}"


def ui_links(tracking_uri: str, experiment_name: str, model_name: str, address: str = UI_ADDRESS) -> list[str]:
    """Lines naming the pages of a config's runs and registered model in the MLflow UI at `address`."""
    client = open_client(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return [f"no experiment '{experiment_name}' in this store yet"]
    lines = [f"runs of '{experiment_name}': {ui_experiment_url(experiment.experiment_id, address)}"]
    if client.search_model_versions(f"name='{model_name}'", max_results=1):
        lines.append(f"registered model '{model_name}': {ui_model_url(model_name, address)}")
    return lines


def ui_compare_url(runs: list[RunSummary], address: str = UI_ADDRESS) -> str:
    """The MLflow UI's compare view of `runs` (the page `runs compare` mirrors)."""
    ids = json.dumps([run.run_id for run in runs], separators=(",", ":"))
    experiments = json.dumps(sorted({run.experiment_id for run in runs}), separators=(",", ":"))
    return f"{address}/#/compare-runs?runs={quote(ids)}&experiments={quote(experiments)}&workflowType=machine_learning"


def _registry_cell(row: RunSummary) -> str:
    if row.version is None:
        return "—"
    if row.registry_state == CHAMPION_ALIAS:
        return f"[bold green]v{row.version} ★ champion[/]"
    return f"v{row.version} {row.registry_state or ''}".strip()


def runs_table(rows: list[RunSummary], experiment_name: str, champion_metric: str):
    """A rich Table: one row per pipeline run, newest first."""
    from rich.markup import escape
    from rich.table import Table

    columns = quality_metrics(rows, champion_metric)
    table = Table(title=f"Pipeline runs of experiment '{escape(experiment_name)}' (newest first)", title_justify="left")
    table.add_column("run", no_wrap=True)
    table.add_column("id", no_wrap=True, style="dim")
    table.add_column("started", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for name in columns:
        label = name[len("student_"):]
        label = f"{label}*" if label == champion_metric else label
        table.add_column(label, justify="right", no_wrap=True, min_width=len(label))
    table.add_column("p50 s", justify="right", no_wrap=True)
    table.add_column("checks", no_wrap=True)
    table.add_column("registry", no_wrap=True)
    for row in rows:
        promote = row.metrics.get("promote")
        checks = "—" if promote is None else ("[green]passed[/]" if promote >= 1 else "[red]failed[/]")
        table.add_row(
            escape(row.name),
            row.run_id[:8],
            row.started_short,
            STATUS_WORDS.get(row.status, row.status.lower()),
            *[format_value(row.metrics.get(name)) for name in columns],
            format_value(row.metrics.get("student_latency_p50_s")),
            checks,
            _registry_cell(row),
        )
    if columns:
        table.caption = "* the champion metric (evaluation.promotion.champion_metric); student metrics, p50 s = student latency per response"
        table.caption_justify = "left"
    return table


def decision_lines(rows: list[RunSummary]) -> list[str]:
    """Why each registered version is where it is, newest first: the `promotion.reason` of its registry entry."""
    return [
        f"v{row.version} {row.registry_state}: {row.registry_reason}"
        for row in rows
        if row.version is not None and row.registry_reason
    ]


def _metric_order(metric: str, champion_metric: str) -> tuple:
    if metric == f"student_{champion_metric}":
        return (0, metric)
    for rank, prefix in enumerate(("student_", "teacher_", "baseline_", "reference_sft_"), start=1):
        if metric.startswith(prefix):
            return (rank, metric)
    return (9 if metric.startswith("stage_seconds_") else 8, metric)


def _change_cell(metric: str, a: Optional[float], b: Optional[float]) -> str:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return ""
    delta = b - a
    if delta == 0:
        return "="
    text = f"{'+' if delta > 0 else '-'}{format_value(abs(delta))}"
    if a:
        text += f" ({delta / abs(a) * 100:+.0f}%)"
    sign = direction(metric)
    if sign == 0:
        return text
    return f"[green]{text}[/]" if delta * sign > 0 else f"[red]{text}[/]"


def compare_tables(a: RunSummary, b: RunSummary, champion_metric: str) -> list:
    """rich Tables comparing two runs: who they are, every metric with the change from A to B, the settings
    that differ."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    header = Table(title="Runs", title_justify="left")
    header.add_column("")
    header.add_column(f"A: {escape(a.name)}")
    header.add_column(f"B: {escape(b.name)}")
    for label, get in (
        ("run id", lambda run: run.run_id),
        ("started", lambda run: run.started),
        ("status", lambda run: run.status.lower()),
        ("data version", lambda run: run.data_version),
        ("teacher", lambda run: run.tags.get("azdistill.teacher", "?")),
        ("student", lambda run: run.tags.get("azdistill.student", "?")),
        ("registry", _registry_cell),
        ("why", lambda run: escape(run.registry_reason or "")),
    ):
        header.add_row(label, get(a), get(b))

    metrics = Table(title="Metrics (change is B - A; green is better)", title_justify="left")
    metrics.add_column("metric")
    metrics.add_column("A", justify="right")
    metrics.add_column("B", justify="right")
    metrics.add_column("change", justify="right")
    for name in sorted(set(a.metrics) | set(b.metrics), key=lambda metric: _metric_order(metric, champion_metric)):
        label = f"{name} *" if name == f"student_{champion_metric}" else name
        metrics.add_row(label, format_value(a.metrics.get(name)), format_value(b.metrics.get(name)),
                        _change_cell(name, a.metrics.get(name), b.metrics.get(name)))

    differing = sorted(key for key in set(a.params) | set(b.params) if a.params.get(key) != b.params.get(key))
    if not differing:
        return [header, metrics, Text("Settings: identical (every config value is the same)")]
    params = Table(title="Settings that differ", title_justify="left")
    params.add_column("param")
    params.add_column("A")
    params.add_column("B")
    for key in differing:
        params.add_row(key, escape(a.params.get(key, "—")), escape(b.params.get(key, "—")))
    return [header, metrics, params]
