"""`run`, `validate`, `preflight` and one command per stage."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from azdistill.cli.options import config_argument, force_option, load_settings, output_dir_option, set_option
from azdistill.tracking.store import local_store_path, redact_uri

# What the "Report:" line names beside report.md: the other files of the report (evaluation/publish.py writes them).
REPORT_FILES_BESIDE = "report.html with the plot inside, report.json, report.png"


@click.command()
@config_argument
@set_option
@force_option
@click.option(
    "--seeds", type=click.IntRange(min=1), default=1, show_default=True,
    help="Train and evaluate the student N times, with seeds training.seed, +1, ..., and report the mean and spread of "
    "its figures (evaluate/seeds.md); the teacher answers once. Registration and promotion stay on the first seed's "
    "student: the other seeds measure the spread.",
)
def run(config: Optional[Path], overrides: tuple[str, ...], force: bool, seeds: int) -> None:
    """Run the whole distillation on this machine: synthesize, finetune, evaluate (`submit` runs it on Azure ML)."""
    from azdistill.evaluation.markdown import headline_lines
    from azdistill.evaluation.seeds import seeds_headline
    from azdistill.stages.run import run_local

    settings = load_settings(config, overrides)
    result = run_local(settings, force=force, seeds=seeds)
    click.echo("")
    click.echo(f"Report: {result.report_dir / 'report.md'} (beside it: {REPORT_FILES_BESIDE})")
    for line in headline_lines(result.report):
        click.echo(f"  {line}")
    if result.seeds is not None:
        click.echo(f"  {seeds_headline(result.seeds) or f'over {seeds} seeds: no quality figure of the student'}")
        click.echo(f"  spread over seeds: {result.report_dir / 'seeds.md'}")
    if result.stage_seconds:
        click.echo("  stage seconds: " + ", ".join(f"{stage} {seconds:.0f}" for stage, seconds in result.stage_seconds.items()))
    if result.tracking_uri and not result.new_run:
        since = f" since run {result.run_id}" if result.run_id else ""  # None: no earlier run of this workdir in the store
        click.echo(f"MLflow: nothing changed{since} in experiment '{settings.experiment_name}': every stage reused, no new run")
    elif result.tracking_uri:
        version = f", student registered as '{settings.registered_model_name}' version {result.registered_version}" if result.registered_version else ""
        click.echo(f"MLflow: run {result.run_id} in experiment '{settings.experiment_name}'{version}")
        if result.promotion is not None:
            click.echo(f"Registry: {result.promotion.summary()}")
        uri = redact_uri(result.tracking_uri)
        if local_store_path(uri) is not None:
            hint = "make ui" if config is None and not overrides else " ".join(
                ["azdistill ui"] + ([str(config)] if config else []) + [f"--set {item}" for item in overrides]
            )
            click.echo(f"Open the MLflow UI with: {hint}  (or: mlflow ui --backend-store-uri {uri})")
        else:
            click.echo(f"Runs are on the tracking server {uri}")


@click.command()
@config_argument
@set_option
def validate(config: Optional[Path], overrides: tuple[str, ...]) -> None:
    """Check a config and its data files without running anything.

    The data is read line by line, never held whole. A file with several bad lines is reported in one line, and
    all of them are listed in <workdir>/validate-report.jsonl; repeated prompts and small splits are warnings.
    """
    from azdistill.data.splits import check_split, split_warnings
    from azdistill.models.checks import check_models

    settings = load_settings(config, overrides)
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
    if settings.azure is not None:
        from azdistill.azure.build import shard_warnings

        warnings += shard_warnings(settings)
    for warning in warnings:  # after every split passed: bad input stays one line on stderr
        click.echo(f"warning: {warning}", err=True)
    student = settings.student.model
    if settings.azure is not None and settings.azure.student_model:
        student += f" (on Azure ML: {settings.azure.student_model})"
    click.echo(f"config OK: task {settings.task.type}, teacher {settings.teacher.label}, student {student}")


@click.command()
@config_argument
@set_option
@force_option
@output_dir_option
def synthesize(config: Optional[Path], overrides: tuple[str, ...], force: bool, output_dir: Optional[Path]) -> None:
    """Have the teacher answer the train and validation prompts."""
    from azdistill.stages.run import run_synthesize

    out_dir = run_synthesize(load_settings(config, overrides), force, out_dir=output_dir)
    click.echo(f"synthetic data: {out_dir}")


@click.command()
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
    from azdistill.stages.run import run_finetune

    out_dir = run_finetune(load_settings(config, overrides), force, output_dir, on_references, synthetic_dir)
    click.echo(f"student: {out_dir / 'model'}")


@click.command()
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
    from azdistill.evaluation.markdown import headline_lines
    from azdistill.stages.run import run_evaluate

    settings = load_settings(config, overrides)
    report = run_evaluate(settings, force, output_dir, student_dir, reference_dir)
    click.echo(f"Report: {(output_dir or settings.stage_dir('evaluate')) / 'report.md'} (beside it: {REPORT_FILES_BESIDE})")
    for line in headline_lines(report):
        click.echo(f"  {line}")


@click.command()
@config_argument
@set_option
def preflight(config: Optional[Path], overrides: tuple[str, ...]) -> None:
    """Check a hosted teacher before the run: it answers, one sample passes, parameters, cost estimate and budget."""
    from azdistill.stages.run import run_preflight

    settings = load_settings(config, overrides)
    counts, report = run_preflight(settings)
    if report is None:
        click.echo(f"teacher.kind {settings.teacher.kind}: no endpoint to check; {counts['train']} train and {counts['validation']} validation records")
        return
    for line in report.lines:
        click.echo(line)
    report.raise_for_budget()
    click.echo("preflight OK" if report.sample_ok else "preflight: the sample answer would be rejected; check the prompt strategy and max_new_tokens")
