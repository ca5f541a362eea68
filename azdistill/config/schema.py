"""The whole config (`DistillConfig`) and the combinations of settings that cannot work together."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from pydantic import Field, field_validator

from azdistill.config.azure import AzureConfig
from azdistill.config.evaluation import EvaluationConfig, judge_problems
from azdistill.config.sections import (
    DataConfig,
    RuntimeConfig,
    Section,
    StudentConfig,
    SynthesisConfig,
    TaskConfig,
    TrackingConfig,
    TrainingConfig,
)
from azdistill.config.teacher import TeacherConfig

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




def label_method(config: DistillConfig) -> Optional[str]:
    """How the teacher's label is obtained on this config (`synthesis.label_constraint` resolved): "scores",
    "json_schema" or "logprobs"; None when the teacher answers freely (not an nli task, a chain-of-thought prompt,
    logged answers, or the constraint turned off)."""
    constraint = config.synthesis.label_constraint
    if (config.task.type != "nli" or constraint == "off" or config.teacher.kind == "logged"
            or config.synthesis.prompt_strategy != "plain"):
        return None
    if constraint == "auto":
        return "json_schema" if config.teacher.hosted else "scores"
    return constraint


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
    problems += _label_problems(config)
    problems += _augment_problems(config)
    problems += _batch_problems(config)
    problems += judge_problems(config.evaluation.judge, config.task.type, teacher.kind)
    if training.topk_weight > 0 and not (teacher.hosted and config.synthesis.top_logprobs > 0) and label_method(config) is None:
        fix = "set synthesis.top_logprobs (e.g. 5)" if teacher.hosted else "use a hosted teacher with synthesis.top_logprobs, or training.kd_weight with a local teacher"
        problems.append((
            "training.topk_weight",
            "the top-k loss learns from the log-probabilities a hosted teacher returns with its answers, or from the "
            f"label distribution of synthesis.label_constraint on an nli task: {fix}, or set "
            "training.topk_weight to 0",
        ))
    return problems


def _label_problems(config: DistillConfig) -> list[tuple[str, str]]:
    """synthesis.label_constraint and synthesis.self_consistency settings that this teacher or task cannot honour."""
    synthesis, teacher = config.synthesis, config.teacher
    problems: list[tuple[str, str]] = []
    constraint = synthesis.label_constraint
    if constraint not in ("auto", "off"):
        if config.task.type != "nli":
            problems.append(("synthesis.label_constraint", f"{constraint} constrains answers to task.labels, which only "
                             f"task.type nli has (this is {config.task.type}): set it to auto or off"))
        elif synthesis.prompt_strategy != "plain":
            problems.append(("synthesis.label_constraint", f"{constraint} constrains the whole answer to one label, and "
                             f"prompt_strategy {synthesis.prompt_strategy} asks for reasoning first: set it to auto or off"))
        elif constraint == "scores" and teacher.kind != "local":
            problems.append(("synthesis.label_constraint", f"scores needs the teacher's weights in this process, and "
                             f"teacher.kind {teacher.kind} has none: use json_schema or logprobs (or auto)"))
        elif constraint in ("json_schema", "logprobs") and not teacher.hosted:
            problems.append(("synthesis.label_constraint", f"{constraint} is how a hosted endpoint is constrained; "
                             f"teacher.kind {teacher.kind} is not one: use scores (or auto) for a local teacher"))
    if synthesis.self_consistency > 1:
        if not teacher.hosted:
            problems.append(("synthesis.self_consistency", f"votes over sampled answers of a hosted teacher, and "
                             f"teacher.kind {teacher.kind} is not one: set it to 1"))
        elif config.task.type not in ("nli", "math"):
            problems.append(("synthesis.self_consistency", f"votes on a label (nli) or a number (math), and task.type "
                             f"{config.task.type} answers neither: set it to 1"))
        elif synthesis.temperature == 0:
            problems.append(("synthesis.self_consistency", "votes over sampled answers, and synthesis.temperature 0 "
                             "gives the same answer every time: set synthesis.temperature above 0 (e.g. 0.7)"))
    return problems


def _augment_problems(config: DistillConfig) -> list[tuple[str, str]]:
    """synthesis.augment settings this task or teacher cannot honour: new prompts are single-turn and written freely."""
    from azdistill.config.sections import SINGLE_TURN_TASKS

    if config.synthesis.augment == 0:
        return []
    if config.task.type not in SINGLE_TURN_TASKS:
        return [("synthesis.augment", f"the teacher writes new single-turn prompts ({', '.join(SINGLE_TURN_TASKS)}), and "
                 f"task.type {config.task.type} has conversations: set it to 0")]
    if config.teacher.kind == "logged":
        return [("synthesis.augment", "needs a teacher that answers new prompts, and teacher.kind logged only replays the "
                 "answers in the data: set it to 0")]
    if config.synthesis.augment_method == "perturb" and config.task.type != "nli":
        return [("synthesis.augment_method", f"perturb changes words of the inputs, which keeps a question answerable only "
                 f"where the answer is a label (task.type nli), not for task.type {config.task.type}: use write")]
    return []


# The teacher kinds whose provider has a Batch API: Azure OpenAI (/openai/batches) and OpenAI (/v1/batches).
BATCH_TEACHERS = ("azure_openai", "openai-compatible")


def _batch_problems(config: DistillConfig) -> list[tuple[str, str]]:
    """synthesis.mode batch where a provider's Batch API cannot answer: no such API, turns that need earlier answers,
    or prompts the teacher must write first."""
    synthesis, teacher = config.synthesis, config.teacher
    if synthesis.mode != "batch":
        return []
    if teacher.kind not in BATCH_TEACHERS:
        return [("synthesis.mode", f"batch submits the prompts to a provider's Batch API, which teacher.kind {teacher.kind} "
                 f"has not: use teacher.kind azure_openai (a Global Batch deployment) or openai-compatible (OpenAI's "
                 f"/v1/batches), or synthesis.mode online")]
    if config.task.type in ("conversation", "chat"):
        return [("synthesis.mode", f"batch answers every prompt at once, and task.type {config.task.type} has conversations "
                 f"whose each turn needs the teacher's answer to the one before (a batch of up to 24 h per turn): use "
                 f"synthesis.mode online")]
    if synthesis.augment and synthesis.augment_method == "write":
        return [("synthesis.augment", "with augment_method write the teacher writes the new prompts before answering "
                 "them, which would be a batch of up to 24 h before the answering batch: set synthesis.augment_method "
                 "perturb (made locally, nli), synthesis.augment 0, or synthesis.mode online")]
    return []

