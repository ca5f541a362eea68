"""The `azdistill` command line. Commands only parse and dispatch; heavy libraries load inside them.

Exit status: 0 success, 1 a stage failed on its data (e.g. too few usable teacher answers), 2 bad input
(config, data, arguments), 130 interrupted.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import click

from azdistill import __version__
from azdistill.errors import StageFailed, UserError

log = logging.getLogger("azdistill")


def workdir_lock(workdir: Path):
    """The workdir held by this command (see stages/state.py), imported when a command needs it."""
    from azdistill.stages.state import workdir_lock as lock

    return lock(workdir)


def configure_logging(verbose: bool = False) -> None:
    """Readable progress lines on stderr; third-party chatter kept to warnings."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # transformers resets its logger to TRANSFORMERS_VERBOSITY when it is first imported, and its progress bars
    # follow HF_HUB_DISABLE_PROGRESS_BARS: set through the environment, so that no command imports transformers
    # (seconds on a small machine) before it needs a model.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    root = logging.getLogger()
    if not any(getattr(handler, "_azdistill", False) for handler in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        handler._azdistill = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("azdistill").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("transformers", "mlflow", "alembic", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    transformers = sys.modules.get("transformers")
    if transformers is not None:  # imported already (a caller's, in the same process): the environment is read
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


config_argument = click.argument("config", required=False, type=click.Path(path_type=Path))
set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
    help="Override a config key, e.g. --set training.epochs=2 (repeatable).",
)
force_option = click.option("--force", is_flag=True, help="Rerun even if inputs and settings are unchanged.")
# Azure ML components pass their mounted input and output folders with these (see components/).
output_dir_option = click.option(
    "--output-dir", type=click.Path(path_type=Path), default=None,
    help="Write the stage's outputs here instead of <workdir>/runs/<name>/<stage>.",
)


def redact_uri(uri: str) -> str:
    """Hide a password in a tracking URI (postgresql://user:secret@host/db) before it is printed or stored."""
    import re

    return re.sub(r"(//[^/:@]+):[^/@]+@", r"\1:***@", uri)


def _load(config: Optional[Path], overrides: tuple[str, ...]):
    from azdistill.config import load_config

    return load_config(config, overrides)


class Commands(click.Group):
    """Turns user mistakes into one line on stderr and exit status 2 (a failed stage: 1), never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as error:
            click.echo(f"error: {error}", err=True)
            ctx.exit(UserError.exit_code)
        except StageFailed as error:
            click.echo(f"failed: {error}", err=True)
            ctx.exit(StageFailed.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; run the same command again to continue where it stopped", err=True)
            ctx.exit(130)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="azdistill")
@click.option("-v", "--verbose", is_flag=True, help="More detail in the log.")
def cli(verbose: bool) -> None:
    """Distil a large teacher LLM into a small student: locally, or as Azure ML pipelines.

    CONFIG is a YAML file; without one, the embedded demo config is used (the built-in SmolLM2 teacher
    on the bundled sentiment sample).
    """
    configure_logging(verbose)


@cli.command()
@config_argument
@set_option
@click.option("--local", "local", is_flag=True, default=True, help="Run every stage on this machine (the default).")
@force_option
def run(config: Optional[Path], overrides: tuple[str, ...], local: bool, force: bool) -> None:
    """Run the whole distillation: synthesize, finetune, evaluate."""
    from azdistill.local_runner import run_local
    from azdistill.report import headline_lines

    settings = _load(config, overrides)
    result = run_local(settings, force=force)
    click.echo("")
    click.echo(f"Report: {result.report_dir / 'report.md'} (plot: {result.report_dir / 'report.png'})")
    for line in headline_lines(result.report):
        click.echo(f"  {line}")
    if result.stage_seconds:
        click.echo("  stage seconds: " + ", ".join(f"{stage} {seconds:.0f}" for stage, seconds in result.stage_seconds.items()))
    if result.tracking_uri and not result.new_run:
        click.echo(f"MLflow: nothing changed since run {result.run_id} in experiment '{settings.experiment_name}': every stage reused, no new run")
    elif result.tracking_uri:
        version = f", student registered as '{settings.registered_model_name}' version {result.registered_version}" if result.registered_version else ""
        click.echo(f"MLflow: run {result.run_id} in experiment '{settings.experiment_name}'{version}")
        if result.promotion is not None:
            click.echo(f"Registry: {result.promotion.summary()}")
        uri = redact_uri(result.tracking_uri)
        if uri.startswith("sqlite:///"):
            hint = "make ui" if config is None and not overrides else " ".join(
                ["azdistill ui"] + ([str(config)] if config else []) + [f"--set {item}" for item in overrides]
            )
            click.echo(f"Open the MLflow UI with: {hint}  (or: mlflow ui --backend-store-uri {uri})")
        else:
            click.echo(f"Runs are on the tracking server {uri}")


@cli.command()
@config_argument
@set_option
def validate(config: Optional[Path], overrides: tuple[str, ...]) -> None:
    """Check a config and its data files without running anything.

    The data is read line by line, never held whole. A file with several bad lines is reported in one line, and
    all of them are listed in <workdir>/validate-report.jsonl; repeated prompts and small splits are warnings.
    """
    from azdistill.data import check_split, split_warnings
    from azdistill.models import check_models

    settings = _load(config, overrides)
    check_models(settings)
    report = settings.workdir / "validate-report.jsonl"
    if report.is_file():  # an earlier validate's report would describe data that has changed since
        report.unlink()
    data, warnings = settings.data, []
    for split in ("train", "validation", "test"):
        path = getattr(data, split)
        summary = check_split(path, settings.task.type, data.max_records, data.max_prompt_chars, report)
        click.echo(f"{split}: {path} — {summary.records} records, {summary.with_reference} with reference answers")
        warnings += split_warnings(summary, settings.task.type)
    for warning in warnings:  # after every split passed: bad input stays one line on stderr
        click.echo(f"warning: {warning}", err=True)
    student = settings.student.model
    if settings.azure is not None and settings.azure.student_model:
        student += f" (on Azure ML: {settings.azure.student_model})"
    click.echo(f"config OK: task {settings.task.type}, teacher {settings.teacher.label}, student {student}")


@cli.command()
@config_argument
@set_option
@force_option
@output_dir_option
def synthesize(config: Optional[Path], overrides: tuple[str, ...], force: bool, output_dir: Optional[Path]) -> None:
    """Have the teacher answer the train and validation prompts."""
    from azdistill.data import read_records
    from azdistill.local_runner import synthesis_teacher
    from azdistill.models import resolve_teacher
    from azdistill.stages.synthesize import synthesize as run_stage
    from azdistill.tracking import make_tracker

    from azdistill.stages.state import check_writable

    settings = _load(config, overrides)
    check_writable(output_dir or settings.stage_dir("synthesize"), "synthesize")
    teacher = None
    if settings.teacher.kind == "local":  # hosted or logged: the stage streams and checks the data itself
        for split in ("train", "validation"):  # report bad data before spending time on the teacher
            read_records(getattr(settings.data, split), settings.task.type, settings.data.max_records)
        teacher = resolve_teacher(settings.teacher.model)
    factory, identity = synthesis_teacher(settings, teacher)
    with workdir_lock(settings.workdir):
        out_dir = run_stage(settings, factory, make_tracker(settings), force, out_dir=output_dir, teacher_identity=identity)
    click.echo(f"synthetic data: {out_dir}")


@cli.command()
@config_argument
@set_option
@force_option
@click.option("--on-references", is_flag=True, help="Train on the data's reference answers instead (the baseline).")
@output_dir_option
@click.option("--synthetic-dir", type=click.Path(path_type=Path), default=None, help="A finished synthesize stage's folder (default: the config's).")
def finetune(
    config: Optional[Path], overrides: tuple[str, ...], force: bool, on_references: bool, output_dir: Optional[Path], synthetic_dir: Optional[Path]
) -> None:
    """Train the student on the teacher's answers (run synthesize first)."""
    from azdistill.local_runner import prepare_models, require_stage_output
    from azdistill.stages.finetune import finetune as run_stage
    from azdistill.tracking import make_tracker

    from azdistill.stages.state import check_writable

    settings = _load(config, overrides)
    synthetic = synthetic_dir or settings.stage_dir("synthesize")
    stage = "finetune-reference" if on_references else "finetune"
    check_writable(output_dir or settings.stage_dir(stage), stage)
    with workdir_lock(settings.workdir):
        if not on_references:
            require_stage_output(synthetic, "synthesize")
        models = prepare_models(settings)
        out_dir = run_stage(
            settings, models.student_init, models.teacher, synthetic, make_tracker(settings), force, out_dir=output_dir, on_references=on_references
        )
    click.echo(f"student: {out_dir / 'model'}")


@cli.command()
@config_argument
@set_option
@force_option
@output_dir_option
@click.option("--student-dir", type=click.Path(path_type=Path), default=None, help="A finished finetune stage's folder (default: the config's).")
@click.option(
    "--reference-dir", type=click.Path(path_type=Path), default=None,
    help="A finished `finetune --on-references` folder (default: the config's, when the data has references).",
)
def evaluate(
    config: Optional[Path], overrides: tuple[str, ...], force: bool, output_dir: Optional[Path], student_dir: Optional[Path], reference_dir: Optional[Path]
) -> None:
    """Compare teacher, student and baselines on the test set (run finetune first)."""
    from azdistill.local_runner import prepare_models, require_stage_output, wants_reference_baseline
    from azdistill.report import headline_lines
    from azdistill.stages.evaluate import evaluate as run_stage
    from azdistill.tracking import make_tracker

    from azdistill.stages.state import check_writable

    settings = _load(config, overrides)
    check_writable(output_dir or settings.stage_dir("evaluate"), "evaluate")
    with workdir_lock(settings.workdir):
        student = require_stage_output(student_dir or settings.stage_dir("finetune"), "finetune") / "model"
        reference = None
        if reference_dir is not None or wants_reference_baseline(settings):
            reference = require_stage_output(reference_dir or settings.stage_dir("finetune-reference"), "finetune --on-references") / "model"
        models = prepare_models(settings)
        evaluated = {"student": student, "baseline": models.student_init}
        if reference is not None:
            evaluated["reference_sft"] = reference
        report = run_stage(settings, models.teacher, evaluated, make_tracker(settings), force, out_dir=output_dir)
    click.echo(f"Report: {(output_dir or settings.stage_dir('evaluate')) / 'report.md'}")
    for line in headline_lines(report):
        click.echo(f"  {line}")


@cli.command()
@config_argument
@set_option
@click.option("--port", default=5000, show_default=True, help="Port to serve on (127.0.0.1).")
def ui(config: Optional[Path], overrides: tuple[str, ...], port: int) -> None:
    """Open the MLflow UI on the runs of a config's tracking store."""
    import shutil
    import subprocess

    settings = _load(config, overrides)
    uri = settings.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        raise UserError(f"no runs yet: {uri[len('sqlite:///'):]} does not exist; run `azdistill run` first")
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    if mlflow is None:
        raise UserError("the mlflow command is not installed in this environment")
    from azdistill.runs import ui_links

    address = f"http://127.0.0.1:{port}"
    click.echo(f"MLflow UI on {redact_uri(uri)}: {address}  (Ctrl-C to stop)")
    for line in ui_links(uri, settings.experiment_name, settings.registered_model_name, address):
        click.echo(f"  {line}")
    # azdistill runs no MLflow server jobs (GenAI judges); without them the server starts no huey worker processes.
    # One worker: a local UI has one user, and each worker is a full MLflow process on a small machine.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    command = [mlflow, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    try:
        subprocess.run(command, check=False, env=env)
    except KeyboardInterrupt:
        pass


@cli.command()
@config_argument
@set_option
def preflight(config: Optional[Path], overrides: tuple[str, ...]) -> None:
    """Check a hosted teacher before the run: it answers, one sample passes, parameters, cost estimate and budget."""
    from azdistill.endpoints import build_endpoint_teacher
    from azdistill.preflight import preflight as check
    from azdistill.prompts import check_strategy
    from azdistill.stages.synthesize import SPLITS, count_records

    settings = _load(config, overrides)
    check_strategy(settings.synthesis.prompt_strategy, settings.task.type)
    counts = {split: count_records(getattr(settings.data, split), settings.task.type, settings.data.max_records) for split in SPLITS}
    if not settings.teacher.hosted:
        click.echo(f"teacher.kind {settings.teacher.kind}: no endpoint to check; {counts['train']} train and {counts['validation']} validation records")
        return
    teacher = build_endpoint_teacher(settings)
    try:
        report = check(settings, teacher, counts)
    finally:
        teacher.close()
    for line in report.lines:
        click.echo(line)
    report.raise_for_budget()
    click.echo("preflight OK" if report.sample_ok else "preflight: the sample answer would be rejected; check the prompt strategy and max_new_tokens")


@cli.command("import-logs")
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
    from azdistill.logs_import import import_logs

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


@cli.command("export")
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
    from azdistill.export import export_azure

    settings = _load(config, overrides)
    summary = export_azure(settings, out_dir)
    for line in summary.lines():
        click.echo(line)
    for warning in summary.warnings():
        click.echo(f"warning: {warning}", err=True)


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="azdistill")


from azdistill.runs_commands import runs as _runs  # noqa: E402  (below: it reuses this module's options)

cli.add_command(_runs)

from azdistill.azure.commands import job as _job, logs as _logs, schedule as _schedule, status as _status, submit as _submit  # noqa: E402

for _command in (_submit, _schedule, _status, _logs, _job):
    cli.add_command(_command)
