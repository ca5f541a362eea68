"""`import-logs` and `export`: datasets in and out of azdistill."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from azdistill.cli.options import config_argument, load_settings, set_option
from azdistill.errors import UserError


@click.command("import-logs")
@click.argument("logs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder for train/validation/test.jsonl.")
@click.option("--task", "task_type", required=True, help="Task type of the records (nli, qa, conversation, math, summarization, chat).")
@click.option("--system", "system_prompt", default=None, help="System message for records that have none (or to replace theirs).")
@click.option("--model", default=None, help="Keep only completions of this model.")
@click.option("--metadata", "metadata", multiple=True, metavar="KEY=VALUE", help="Keep only completions with this metadata (repeatable).")
@click.option("--validation-share", default=0.1, show_default=True, type=float, help="Share of records for validation.")
@click.option("--test-share", default=0.1, show_default=True, type=float, help="Share of records for test.")
@click.option("--drop-answers", is_flag=True, help="Write prompts only (the teacher regenerates every answer, no references).")
def import_logs_command(logs, out_dir, task_type, system_prompt, model, metadata, validation_share, test_share, drop_answers) -> None:
    """Turn chat logs (stored completions or request/response JSONL) into a dataset.

    Reuse the logged answers with `teacher.kind: logged`, or regenerate them with a hosted teacher.
    """
    from azdistill.data.logs_import import import_logs

    filters = {}
    for item in metadata:
        if "=" not in item:
            raise UserError(f"--metadata {item}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        filters[key] = value
    summary = import_logs(logs, out_dir, task_type, system_prompt, model, filters, validation_share, test_share, drop_answers)
    written = ", ".join(f"{count} {split}" for split, count in summary.written.items())
    click.echo(f"imported {written} records from {summary.read} log lines into {out_dir}")
    for reason, count in sorted(summary.skipped.items(), key=lambda pair: -pair[1]):
        click.echo(f"  skipped {count}: {reason}")


@click.command("export")
@config_argument
@set_option
# One format for now; azdistill.export.EXPORT_FORMATS lists the same (a test keeps them equal).
@click.option("--format", "export_format", required=True, type=click.Choice(["azure"]), help="azure: Azure ML's own distillation.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder to write (new, empty, or an earlier export's).")
def export_command(config: Optional[Path], overrides: tuple[str, ...], export_format: str, out_dir: Path) -> None:
    """Write the config's train/validation/test splits in another tool's distillation format.

    azure: prompts only ([system, user]) for single-turn tasks, their reference answers kept in
    <split>.references.jsonl; conversation and chat records whole; export.json maps the task type to Azure's.
    A split under Azure's minimum size is written and warned about.
    """
    from azdistill.data.export import export_azure

    settings = load_settings(config, overrides)
    summary = export_azure(settings, out_dir)
    for line in summary.lines():
        click.echo(line)
    for warning in summary.warnings():
        click.echo(f"warning: {warning}", err=True)
