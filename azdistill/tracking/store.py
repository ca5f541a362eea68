"""Where runs are kept: a local MLflow store is a SQLite file (`sqlite:///<workdir>/mlflow.db`, the default) with
its artifacts beside it; anything else is a tracking server or an Azure ML workspace."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from azdistill.errors import UserError

SQLITE_PREFIX = "sqlite:///"


def local_store_path(tracking_uri: str) -> Optional[Path]:
    """The SQLite file of a local store, or None when the URI names a server or a workspace."""
    return Path(tracking_uri[len(SQLITE_PREFIX):]) if tracking_uri.startswith(SQLITE_PREFIX) else None


def require_runs(tracking_uri: str) -> None:
    """A local store that does not exist yet is a user error saying what to run; a server is asked as it is."""
    path = local_store_path(tracking_uri)
    if path is not None and not path.exists():
        raise UserError(f"no runs yet: {path} does not exist; run `azdistill run` first")


def local_artifact_location(tracking_uri: str) -> Optional[str]:
    """Where a local store keeps artifacts: beside its file, not in ./mlruns of whatever folder we run from."""
    path = local_store_path(tracking_uri)
    return (path.parent / "artifacts").resolve().as_uri() if path is not None else None


def redact_uri(uri: str) -> str:
    """Hide a password in a tracking URI (postgresql://user:secret@host/db) before it is printed or stored."""
    return re.sub(r"(//[^/:@]+):[^/@]+@", r"\1:***@", uri)
