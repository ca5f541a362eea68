"""The distillation trainer: a `transformers.Trainer` whose loss mixes SFT, logit KD, top-k KD and hidden-state
matching, computing logits only where an answer token is predicted."""

from __future__ import annotations

import functools
import inspect
import json
import random
from pathlib import Path
from typing import Optional

import torch
from transformers import Trainer, TrainerCallback

from azdistill.config.sections import TrainingConfig
from azdistill.console import Progress
from azdistill.errors import UserError
from azdistill.models.prefix import prefix_shared_forward, shared_prefix_length
from azdistill.tracking.tracker import NullTracker
from azdistill.training import losses
from azdistill.training.examples import IGNORE_INDEX, pad_batch

LOSS_NAMES = ("sft", "kd", "topk", "hidden")


def check_same_vocabulary(teacher_tokenizer, student_tokenizer) -> None:
    """Token-level distillation compares distributions over the same tokens: the vocabularies must match."""
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise UserError(
            "training.kd_weight > 0 and training.on_policy_ratio > 0 need the teacher and the student to share a "
            f"vocabulary, and they differ ({len(teacher_tokenizer)} vs {len(student_tokenizer)} tokens); set them "
            "to 0 or use a student with the teacher's tokenizer (training.topk_weight works across tokenizers)"
        )


# Hidden-state matching: which teacher layer each student layer came from


def teacher_layer_map(student_path: Path, teacher_num_layers: int, student_num_layers: int) -> list[int]:
    """For each student layer, the teacher layer it was copied from, read from the pruned student's pruned-from.json."""
    from azdistill.models.students import kept_layer_indices

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
        raise UserError(
            "training.hidden_weight > 0 needs a decoder with .layers (Llama, Mistral, Qwen, Phi-3 style); "
            f"{type(model).__name__} has none"
        )
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


def loss_weights(training: TrainingConfig) -> dict[str, float]:
    """The weight of each loss term in force, by the names of LOSS_NAMES and in their order."""
    return {
        "sft": training.effective_sft_weight,
        "kd": training.kd_weight,
        "topk": training.topk_weight,
        "hidden": training.hidden_weight,
    }


def predicting_positions(labels):
    """[rows, width] bool: positions whose next token is an answer token (position t predicts token t+1)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


@functools.lru_cache(maxsize=None)
def _accepts_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def answer_forward(model, batch: dict, predict, share_prefix: bool = False):
    """Run a causal LM and return its logits at the `predict` positions only, as [N, vocab].

    The vocabulary projection is the largest single matrix product of a small model (49152 x 576 for SmolLM2):
    sparing it on prompt and padding positions is most of our speed-up over a plain Trainer. Models whose forward
    takes no `logits_to_keep` get the full projection, then the selection. With `share_prefix`, the tokens every
    row of a padded batch starts with run once (`azdistill.models.prefix`).
    """
    inner = getattr(model, "module", model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    keeps_logits = _accepts_logits_to_keep(type(inner))
    if share_prefix and "position_ids" not in batch:
        shared = shared_prefix_length(batch["input_ids"], batch["attention_mask"], predict)
        if shared:
            rest = predict[:, shared:]
            kept = {"logits_to_keep": rest} if keeps_logits else {}
            output = prefix_shared_forward(model, batch["input_ids"], batch["attention_mask"], shared, keeps_logits, **kept)
            if output is not None:
                return output.logits if keeps_logits else output.logits[rest]
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}  # a cache would also hide packed boundaries
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    if keeps_logits:
        return model(**inputs, logits_to_keep=predict).logits
    return model(**inputs).logits[predict]


def shares_prefix(training: TrainingConfig, args) -> bool:
    """Whether batches run their shared prefix once (`training.shared_prefix`, where it gives the same gradients)."""
    # Hidden states are matched at every position (the prefix's too); gradient checkpointing drops the cache the
    # rows read the prefix from; DistributedDataParallel allows one forward per backward.
    return bool(
        training.shared_prefix and training.hidden_weight == 0 and not training.gradient_checkpointing
        and args.world_size == 1
    )


# On-policy batches: the student answers the batch's prompts itself


def last_answer_prompts(inputs: dict) -> list:
    """Each row's tokens before the start of its last answer: earlier turns stay as context."""
    prompts = []
    for row in range(inputs["input_ids"].shape[0]):
        answer = (inputs["labels"][row] != IGNORE_INDEX).nonzero().flatten().tolist()
        start = answer[-1]
        while start - 1 in answer:  # the start of the last answer: earlier turns stay as context
            start -= 1
        prompts.append(inputs["input_ids"][row, :start])
    return prompts


