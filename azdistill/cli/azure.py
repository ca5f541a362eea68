"""`azdistill submit | deploy | schedule | status | logs | job`: the Azure ML commands.

Like every command, these only parse and dispatch; azure.ai.ml is imported inside them so `azdistill --help`
stays instant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click

from azdistill.cli.options import config_argument, set_option

pipeline_option = click.option(
    "--pipeline", type=click.Choice(["distill", "retrain"]), default=None,
    help="Pipeline definition in pipelines/ (default: the config's azure.pipeline, else distill).",
)
workspace_config_option = click.option(
    "--config", "config", type=click.Path(path_type=Path), default=None,
    help="A config whose azure section names the workspace (else AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP, "
    "AZUREML_WORKSPACE_NAME, or config.json).",
)


def _settings(config: Optional[Path], overrides: tuple[str, ...] = ()):
    from azdistill.config.loading import load_config

    return load_config(config, overrides)


def _quiet_sdk() -> None:
    """No notices about the SDK's experimental classes in these commands' output (see workspace.quiet_sdk_notices)."""
    from azdistill.azure.workspace import quiet_sdk_notices

    quiet_sdk_notices()


def _client(config: Optional[Path]):
    from azdistill.azure.workspace import ml_client, resolve_workspace

    _quiet_sdk()
    azure = _settings(config).azure if config is not None else None
    workspace = resolve_workspace(azure)
    return ml_client(workspace), workspace


@click.command()
@config_argument
@set_option
@pipeline_option
@click.option("--dry-run", is_flag=True, help="Build and validate the pipeline and write its YAML; no network, no credentials.")
@click.option("--stream", is_flag=True, help="Follow the job's logs until it finishes.")
@click.option("--output-dir", type=click.Path(path_type=Path), default=None, help="Where the job config and YAML go (default: <workdir>/azure/<name>).")
def submit(config: Optional[Path], overrides: tuple[str, ...], pipeline: Optional[str], dry_run: bool, stream: bool, output_dir: Optional[Path]) -> None:
    """Submit the distillation to Azure ML as a pipeline job (or write it for review with --dry-run)."""
    from azdistill.azure.build import shard_warnings
    from azdistill.azure.submit import submit as submit_pipeline

    _quiet_sdk()
    settings = _settings(config, overrides)
    for warning in shard_warnings(settings):  # as `validate` says it: a submit may come without one
        click.echo(f"warning: {warning}", err=True)
    result = submit_pipeline(settings, pipeline, dry_run=dry_run, stream=stream, folder=output_dir, echo=click.echo)
    if dry_run:
        click.echo(f"{result.pipeline} pipeline validated; job YAML: {result.yaml_path}")
        click.echo(f"submit it with: azdistill submit {config or ''} --pipeline {result.pipeline}".replace("  ", " "))
    elif stream and result.status not in ("Completed", None):
        raise SystemExit(1)


@click.command()
@config_argument
@set_option
@click.option(
    "--model", "model", default="@champion", show_default=True,
    help="The registered version to deploy: @champion (the version tagged azdistill.champion=true), 3 or v3.",
)
@click.option(
    "--dry-run", is_flag=True, help="Write endpoint.yaml and deployment.yaml (needs --model VERSION); no network, no credentials."
)
@click.option(
    "--retire", multiple=True, metavar="DEPLOYMENT",
    help="Delete this old deployment (at 0%) once the new one serves (repeatable).",
)
@click.option(
    "--output-dir", type=click.Path(path_type=Path), default=None,
    help="Where the dry run writes (default: <workdir>/azure/<name>/deploy).",
)
def deploy(
    config: Optional[Path], overrides: tuple[str, ...], model: str, dry_run: bool, retire: tuple[str, ...],
    output_dir: Optional[Path],
) -> None:
    """Deploy the champion (or --model VERSION) to the config's online endpoint: its own deployment, a smoke test with
    held-out prompts, then all the traffic (blue/green)."""
    from azdistill.azure.deploy import deploy as deploy_model
    from azdistill.azure.deploy import manual_steps, write_dry_run

    _quiet_sdk()
    settings = _settings(config, overrides)
    if dry_run:
        written = write_dry_run(settings, model, output_dir)
        click.echo(f"written, no request sent: {', '.join(str(path) for path in written)}")
        click.echo("to apply them by hand (what `azdistill deploy` does, smoke test included):")
        for line in manual_steps(settings, model, written):
            click.echo(f"  {line}")
        return
    deploy_model(settings, model, retire, echo=click.echo)


@click.group()
def schedule() -> None:
    """Recurring retrains on Azure ML: create, list, show, enable, disable, delete, trigger."""


@schedule.command("create")
@config_argument
@set_option
@click.option("--dry-run", is_flag=True, help="Build and validate the schedule's pipeline and write its YAML; send nothing.")
def schedule_create(config: Optional[Path], overrides: tuple[str, ...], dry_run: bool) -> None:
    """Create (or update) the config's schedule: the retrain pipeline on azure.schedule's trigger."""
    from azdistill.azure.schedules import build_schedule, describe, dry_run_schedule
    from azdistill.azure.workspace import azure_errors, ml_client, plain_sdk_output, resolve_workspace

    _quiet_sdk()
    settings = _settings(config, overrides)
    if dry_run:
        click.echo(f"schedule validated; its job YAML: {dry_run_schedule(settings)}")
        return
    job_schedule, _ = build_schedule(settings)
    workspace = resolve_workspace(settings.azure)
    with azure_errors(f"creating schedule {job_schedule.name}", workspace), plain_sdk_output():
        created = ml_client(workspace).schedules.begin_create_or_update(job_schedule).result()
    click.echo(f"schedule {describe(created)} in {workspace}")


@schedule.command("list")
@workspace_config_option
def schedule_list(config: Optional[Path]) -> None:
    """List the workspace's schedules."""
    from azdistill.azure.schedules import describe
    from azdistill.azure.workspace import azure_errors

    client, workspace = _client(config)
    with azure_errors("listing schedules", workspace):
        schedules = list(client.schedules.list())
    for item in schedules:
        click.echo(describe(item))
    if not schedules:
        click.echo(f"no schedules in {workspace}")


