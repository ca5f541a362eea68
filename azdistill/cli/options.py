"""Options and helpers every command shares."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click


def workdir_lock(workdir: Path):
    """The workdir held by this command (see stages/state.py), imported when a command needs it."""
    from azdistill.stages.state import workdir_lock as lock

    return lock(workdir)


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
    from azdistill.config.loading import load_config

    return load_config(config, overrides)
