"""`azdistill serve [MODEL]`: a trained student behind an OpenAI-compatible chat-completions server on this machine.

The command only parses and dispatches to `azdistill.serving`; MLflow and the server load inside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from azdistill.cli.options import load_settings, set_option


@click.command()
@click.argument("model", required=False)
@click.option(
    "-c", "--config", "config", type=click.Path(path_type=Path), help="Config whose student to serve (default: the demo config)."
)
@set_option
@click.option(
    "--name", default=None,
    help="The model name requests send (default: the config's registered model name, e.g. sentiment-student). "
    "Give the teacher's model name and an application moving from the teacher's endpoint changes only its base URL.",
)  # fmt: skip
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option("--device", default="auto", show_default=True, help="Where the model runs: auto, cpu, cuda, cuda:N or mps.")
def serve(
    model: Optional[str], config: Optional[Path], overrides: tuple[str, ...], name: Optional[str],
    host: str, port: int, device: str,
) -> None:  # fmt: skip
    """Serve a trained student with an OpenAI-compatible API (transformers serve) until Ctrl-C.

    MODEL is a finetune stage folder, a model folder (Hugging Face or MLflow), a registered version of the config's
    student (3 or v3) or @champion; without it, the config's finetune stage output. Prints the base URL, the
    model name requests send and a curl line to try, then "ready" once the server answers.
    """
    from azdistill.serving.local import Server, check_server_options, run_server, transformers_command
    from azdistill.serving.resolve import model_to_serve, serving_dir

    settings = load_settings(config, overrides)
    name = name or settings.registered_model_name
    check_server_options(name, host, port, device)
    transformers_command()
    chosen = model_to_serve(settings, model, config)
    server = Server(chosen.folder.resolve(), name, host, port, device, serving_dir(settings).resolve())
    click.echo(f"Serving {chosen.source} as '{name}'")
    click.echo(f"  model folder  {server.folder}")
    click.echo(f"  base URL      {server.base_url}")
    click.echo(f"  model name    {name}  (what requests send as \"model\")")
    click.echo(f"  server log    {server.log_path}")
    click.echo(f"  try it        {server.curl_line()}")
    click.echo("loading the model ...")
    run_server(server, on_ready=lambda: click.echo(f"ready: {server.base_url} (Ctrl-C stops the server)"))
    click.echo("stopped")
