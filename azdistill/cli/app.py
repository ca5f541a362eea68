"""The `azdistill` command line. Commands only parse and dispatch; heavy libraries load inside them.

Exit status: 0 success, 1 a stage failed on its data (e.g. too few usable teacher answers), 2 bad input
(config, data, arguments), 130 interrupted."""

from __future__ import annotations

import gc
from typing import Optional

import click

from azdistill import __version__
from azdistill.cli import azure, data, runs, serve, stages
from azdistill.console import configure_logging
from azdistill.errors import StageFailed, UserError


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


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point."""
    try:
        cli.main(args=argv, prog_name="azdistill")
    finally:
        # The process ends here. Python's last garbage collection at exit walks every object the imports made
        # (0.3 s more once MLflow is imported); frozen, they are left to the exit itself. Files and stores are
        # closed by then: every writer here closes or flushes its own, and atexit handlers (logging, MLflow) still run.
        gc.freeze()


for _command in (
    stages.run, stages.validate, stages.synthesize, stages.finetune, stages.evaluate, stages.preflight,
    data.import_logs_command, data.export_command,
    runs.ui, runs.runs,
    azure.submit, azure.schedule, azure.status, azure.logs, azure.job,
    azure.deploy,
    serve.serve,
):
    cli.add_command(_command)