def _schedule_action(verb: str):
    @click.argument("name")
    @workspace_config_option
    def action(name: str, config: Optional[Path]) -> None:
        from azdistill.azure.schedules import describe
        from azdistill.azure.workspace import azure_errors

        client, workspace = _client(config)
        with azure_errors(f"{verb} schedule {name}", workspace):
            if verb == "show":
                click.echo(describe(client.schedules.get(name)))
            elif verb == "enable":
                click.echo(describe(client.schedules.begin_enable(name).result()))
            elif verb == "disable":
                click.echo(describe(client.schedules.begin_disable(name).result()))
            elif verb == "delete":
                client.schedules.begin_delete(name).result()
                click.echo(f"schedule {name} deleted")
            elif verb == "trigger":
                result = client.schedules.trigger(name)
                click.echo(f"schedule {name} triggered: job {result.job_name}")

    return action


for _verb, _help in (
    ("show", "Show a schedule: state and trigger."),
    ("enable", "Enable a schedule."),
    ("disable", "Disable a schedule (it keeps its definition)."),
    ("delete", "Delete a schedule."),
    ("trigger", "Run a schedule's job once, now."),
):
    schedule.command(_verb, help=_help)(_schedule_action(_verb))


@click.command()
@click.argument("job")
@workspace_config_option
def status(job: str, config: Optional[Path]) -> None:
    """Show a job's status (and each step's, for a pipeline)."""
    from azdistill.azure.jobs import job_status_lines
    from azdistill.azure.workspace import azure_errors

    client, workspace = _client(config)
    with azure_errors(f"reading job {job}", workspace):
        lines = job_status_lines(client, job)
    for line in lines:
        click.echo(line)


@click.command()
@click.argument("job")
@workspace_config_option
@click.option("--step", default=None, help="Only this step of a pipeline (its name in `azdistill status`).")
@click.option("--follow", is_flag=True, help="Stream the logs until the job finishes.")
def logs(job: str, config: Optional[Path], step: Optional[str], follow: bool) -> None:
    """Print a job's logs (each step's, for a pipeline)."""
    from azdistill.azure.jobs import fetch_logs
    from azdistill.azure.workspace import azure_errors

    client, workspace = _client(config)
    with azure_errors(f"reading the logs of job {job}", workspace):
        if follow:
            client.jobs.stream(job)
            return
        for heading, text in fetch_logs(client, job, step):
            click.echo(f"===== {heading}")
            click.echo(text.rstrip("\n"))


# ---------------------------------------------------------------------------------------------------
# Inside Azure ML jobs


@click.group()
def job() -> None:
    """Helpers the Azure ML components run inside their jobs (see components/)."""


