"""Where runs are kept: a local MLflow store is a SQLite file (`sqlite:///<workdir>/mlflow.db`, the default) with
its artifacts beside it; anything else is a tracking server or an Azure ML workspace."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from azdistill.errors import UserError

log = logging.getLogger(__name__)

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


def create_local_store(path: Path) -> None:
    """Create the local store `path`, which does not exist yet, as a copy of an empty store of this MLflow version.

    MLflow creates a store by running every migration of its schema, one by one (half a second on an idle machine,
    3 s and more on a loaded one), and every new workdir pays for it again. The first store made with an MLflow version
    is migrated once, into the cache (`store_template`); later stores are copies of it, and MLflow then opens one
    as it opens any store at its schema's head (it checks the revision and adds its default experiment). Without a
    template (see `store_template`), MLflow creates the store itself, as before.
    """
    template = store_template()
    if template is None:
        return
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(template, staging)
        os.link(staging, path)  # appears whole, and never over a store another process made meanwhile
    except FileExistsError:
        pass
    except OSError as error:  # e.g. a file system without hard links: MLflow creates the store itself
        log.debug("no copy of the store template at %s (%s)", path, error)
    finally:
        staging.unlink(missing_ok=True)


def store_template() -> Optional[Path]:
    """The cached empty store of this MLflow and SQLAlchemy version, migrated to its schema's head when first asked
    for (`<cache>/mlflow/`); None when it cannot be made."""
    import mlflow
    import sqlalchemy

    from azdistill.models.files import cache_dir, file_lock

    folder = cache_dir() / "mlflow"
    template = folder / f"empty-store-mlflow-{mlflow.__version__}-sqlalchemy-{sqlalchemy.__version__}.db"
    if template.is_file():
        return template
    try:
        with file_lock(folder / f".{template.name}.lock"):  # two first runs at once migrate it once
            if not template.is_file():
                _migrate_empty_store(template)
    # The template only saves time: whatever stops it (a cache that cannot be written, an MLflow whose private
    # migration function moved), MLflow creates the store itself and raises its own error if that fails too.
    except Exception as error:  # noqa: BLE001
        log.info("MLflow creates the store itself: no template of an empty store (%s: %s)", type(error).__name__, error)
        return None
    return template


def _migrate_empty_store(template: Path) -> None:
    """Run MLflow's own creation of a new SQLite store (its initial tables, then every migration) into `template`."""
    from mlflow.store.db.utils import _initialize_tables, create_sqlalchemy_engine_with_retry

    staging = template.with_name(f".{template.name}.{os.getpid()}.tmp")
    staging.unlink(missing_ok=True)
    engine = create_sqlalchemy_engine_with_retry(f"{SQLITE_PREFIX}{staging}")
    try:
        _initialize_tables(engine)
    finally:
        engine.dispose()
    os.replace(staging, template)
