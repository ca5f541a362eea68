"""Building blocks of the pipeline definitions in `pipelines/`: components and environments loaded from the
repository, compute placement per step, and the config file each step reads.

Components and environments are loaded fresh for every pipeline built: the SDK writes ARM ids back into them
when it submits, so objects reused across submissions would carry a stale identity.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import yaml

from azdistill.config.azure import AzureConfig, ComputeTarget
from azdistill.config.schema import DistillConfig
from azdistill.config.sections import PROJECT_ROOT
from azdistill.errors import UserError

COMPONENTS_DIR = PROJECT_ROOT / "components"
ENVIRONMENTS_DIR = PROJECT_ROOT / "environments"
PIPELINES_DIR = PROJECT_ROOT / "pipelines"
COMPONENT_NAMES = ("validate", "synthesize", "synthesize_shards", "merge_shards", "finetune", "evaluate", "register")
PIPELINE_NAMES = ("distill", "retrain")
SPLITS = ("train", "validation", "test")
# Environment variables a job step reads the teacher key's reference from (never the key itself).
TEACHER_CONNECTION_ENV = "AZDISTILL_TEACHER_CONNECTION"
TEACHER_KEY_SECRET_ENV = "AZDISTILL_TEACHER_KEY_SECRET"
# `azdistill job with-teacher-key` hands the key to the stage process in the variable the config names
# (teacher.auth.api_key_env); the pipeline passes that NAME (never the key) in TEACHER_KEY_NAME_ENV. Default name:
TEACHER_KEY_ENV = "AZDISTILL_TEACHER_KEY"
TEACHER_KEY_NAME_ENV = "AZDISTILL_TEACHER_KEY_ENV"
# Processes per node of the sharded synthesis job: each works through one shard at a time.
SHARD_PROCESSES_PER_INSTANCE = 1
# Each shard's share of the teacher's limits and budget: the synthesize_shards input -> the config key it sets.
SHARD_LIMITS = {
    "shard_requests_per_minute": "teacher.requests_per_minute",
    "shard_tokens_per_minute": "teacher.tokens_per_minute",
    "shard_max_concurrency": "teacher.max_concurrency",
    "shard_max_cost": "synthesis.max_cost",
}
# The settings users tune, as typed pipeline inputs: the input -> the config key it overrides. The config file stays
# the single source of defaults (each input's value is the config's when the pipeline is built); the studio or a
# schedule changes an input without a new file. The steps that use a setting take it as an input of the same name
# and pass it as `--set key=value` after the config file, so inside the step the input wins.
SETTING_INPUTS = {
    "synthesis_temperature": "synthesis.temperature",
    "synthesis_max_new_tokens": "synthesis.max_new_tokens",
    "training_epochs": "training.epochs",
    "training_learning_rate": "training.learning_rate",
    "training_kd_weight": "training.kd_weight",
    "training_topk_weight": "training.topk_weight",
    "training_method": "training.method",
}
SYNTHESIS_SETTINGS = ("synthesis_temperature", "synthesis_max_new_tokens")
TRAINING_SETTINGS = ("training_epochs", "training_learning_rate", "training_kd_weight", "training_topk_weight", "training_method")


@dataclass
class Components:
    """The repository's components, freshly loaded."""

    validate: Any
    synthesize: Any
    synthesize_shards: Any
    merge_shards: Any
    finetune: Any
    evaluate: Any
    register: Any


def component_spec(name: str) -> Path:
    return COMPONENTS_DIR / name / "spec.yaml"


def environment_specs() -> dict[str, Path]:
    """Environment name -> its environment.yaml, for every folder under environments/."""
    specs = {}
    for path in sorted(ENVIRONMENTS_DIR.glob("*/environment.yaml")):
        specs[yaml.safe_load(path.read_text(encoding="utf-8"))["name"]] = path
    return specs


