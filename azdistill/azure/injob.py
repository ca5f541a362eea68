"""What the components run inside their Azure ML jobs, besides the stage commands themselves.

Each function here is one `azdistill job ...` command (see `commands.py`), called from a component's command
line. They authenticate as the job's managed identity (`workspace.make_credential`) and find the workspace from
the AZUREML_ARM_* variables Azure ML sets in every job.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from azdistill.azure.build import (
    SETTING_INPUTS,
    SHARD_LIMITS,
    SPLITS,
    TEACHER_CONNECTION_ENV,
    TEACHER_KEY_ENV,
    TEACHER_KEY_NAME_ENV,
    TEACHER_KEY_SECRET_ENV,
)
from azdistill.azure.workspace import make_credential, ml_client, resolve_workspace
from azdistill.data.files import write_json
from azdistill.errors import StageFailed, UserError

log = logging.getLogger(__name__)

DATASTORE_URI = re.compile(r"^azureml://.*?/datastores/(?P<datastore>[^/]+)/paths/(?P<path>.+)$")
ASSET_REFERENCE = re.compile(r"^azureml:(?P<name>[A-Za-z0-9_.-]+)(?:(?::(?P<version>[A-Za-z0-9_.-]+))|(?:@(?P<label>[A-Za-z0-9_.-]+)))$")


def job_client(credential: Any = None):
    """An MLClient for the workspace the job runs in, as the job's managed identity."""
    credential = credential or make_credential()
    return ml_client(resolve_workspace(None), credential), credential


# ---------------------------------------------------------------------------------------------------
# Data


def download_datastore_file(client: Any, credential: Any, uri: str, destination: Path) -> None:
    """Download one file of a workspace datastore (an `azureml://.../datastores/<d>/paths/<p>` URI) with the
    job's identity: identity-based access needs no datastore key."""
    from azure.storage.blob import BlobClient

    match = DATASTORE_URI.match(uri)
    if match is None:
        raise UserError(f"cannot download {uri}: expected azureml://.../datastores/<name>/paths/<path>")
    datastore = client.datastores.get(match["datastore"])
    account_url = f"{datastore.protocol or 'https'}://{datastore.account_name}.blob.{datastore.endpoint or 'core.windows.net'}"
    blob = BlobClient(account_url, container_name=datastore.container_name, blob_name=match["path"], credential=credential)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with destination.open("wb") as handle:
        blob.download_blob().readinto(handle)


def resolve_data_asset(client: Any, reference: str) -> Any:
    """The data asset a reference names, `@latest` resolved now (when the job runs, not when it was submitted)."""
    match = ASSET_REFERENCE.match(reference)
    if match is None:
        raise UserError(f"'{reference}' is not a data asset reference: use azureml:<name>:<version> or azureml:<name>@latest")
    if match["version"]:
        return client.data.get(match["name"], version=match["version"])
    return client.data.get(match["name"], label=match["label"])


def prepare_data(
    files: dict[str, Optional[Path]], assets: dict[str, Optional[str]], data_version: str, output: Path, client_factory=job_client
) -> dict:
    """Gather the three splits into `output` (train.jsonl, validation.jsonl, test.jsonl) and record where each
    came from in data.json. Data assets are resolved here, so `@latest` means the latest version at run time."""
    output.mkdir(parents=True, exist_ok=True)
    sources: dict[str, dict] = {}
    client = credential = None
    for split in SPLITS:
        target = output / f"{split}.jsonl"
        if files.get(split):
            shutil.copyfile(files[split], target)  # type: ignore[arg-type]
            sources[split] = {"source": "file"}
        elif assets.get(split):
            if client is None:
                client, credential = client_factory()
            asset = resolve_data_asset(client, assets[split])  # type: ignore[arg-type]
            if asset.type != "uri_file":
                raise UserError(f"data asset {asset.name}:{asset.version} is a {asset.type}; register each split as a uri_file asset")
            download_datastore_file(client, credential, asset.path, target)
            sources[split] = {"source": "asset", "asset": asset.name, "version": str(asset.version)}
            log.info("%s: data asset %s version %s", split, asset.name, asset.version)
        else:
            raise UserError(f"no {split} data: the validate step needs either the {split} file or the {split}_asset reference")
    if all(source["source"] == "asset" for source in sources.values()):
        versions = {f"{source['asset']}:{source['version']}" for source in sources.values()}
        data_version = ",".join(sorted(versions))
    info = {"version": data_version, "splits": sources}
    write_json(output / "data.json", info)
    return info


