"""`azdistill runs list` and `azdistill runs compare`: the retrains of a config, in the terminal.

Commands only parse and dispatch to `azdistill.runs`; MLflow loads inside them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import click

from azdistill.cli.options import config_argument, load_settings, set_option
from azdistill.errors import UserError
from azdistill.tracking.store import local_store_path, redact_uri, require_runs

workspace_option = click.option(
    "--workspace", is_flag=True,
    help="Read the Azure ML workspace's MLflow, where `azdistill submit` pipelines log (the workspace from the "
    "config's azure section, AZURE_* variables or config.json; experiment azure.experiment), instead of tracking.uri.",
)
DEFAULT_UI_PORT = 5000  # `azdistill ui --port`'s default
ui_port_option = click.option(
    "--ui-port", default=DEFAULT_UI_PORT, show_default=True, type=click.IntRange(1, 65535),
    help="Port of the `azdistill ui` the printed links open.",
)


def _store(settings, workspace: bool) -> tuple[str, str]:
    """The tracking URI and experiment to read: the config's own, or with --workspace the workspace's MLflow and
    the experiment `submit` names."""
    if not workspace:
        return settings.tracking_uri, settings.experiment_name
    from azdistill.azure.build import experiment_name
    from azdistill.azure.workspace import workspace_tracking_uri

    return workspace_tracking_uri(settings.azure), experiment_name(settings)


def _ui_label(ui_port: int) -> str:
    return "azdistill ui" if ui_port == DEFAULT_UI_PORT else f"azdistill ui --port {ui_port}"


def _console():
    import os

    from rich.console import Console

    # Piped into a file or a CI log there is no terminal width to fit: use a wide one rather than rich's 80
    # columns, so each run stays on one line. COLUMNS still decides when set.
    wide = None if os.environ.get("COLUMNS") or os.isatty(1) else 180
    return Console(highlight=False, width=wide)


@click.group()
def runs() -> None:
    """Review tracked runs: list a config's retrains, compare two of them."""


@runs.command("list")
@config_argument
@set_option
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1), help="Show at most this many runs.")
@workspace_option
@ui_port_option
def list_command(config: Optional[Path], overrides: tuple[str, ...], limit: int, workspace: bool, ui_port: int) -> None:
    """List a config's pipeline runs (retrains), newest first.

    One row per run: its data version, the student's metrics, whether the checks passed, the registered
    version and whether it is the champion, and why.
    """
    from rich.markup import escape

    from azdistill.tracking.runs import decision_lines, list_runs, open_client, runs_table, ui_address, ui_experiment_url

    settings = load_settings(config, overrides)
    tracking_uri, experiment = _store(settings, workspace)
    client = open_client(tracking_uri)
    rows = list_runs(client, experiment, settings.registered_model_name)
    console = _console()
    if not rows:
        start = "azdistill submit" if workspace else "azdistill run"
        console.print(f"No pipeline runs in experiment '{experiment}' yet; start one with `{start}`.")
        return
    shown = rows[:limit]
    console.print(runs_table(shown, experiment, settings.evaluation.promotion.champion_metric))
    if len(rows) > limit:
        console.print(f"({len(rows) - limit} older runs not shown; --limit {len(rows)} shows all)")
    decisions = decision_lines(shown)
    if decisions:
        console.print("Why (champion/challenger rule, docs/reviewing-runs.md):")
        for line in decisions:
            console.print(f"  {escape(line)}")
    console.print(f"Store: {redact_uri(tracking_uri)}; registered model: '{settings.registered_model_name}'")
    if not workspace and local_store_path(tracking_uri) is not None:
        url = ui_experiment_url(rows[0].experiment_id, ui_address(ui_port))
        console.print(f"In the MLflow UI ({_ui_label(ui_port)}): {url}", soft_wrap=True)


@runs.command("compare")
@click.argument("run_a", metavar="RUN")
@click.argument("run_b", metavar="RUN")
@click.option("-c", "--config", "config", type=click.Path(path_type=Path), help="Config whose runs to look in (default: the demo config).")
@set_option
@workspace_option
@ui_port_option
def compare_command(
    run_a: str, run_b: str, config: Optional[Path], overrides: tuple[str, ...], workspace: bool, ui_port: int
) -> None:
    """Compare two pipeline runs: every metric (B against A) and the settings that differ.

    RUN is a run id or a unique prefix of one (the #1a2b3c of a run name), a data version (data-v3; the newest
    run on it), a run name (the newest run of that name), a registered version (v3) or @champion.
    """
    from azdistill.tracking.runs import compare_tables, list_runs, open_client, resolve_run, ui_address, ui_compare_url

    settings = load_settings(config, overrides)
    tracking_uri, experiment = _store(settings, workspace)
    client = open_client(tracking_uri)
    rows = list_runs(client, experiment, settings.registered_model_name)
    first = resolve_run(rows, run_a, settings.registered_model_name)
    second = resolve_run(rows, run_b, settings.registered_model_name)
    if first.run_id == second.run_id:
        raise UserError(f"{run_a} and {run_b} are the same run ({first.name}, {first.run_id}); name two different runs")
    console = _console()
    for table in compare_tables(first, second, settings.evaluation.promotion.champion_metric):
        console.print(table)
    if not workspace and local_store_path(tracking_uri) is not None:
        url = ui_compare_url([first, second], ui_address(ui_port))
        console.print(f"Same comparison in the MLflow UI ({_ui_label(ui_port)}): {url}", soft_wrap=True)


@click.command()
@config_argument
@set_option
@click.option("--port", default=5000, show_default=True, help="Port to serve on (127.0.0.1).")
def ui(config: Optional[Path], overrides: tuple[str, ...], port: int) -> None:
    """Open the MLflow UI on the runs of a config's tracking store."""
    import shutil
    import subprocess

    settings = load_settings(config, overrides)
    uri = settings.tracking_uri
    require_runs(uri)
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    if mlflow is None:
        raise UserError("the mlflow command is not installed in this environment")
    from azdistill.tracking.runs import ui_links

    address = f"http://127.0.0.1:{port}"
    click.echo(f"MLflow UI on {redact_uri(uri)}: {address}  (Ctrl-C to stop)")
    for line in ui_links(uri, settings.experiment_name, settings.registered_model_name, address):
        click.echo(f"  {line}")
    # azdistill runs no MLflow server jobs (GenAI judges); without them the server starts no huey worker processes.
    # One worker: a local UI has one user, and each worker is a full MLflow process on a small machine.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    # --app-name azdistill: MLflow's server app, opening in the model-training views (tracking/ui_app.py).
    command = [mlflow, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--app-name", "azdistill"]
    try:
        subprocess.run(command, check=False, env=env)
    except KeyboardInterrupt:
        pass
