"""The `azure` section: the workspace, compute per stage, data assets, the retrain schedule and the online endpoint
the champion is deployed on."""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from azdistill.config.sections import Section


class ComputeTarget(Section):
    """Where one Azure ML step runs: a compute cluster of the workspace, or serverless compute of a VM size."""

    cluster: Optional[str] = Field(default=None, description="Name of a compute cluster in the workspace.")
    instance_type: Optional[str] = Field(
        default=None,
        description="Serverless compute: the VM size, e.g. Standard_D4s_v3 or Standard_NC24ads_A100_v4 "
        "(used when no cluster is named).",
    )
    instance_count: int = Field(
        default=1, ge=1, le=100, description="Nodes: finetune's PyTorch distribution, or the sharded synthesis job."
    )
    processes_per_instance: int = Field(
        default=1, ge=1, le=64, description="finetune: processes per node, one per GPU (torch.distributed)."
    )

    @model_validator(mode="after")
    def _one_target(self) -> "ComputeTarget":
        if bool(self.cluster) == bool(self.instance_type):
            raise ValueError("name either a cluster (e.g. cluster: gpu-cluster) or a serverless instance_type, not both or neither")
        return self


class AzureComputeConfig(Section):
    cpu: ComputeTarget = Field(
        default_factory=lambda: ComputeTarget(cluster="cpu-cluster"),
        description="Default for the CPU steps (validate, synthesize, merge_shards, register).",
    )
    gpu: ComputeTarget = Field(
        default_factory=lambda: ComputeTarget(cluster="gpu-cluster"), description="Default for finetune and evaluate."
    )
    synthesize: Optional[ComputeTarget] = Field(default=None, description="Overrides cpu for synthesis.")
    finetune: Optional[ComputeTarget] = Field(default=None, description="Overrides gpu for fine-tuning.")
    evaluate: Optional[ComputeTarget] = Field(default=None, description="Overrides gpu for evaluation (e.g. a CPU cluster).")


class AzureDataConfig(Section):
    train: Optional[str] = Field(
        default=None,
        description="Registered data asset for the train split: 'azureml:name:version' or 'azureml:name@latest'. "
        "Default: the config's local file, uploaded on submit.",
    )
    validation: Optional[str] = Field(default=None, description="Data asset for the validation split (as train).")
    test: Optional[str] = Field(default=None, description="Data asset for the test split (as train).")

    @field_validator("train", "validation", "test")
    @classmethod
    def _asset_reference(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not re.match(r"^azureml:[A-Za-z0-9_.-]+([:@][A-Za-z0-9_.-]+)$", value):
            raise ValueError("use 'azureml:<name>:<version>' or 'azureml:<name>@latest'")
        return value


class ScheduleConfig(Section):
    name: Optional[str] = Field(default=None, description="Schedule name. Default: <name>-retrain.")
    cron: Optional[str] = Field(default=None, description="Cron expression, e.g. '0 3 * * 1' (Mondays 03:00).")
    frequency: Optional[Literal["minute", "hour", "day", "week", "month"]] = Field(
        default=None, description="Recurrence unit (instead of cron)."
    )
    interval: int = Field(default=1, ge=1, description="Recurrence: every `interval` units of `frequency`.")
    hours: Optional[list[int]] = Field(default=None, description="Recurrence: hours of the day (0-23) it fires at.")
    minutes: Optional[list[int]] = Field(default=None, description="Recurrence: minutes of the hour (0-59).")
    week_days: Optional[list[Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]]] = (
        Field(default=None, description="Recurrence with frequency week: the days it fires on.")
    )
    time_zone: str = Field(default="UTC", description="Time zone of the trigger, e.g. 'W. Europe Standard Time'.")
    start_time: Optional[str] = Field(default=None, description="ISO 8601 time of the first trigger. Default: now.")

    @model_validator(mode="after")
    def _one_trigger(self) -> "ScheduleConfig":
        if bool(self.cron) == bool(self.frequency):
            raise ValueError("give either cron (e.g. '0 3 * * 1') or frequency (minute, hour, day, week, month)")
        if self.cron and len(self.cron.split()) != 5:
            raise ValueError(f"cron needs 5 fields (minute hour day month weekday), got '{self.cron}'")
        if self.cron and (self.hours or self.minutes or self.week_days):
            raise ValueError("hours, minutes and week_days belong to a recurrence (frequency), not to cron")
        if any(not 0 <= hour <= 23 for hour in self.hours or []) or any(not 0 <= m <= 59 for m in self.minutes or []):
            raise ValueError("hours must be 0-23 and minutes 0-59")
        return self