def shard(data_dir: Path, shards: int, manifests: Path) -> int:
    """Cut train and validation into `shards` contiguous shards under data_dir/shards, one manifest per shard.

    Contiguous shards keep the input order when merged back in shard order. The count is lowered so that no
    shard is empty. Returns the number of shards written (0: no sharding asked for).
    """
    manifests.mkdir(parents=True, exist_ok=True)
    if shards <= 1:
        return 0
    lines = {
        split: [line for line in (data_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
        for split in ("train", "validation")
    }
    count = min(shards, *(len(split_lines) for split_lines in lines.values()))
    if count < shards:
        log.info("shard: %d shards asked for, %d written so that none is empty", shards, count)
    shard_dir = data_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        manifest = {"shard": index}
        for split, split_lines in lines.items():
            start, stop = index * len(split_lines) // count, (index + 1) * len(split_lines) // count
            name = f"{split}-{index:05d}.jsonl"
            (shard_dir / name).write_text("\n".join(split_lines[start:stop]) + "\n", encoding="utf-8")
            manifest[split] = f"shards/{name}"
        write_json(manifests / f"shard-{index:05d}.json", manifest)
    return count


def shard_command(manifest: dict, config: str, data: str, output: str, shares: Optional[dict[str, Any]] = None) -> list[str]:
    """The command answering one shard: `azdistill synthesize` as in local mode, under `with-teacher-key`, with
    the shard's share of the teacher's limits and budget (`shares`: synthesize_shards inputs, see SHARD_LIMITS, and
    the pipeline's synthesis settings, see SETTING_INPUTS; None values are left to the config) as --set overrides."""
    azdistill = [sys.executable, "-m", "azdistill"]
    keys = {**SHARD_LIMITS, **SETTING_INPUTS}
    limits = []
    for name, value in (shares or {}).items():
        if name not in keys:
            raise UserError(f"unknown shard limit '{name}': expected one of {', '.join(keys)}")
        if value is not None:
            limits += ["--set", f"{keys[name]}={value}"]
    return azdistill + ["job", "with-teacher-key", "--"] + azdistill + [
        "synthesize", config,
        "--set", f"data.train={Path(data) / manifest['train']}",
        "--set", f"data.validation={Path(data) / manifest['validation']}",
        "--set", f"data.test={Path(data) / 'test.jsonl'}",
        *limits,
        "--output-dir", str(Path(output) / f"shard-{int(manifest['shard']):05d}"),
    ]  # fmt: skip


def synthesize_shard(manifest_path: Path, config: str, data: str, output: str, shares: Optional[dict[str, Any]] = None) -> str:
    """Answer one shard with the same `azdistill synthesize` command as local mode (parallel job entry), within
    the shard's share of the teacher's limits (see `shard_command`)."""
    manifest = json.loads(Path(manifest_path).read_text(encoding="utf-8"))
    shard_output = Path(output) / f"shard-{int(manifest['shard']):05d}"
    command = shard_command(manifest, config, data, output, shares)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"shard {manifest['shard']} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return f"{shard_output.name}: done"


def _add_numbers(total: Any, part: Any) -> Any:
    """Sum two stats.json documents: numbers add up, nested sections recurse, anything else keeps the first."""
    if isinstance(total, dict) and isinstance(part, dict):
        return {key: _add_numbers(total[key], part[key]) if key in total else part[key] for key in {**total, **part}}
    if isinstance(total, (int, float)) and isinstance(part, (int, float)) and not isinstance(total, bool):
        return total + part
    return total


def merge_shards(shards_dir: Path, output: Path, min_success_ratio: float) -> dict:
    """Join finished shard folders, in shard order, into one synthesize stage folder."""
    from azdistill.data import digests
    from azdistill.stages import state

    folders = sorted(path for path in Path(shards_dir).iterdir() if path.is_dir() and path.name.startswith("shard-"))
    if not folders:
        raise StageFailed(f"{shards_dir} holds no shard-NNNNN folders: the sharded synthesis produced nothing")
    for folder in folders:
        if not (folder / state.DONE_FILE).is_file():
            raise StageFailed(f"{folder.name} did not finish (no {state.DONE_FILE}): rerun the pipeline to redo it")
    output.mkdir(parents=True, exist_ok=True)
    skip = {state.DONE_FILE, state.IN_PROGRESS_FILE}
    names = sorted(
        {file.name for folder in folders for file in folder.iterdir() if file.is_file() and file.name not in skip and not file.name.endswith(".journal.jsonl")}
    )
    stats: Any = None
    for name in names:
        if name.endswith(".jsonl"):
            with (output / name).open("w", encoding="utf-8") as merged:
                for folder in folders:
                    if (folder / name).is_file():
                        text = (folder / name).read_text(encoding="utf-8")
                        merged.write(text if not text or text.endswith("\n") else text + "\n")
        elif name == "stats.json":
            for folder in folders:
                if (folder / name).is_file():
                    part = json.loads((folder / name).read_text(encoding="utf-8"))
                    stats = part if stats is None else _add_numbers(stats, part)
            write_json(output / name, {**(stats or {}), "shards": len(folders)})
        else:
            shutil.copyfile(folders[0] / name, output / name)
    kept = _count_lines(output / "train.jsonl") + _count_lines(output / "validation.jsonl")
    rejected = _count_lines(output / "rejected.jsonl")
    ratio = kept / (kept + rejected) if kept + rejected else 0.0
    if ratio < min_success_ratio:
        raise StageFailed(
            f"only {kept} of {kept + rejected} teacher answers passed the checks over all shards ({ratio:.0%} < "
            f"synthesis.min_success_ratio {min_success_ratio:.0%}); see rejected.jsonl for the reasons"
        )
    summary = {"shards": len(folders), "kept": kept, "rejected": rejected}
    state.finish(output, digests.fingerprint({"shards": [state.read_manifest(folder).get("fingerprint") for folder in folders]}), names, summary)
    return summary


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open(encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


# ---------------------------------------------------------------------------------------------------
# The teacher key


def teacher_key(client_factory=job_client) -> Optional[str]:
    """The teacher key, read with the job's managed identity from the workspace connection or Key Vault secret
    the pipeline named (AZDISTILL_TEACHER_CONNECTION / AZDISTILL_TEACHER_KEY_SECRET); None when neither is set."""
    connection = os.environ.get(TEACHER_CONNECTION_ENV)
    secret_uri = os.environ.get(TEACHER_KEY_SECRET_ENV)
    if not connection and not secret_uri:
        return None
    client, credential = client_factory()
    if connection:
        found = client.connections.get(connection, populate_secrets=True)
        key = getattr(found, "api_key", None) or getattr(getattr(found, "credentials", None), "key", None)
        if not key:
            raise UserError(f"workspace connection '{connection}' holds no API key: create it as an API-key connection (infra/ does)")
        return key
    return read_key_vault_secret(credential, secret_uri)  # type: ignore[arg-type]


def read_key_vault_secret(credential: Any, secret_uri: str) -> str:
    """A Key Vault secret's value by its URI (Key Vault REST API 7.4), with an Entra ID token."""
    import requests

    token = credential.get_token("https://vault.azure.net/.default").token
    response = requests.get(secret_uri, params={"api-version": "7.4"}, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    if response.status_code in (401, 403):
        raise UserError(
            f"Key Vault refused the job's identity ({response.status_code}) for {secret_uri}: grant it the "
            "'Key Vault Secrets User' role on the vault (infra/ does)"
        )
    if response.status_code == 404:
        raise UserError(f"no Key Vault secret at {secret_uri} (404): check azure.teacher_key_secret")
    response.raise_for_status()
    return response.json()["value"]


def teacher_key_variable() -> str:
    """The variable the stage reads the teacher key from: the name the pipeline passed in AZDISTILL_TEACHER_KEY_ENV
    (the config's teacher.auth.api_key_env), else AZDISTILL_TEACHER_KEY."""
    from azdistill.secrets import ENV_NAME

    name = os.environ.get(TEACHER_KEY_NAME_ENV) or TEACHER_KEY_ENV
    if not ENV_NAME.match(name):
        raise UserError(f"{TEACHER_KEY_NAME_ENV} must name an environment variable (letters, digits and '_'), e.g. OPENAI_KEY")
    return name


def run_with_teacher_key(command: Sequence[str], client_factory=job_client) -> int:
    """Run `command` with the teacher key in the environment variable the config names (`teacher_key_variable`).

    The key lives only in that process's environment: not on a command line, in a file, or in a log.
    """
    if not command:
        raise UserError("with-teacher-key: give the command to run after --")
    variable = teacher_key_variable()
    key = teacher_key(client_factory)
    environment = dict(os.environ)
    if key is not None:
        environment[variable] = key
    return subprocess.run(list(command), env=environment).returncode


# ---------------------------------------------------------------------------------------------------
# The student as an MLflow model, registered; champion and challenger


def package_model(model_dir: Path, output: Path) -> bool:
    """Save the fine-tuned student as an MLflow transformers model. Only rank 0 of a distributed job writes."""
    if os.environ.get("RANK", "0") != "0":
        return False
    import mlflow
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from azdistill.models.loading import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = load_tokenizer(Path(model_dir))
    if output.exists() and not any(output.iterdir()):
        output.rmdir()  # MLflow writes the folder itself; the job's mounted output starts empty
    mlflow.transformers.save_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        path=str(output),
        task="text-generation",
        # Requirement inference imports every candidate package; the student needs only these.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"],
    )
    return True


def student_tags(report: dict, data_info: dict, teacher: str) -> dict[str, str]:
    """Lineage tags of a registered student: teacher, data version, its metrics and the evaluation's verdict."""
    student = next((model for model in report.get("models", []) if model.get("role") == "student"), {})
    tags = {
        "teacher": teacher,
        "data_version": str(data_info.get("version", "")),
        "promote": str(bool(report.get("promote"))).lower(),
        "task": str(report.get("task", "")),
    }
    for name, value in (student.get("metrics") or {}).items():
        tags[f"metric.{name}"] = f"{value:.4f}"
    for field in ("latency_p50_s", "peak_memory_mb", "parameters"):
        if student.get(field) is not None:
            tags[f"metric.{field}"] = f"{student[field]:.4f}"
    run_id = os.environ.get("AZUREML_ROOT_RUN_ID") or os.environ.get("AZUREML_RUN_ID")
    if run_id:
        tags["azdistill.job"] = run_id
    return tags


def register_student(
    model_dir: Path,
    report_path: Path,
    data_info_path: Path,
    name: str,
    teacher: str,
    champion_metric: str,
    promotion: str,
    output: Path,
    client_factory=job_client,
) -> dict:
    """Register the student with its lineage tags, then apply the champion/challenger rule
    (`azdistill.tracking.registry.decide`): the champion is the version tagged azdistill.champion=true, read now."""
    from azure.ai.ml.entities import Model

    from azdistill.evaluation.promotion import failed_check_descriptions
    from azdistill.evaluation.report import report_from_dict
    from azdistill.tracking.registry import CHAMPION_TAG, REPLACED_BY_TAG, decide, metric_from_tags

    report = json.loads(Path(report_path).read_text(encoding="utf-8"))
    data_info = json.loads(Path(data_info_path).read_text(encoding="utf-8")) if Path(data_info_path).is_file() else {}
    tags = student_tags(report, data_info, teacher)
    client, _ = client_factory()
    registered = client.models.create_or_update(
        Model(
            path=str(model_dir),
            type="mlflow_model",
            name=name,
            tags=tags,
            description=f"Student distilled from {teacher} on data {tags['data_version']}.",
        )
    )
    version = str(registered.version)
    result: dict[str, Any] = {"name": name, "version": version, "promoted": False, "reason": "register_only"}
    if promotion == "champion_challenger":
        champion = None
        for candidate in client.models.list(name=name):
            if str(candidate.version) != version and (candidate.tags or {}).get(CHAMPION_TAG) == "true":
                champion = candidate
                break
        checks = report_from_dict(report).checks
        decision = decide(
            version,
            champion_metric,
            metric_from_tags(tags, champion_metric),
            failed_check_descriptions(checks),
            str(champion.version) if champion is not None else None,
            metric_from_tags(champion.tags or {}, champion_metric) if champion is not None else None,
        )
        registered.tags = {**(registered.tags or {}), **decision.version_tags(), CHAMPION_TAG: str(decision.promoted).lower()}
        client.models.create_or_update(registered)
        if decision.promoted and champion is not None:
            champion.tags = {**(champion.tags or {}), CHAMPION_TAG: "false", REPLACED_BY_TAG: version}
            client.models.create_or_update(champion)
        result.update(
            promoted=decision.promoted, decision=decision.decision, reason=decision.reason, champion_before=decision.champion_version
        )
    write_json(Path(output) / "decision.json", result)
    log.info("registered %s version %s (%s): %s", name, version, result.get("decision", "registered"), result["reason"])
    return result
