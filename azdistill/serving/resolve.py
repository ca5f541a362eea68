"""What `azdistill serve MODEL` serves: the model folder MODEL names, whether it is a folder, a finetune stage, a
registered version or the champion.

MODEL may be
- nothing: the config's own finetune stage (`<workdir>/runs/<name>/finetune/model`), once that stage has finished;
- a finetune stage folder (its `model/`), a Hugging Face model folder, or an MLflow model folder;
- a registered version of the config's student (`3` or `v3`) or `@champion`, in the config's tracking store.

A registered version is downloaded once into `<workdir>/serving/registry/<model name>/v<version>` and reused after:
a version's files never change, only which version the champion alias points at. A folder that is `./3` on disk is
given with its `./`, since `3` alone is a version.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from azdistill.errors import UserError
from azdistill.models.files import file_lock, model_folder, open_permissions

log = logging.getLogger("azdistill")

CHAMPION = "@champion"
VERSION = re.compile(r"v?(\d+)")
KEY = "MODEL"  # how errors name the argument
WHAT_MODEL_MAY_BE = "a model folder, a finetune stage folder, a registered version (3 or v3) or @champion"
STAGE_DONE_FILE = "stage.json"  # azdistill.stages.state.DONE_FILE: written when a stage has finished


@dataclass(frozen=True)
class ModelToServe:
    """A Hugging Face model folder to serve (config.json, weights and tokenizer side by side) and, in words, where
    it came from."""

    folder: Path
    source: str


def serving_dir(config) -> Path:
    """Where serving keeps its files for a config: downloads, joined MLflow folders, name links and server logs."""
    return config.workdir / "serving"


def model_to_serve(config, model: Optional[str], config_path: Optional[Path] = None) -> ModelToServe:
    """The folder `azdistill serve` serves for MODEL (see the module docstring); `config_path` only names the config
    in the command an error suggests. Nothing loads: only files are looked at, or a registered version downloaded."""
    if model is None:
        return _finetuned(config, config_path)
    if model == CHAMPION or VERSION.fullmatch(model):
        return _registered(config, model)
    if model.startswith("@"):
        raise UserError(f"{KEY}: {model} is not an alias azdistill sets; give {WHAT_MODEL_MAY_BE}")
    return _from_folder(config, Path(model).expanduser())


def _finetuned(config, config_path: Optional[Path]) -> ModelToServe:
    """The config's own finetune stage, or an error naming the command that makes it."""
    stage = config.stage_dir("finetune")
    if not (stage / "model").is_dir():
        config_arg = f" {config_path}" if config_path is not None else ""
        raise UserError(
            f"{KEY}: no finetuned student in {stage} yet; run `azdistill run{config_arg}` (or `azdistill finetune{config_arg}`) "
            f"first, or give {WHAT_MODEL_MAY_BE}"
        )
    return ModelToServe(_finished_stage_model(stage), f"the finetune stage of '{config.name}'")


def _finished_stage_model(stage: Path) -> Path:
    """The student a finished stage folder holds; a stage that has not finished is refused, as its model may be
    missing, an older run's or half-written."""
    if not (stage / STAGE_DONE_FILE).is_file():
        raise UserError(
            f"{KEY}: the stage in {stage} has not finished (no {STAGE_DONE_FILE}); run its command again to finish it, "
            f"or give {WHAT_MODEL_MAY_BE}"
        )
    return model_folder(stage / "model", KEY)


def _from_folder(config, path: Path) -> ModelToServe:
    if not path.is_dir():
        raise UserError(f"{KEY}: {path} is not a folder; give {WHAT_MODEL_MAY_BE}")
    is_model = (path / "config.json").is_file() or (path / "MLmodel").is_file()
    if not is_model and (path / "model").is_dir():
        return ModelToServe(_finished_stage_model(path), f"the stage folder {path}")
    return ModelToServe(model_folder(path, KEY, _joined_target(config, path)), f"the model folder {path}")


def _joined_target(config, path: Path) -> Path:
    """Where an MLflow model folder that keeps its tokenizer apart gets its weights and tokenizer joined (links
    only), one folder per source so that two models never share one."""
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    return serving_dir(config) / "joined" / f"{path.name}-{digest}"


def _registered(config, model: str) -> ModelToServe:
    """A registered version of the config's student, or its champion, downloaded into the workdir once."""
    from mlflow import MlflowClient

    from azdistill.tracking.registry import champion_version
    from azdistill.tracking.store import local_store_path, redact_uri

    uri, name = config.tracking_uri, config.registered_model_name
    local_store = local_store_path(uri)
    if local_store is not None and not local_store.exists():
        raise UserError(
            f"{KEY}: {model} is a registered version, and there is no tracking store yet ({local_store} does not exist); "
            "a run with tracking on registers its student (`azdistill run`), or give a model folder"
        )
    store = redact_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = _versions(client, name, store)
    if model == CHAMPION:
        version = champion_version(client, name)
        if version is None:
            raise UserError(
                f"{KEY}: '{name}' has no champion yet in {store} (no version has passed the promotion checks; "
                f"`azdistill runs list` says why); give a version instead: {', '.join(versions)}"
            )
        source = f"version {version} of '{name}' ({CHAMPION})"
    else:
        version = str(int(VERSION.fullmatch(model).group(1)))
        if version not in versions:
            raise UserError(
                f"{KEY}: '{name}' has no version {version} in {store}; its registered versions: {', '.join(versions)}"
            )
        source = f"version {version} of '{name}'"
    download = _download(config, client, name, version, uri)
    return ModelToServe(model_folder(download, KEY, download.with_name(f"{download.name}.joined")), source)


def _versions(client: Any, name: str, store: str) -> list[str]:
    """The registered versions of `name`, oldest first; none is a user error saying what registers one."""
    registered = sorted(int(version.version) for version in client.search_model_versions(f"name='{name}'"))
    if not registered:
        raise UserError(
            f"{KEY}: no model '{name}' is registered in {store}; a run with tracking on registers its student "
            "(`azdistill run`), or give a model folder"
        )
    return [str(version) for version in registered]


def _download(config, client: Any, name: str, version: str, uri: str) -> Path:
    """The registered version's files, downloaded whole into a staging folder and moved into place, so that a
    folder in place is always complete and is reused as it is."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    safe_name = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    target = serving_dir(config) / "registry" / safe_name / f"v{version}"
    with file_lock(target.parent / f".v{version}.lock"):
        if target.is_dir():
            log.info("serving version %s of '%s' from %s (downloaded before)", version, name, target)
            return target
        log.info("downloading version %s of '%s' into %s", version, name, target)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".v{version}-"))
        try:
            # Not `models:/NAME/VERSION`: MLflow resolves that with the process-wide registry URI, whatever store the
            # call names (ModelsArtifactRepository._get_model_uri_infos, MLflow 3.15). The version's own location is
            # what that resolves to, asked of this store.
            location = client.get_model_version_download_uri(name, version)
            downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(staging), tracking_uri=uri))
            open_permissions(downloaded)
            os.replace(downloaded, target)  # the location's folder, under its own name inside staging
        except BaseException as error:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(error, MlflowException):
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise UserError(f"{KEY}: version {version} of '{name}' could not be downloaded: {first_line}") from error
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return target