# Azure's rule for online endpoint and deployment names: 3-32 characters, letters, digits and hyphens, starting with a
# letter and ending with a letter or digit (azure.ai.ml's validate_endpoint_or_deployment_name says the same).
ENDPOINT_NAME_PATTERN = r"[A-Za-z][A-Za-z0-9-]{1,30}[A-Za-z0-9]"


class DeploymentConfig(Section):
    """Where `azdistill deploy` serves the champion: a managed online endpoint and one deployment per model version."""

    endpoint_name: Optional[str] = Field(
        default=None,
        description="Managed online endpoint name: 3-32 letters, digits and hyphens, starting with a letter, unique in "
        "the Azure region. Default: <config name>-student.",
    )
    instance_type: str = Field(
        default="Standard_DS3_v2",
        description="VM size of each deployment, e.g. Standard_DS3_v2 (CPU) or Standard_NC6s_v3 (GPU); Azure's list: "
        "https://learn.microsoft.com/azure/machine-learning/reference-managed-online-endpoints-vm-sku-list",
    )
    instance_count: int = Field(default=1, ge=1, le=100, description="Instances a new deployment starts with.")
    min_instances: Optional[int] = Field(
        default=None, ge=1, le=100,
        description="Autoscale: the fewest instances (with max_instances). Managed deployments scale through Azure "
        "Monitor autoscale, so `deploy` prints the `az monitor autoscale` commands for the new deployment.",
    )
    max_instances: Optional[int] = Field(
        default=None, ge=1, le=100, description="Autoscale: the most instances (with min_instances)."
    )
    target_utilization_percentage: Optional[int] = Field(
        default=None, ge=1, le=100,
        description="Autoscale: average CPU % above which an instance is added (below half of it one is removed). "
        "Default with min/max_instances: 70.",
    )
    smoke_prompts: int = Field(
        default=3, ge=1, le=100,
        description="Held-out prompts of data.test sent to a new deployment before it takes traffic; each must be "
        "answered with non-empty text.",
    )
    auth_mode: Literal["key", "aad_token"] = Field(
        default="key",
        description="How callers authenticate: key (the endpoint's keys, fetched with `az ml online-endpoint "
        "get-credentials`) or aad_token (a Microsoft Entra ID token). Applies when the endpoint is created.",
    )

    @field_validator("endpoint_name")
    @classmethod
    def _endpoint_name_is_valid(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not re.fullmatch(ENDPOINT_NAME_PATTERN, value):
            raise ValueError("use 3-32 letters, digits and hyphens, starting with a letter and ending with a letter or digit")
        return value

    @model_validator(mode="after")
    def _autoscale_is_complete(self) -> "DeploymentConfig":
        bounds = (self.min_instances, self.max_instances)
        if (bounds[0] is None) != (bounds[1] is None) or (self.target_utilization_percentage and bounds[0] is None):
            raise ValueError("autoscale needs min_instances and max_instances together (target_utilization_percentage optional)")
        if bounds[0] is not None and not bounds[0] <= self.instance_count <= bounds[1]:
            raise ValueError(
                f"instance_count {self.instance_count} must lie within min_instances {bounds[0]} and max_instances {bounds[1]}"
            )
        return self

    @property
    def autoscaled(self) -> bool:
        return self.min_instances is not None


class AzureConfig(Section):
    subscription_id: Optional[str] = Field(
        default=None, description="Workspace subscription. Default: AZURE_SUBSCRIPTION_ID, else an Azure ML config.json."
    )
    resource_group: Optional[str] = Field(
        default=None, description="Workspace resource group. Default: AZURE_RESOURCE_GROUP, else config.json."
    )
    workspace_name: Optional[str] = Field(
        default=None, description="Workspace name. Default: AZUREML_WORKSPACE_NAME, else config.json."
    )
    experiment: Optional[str] = Field(default=None, description="Azure ML experiment. Default: the config name.")
    pipeline: Literal["distill", "retrain"] = Field(
        default="distill",
        description="Pipeline definition `submit` builds: distill (the three stages on the given data) or retrain "
        "(latest data asset versions read when the job runs, champion/challenger promotion; what schedules run).",
    )
    compute: AzureComputeConfig = Field(default_factory=AzureComputeConfig)
    data: AzureDataConfig = Field(default_factory=AzureDataConfig)
    synthesis_shards: int = Field(
        default=1, ge=1, le=1000, description="Split synthesis into this many shards run as an Azure ML parallel job."
    )
    student_model: Optional[str] = Field(
        default=None,
        description="Base student as an MLflow model of the workspace (azureml:<name>:<version>, azureml:<name>@latest) "
        "or of a registry (azureml://registries/<registry>/models/<name>/versions/<version>), bound as an mlflow_model "
        "input and loaded from its mounted folder. Default: the config's student.model.",
    )
    teacher_connection: Optional[str] = Field(
        default=None,
        description="Workspace connection holding the teacher's endpoint and key; the job reads it with its managed "
        "identity. The key itself never appears in a config, job or YAML.",
    )
    teacher_key_secret: Optional[str] = Field(
        default=None,
        description="Key Vault secret holding the teacher key: https://<vault>.vault.azure.net/secrets/<name>, read "
        "by the job's managed identity.",
    )
    identity_client_id: Optional[str] = Field(
        default=None,
        description="Client id of the user-assigned managed identity the clusters run as (the infra output "
        "identityClientId); jobs authenticate with it.",
    )
    schedule: Optional[ScheduleConfig] = Field(default=None, description="Recurring retrain (azdistill schedule create).")
    deployment: Optional[DeploymentConfig] = Field(
        default=None, description="The managed online endpoint `azdistill deploy` serves the champion on. Default: all defaults."
    )

    @field_validator("teacher_key_secret")
    @classmethod
    def _secret_is_a_reference(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not re.match(r"^https://[A-Za-z0-9-]+\.vault\.azure\.(net|cn|us)/secrets/[A-Za-z0-9-]+(/[0-9a-f]{32})?$", value):
            from pydantic_core import PydanticCustomError

            # Its own error type, so the error message never echoes the value (it may be the key itself).
            raise PydanticCustomError(
                "secret_literal",
                "must be a Key Vault secret reference https://<vault>.vault.azure.net/secrets/<name>, never the key itself",
            )
        return value

    @field_validator("student_model")
    @classmethod
    def _model_reference(cls, value: Optional[str]) -> Optional[str]:
        name, version = r"[A-Za-z0-9][A-Za-z0-9_.-]*", r"[A-Za-z0-9_.-]+"
        forms = (rf"azureml:{name}:{version}", rf"azureml:{name}@latest", rf"azureml://registries/{name}/models/{name}/versions/{version}")
        if value is not None and not any(re.fullmatch(form, value) for form in forms):
            raise ValueError(
                "use a model asset: 'azureml:<name>:<version>', 'azureml:<name>@latest' or "
                "'azureml://registries/<registry>/models/<name>/versions/<version>' "
                "(e.g. azureml://registries/azureml/models/Phi-4-mini-instruct/versions/1)"
            )
        return value

    @model_validator(mode="after")
    def _one_teacher_secret(self) -> "AzureConfig":
        if self.teacher_connection and self.teacher_key_secret:
            raise ValueError("give teacher_connection or teacher_key_secret, not both")
        return self