@job.command("prepare-data")
@click.option("--config", "config", type=click.Path(path_type=Path), required=True, help="The job config.")
@click.option("--train", type=click.Path(path_type=Path), default=None, help="Train JSONL file.")
@click.option("--validation", type=click.Path(path_type=Path), default=None, help="Validation JSONL file.")
@click.option("--test", type=click.Path(path_type=Path), default=None, help="Test JSONL file.")
@click.option("--train-asset", default=None, help="Train data asset, azureml:name@latest or azureml:name:version.")
@click.option("--validation-asset", default=None, help="Validation data asset.")
@click.option("--test-asset", default=None, help="Test data asset.")
@click.option("--data-version", default="local", show_default=True, help="Version label of file inputs.")
@click.option("--output", type=click.Path(path_type=Path), required=True, help="Folder for the gathered splits.")
def job_prepare_data(config, train, validation, test, train_asset, validation_asset, test_asset, data_version, output) -> None:
    """Gather the splits (resolving data assets now) into one folder with data.json."""
    from azdistill.azure.injob import prepare_data

    _settings(config)  # a broken config fails here, before any download
    info = prepare_data(
        {"train": train, "validation": validation, "test": test},
        {"train": train_asset, "validation": validation_asset, "test": test_asset},
        data_version,
        output,
    )
    click.echo(f"data version {info['version']}: {output}")


@job.command("shard")
@click.option("--config", "config", type=click.Path(path_type=Path), required=True, help="The job config.")
@click.option("--data", type=click.Path(path_type=Path), required=True, help="The gathered splits.")
@click.option("--shards", type=click.IntRange(1, 1000), default=1, show_default=True, help="Number of shards.")
@click.option("--manifests", type=click.Path(path_type=Path), required=True, help="Folder for the shard manifests.")
def job_shard(config, data, shards, manifests) -> None:
    """Cut train and validation into shards for the parallel synthesis job."""
    from azdistill.azure.injob import shard

    _settings(config)
    written = shard(data, shards, manifests)
    click.echo(f"{written} shards" if written else "no sharding")


@job.command("with-teacher-key", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
def job_with_teacher_key(command: tuple[str, ...]) -> None:
    """Run COMMAND with the teacher key (read by managed identity) in AZDISTILL_TEACHER_KEY."""
    from azdistill.azure.injob import run_with_teacher_key

    sys.exit(run_with_teacher_key(list(command)))


@job.command("merge-shards")
@click.option("--config", "config", type=click.Path(path_type=Path), required=True, help="The job config.")
@click.option("--shards", type=click.Path(path_type=Path), required=True, help="The shard folders.")
@click.option("--output", type=click.Path(path_type=Path), required=True, help="The merged synthesize folder.")
def job_merge_shards(config, shards, output) -> None:
    """Join the synthesized shards into one synthesize stage folder."""
    from azdistill.azure.injob import merge_shards

    settings = _settings(config)
    summary = merge_shards(shards, output, settings.synthesis.min_success_ratio)
    click.echo(f"merged {summary['shards']} shards: {summary['kept']} answers kept, {summary['rejected']} rejected")


@job.command("package-model")
@click.option("--model", "model", type=click.Path(path_type=Path), required=True, help="The fine-tuned model folder.")
@click.option("--output", type=click.Path(path_type=Path), required=True, help="Folder for the MLflow model.")
def job_package_model(model, output) -> None:
    """Save the student as an MLflow model (rank 0 only)."""
    from azdistill.azure.injob import package_model

    if package_model(model, output):
        click.echo(f"MLflow model: {output}")


@job.command("register")
@click.option("--model", "model", type=click.Path(path_type=Path), required=True, help="The MLflow model folder.")
@click.option("--report", type=click.Path(path_type=Path), required=True, help="The evaluation's report.json.")
@click.option("--data-info", type=click.Path(path_type=Path), required=True, help="The validate step's data.json.")
@click.option("--name", required=True, help="Registered model name.")
@click.option("--teacher", required=True, help="The teacher's name (a tag).")
@click.option("--champion-metric", default="agreement", show_default=True, help="Metric the champion is beaten on.")
@click.option("--promotion", type=click.Choice(["champion_challenger", "register_only"]), default="champion_challenger", show_default=True)
@click.option("--output", type=click.Path(path_type=Path), required=True, help="Folder for decision.json.")
def job_register(model, report, data_info, name, teacher, champion_metric, promotion, output) -> None:
    """Register the student with lineage tags and apply the champion/challenger rule."""
    from azdistill.azure.injob import register_student

    result = register_student(model, report, data_info, name, teacher, champion_metric, promotion, output)
    click.echo(f"{name} version {result['version']}: {'champion' if result['promoted'] else 'registered'} ({result['reason']})")
