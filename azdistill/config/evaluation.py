"""The `evaluation` section: answer settings, the promotion checks, the served models measured beside the teacher, and the judge.

A served model (`evaluation.served`) is any chat-completions endpoint, such as the student behind `azdistill serve`
or an Azure ML online endpoint. It is reached the way a hosted teacher is, with the teacher section's own keys (kind,
endpoint, model, auth, limits, prices), so the report shows it as a client sees it, beside the teacher's endpoint.
The judge (`evaluation.judge`) is the teacher, or an endpoint named with the same keys and a key variable of its own."""

from __future__ import annotations

import re
from typing import ClassVar, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from azdistill.config.sections import Section
from azdistill.config.teacher import TeacherAuthConfig, TeacherConfig

# A served model's report row, predictions file and MLflow metrics (`served_<name>_<metric>`) are named by this role.
SERVED_ROLE_PREFIX = "served_"


def _in_served_words(message: str) -> str:
    """A message the teacher's validators wrote, with the teacher's keys named as a served entry's own."""
    return message.replace("teacher.auth.", "auth.").replace("teacher.auth", "auth")


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


class OtherEndpointAuthConfig(TeacherAuthConfig):
    """How to authenticate to an endpoint other than the teacher's (a served model, a judge): the teacher's methods,
    with messages that name the endpoint's own keys; each kind sets its own default key variable."""

    @model_validator(mode="after")
    def _method_has_its_settings(self) -> "OtherEndpointAuthConfig":
        try:
            TeacherAuthConfig._method_has_its_settings(self)
        except ValueError as error:
            raise ValueError(_in_served_words(str(error))) from None
        return self


class ServedAuthConfig(OtherEndpointAuthConfig):
    """How to authenticate to a served model: the teacher's methods, with its own default key variable."""

    SECTION: ClassVar[str] = "evaluation.served.auth"

    api_key_env: str = Field(
        default="AZDISTILL_SERVED_KEY",
        description="api_key_env: NAME of the environment variable holding the served endpoint's key (never the key "
        "itself). Its own default, so the teacher's key is never sent to another endpoint by accident.",
    )


class ServedModelConfig(TeacherConfig):
    """A model served behind an endpoint, measured like a hosted teacher: a row of the report, never a promotion gate."""

    SECTION: ClassVar[str] = "evaluation.served"

    name: str = Field(
        min_length=1, max_length=64,
        description="Required. The report row's label, e.g. 'student (served)'. In lower case, with every run of "
        "other characters than letters and digits made one '_', it also names the row's MLflow metrics: "
        "served_student_served_latency_p50_s.",
    )
    kind: Literal["openai-compatible", "azure_openai", "serverless", "online_endpoint"] = Field(
        default="openai-compatible",
        description="How the endpoint is called, as for a hosted teacher: openai-compatible (any /v1/chat/completions "
        "server, e.g. `azdistill serve` or vLLM), azure_openai, serverless or online_endpoint (an Azure ML managed "
        "online endpoint).",
    )
    endpoint: str = Field(  # type: ignore[assignment]  # required here; optional for a teacher
        description="Required. The endpoint's base URL, e.g. http://127.0.0.1:8000/v1 or "
        "https://<name>.<region>.inference.ml.azure.com. A URL ending in /chat/completions is used as is.",
    )
    model: str = Field(
        min_length=1,
        description="Required. The model name the server expects in each request (the one `azdistill serve` prints).",
    )
    auth: ServedAuthConfig = Field(default_factory=ServedAuthConfig)  # type: ignore[assignment]

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_a_url(cls, value: Optional[str]) -> Optional[str]:
        try:
            return TeacherConfig._endpoint_is_a_url(value)
        except PydanticCustomError as error:
            # Kept as its own error type: the report of it never repeats the URL, which carries a credential.
            raise PydanticCustomError(error.type, _in_served_words(error.message())) from None

    @field_validator("name")
    @classmethod
    def _name_makes_a_role(cls, value: str) -> str:
        if not re.search(r"[A-Za-z0-9]", value):
            raise ValueError("needs a letter or a digit: the name also names the row's metrics (served_<name>_<metric>)")
        return value.strip()

    @model_validator(mode="after")
    def _kind_has_its_settings(self) -> "ServedModelConfig":
        if self.kind == "azure_openai" and not (self.deployment and self.api_version):
            raise ValueError("kind azure_openai needs deployment and api_version (e.g. 2024-10-21)")
        if self.local_copy is not None:
            raise ValueError(
                "local_copy is only for the teacher (teacher.local_copy); a served model is measured through its endpoint"
            )
        return self

    @property
    def role(self) -> str:
        """The row's role in the report: `served_` and the name in lower case, letters and digits joined by '_'."""
        return SERVED_ROLE_PREFIX + re.sub(r"[^a-z0-9]+", "_", self.name.lower()).strip("_")