def load_environments() -> dict[str, Any]:
    """`azureml:name:version` -> the Environment defined by environments/<folder>/environment.yaml."""
    from azure.ai.ml import load_environment

    environments = {}
    for path in environment_specs().values():
        environment = load_environment(source=path)
        environments[f"azureml:{environment.name}:{environment.version}"] = environment
    return environments


def stage_code(folder: Path) -> Path:
    """Copy what the jobs run (the azdistill package and the component entry scripts) into folder/code.

    The specs' `code: ../..` (the repository) works on its own with the .amlignore beside it, but the SDK walks
    every file of a code folder, ignored ones included, before uploading; the repository's .venv makes that
    take minutes. A staged copy uploads in a moment and holds exactly what the jobs run.
    """
    import shutil

    code = Path(folder) / "code"
    if code.exists():
        shutil.rmtree(code)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(PROJECT_ROOT / "azdistill", code / "azdistill", ignore=ignore)
    for entry in sorted(COMPONENTS_DIR.glob("*/*.py")):
        target = code / entry.relative_to(PROJECT_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(entry, target)
    return code


def load_components(code: Optional[Path] = None) -> Components:
    """Every component under components/, loaded afresh, with its code folder replaced by `code` if given.

    Components name their environment by reference (`azureml:azdistill-gpu:1.1.0`), so each spec stays valid
    on its own; `register_environments` creates those versions from environments/ before a submission.
    """
    from azure.ai.ml import load_component

    known = {f"azureml:{name}:{yaml.safe_load(path.read_text(encoding='utf-8'))['version']}" for name, path in environment_specs().items()}
    loaded = {}
    for name in COMPONENT_NAMES:
        component = load_component(source=component_spec(name))
        holder = component.task if component.type == "parallel" else component
        reference = holder.environment if isinstance(holder.environment, str) else None
        if reference is not None and (reference if reference.startswith("azureml:") else f"azureml:{reference}") not in known:
            raise UserError(f"{component_spec(name)}: environment {reference} is not defined under environments/ (name and version)")
        if code is not None:
            if component.type == "parallel":
                component.task.code = str(Path(code).resolve())
            else:
                component.code = str(Path(code).resolve())
        # A parallel node resolves its task's relative code path against the current folder, not the spec's
        # (it would upload whatever folder `../..` is from there): make it absolute.
        elif component.type == "parallel" and component.task.code and not Path(component.task.code).is_absolute():
            component.task.code = str((component_spec(name).parent / component.task.code).resolve())
        loaded[name] = component
    return Components(**loaded)


def register_environments(client: Any) -> list[str]:
    """Create the environment versions the components use, from environments/ (idempotent for an unchanged
    definition; Azure ML refuses changed content under an existing version, so bump the version)."""
    registered = []
    for environment in load_environments().values():
        created = client.environments.create_or_update(environment)
        registered.append(f"{created.name}:{created.version}")
    return registered


def stage_target(azure: AzureConfig, stage: str) -> ComputeTarget:
    """The compute target of a step: its own override, else the gpu default (finetune, evaluate) or cpu."""
    override = getattr(azure.compute, stage, None) if stage in ("synthesize", "finetune", "evaluate") else None
    if override is not None:
        return override
    return azure.compute.gpu if stage in ("finetune", "evaluate") else azure.compute.cpu


def place(node: Any, target: ComputeTarget, distributed: bool = False) -> None:
    """Put a pipeline node on a cluster or on serverless compute of an instance type.

    `command(compute=...).component` drops the compute, so it is set on the node inside the pipeline function.
    """
    from azure.ai.ml.entities import JobResourceConfiguration

    if target.cluster:
        node.compute = target.cluster
        node.resources = JobResourceConfiguration(instance_count=target.instance_count)
    else:
        node.compute = "serverless"
        node.resources = JobResourceConfiguration(instance_type=target.instance_type, instance_count=target.instance_count)
    if distributed:
        from azure.ai.ml import PyTorchDistribution

        node.distribution = PyTorchDistribution(process_count_per_instance=target.processes_per_instance)


def job_environment(azure: AzureConfig, teacher_key_env: Optional[str] = None) -> dict[str, str]:
    """Environment variables of a step: which identity to authenticate as and, for a step that calls the teacher
    (`teacher_key_env` given: the variable the teacher reads its key from, teacher.auth.api_key_env), where the
    key lives (a connection name or a Key Vault secret URI) and that variable's name: references, never the key.
    Steps that do not call the teacher get no reference, so they cannot read the key."""
    variables = {}
    if azure.identity_client_id:
        variables["AZURE_CLIENT_ID"] = azure.identity_client_id
    if teacher_key_env is not None and (azure.teacher_connection or azure.teacher_key_secret):
        if azure.teacher_connection:
            variables[TEACHER_CONNECTION_ENV] = azure.teacher_connection
        if azure.teacher_key_secret:
            variables[TEACHER_KEY_SECRET_ENV] = azure.teacher_key_secret
        variables[TEACHER_KEY_NAME_ENV] = teacher_key_env
    return variables


def identify(node: Any, azure: AzureConfig, teacher_key_env: Optional[str] = None) -> None:
    """Run the step as the compute's managed identity, with the job environment above (`teacher_key_env` only
    for the steps that call the teacher)."""
    from azure.ai.ml.entities import ManagedIdentityConfiguration

    node.identity = ManagedIdentityConfiguration(client_id=azure.identity_client_id) if azure.identity_client_id else ManagedIdentityConfiguration()
    node.environment_variables = {**(node.environment_variables or {}), **job_environment(azure, teacher_key_env)}


def check_teacher_key_reference(config: DistillConfig) -> None:
    """Refuse, before anything is written or sent, a hosted teacher whose key an Azure ML job could not get.

    With teacher.auth.method api_key_env the stage reads the key from an environment variable, which a job has
    only when `azdistill job with-teacher-key` fills it from a workspace connection or a Key Vault secret.
    """
    teacher, azure = config.teacher, azure_settings(config)
    if teacher.hosted and teacher.auth.method == "api_key_env" and not (azure.teacher_connection or azure.teacher_key_secret):
        raise UserError(
            f"teacher.kind {teacher.kind} reads its key from ${teacher.auth.api_key_env} (teacher.auth.api_key_env), "
            "which an Azure ML job does not have: set azure.teacher_connection (a workspace connection holding the key) "
            "or azure.teacher_key_secret (https://<vault>.vault.azure.net/secrets/<name>), or set teacher.auth.method "
            "to workspace_connection, key_vault or entra"
        )


def shards_at_once(config: DistillConfig) -> int:
    """How many synthesis shards run at the same time: one process on each node of the synthesize target."""
    azure = azure_settings(config)
    return min(azure.synthesis_shards, stage_target(azure, "synthesize").instance_count * SHARD_PROCESSES_PER_INSTANCE)


def shard_warnings(config: DistillConfig) -> list[str]:
    """What `validate` says of a sharded synthesis: shards that run at once against a hosted teacher whose request
    quota the config does not give each find the endpoint's limit from 429s on their own, and settle on unequal
    shares of it (docs/benchmarks.md). Without an azure section there is one shard, and nothing to say."""
    concurrent = shards_at_once(config)
    if concurrent < 2 or config.teacher.kind in ("local", "logged") or config.teacher.requests_per_minute is not None:
        return []
    return [
        f"azure.synthesis_shards: {concurrent} shards run at once against the teacher's endpoint and teacher.requests_per_minute "
        "is not set, so each finds the endpoint's limit from 429s on its own and they share it unequally; set it to the "
        "deployment's quota and each shard paces at its share (docs/azure.md)"
    ]


def shard_shares(config: DistillConfig) -> dict[str, Any]:
    """Each synthesis shard's share of the teacher's limits and budget: the synthesize_shards inputs (SHARD_LIMITS).

    Every shard runs its own client, and C = min(shards, nodes x processes per node) of them run at once against
    the one endpoint: each gets 1/C of its requests and tokens per minute and of its concurrency. The shards are
    equal contiguous slices, so each gets 1/N of synthesis.max_cost (fewer, larger shards, when the data is too
    small for N, spend less in all). Only the limits the config sets are passed.
    """
    teacher, shards, concurrent = config.teacher, azure_settings(config).synthesis_shards, shards_at_once(config)
    shares: dict[str, Any] = {"shard_max_concurrency": max(1, -(-teacher.max_concurrency // concurrent))}
    if teacher.requests_per_minute is not None:
        shares["shard_requests_per_minute"] = max(1, teacher.requests_per_minute // concurrent)
    if teacher.tokens_per_minute is not None:
        shares["shard_tokens_per_minute"] = max(1, teacher.tokens_per_minute // concurrent)
    if config.synthesis.max_cost is not None:
        shares["shard_max_cost"] = config.synthesis.max_cost / shards
    return shares


def setting_inputs(config: DistillConfig) -> dict[str, Any]:
    """The config's value of each SETTING_INPUTS setting: the pipeline inputs' values (and, as the pipeline function's
    defaults, their types: a float is a number input, an int an integer, a choice a string)."""
    values = {}
    for name, key in SETTING_INPUTS.items():
        section, field = key.split(".")
        values[name] = getattr(getattr(config, section), field)
    return values


def azure_settings(config: DistillConfig) -> AzureConfig:
    """The config's azure section; an empty one (clusters cpu-cluster and gpu-cluster) when it has none."""
    return config.azure or AzureConfig()


def experiment_name(config: DistillConfig) -> str:
    return azure_settings(config).experiment or config.experiment_name


def data_has_references(config: DistillConfig) -> bool:
    """Whether the local training data has reference answers (the 'no teacher' baseline needs them)."""
    from azdistill.data.records import has_references

    if azure_settings(config).data.train:
        return True  # a data asset: the evaluation.reference_baseline setting decides
    return has_references(config.data.train, config.task.type, config.data.max_records)


def wants_reference_node(config: DistillConfig) -> bool:
    return config.evaluation.reference_baseline and data_has_references(config)


def write_job_config(config: DistillConfig, folder: Path) -> Path:
    """Write the config every step reads: the resolved config (overrides applied) without the azure section,
    with the data paths left to the steps (they pass their mounted inputs) and MLflow pointed at the job's run."""
    azure = azure_settings(config)
    # A hosted teacher's model is the name sent to its endpoint (a server may name it like a path), not a folder.
    local_folders = [("student.model", config.student.model, "set azure.student_model to a model asset")]
    if not config.teacher.hosted:
        local_folders.append(("teacher.model", config.teacher.model, "use a hosted teacher"))
    if config.teacher.local_copy is not None:
        local_folders.append(("teacher.local_copy", config.teacher.local_copy, "use teacher.local_copy: builtin, or a folder inside the job's environment"))
    for key, model, hint in local_folders:
        if model not in ("builtin", "pruned-teacher") and Path(model).exists():
            if key == "student.model" and azure.student_model:
                continue
            raise UserError(f"{key} is a local folder ({model}) that an Azure ML job cannot read: {hint}")
    data = config.model_dump(mode="json", exclude={"azure", "workdir"})
    data["data"].update({split: f"{split}.jsonl" for split in SPLITS})
    # Inside a job MLflow logs to the job's own run (azureml-mlflow reads MLFLOW_TRACKING_URI, which Azure ML
    # sets); the experiment must be the job's, or MLflow refuses to resume that run.
    data["tracking"].update({"uri": None, "experiment": experiment_name(config)})
    data["evaluation"]["reference_baseline"] = wants_reference_node(config)
    if azure.student_model:
        # Replaced by the mounted student_model input in the steps that load the student (finetune, evaluate);
        # the reference itself, not pruned-teacher, so that a hosted teacher without local weights still validates.
        data["student"]["model"] = azure.student_model
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job-config.yaml"
    header = (
        f"# Written by `azdistill submit` from the config '{config.name}': the settings every Azure ML step reads.\n"
        "# Data paths are placeholders: each step passes its mounted inputs with --set.\n"
        f"# The pipeline's setting inputs ({', '.join(SETTING_INPUTS)})\n"
        "# start at this file's values and override them in the steps (--set): the studio or a schedule may change them.\n"
    )
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def data_inputs(config: DistillConfig, resolve_when_running: bool) -> dict[str, Any]:
    """The validate step's data inputs.

    Files are uploaded on submit. Data assets are either pinned when the job is submitted (uri_file inputs the
    SDK resolves, `@latest` included) or, with `resolve_when_running`, passed as text and resolved by the step
    itself when it runs, so a schedule reads the latest version at each trigger.
    """
    from azure.ai.ml import Input

    assets = azure_settings(config).data
    inputs: dict[str, Any] = {}
    for split in SPLITS:
        reference = getattr(assets, split)
        if resolve_when_running:
            if not reference:
                raise UserError(
                    f"the retrain pipeline reads registered data assets when it runs: set azure.data.{split} "
                    f"(e.g. azureml:{config.name}-{split}@latest)"
                )
            inputs[f"{split}_asset"] = reference
        elif reference:
            inputs[split] = Input(type="uri_file", path=reference)
        else:
            inputs[split] = Input(type="uri_file", path=str(getattr(config.data, split)))
    return inputs


def student_model_input(config: DistillConfig) -> Optional[Any]:
    """The base student from the workspace or an Azure ML registry (azure.student_model) as an mlflow_model input,
    as Azure ML's own distillation binds it; the job mounts it as a folder and passes it as student.model."""
    from azure.ai.ml import Input

    reference = azure_settings(config).student_model
    return Input(type="mlflow_model", path=reference) if reference else None


def load_pipeline_module(name: str) -> ModuleType:
    """Import pipelines/<name>.py (the pipeline definitions live beside components/, outside the package)."""
    if name not in PIPELINE_NAMES:
        raise UserError(f"unknown pipeline '{name}': choose one of {', '.join(PIPELINE_NAMES)}")
    path = PIPELINES_DIR / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"azdistill_pipelines_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_pipeline(config: DistillConfig, name: str, folder: Path):
    """Build (not submit) the pipeline job `name` for `config`; the job config is written into `folder`."""
    check_teacher_key_reference(config)
    job_config = write_job_config(config, folder)
    job = load_pipeline_module(name).build(config, job_config, stage_code(folder))
    name_assets_as_load_job_does(job)
    return job


def name_assets_as_load_job_does(job: Any) -> None:
    """Give the pipeline's workspace asset inputs (`azureml:name@latest`, `azureml:name:version`: data, the base
    student) the form `load_job` reads them into from YAML, without the `azureml:` prefix.

    When it submits, the SDK splits off a `@label` before it drops the prefix, so an input built in Python as
    `azureml:name@latest` looked up a container literally named `azureml:name` (a 404 on the service), while the same
    reference in a YAML file resolves `name`. The YAML dump writes the prefix back: the dry-run file is unchanged.
    """
    import copy

    from azure.ai.ml import Input

    for name, value in job.inputs.items():
        given = value.result()
        if isinstance(given, Input) and isinstance(given.path, str) and given.path.startswith("azureml:") and not given.path.startswith("azureml://"):
            named = copy.copy(given)
            named.path = given.path[len("azureml:") :]
            setattr(job.inputs, name, named)


def distillation_steps(
    components: Components, config: DistillConfig, config_file: Any, validate: Any, student_model: Any, settings: dict[str, Any]
) -> dict:
    """The steps after validation, shared by every pipeline definition: synthesize (one job, or shards on the
    parallel engine and a merge), finetune (PyTorch distribution), the reference baseline, evaluate, register.
    `settings` are the pipeline's SETTING_INPUTS inputs, bound to the steps that use them.

    Call inside a `dsl.pipeline` function; returns the pipeline outputs.
    """
    synthesis_settings = {name: settings[name] for name in SYNTHESIS_SETTINGS}
    training_settings = {name: settings[name] for name in TRAINING_SETTINGS}
    azure = azure_settings(config)
    data = validate.outputs.data
    # Bind the base student only when there is one: a binding to an absent pipeline input fails on the service.
    student_model = student_model if azure.student_model else None
    # Only the steps that call the teacher (synthesis and evaluation) get the key's reference.
    teacher_key_env = config.teacher.auth.api_key_env
    synthesis_target = stage_target(azure, "synthesize")
    if azure.synthesis_shards > 1:
        shards = components.synthesize_shards(
            shard_manifests=validate.outputs.shard_manifests, config=config_file, data=data, **shard_shares(config), **synthesis_settings
        )
        shards.name = "synthesize_shards"
        place(shards, synthesis_target)
        shards.max_concurrency_per_instance = SHARD_PROCESSES_PER_INSTANCE
        identify(shards, azure, teacher_key_env)
        merge = components.merge_shards(shards=shards.outputs.shards, config=config_file)
        merge.name = "merge_shards"
        place(merge, azure.compute.cpu.model_copy(update={"instance_count": 1}))
        identify(merge, azure)
        synthetic = merge.outputs.synthetic
    else:
        synthesize = components.synthesize(config=config_file, data=data, **synthesis_settings)
        synthesize.name = "synthesize"
        place(synthesize, synthesis_target.model_copy(update={"instance_count": 1}))
        identify(synthesize, azure, teacher_key_env)
        synthetic = synthesize.outputs.synthetic

    finetune_target = stage_target(azure, "finetune")
    finetune = components.finetune(
        config=config_file, data=data, synthetic=synthetic, student_model=student_model, train_on="teacher_answers", **training_settings
    )
    finetune.name = "finetune"
    place(finetune, finetune_target, distributed=True)
    identify(finetune, azure)
    reference = None
    if wants_reference_node(config):
        baseline = components.finetune(config=config_file, data=data, student_model=student_model, train_on="references", **training_settings)
        baseline.name = "finetune_references"
        place(baseline, finetune_target, distributed=True)
        identify(baseline, azure)
        reference = baseline.outputs.model

    evaluate = components.evaluate(config=config_file, data=data, student=finetune.outputs.model, reference=reference, student_model=student_model)
    evaluate.name = "evaluate"
    place(evaluate, stage_target(azure, "evaluate").model_copy(update={"instance_count": 1}))
    identify(evaluate, azure, teacher_key_env)

    register = components.register(
        mlflow_model=finetune.outputs.mlflow_model,
        report=evaluate.outputs.report,
        data=data,
        model_name=config.registered_model_name,
        teacher=config.teacher.label,
        champion_metric=getattr(config.evaluation.promotion, "champion_metric", "agreement"),
        promotion="champion_challenger",
    )
    register.name = "register"
    place(register, azure.compute.cpu.model_copy(update={"instance_count": 1}))
    identify(register, azure)
    return {
        "synthetic": synthetic,
        "student": finetune.outputs.mlflow_model,
        "report": evaluate.outputs.report,
        "decision": register.outputs.decision,
    }


def pipeline_tags(config: DistillConfig, pipeline: str) -> dict[str, str]:
    return {
        "azdistill.pipeline": pipeline,
        "azdistill.config": config.name,
        "azdistill.task": config.task.type,
        "azdistill.teacher": config.teacher.label,
        "azdistill.student": azure_settings(config).student_model or config.student.model,
        "azdistill.data_version": config.data.version,
    }
