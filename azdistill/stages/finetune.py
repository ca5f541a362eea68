"""Finetune: train the student on the teacher's answers, with any mix of distillation losses.

Losses (each weighted in `training`, see docs/training.md):

- SFT on the teacher's answers, assistant tokens only (sequence-level distillation);
- token-level distillation from the local teacher's full logits: forward KL, reverse KL or generalized JSD at a
  temperature (`kd_weight`, `kd_loss`);
- the same from the top-k log-probabilities a hosted teacher returned (`topk_weight`, read from
  `<split>.logprobs.jsonl` beside the synthetic data);
- hidden-state matching: each layer of a student pruned from the teacher against the teacher layer it was copied
  from (`hidden_weight`);
- on-policy distillation: on a share of batches the student writes its own answers and the teacher's logits
  grade every token of them (`on_policy_ratio`, GKD).

Students train in full or through LoRA adapters (peft), merged into ordinary weights at the end. Training runs on
`transformers.Trainer` (schedule, checkpoints, resume, one process per GPU under torchrun or accelerate). What
makes it faster than a plain Trainer on the same data: the vocabulary projection and the losses run only on the
positions that predict an answer token (prompt tokens need no logits), and batches are grouped by length or
packed without padding.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from azdistill.config import DistillConfig, RuntimeConfig, TrainingConfig
from azdistill.data import Message, iter_jsonl, write_json
from azdistill.errors import StageFailed, UserError
from azdistill.progress import Progress
from azdistill.stages import state
from azdistill.tracking import NullTracker

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
OUTPUTS = ["model", "training.json"]
# Everything the stage writes into its folder: what a rerun under other inputs or settings removes (nothing else).
OWNED = [*OUTPUTS, "adapter", "checkpoints"]
LOSS_NAMES = ("sft", "kd", "topk", "hidden")


# ---------------------------------------------------------------------------------------------------
# Examples: token ids, labels on the assistant answers, and the teacher's top-k where a hosted teacher gave it


def assistant_spans(tokenizer, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant answer (end-of-turn token included).

    Each span is found by rendering the conversation up to that turn with and without the answer, which
    works for any chat template that renders a conversation as a growing prefix.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (full.startswith(before) and full.startswith(through)):
            raise UserError(
                "the student's chat template does not render conversations as growing prefixes; "
                "assistant-only loss needs one that does (ChatML-style templates do)"
            )
        spans.append((len(before), len(through)))
    return full, spans


def build_example(
    tokenizer, messages: list[Message], max_length: int, teacher_turns: Optional[list[dict]] = None, token_id: Optional[Callable[[str], Optional[int]]] = None
) -> Optional[dict]:
    """Token ids and labels for one conversation; labels are -100 outside assistant answers.

    With `teacher_turns` (one row's "turns" from a `<split>.logprobs.jsonl` sidecar) the example also gets
    "topk": (position, candidate ids, log-probabilities) for each position whose next token the teacher's tokens
    line up with (see `align_topk`). Returns None when truncation to `max_length` leaves no assistant token.
    """
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length)
    ids = encoded["input_ids"]
    labels = []
    for token_id_, (start, _end) in zip(ids, encoded["offset_mapping"]):
        inside = any(span_start <= start < span_end for span_start, span_end in spans)
        labels.append(token_id_ if inside else IGNORE_INDEX)
    if all(label == IGNORE_INDEX for label in labels):
        return None
    example = {"input_ids": ids, "labels": labels}
    if teacher_turns:
        answers = [message["content"] for message in messages if message["role"] == "assistant"]
        topk = []
        for turn in teacher_turns:
            number = turn.get("turn", 0)
            if not 1 <= number <= len(spans):
                continue
            span_start, span_end = spans[number - 1]
            first = next((i for i, (start, _) in enumerate(encoded["offset_mapping"]) if span_start <= start < span_end), None)
            if first is None:  # the answer was truncated away
                continue
            last = next((i for i in range(first, len(ids)) if encoded["offset_mapping"][i][0] >= span_end), len(ids))
            pieces = [tokenizer.decode([token]) for token in ids[first:last]]
            topk += align_topk(pieces, first, answers[number - 1], turn, token_id or token_id_lookup(tokenizer))
        example["topk"] = topk
    return example


def token_id_lookup(tokenizer) -> Callable[[str], Optional[int]]:
    """Maps a token's text (as endpoints return it, e.g. " positive") to the student's id, None when the text is
    not exactly one student token."""

    @functools.lru_cache(maxsize=None)
    def lookup(text: str) -> Optional[int]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        return ids[0] if len(ids) == 1 and tokenizer.decode(ids) == text else None

    return lookup


def align_topk(
    pieces: list[str], first_position: int, answer: str, turn: dict, token_id: Callable[[str], Optional[int]]
) -> list[tuple[int, list[int], list[float]]]:
    """Line a hosted teacher's per-token top-k up with the student's tokens of one answer.

    `pieces` are the student's tokens of the answer as text, the first at index `first_position` of the example;
    `turn` is one sidecar turn: {"text": the teacher's answer, "content": [{"token", "logprob", "top_logprobs":
    [{"token", "logprob"}, ...]}, ...]}. A student token is supervised where a teacher token covers exactly the same
    characters of the answer; its candidates are those teacher candidates that are one student token. With the same
    tokenizer on both sides every token lines up; with different ones, those that happen to coincide.

    Returns (position predicting the token, candidate ids, candidate log-probabilities) triples. Nothing lines
    up when the stored text is not the trained answer (e.g. the prompt strategy kept only part of it).
    """
    entries = turn.get("content") or []
    if not entries or (turn.get("text") or "").strip() != answer.strip():
        return []
    teacher_text = "".join(entry.get("token") or "" for entry in entries)
    lead = teacher_text.find(answer)
    if lead < 0:  # tokens given as bytes, or an answer cleaned up after generation
        return []
    teacher_spans: dict[tuple[int, int], dict] = {}
    offset = -lead
    for entry in entries:
        end = offset + len(entry.get("token") or "")
        teacher_spans[(offset, end)] = entry
        offset = end
    aligned = []
    offset = 0
    for index, piece in enumerate(pieces):
        end = offset + len(piece)
        if end > len(answer):
            break  # the end-of-turn tokens after the answer: the teacher's logprobs do not cover them
        entry = teacher_spans.get((offset, end))
        offset = end
        if entry is None:
            continue
        candidates: dict[int, float] = {}
        for top in (entry.get("top_logprobs") or []) + [{"token": entry.get("token"), "logprob": entry.get("logprob")}]:
            if top.get("token") is None or top.get("logprob") is None:
                continue
            candidate = token_id(top["token"])
            if candidate is not None and candidate not in candidates:
                candidates[candidate] = float(top["logprob"])
        if candidates:
            ordered = sorted(candidates.items(), key=lambda pair: -pair[1])
            aligned.append((first_position + index - 1, [pair[0] for pair in ordered], [pair[1] for pair in ordered]))
    return aligned


def _topk_tensors(examples: list[dict], shape: tuple[int, int], offsets: list[tuple[int, int]]):
    """[rows, width, k] candidate ids and log-probabilities (-inf where none) for a batch; None without top-k."""
    import torch

    if not any(example.get("topk") for example in examples):
        return None, None
    k = max(len(ids) for example in examples for _, ids, _ in example.get("topk") or [])
    topk_ids = torch.zeros((*shape, k), dtype=torch.long)
    topk_logprobs = torch.full((*shape, k), float("-inf"))
    for example, (row, start) in zip(examples, offsets):
        for position, ids, logprobs in example.get("topk") or []:
            topk_ids[row, start + position, : len(ids)] = torch.tensor(ids)
            topk_logprobs[row, start + position, : len(ids)] = torch.tensor(logprobs)
    return topk_ids, topk_logprobs


def pad_batch(examples: list[dict], pad_token_id: int) -> dict:
    """Right-pad a list of examples into tensors."""
    import torch

    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"])
        labels[row, :length] = torch.tensor(example["labels"])
        attention_mask[row, :length] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    topk_ids, topk_logprobs = _topk_tensors(examples, (len(examples), width), [(row, 0) for row in range(len(examples))])
    if topk_ids is not None:
        batch.update(topk_ids=topk_ids, topk_logprobs=topk_logprobs)
    return batch


def pack_batch(examples: list[dict]) -> dict:
    """Concatenate a batch into one row without padding; position ids restart at each example.

    With no attention mask, transformers reads the restarts as boundaries and keeps each example's attention to
    itself (varlen kernels under flash attention, a block-diagonal mask under sdpa). Each example's first label is
    -100 already (a prompt token), so no example learns to predict the next one's first token.
    """
    import torch

    input_ids, labels, position_ids, offsets = [], [], [], []
    for example in examples:
        offsets.append((0, len(input_ids)))
        input_ids += example["input_ids"]
        labels += [IGNORE_INDEX] + example["labels"][1:]
        position_ids += range(len(example["input_ids"]))
    batch = {
        "input_ids": torch.tensor([input_ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([position_ids]),
    }
    topk_ids, topk_logprobs = _topk_tensors(examples, (1, len(input_ids)), offsets)
    if topk_ids is not None:
        batch.update(topk_ids=topk_ids, topk_logprobs=topk_logprobs)
    return batch


def check_same_vocabulary(teacher_tokenizer, student_tokenizer) -> None:
    """Token-level distillation compares distributions over the same tokens: the vocabularies must match."""
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise UserError(
            "training.kd_weight > 0 and training.on_policy_ratio > 0 need the teacher and the student to share a "
            f"vocabulary, and they differ ({len(teacher_tokenizer)} vs {len(student_tokenizer)} tokens); set them "
            "to 0 or use a student with the teacher's tokenizer (training.topk_weight works across tokenizers)"
        )


# ---------------------------------------------------------------------------------------------------
# Hidden-state matching: which teacher layer each student layer came from


def teacher_layer_map(student_path: Path, teacher_num_layers: int, student_num_layers: int) -> list[int]:
    """For each student layer, the teacher layer it was copied from, read from the pruned student's pruned-from.json."""
    from azdistill.models import kept_layer_indices

    marker = Path(student_path) / "pruned-from.json"
    if not marker.is_file():
        raise UserError(
            f"training.hidden_weight > 0 needs a student pruned from the teacher (student.model: pruned-teacher); "
            f"{student_path} has no pruned-from.json to say which teacher layer each of its layers came from"
        )
    origin = json.loads(marker.read_text())
    kept = origin.get("kept_layers") or kept_layer_indices(teacher_num_layers, float(origin["keep_layers"]))
    if len(kept) != student_num_layers or max(kept) >= teacher_num_layers:
        raise UserError(
            f"{marker}: the student has {student_num_layers} layers but its record names teacher layers {kept} of "
            f"{teacher_num_layers}; rebuild the pruned student from this teacher"
        )
    return list(kept)


