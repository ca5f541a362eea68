"""The sections of a config that describe the task, the data and each stage's settings."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # azdistill/
PROJECT_ROOT = PACKAGE_DIR.parent
DEMO_CONFIG = PACKAGE_DIR / "defaults" / "demo.yaml"

TaskType = Literal["nli", "qa", "conversation", "math", "summarization", "chat"]
TASK_TYPES: tuple[str, ...] = TaskType.__args__  # type: ignore[attr-defined]
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
    label_constraint: Literal["auto", "scores", "json_schema", "logprobs", "off"] = Field(
        default="auto",
        description="nli tasks (task.labels): how the teacher is made to commit to one label. scores: a local teacher "
        "scores every label and answers the most likely; json_schema: a hosted teacher is asked for a structured answer "
        "whose label is one of task.labels; logprobs: a hosted teacher's top log-probabilities over the labels' first "
        "tokens decide. The label distribution is kept as a soft target (<split>.logprobs.jsonl, training.topk_weight). "
        "auto: scores for a local teacher, json_schema for a hosted one (logprobs where the endpoint refuses "
        "structured outputs); off: the teacher answers freely and an answer naming no single label is rejected.",
    )
    @field_validator("label_constraint", mode="before")
    @classmethod
    def _off_as_written(cls, value):
        """YAML 1.1 reads an unquoted `off` as false: `label_constraint: off` means the setting, not a boolean."""
        return "off" if value is False else value

    self_consistency: int = Field(
        default=1, ge=1, le=16,
        description="Hosted teachers, nli and math tasks: ask for this many sampled answers per prompt (needs "
        "temperature > 0) and keep the majority label or number, with its vote share as the confidence; 1 asks once.",
    )
    augment: int = Field(
        default=0, ge=0, le=10,
        description="Single-turn tasks with little data: before answering, the teacher writes this many new prompts per "
        "training prompt (same system message and format, another subject); those too close to a test prompt or to a "
        "prompt already kept are dropped, the rest are answered and trained on like training prompts "
        "(<synthesize>/augmented.jsonl, stats.json 'augmented'). 0 writes none.",
    )
    augment_method: Literal["write", "perturb"] = Field(
        default="write",
        description="synthesis.augment: how new prompts are made. write: the teacher writes them (another subject, "
        "same format). perturb (label tasks, nli): each training input with words dropped and replaced and sometimes "
        "only a span kept (Tang et al. 2019), for the teacher to label: nothing to write, so as cheap as answering, "
        "and the student learns the teacher's labels near every training input.",
    )
    augment_max_similarity: float = Field(
        default=0.6, gt=0.0, le=1.0,
        description="synthesis.augment: drop a new prompt whose Jaccard similarity (over character 5-grams of its "
        "words) to any test prompt (contamination) or any prompt already kept (train, validation, earlier new ones) is "
        "above this; exact duplicates (ignoring case and spacing) are always dropped. Lower drops more.",
    )
    mode: Literal["online", "batch"] = Field(
        default="online",
        description="online: one request per record, answered at once under the endpoint's rate limits. batch: every "
        "record in one JSONL submitted to the provider's Batch API (teacher.kind azure_openai with a Global Batch "
        "deployment, or openai-compatible with OpenAI's /v1/batches): about half the price (teacher.batch_price_ratio), "
        "answers within 24 h; the run waits, and a rerun resumes waiting for the same batch. Single-turn tasks only.",
    )
    batch_poll_s: float = Field(
        default=10.0, gt=0.0, le=3600.0,
        description="mode batch: seconds before the first status check of a batch; the wait doubles after each check "
        "up to 300 s (or this, if longer), and a Retry-After from the provider is honoured.",
    )
    batch_retries: int = Field(
        default=2, ge=0, le=10,
        description="mode batch: follow-up batches per run for the requests a batch answered with a transient fault "
        "(429, 5xx) or left unanswered (an expired batch); what still has no answer is rejected as retryable and "
        "asked again by the next run.",
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
    shared_prefix: bool = Field(
        default=True,
        description="Run the tokens every row of a padded batch starts with (a shared system prompt, the chat "
        "template's header) once per batch instead of once per row, forward and backward; same loss and gradients. "
        "Not with packed batches, hidden_weight > 0, gradient checkpointing or several processes, which train as before.",
    )
    freeze_embeddings: bool = Field(
        default=False,
        description="method full: keep the token embeddings (and an output head tied to them) as the student had them. "
        "A student pruned from the teacher keeps the teacher's vocabulary space, and the optimizer skips those weights "
        "(on the demo's student 28.3M of 63.7M weights: a 10-epoch run took 183 s instead of 216 s on a 2-core CPU).",
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
        if self.freeze_embeddings and self.method == "lora":
            raise ValueError("freeze_embeddings applies to method full: with lora every weight of the model already stays as it is")
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
