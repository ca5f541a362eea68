"""Options and helpers every command shares."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

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


def load_settings(config: Optional[Path], overrides: tuple[str, ...]):
    """The config a command was given (or the embedded demo config), with its --set overrides applied."""
    from azdistill.config.loading import load_config

    return load_config(config, overrides)