def decoder_layers(model):
    """The decoder's list of layers, through peft and DDP wrappers."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise UserError(f"training.hidden_weight > 0 needs a decoder with .layers (Llama, Mistral, Qwen, Phi-3 style); {type(model).__name__} has none")
    return layers


class LayerOutputs:
    """Keeps the latest output of chosen layers through forward hooks (hooks see the layer output even when the
    model returns no hidden states, and work the same under peft and gradient checkpointing)."""

    def __init__(self, layers, indices: list[int]):
        self.outputs: dict[int, object] = {}
        self.indices = indices
        self._handles = [layers[index].register_forward_hook(self._hook(index)) for index in indices]

    def _hook(self, index: int):
        def keep(module, args, output):
            self.outputs[index] = output[0] if isinstance(output, tuple) else output

        return keep

    def take(self) -> list:
        outputs = [self.outputs.pop(index) for index in self.indices]
        return outputs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------------
# The trainer


@dataclass
class LossSettings:
    sft: float
    kd: float
    topk: float
    hidden: float
    kd_loss: str
    kd_beta: float
    temperature: float
    hidden_loss: str
    on_policy_ratio: float
    on_policy_max_new_tokens: int
    on_policy_temperature: float

    @classmethod
    def from_config(cls, settings: TrainingConfig) -> "LossSettings":
        return cls(
            sft=settings.effective_sft_weight, kd=settings.kd_weight, topk=settings.topk_weight, hidden=settings.hidden_weight,
            kd_loss=settings.kd_loss, kd_beta=settings.kd_beta, temperature=settings.kd_temperature, hidden_loss=settings.hidden_loss,
            on_policy_ratio=settings.on_policy_ratio, on_policy_max_new_tokens=settings.on_policy_max_new_tokens,
            on_policy_temperature=settings.on_policy_temperature,
        )


def predicting_positions(labels):
    """[rows, width] bool: positions whose next token is an answer token (position t predicts token t+1)."""
    import torch

    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


@functools.lru_cache(maxsize=None)
def _accepts_logits_to_keep(model_class: type) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def answer_forward(model, batch: dict, predict):
    """Run a causal LM and return its logits at the `predict` positions only, as [N, vocab].

    The vocabulary projection is the largest single matrix product of a small model (49152 x 576 for SmolLM2):
    sparing it on prompt and padding positions is most of our speed-up over a plain Trainer. Models whose forward
    takes no `logits_to_keep` get the full projection, then the selection.
    """
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}  # a cache would also hide packed boundaries
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    inner = getattr(model, "module", model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    if _accepts_logits_to_keep(type(inner)):
        return model(**inputs, logits_to_keep=predict).logits
    return model(**inputs).logits[predict]


@functools.lru_cache(maxsize=None)
def distillation_trainer_class():
    """The Trainer subclass (built on first use, so importing this module does not import transformers)."""
    import torch
    from transformers import Trainer

    from azdistill import losses

    class DistillationTrainer(Trainer):
        """Trainer whose loss is a weighted sum of SFT, logit, top-k and hidden-state distillation terms."""

        # Each term is a mean over its micro-batch, so the Trainer must divide the sum by the accumulation steps.
        loss_is_scaled_for_ga = False

        def __init__(self, *args, teacher=None, loss_settings: LossSettings, layer_map: Optional[list[int]] = None, seed: int = 0, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher
            self.weights = loss_settings
            self.student_layers = self.teacher_layers = None
            if layer_map is not None:
                self.student_layers = LayerOutputs(decoder_layers(self.model), list(range(len(layer_map))))
                self.teacher_layers = LayerOutputs(decoder_layers(teacher), layer_map)
            self.rng = random.Random(seed + self.args.process_index)
            self._sums = {"train": {}, "eval": {}}
            self.on_policy_batches = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            training = model.training
            on_policy = False
            if training and self.weights.on_policy_ratio > 0 and self.rng.random() < self.weights.on_policy_ratio:
                inputs = self.on_policy_batch(model, inputs)
                on_policy = True
                self.on_policy_batches += 1
            labels = inputs["labels"]
            predict = predicting_positions(labels)
            targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
            logits = answer_forward(model, inputs, predict)
            # Positions of real tokens, for hidden states: every token of a packed row, else the attention mask.
            real = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones_like(labels, dtype=torch.bool)
            terms = {}
            weights = self.weights
            if weights.sft > 0 and not on_policy:  # the student's own answers are no SFT target
                terms["sft"] = losses.cross_entropy(logits, targets)
            if weights.topk > 0 and not on_policy and "topk_logprobs" in inputs:
                present = torch.isfinite(inputs["topk_logprobs"][..., 0])[predict]
                terms["topk"] = losses.topk_divergence(
                    logits[present], inputs["topk_ids"][predict][present], inputs["topk_logprobs"][predict][present], weights.temperature
                )
            if self.teacher is not None and (weights.kd > 0 or weights.hidden > 0):
                with torch.no_grad():
                    # Hidden states alone need no teacher logits: an empty selection skips its projection.
                    teacher_logits = answer_forward(self.teacher, inputs, predict if weights.kd > 0 else torch.zeros_like(predict))
                if weights.kd > 0:
                    terms["kd"] = losses.logit_divergence(logits, teacher_logits, weights.kd_loss, weights.temperature, weights.kd_beta)
                if weights.hidden > 0:
                    student_states = [state[real] for state in self.student_layers.take()]
                    teacher_states = [state[real] for state in self.teacher_layers.take()]
                    terms["hidden"] = losses.hidden_state_distance(student_states, teacher_states, weights.hidden_loss)
            # A batch can lack every weighted term (e.g. no top-k in it): a zero that still reaches every parameter.
            loss = sum((getattr(weights, name) * value for name, value in terms.items()), logits.sum() * 0.0)
            sums = self._sums["train" if training else "eval"]
            for name, value in terms.items():
                total, count = sums.get(name, (0.0, 0))
                sums[name] = (total + value.detach(), count + 1)
            return (loss, {}) if return_outputs else loss

        def on_policy_batch(self, model, inputs: dict) -> dict:
            """The batch's prompts with answers the student samples now; labels on the sampled tokens (GKD)."""
            unwrapped = self.accelerator.unwrap_model(model)
            tokenizer = self.processing_class
            prompts = []
            for row in range(inputs["input_ids"].shape[0]):
                answer = (inputs["labels"][row] != IGNORE_INDEX).nonzero().flatten().tolist()
                start = answer[-1]
                while start - 1 in answer:  # the start of the last answer: earlier turns stay as context
                    start -= 1
                prompts.append(inputs["input_ids"][row, :start])
            width = max(len(prompt) for prompt in prompts)
            device = inputs["input_ids"].device
            left = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long, device=device)
            mask = torch.zeros_like(left)
            for row, prompt in enumerate(prompts):
                left[row, width - len(prompt):] = prompt
                mask[row, width - len(prompt):] = 1
            eos = unwrapped.generation_config.eos_token_id
            eos = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])
            was_training = unwrapped.training
            unwrapped.eval()
            with torch.no_grad():
                generated = unwrapped.generate(
                    input_ids=left, attention_mask=mask, do_sample=True, temperature=self.weights.on_policy_temperature,
                    top_k=0, top_p=1.0, max_new_tokens=self.weights.on_policy_max_new_tokens, use_cache=True,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos),
                )[:, width:]
            unwrapped.train(was_training)
            examples = []
            for prompt, answer in zip(prompts, generated.tolist()):
                cut = next((i + 1 for i, token in enumerate(answer) if token in eos), len(answer))
                answer = answer[:cut]
                examples.append({"input_ids": prompt.tolist() + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
            return {key: value.to(device) for key, value in pad_batch(examples, tokenizer.pad_token_id).items()}

        def log(self, logs: dict, start_time=None) -> None:
            kind = "eval" if any(key.startswith("eval_") for key in logs) else "train"
            prefix = "eval_" if kind == "eval" else ""
            for name, (total, count) in self._sums[kind].items():
                logs[f"{prefix}loss_{name}"] = round(float(total) / max(count, 1), 6)
            self._sums[kind] = {}
            super().log(logs, start_time)

    return DistillationTrainer


def _tracking_callback(tracker: NullTracker, total_steps: int, show_progress: bool):
    from transformers import TrainerCallback

    class LogToTracker(TrainerCallback):
        """Sends losses to the stage's MLflow run as metric histories, and shows progress."""

        def __init__(self) -> None:
            self.progress: Optional[Progress] = None

        def on_train_begin(self, args, state_, control, **kwargs):
            if show_progress:
                self.progress = Progress(total_steps, "finetune", unit="steps")
                self.progress.update(state_.global_step)

        def on_step_end(self, args, state_, control, **kwargs):
            if self.progress is not None:
                loss = next((entry["loss"] for entry in reversed(state_.log_history) if "loss" in entry), None)
                self.progress.update(1, **({"loss": f"{loss:.3f}"} if loss is not None else {}))

        def on_log(self, args, state_, control, logs=None, **kwargs):
            metrics = {}
            for key, value in (logs or {}).items():
                if isinstance(value, (int, float)) and (key in ("loss", "eval_loss", "learning_rate", "grad_norm") or "loss_" in key):
                    metrics["train_loss" if key == "loss" else key] = value
            tracker.log_metrics(metrics, step=state_.global_step)

        def on_train_end(self, args, state_, control, **kwargs):
            if self.progress is not None:
                self.progress.close()

    return LogToTracker()


# ---------------------------------------------------------------------------------------------------
# Several processes (torchrun, accelerate launch, Azure ML's PyTorch distribution)


def distributed() -> bool:
    """Whether this process is one of several started by a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@functools.lru_cache(maxsize=None)
def _process_state():
    import torch
    from accelerate import PartialState

    # Joins the process group the launcher set up: NCCL on GPUs, gloo on CPUs (without cpu=True, accelerate treats
    # CPU-only processes as unrelated single ones, and every one of them would think it is the main one).
    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    return not distributed() or _process_state().is_main_process


def wait_for_everyone() -> None:
    if distributed():
        _process_state().wait_for_everyone()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """The main process does the block first (e.g. preparing a shared folder), the others after it."""
    if not distributed():
        yield
        return
    with _process_state().main_process_first():
        yield


# ---------------------------------------------------------------------------------------------------
# Training


def load_conversations(path: Path) -> list[list[Message]]:
    return [row["messages"] for row in iter_jsonl(path)]


def load_teacher_topk(path: Path, rows: int) -> list[Optional[list[dict]]]:
    """The teacher's top-k per accepted row from a synthesize sidecar (`<split>.logprobs.jsonl`): for each line of
    `<split>.jsonl`, its "turns" (see docs/training.md), or None where the sidecar has no line for it."""
    if not Path(path).is_file():
        raise UserError(
            f"training.topk_weight > 0 needs the teacher's top-k log-probabilities in {path}; a hosted teacher "
            "writes them with synthesis.top_logprobs > 0 (rerun `azdistill synthesize`), or set training.topk_weight=0"
        )
    turns: list[Optional[list[dict]]] = [None] * rows
    for line in iter_jsonl(path):
        if 0 <= line.get("row", -1) < rows:
            turns[line["row"]] = line.get("turns") or None
    if rows and not any(any(turn.get("content") for turn in row) for row in turns if row):
        raise UserError(
            f"training.topk_weight > 0, and {path} holds no log-probabilities: the endpoint answered without them "
            "(transformers serve ignores synthesis.top_logprobs); set training.topk_weight=0 or synthesize with an endpoint that returns them"
        )
    return turns


def _wants_bf16(settings: TrainingConfig) -> bool:
    import torch

    if settings.bf16 is not None:
        return settings.bf16
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _attention_implementation(settings: TrainingConfig, device) -> Optional[str]:
    import importlib.util

    # Packed rows want varlen kernels; sdpa handles them through a block-diagonal mask, correct but quadratic in the row.
    if settings.batching == "packed" and str(device).startswith("cuda") and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return None


def _load_causal_lm(path: Path, dtype, device, attn_implementation: Optional[str]):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device)


def _apply_lora(model, settings: TrainingConfig):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.lora.r, lora_alpha=settings.lora.alpha, lora_dropout=settings.lora.dropout,
        target_modules=settings.lora.target_modules, task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def train_student(
    train_conversations: list[list[Message]],
    validation_conversations: list[list[Message]],
    student_path: Path,
    out_dir: Path,
    settings: TrainingConfig,
    teacher_path: Optional[Path] = None,
    tracker: NullTracker = NullTracker(),
    resume: bool = False,
    train_topk: Optional[list[Optional[list[dict]]]] = None,
    validation_topk: Optional[list[Optional[list[dict]]]] = None,
    runtime: RuntimeConfig = RuntimeConfig(),
) -> dict:
    """Fine-tune the model at `student_path`; the result goes to `out_dir/model` (merged weights, also for LoRA).

    `teacher_path` is the local teacher, needed by kd_weight, hidden_weight and on_policy_ratio;
    `train_topk`/`validation_topk` the hosted teacher's top-k per conversation, needed by topk_weight.
    Returns a summary, also written to `out_dir/training.json`. Safe to run in every process of a launcher.
    """
    import torch
    from transformers import PrinterCallback, TrainingArguments

    from azdistill.determinism import make_repeatable
    from azdistill.models import count_parameters, load_tokenizer

    make_repeatable(settings.seed, runtime.threads, runtime.deterministic)
    tokenizer = load_tokenizer(student_path)
    losses = LossSettings.from_config(settings)
    if settings.uses_teacher_model and teacher_path is None:
        raise UserError("training.kd_weight, hidden_weight and on_policy_ratio need the teacher's weights (teacher.kind: local, or teacher.local_copy)")
    if settings.topk_weight > 0 and train_topk is None:
        raise UserError("training.topk_weight > 0 needs the teacher's top-k log-probabilities (synthesis.top_logprobs with a hosted teacher)")
    if teacher_path is not None and (settings.kd_weight > 0 or settings.on_policy_ratio > 0):
        check_same_vocabulary(load_tokenizer(teacher_path), tokenizer)

    lookup = token_id_lookup(tokenizer)

    def examples(conversations, topk):
        built = [
            build_example(tokenizer, messages, settings.max_length, topk[index] if topk else None, lookup)
            for index, messages in enumerate(conversations)
        ]
        return [example for example in built if example is not None]

    train = examples(train_conversations, train_topk if settings.topk_weight > 0 else None)
    validation = examples(validation_conversations, validation_topk if settings.topk_weight > 0 else None)
    if not train:
        raise StageFailed("finetune: no training example has an assistant token within training.max_length")
    dropped = len(train_conversations) - len(train)
    if dropped:
        log.warning("finetune: %d conversations had no answer token within max_length=%d and were skipped", dropped, settings.max_length)
    if settings.topk_weight > 0:
        covered = sum(1 for example in train if example.get("topk"))
        positions = sum(len(example.get("topk") or []) for example in train)
        answer_tokens = sum(sum(label != IGNORE_INDEX for label in example["labels"]) for example in train)
        log.info("finetune: teacher top-k lines up with %d of %d answer tokens in %d of %d examples", positions, answer_tokens, covered, len(train))
        if positions == 0:
            raise UserError(
                "training.topk_weight > 0, but none of the teacher's top-k tokens line up with the training answers "
                "(the stored texts differ from the answers, e.g. a prompt strategy that keeps only part of them)"
            )

    bf16 = _wants_bf16(settings)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps_per_epoch = math.ceil(len(train) / (settings.batch_size * settings.gradient_accumulation_steps * world))
    total_steps = max(1, math.ceil(steps_per_epoch * settings.epochs))
    checkpoints = out_dir / "checkpoints"
    use_cpu = not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.epochs,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=int(settings.warmup_ratio * total_steps),
        weight_decay=settings.weight_decay,
        logging_steps=settings.logging_steps,
        logging_first_step=True,  # so even a short run records the loss it started from
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=1,
        eval_strategy="epoch" if validation else "no",
        prediction_loss_only=True,
        bf16=bf16,
        use_cpu=use_cpu,
        report_to="none",
        disable_tqdm=True,  # our own Progress shows steps, as a bar or as log lines
        seed=settings.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if settings.batching == "length_grouped" else "random",
        # Every parameter takes part in every step, so DDP need not search the graph for unused ones.
        ddp_find_unused_parameters=False,
    )
    device = args.device  # cuda:<local rank> under a launcher
    attention = _attention_implementation(settings, device)
    student_dtype = torch.bfloat16 if (bf16 and settings.method == "lora") else torch.float32
    # Full fine-tuning keeps float32 master weights under bf16 autocast; LoRA trains float32 adapters on bf16 weights.
    model = _load_causal_lm(student_path, student_dtype, device, attention)
    teacher_model = layer_map = None
    if teacher_path is not None and settings.uses_teacher_model:
        teacher_model = _load_causal_lm(teacher_path, torch.bfloat16 if bf16 else torch.float32, device, attention).eval()
        teacher_model.requires_grad_(False)
        if settings.hidden_weight > 0:
            layer_map = teacher_layer_map(student_path, teacher_model.config.num_hidden_layers, model.config.num_hidden_layers)
            if model.config.hidden_size != teacher_model.config.hidden_size:
                raise UserError(
                    f"training.hidden_weight > 0 needs equal hidden sizes; the student's is {model.config.hidden_size}, "
                    f"the teacher's {teacher_model.config.hidden_size}"
                )
    if settings.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if settings.method == "lora":
        model = _apply_lora(model, settings)
    collator = pack_batch if settings.batching == "packed" else (lambda batch: pad_batch(batch, tokenizer.pad_token_id))
    trainer = distillation_trainer_class()(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=validation or None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[_tracking_callback(tracker, total_steps, is_main_process())],
        teacher=teacher_model,
        loss_settings=losses,
        layer_map=layer_map,
        seed=settings.seed,
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts to stdout; our callback logs instead
    last_checkpoint = last_complete_checkpoint(checkpoints) if resume else None
    if last_checkpoint:
        log.info("finetune: resuming from %s", last_checkpoint)
    trainable = {name: parameter.detach().clone() for name, parameter in model.named_parameters() if parameter.requires_grad}
    started, cpu_started = time.monotonic(), time.process_time()
    result = trainer.train(resume_from_checkpoint=last_checkpoint)
    seconds, cpu_seconds = time.monotonic() - started, time.process_time() - cpu_started
    changed = sum(not torch.equal(trainable[name], parameter.detach()) for name, parameter in model.named_parameters() if name in trainable)

    history = trainer.state.log_history
    losses_logged = [entry["loss"] for entry in history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    tokens = sum(len(example["input_ids"]) for example in train) * settings.epochs
    summary = {
        "examples": len(train),
        "validation_examples": len(validation),
        "steps": trainer.state.global_step,
        "epochs": settings.epochs,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
        "cpu_seconds": round(cpu_seconds, 2),  # this process's CPU time: the work done, whatever else shares the machine
        "first_loss": losses_logged[0] if losses_logged else None,
        "final_loss": losses_logged[-1] if losses_logged else None,
        "train_loss": result.training_loss,
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
        "parameters": count_parameters(model.get_base_model() if settings.method == "lora" else model),
        "trainable_parameters": sum(parameter.numel() for parameter in trainable.values()),
        "trainable_tensors": len(trainable),
        "parameters_changed": changed,
        "method": settings.method,
        "loss_weights": {name: getattr(losses, name) for name in LOSS_NAMES},
        "kd_weight": settings.kd_weight,
        "device": str(device),
        "processes": world,
        "on_policy_batches": trainer.on_policy_batches,
        "bf16": bf16,
    }
    for name in LOSS_NAMES:
        logged = [entry[f"loss_{name}"] for entry in history if f"loss_{name}" in entry]
        if logged:
            summary[f"first_loss_{name}"], summary[f"final_loss_{name}"] = logged[0], logged[-1]
    if trainer.is_world_process_zero():
        _save_student(trainer, tokenizer, out_dir, settings)
        write_json(out_dir / "training.json", summary)
        tracker.log_metrics({key: value for key, value in summary.items() if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epochs"})
    wait_for_everyone()
    return summary


# What a checkpoint the Trainer finished saving holds; it writes trainer_state.json after the weights and optimizer.
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt")
CHECKPOINT_WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def last_complete_checkpoint(checkpoints: Path) -> Optional[str]:
    """The newest checkpoint the Trainer finished writing. Ones a kill interrupted (no trainer_state.json, no
    weights or optimizer state) are removed with a log line: transformers' get_last_checkpoint would pick them and
    every later run would fail with "Can't find a valid checkpoint"."""
    if not Path(checkpoints).is_dir():
        return None
    found = []
    for folder in Path(checkpoints).iterdir():
        if folder.is_dir() and folder.name.startswith("checkpoint-") and folder.name[len("checkpoint-"):].isdigit():
            found.append((int(folder.name[len("checkpoint-"):]), folder))
    for _, folder in sorted(found, reverse=True):
        complete = all((folder / name).is_file() for name in CHECKPOINT_FILES) and any((folder / name).is_file() for name in CHECKPOINT_WEIGHTS)
        try:
            complete = complete and isinstance(json.loads((folder / "trainer_state.json").read_text()), dict)  # not torn
        except (OSError, ValueError):
            complete = False
        if complete:
            return str(folder)
        if is_main_process():
            log.info("finetune: %s was cut short while it was saved; removing it and resuming from the one before", folder.name)
            shutil.rmtree(folder, ignore_errors=True)
    return None


def _save_student(trainer, tokenizer, out_dir: Path, settings: TrainingConfig) -> None:
    """Write the student to out_dir/model (merged weights for LoRA, plus out_dir/adapter) and drop the checkpoints."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    staging = out_dir / ".model-staging"
    if staging.exists():
        shutil.rmtree(staging)
    if settings.method == "lora":
        if settings.lora.save_adapter:
            adapter = out_dir / "adapter"
            shutil.rmtree(adapter, ignore_errors=True)
            model.save_pretrained(adapter)
        model = model.merge_and_unload()
    model.config.use_cache = True  # for generation by whoever loads it
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    target = out_dir / "model"
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # the final model supersedes them


def finetune(
    config: DistillConfig,
    student_init: Path,
    teacher_path: Optional[Path],
    synthetic_dir: Path,
    tracker: NullTracker = NullTracker(),
    force: bool = False,
    out_dir: Optional[Path] = None,
    on_references: bool = False,
) -> Path:
    """Run the stage on the synthetic set (or, with `on_references`, on the data's own reference answers).

    Under a launcher (torchrun, accelerate launch, Azure ML's PyTorch distribution) every process calls this; the
    main process keeps the stage's books and writes the outputs, all of them train.
    """
    stage = "finetune-reference" if on_references else "finetune"
    out_dir = Path(out_dir or config.stage_dir(stage))
    train_topk = validation_topk = None
    if on_references:
        from azdistill.data import read_records

        def references(split: str) -> list[list[Message]]:
            records = read_records(getattr(config.data, split), config.task.type, config.data.max_records)
            return [record.messages for record in records if record.reference is not None]

        train, validation = references("train"), references("validation")
        if not train:
            raise UserError(f"{config.data.train}: no record has a reference answer (a final assistant message) to train on")
        # The 'no teacher' baseline: SFT on the references alone.
        settings = config.training.model_copy(
            update={"sft_weight": None, "kd_weight": 0.0, "topk_weight": 0.0, "hidden_weight": 0.0, "on_policy_ratio": 0.0}
        )
    else:
        # The synthetic set as the synthesize stage wrote it: a truncated or edited file is named, never trained on.
        # (A folder without the stage's record, e.g. one prepared by hand, is taken as it is; the CLI requires it.)
        if (Path(synthetic_dir) / state.DONE_FILE).is_file():
            state.verify_outputs(synthetic_dir, "synthesize")
        train = load_conversations(synthetic_dir / "train.jsonl")
        validation = load_conversations(synthetic_dir / "validation.jsonl")
        settings = config.training
        if settings.topk_weight > 0:
            train_topk = load_teacher_topk(synthetic_dir / "train.logprobs.jsonl", len(train))
            validation_path = synthetic_dir / "validation.logprobs.jsonl"
            validation_topk = load_teacher_topk(validation_path, len(validation)) if validation_path.is_file() else None
    uses_teacher = settings.uses_teacher_model
    stage_fingerprint = state.fingerprint(
        {
            "inputs": state.fingerprint({"train": train, "validation": validation, "topk": train_topk}),
            "student": state.folder_digest(student_init),
            "teacher": state.folder_digest(teacher_path) if uses_teacher and teacher_path else None,
            # Logging, checkpoint intervals and memory savers do not change the weights.
            "training": settings.model_dump(exclude={"logging_steps", "save_steps", "gradient_checkpointing"}),
        }
    )
    done = not force and state.is_done(out_dir, stage_fingerprint, stage)
    wait_for_everyone()  # every process has read the books before the main one changes them
    if done:
        log.info("%s: data and settings unchanged, reusing %s (use --force to rerun)", stage, out_dir)
        return out_dir
    main = is_main_process()
    tracker = tracker if main else NullTracker()
    resume = state.begin(out_dir, stage_fingerprint, force, stage, OWNED) if main else True
    wait_for_everyone()
    with tracker.stage(stage):
        tracker.log_params({"stage.student_init": student_init, "stage.examples": len(train)})
        summary = train_student(
            train, validation, student_init, out_dir, settings, teacher_path if uses_teacher else None, tracker, resume, train_topk, validation_topk,
            config.runtime,
        )
        if main:
            tracker.log_artifact(out_dir / "training.json")
            state.finish(out_dir, stage_fingerprint, OUTPUTS, summary, stage=stage)
    wait_for_everyone()
    log.info(
        "%s: %d steps in %.0f s, loss %.3f -> %.3f -> %s",
        stage, summary["steps"], summary["seconds"], summary["first_loss"] or float("nan"), summary["final_loss"] or float("nan"), out_dir / "model",
    )
    return out_dir