def left_padded(prompts: list, pad_token_id: int, device) -> tuple:
    """The prompts padded on the left into one tensor, with its attention mask, so that generation continues each
    from its own end."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = prompt
        attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask


class DistillationTrainer(Trainer):
    """Trainer whose loss is a weighted sum of SFT, logit, top-k and hidden-state distillation terms.

    `training` configures it: the weight of each term, the divergences and their temperature, and the share and
    sampling of on-policy batches. `teacher` is the local teacher (for kd, hidden and on-policy batches);
    `layer_map` the teacher layer of each student layer, for hidden-state matching.
    """

    # Each term is a mean over its micro-batch, so the Trainer must divide the sum by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, training: TrainingConfig, teacher=None, layer_map: Optional[list[int]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = training
        self.loss_weights = loss_weights(training)
        self.teacher = teacher
        self.student_layers = self.teacher_layers = None
        if layer_map is not None:
            self.student_layers = LayerOutputs(decoder_layers(self.model), list(range(len(layer_map))))
            self.teacher_layers = LayerOutputs(decoder_layers(teacher), layer_map)
        self.rng = random.Random(training.seed + self.args.process_index)
        self.share_prefix = shares_prefix(training, self.args)
        self._sums = {"train": {}, "eval": {}}
        self.on_policy_batches = 0

    def evaluate(self, *args, **kwargs):
        """The Trainer's evaluation, leaving torch's random state as it found it. At an epoch's end the Trainer saves
        the checkpoint (and its random state) before it evaluates, and the validation loader draws a seed from
        torch's generator: the next epoch was shuffled from another state than a run resumed from that checkpoint
        restores, so a run killed there trained other weights. (Not in transformers: it restores the state it saved.)"""
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return super().evaluate(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training
        on_policy = training and self.draws_on_policy_batch()
        if on_policy:
            inputs = self.on_policy_batch(model, inputs)
            self.on_policy_batches += 1
        terms, logits = self.loss_terms(model, inputs, on_policy)
        # A batch can lack every weighted term (e.g. no top-k in it): a zero that still reaches every parameter.
        loss = sum((self.loss_weights[name] * value for name, value in terms.items()), logits.sum() * 0.0)
        self.add_to_sums(terms, "train" if training else "eval")
        return (loss, {}) if return_outputs else loss

    def draws_on_policy_batch(self) -> bool:
        """Whether this training batch is replaced by the student's own answers (a draw at on_policy_ratio)."""
        ratio = self.settings.on_policy_ratio
        return ratio > 0 and self.rng.random() < ratio

    def loss_terms(self, model, inputs: dict, on_policy: bool) -> tuple[dict, object]:
        """Each weighted loss term of a batch by name, and the student's logits at the positions predicting answers."""
        labels = inputs["labels"]
        predict = predicting_positions(labels)
        targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
        logits = answer_forward(model, inputs, predict, self.share_prefix)
        weights = self.loss_weights
        terms = {}
        if weights["sft"] > 0 and not on_policy:  # the student's own answers are no SFT target
            terms["sft"] = losses.cross_entropy(logits, targets)
        if weights["topk"] > 0 and not on_policy and "topk_logprobs" in inputs:
            present = torch.isfinite(inputs["topk_logprobs"][..., 0])[predict]
            terms["topk"] = losses.topk_divergence(
                logits[present], inputs["topk_ids"][predict][present], inputs["topk_logprobs"][predict][present],
                self.settings.kd_temperature,
            )
        if self.teacher is not None and (weights["kd"] > 0 or weights["hidden"] > 0):
            terms.update(self.teacher_terms(logits, inputs, predict))
        return terms, logits

    def teacher_terms(self, logits, inputs: dict, predict) -> dict:
        """The terms measured against the local teacher: its logits (kd) and its layers' outputs (hidden)."""
        settings, weights = self.settings, self.loss_weights
        terms = {}
        with torch.no_grad():
            # Hidden states alone need no teacher logits: an empty selection skips its projection.
            teacher_logits = answer_forward(
                self.teacher, inputs, predict if weights["kd"] > 0 else torch.zeros_like(predict), self.share_prefix
            )
        if weights["kd"] > 0:
            terms["kd"] = losses.logit_divergence(
                logits, teacher_logits, settings.kd_loss, settings.kd_temperature, settings.kd_beta
            )
        if weights["hidden"] > 0:
            # Positions of real tokens, for hidden states: every token of a packed row, else the attention mask.
            labels = inputs["labels"]
            real = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones_like(labels, dtype=torch.bool)
            student_states = [state[real] for state in self.student_layers.take()]
            teacher_states = [state[real] for state in self.teacher_layers.take()]
            terms["hidden"] = losses.hidden_state_distance(student_states, teacher_states, settings.hidden_loss)
        return terms

    def add_to_sums(self, terms: dict, kind: str) -> None:
        """Add each term to its running sum until the next log, which reports their means."""
        sums = self._sums[kind]
        for name, value in terms.items():
            total, count = sums.get(name, (0.0, 0))
            sums[name] = (total + value.detach(), count + 1)

    def on_policy_batch(self, model, inputs: dict) -> dict:
        """The batch's prompts with answers the student samples now; labels on the sampled tokens (GKD)."""
        prompts = last_answer_prompts(inputs)
        answers = self.sample_answers(self.accelerator.unwrap_model(model), prompts, inputs["input_ids"].device)
        examples = [
            {"input_ids": prompt.tolist() + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}
            for prompt, answer in zip(prompts, answers)
        ]
        device = inputs["input_ids"].device
        return {key: value.to(device) for key, value in pad_batch(examples, self.processing_class.pad_token_id).items()}

    def sample_answers(self, unwrapped, prompts: list, device) -> list[list[int]]:
        """The student's sampled answer to each prompt, through its first end-of-sequence token."""
        tokenizer = self.processing_class
        input_ids, attention_mask = left_padded(prompts, tokenizer.pad_token_id, device)
        eos = unwrapped.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])
        was_training = unwrapped.training
        unwrapped.eval()
        with torch.no_grad():
            generated = unwrapped.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                temperature=self.settings.on_policy_temperature, top_k=0, top_p=1.0,
                max_new_tokens=self.settings.on_policy_max_new_tokens, use_cache=True,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos),
            )[:, input_ids.shape[1]:]
        unwrapped.train(was_training)
        answers = []
        for answer in generated.tolist():
            cut = next((i + 1 for i, token in enumerate(answer) if token in eos), len(answer))
            answers.append(answer[:cut])
        return answers

    def log(self, logs: dict, start_time=None) -> None:
        kind = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if kind == "eval" else ""
        for name, (total, count) in self._sums[kind].items():
            logs[f"{prefix}loss_{name}"] = round(float(total) / max(count, 1), 6)
        self._sums[kind] = {}
        super().log(logs, start_time)


class LogToTracker(TrainerCallback):
    """Sends losses to the stage's MLflow run as metric histories, and shows progress (in the main process)."""

    def __init__(self, tracker: NullTracker, total_steps: int, show_progress: bool) -> None:
        self.tracker = tracker
        self.total_steps = total_steps
        self.show_progress = show_progress
        self.progress: Optional[Progress] = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.show_progress:
            self.progress = Progress(self.total_steps, "finetune", unit="steps")
            self.progress.update(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            loss = next((entry["loss"] for entry in reversed(state.log_history) if "loss" in entry), None)
            self.progress.update(1, **({"loss": f"{loss:.3f}"} if loss is not None else {}))

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = {}
        for key, value in (logs or {}).items():
            if isinstance(value, (int, float)) and (key in ("loss", "eval_loss", "learning_rate", "grad_norm") or "loss_" in key):
                metrics["train_loss" if key == "loss" else key] = value
        self.tracker.log_metrics(metrics, step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.close()