# Task types whose answers are open text, which a judge can compare; nli and math answers are compared exactly.
JUDGED_TASKS = ("summarization", "conversation", "chat", "qa")


class JudgeAuthConfig(OtherEndpointAuthConfig):
    """How to authenticate to a judge endpoint: the teacher's methods, with its own default key variable."""

    SECTION: ClassVar[str] = "evaluation.judge.endpoint.auth"

    api_key_env: str = Field(
        default="AZDISTILL_JUDGE_KEY",
        description="api_key_env: NAME of the environment variable holding the judge endpoint's key (never the key "
        "itself). Its own default, so the teacher's key is never sent to another endpoint by accident.",
    )


class JudgeEndpointConfig(TeacherConfig):
    """A judge behind an endpoint, reached like a hosted teacher with the teacher section's keys."""

    SECTION: ClassVar[str] = "evaluation.judge.endpoint"

    kind: Literal["openai-compatible", "azure_openai", "serverless", "online_endpoint"] = Field(
        default="openai-compatible",
        description="How the judge endpoint is called, as for a hosted teacher: openai-compatible, azure_openai, "
        "serverless or online_endpoint.",
    )
    endpoint: str = Field(  # type: ignore[assignment]  # required here; optional for a teacher
        description="Required. The judge endpoint's base URL, e.g. https://<resource>.openai.azure.com or "
        "http://127.0.0.1:8000/v1. A URL ending in /chat/completions is used as is.",
    )
    model: str = Field(min_length=1, description="Required. The model name the judge endpoint expects in each request.")
    auth: JudgeAuthConfig = Field(default_factory=JudgeAuthConfig)  # type: ignore[assignment]

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_a_url(cls, value: Optional[str]) -> Optional[str]:
        try:
            return TeacherConfig._endpoint_is_a_url(value)
        except PydanticCustomError as error:
            # Kept as its own error type: the report of it never repeats the URL, which carries a credential.
            raise PydanticCustomError(error.type, _in_served_words(error.message())) from None

    @model_validator(mode="after")
    def _kind_has_its_settings(self) -> "JudgeEndpointConfig":
        if self.kind == "azure_openai" and not (self.deployment and self.api_version):
            raise ValueError("kind azure_openai needs deployment and api_version (e.g. 2024-10-21)")
        if self.local_copy is not None:
            raise ValueError("local_copy is only for the teacher (teacher.local_copy); a judge is asked through its endpoint")
        return self


class JudgeConfig(Section):
    """The LLM judge: the teacher, or a judge endpoint, compares the student's answers with the teacher's, pairwise."""

    enabled: Union[Literal["auto"], bool] = Field(
        default="auto",
        description="auto (the default): judge on the open-ended task types (summarization, conversation, chat, qa), "
        "never on nli or math, whose answers are compared exactly, and not when the teacher is logged answers "
        "without a judge endpoint; true: always judge (refused for nli and math); false: never.",
    )
    endpoint: Optional[JudgeEndpointConfig] = Field(
        default=None,
        description="A judge endpoint other than the teacher: kind, endpoint, model and any of the teacher's endpoint "
        "keys (auth, deployment, api_version, limits, prices); its key variable defaults to AZDISTILL_JUDGE_KEY. "
        "Default: the teacher judges.",
    )
    max_items: Optional[int] = Field(
        default=None, gt=0,
        description="Judge only the first N held-out items (each is asked twice, once per order); default: all of them.",
    )

    def applies(self, task_type: str, teacher_kind: str) -> bool:
        """Whether the judge runs for this task and teacher (`enabled` resolved)."""
        if self.enabled == "auto":
            return task_type in JUDGED_TASKS and (self.endpoint is not None or teacher_kind != "logged")
        return bool(self.enabled)


def judge_problems(judge: JudgeConfig, task_type: str, teacher_kind: str) -> list[tuple[str, str]]:
    """Judge settings this task or teacher cannot honour, as (key path, what to do instead)."""
    if judge.enabled is not True:
        return []
    if task_type not in JUDGED_TASKS:
        return [("evaluation.judge.enabled", f"true compares open-ended answers, and task.type {task_type} answers are "
                 "compared exactly (agreement, accuracy): set it to auto or false")]
    if judge.endpoint is None and teacher_kind == "logged":
        return [("evaluation.judge.endpoint", "is needed: the teacher judges unless a judge endpoint is named, and "
                 "teacher.kind logged answers cannot judge; name one (kind, endpoint, model) or set "
                 "evaluation.judge.enabled to auto or false")]
    return []


class EvaluationConfig(Section):
    max_new_tokens: int = Field(default=256, gt=0, le=8192, description="Longest answer generated per model.")
    batch_size: int = Field(default=8, gt=0, le=1024, description="Prompts generated together (throughput).")
    latency_samples: int = Field(
        default=16, ge=1, description="Prompts answered one at a time to measure latency per response."
    )
    engine: Literal["auto", "transformers", "vllm"] = Field(
        default="auto",
        description="What answers the held-out prompts of a local model for the quality figures and the throughput: "
        "auto (the default): vLLM where the model runs on a CUDA GPU and the vllm package is installed, transformers "
        "otherwise; vllm: always vLLM, and the evaluation stops before loading any model where it cannot run; "
        "transformers: always transformers. Latency is timed with transformers either way, one prompt at a time, and "
        "a teacher constrained to the labels (synthesis.label_constraint) always scores them with transformers: "
        "vLLM has no counterpart of that scoring here.",
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
    served: list[ServedModelConfig] = Field(
        default_factory=list,
        description="Served models measured through their endpoints like a hosted teacher (latency one request at a "
        "time, quality and agreement with the teacher on every held-out prompt, cost from their token prices), one "
        "report row each. Each entry: name, endpoint, model, and any of the teacher's endpoint keys (kind, auth, "
        "deployment, api_version, limits, prices, parameters). They never enter the promotion checks.",
    )
    judge: JudgeConfig = Field(
        default_factory=JudgeConfig,
        description="The LLM judge of open-ended answers: the student's and the teacher's answers compared pairwise "
        "in both orders (win / tie / loss), beside BLEU and ROUGE. Keys: enabled, endpoint, max_items.",
    )

    @model_validator(mode="after")
    def _one_row_per_served_model(self) -> "EvaluationConfig":
        first_of_role: dict[str, int] = {}
        for index, entry in enumerate(self.served):
            first = first_of_role.setdefault(entry.role, index)
            if first == index:
                continue
            earlier = self.served[first].name
            if earlier == entry.name:
                clash, fix = f"is named {entry.name!r} like evaluation.served.{first}", "a name of its own"
            else:
                clash = (
                    f"({entry.name!r}) gives the same metric names ({entry.role}_...) as evaluation.served.{first} ({earlier!r})"
                )
                fix = "a name of its own, with other letters or digits"
            raise ValueError(
                f"evaluation.served.{index} {clash}; give each served model {fix}: it labels the report row and names its metrics"
            )
        return self
