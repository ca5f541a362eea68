"""Finetune: train the student on the teacher's answers, with the loss on assistant tokens only.

Sequence-level distillation is plain SFT on the synthetic set. When the teacher runs in-process, token-level
distillation is mixed in: the KL divergence between the teacher's and the student's next-token distributions
at a temperature, on the same assistant positions, weighted by `training.kd_weight`.

Training runs on `transformers.Trainer`, which brings the schedule, checkpoints and resume from the last
checkpoint after an interruption.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from azdistill.config import DistillConfig, TrainingConfig
from azdistill.data import Message, iter_jsonl, write_json
from azdistill.errors import StageFailed, UserError
from azdistill.progress import Progress
from azdistill.stages import state
from azdistill.tracking import NullTracker

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
OUTPUTS = ["model", "training.json"]


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


def build_example(tokenizer, messages: list[Message], max_length: int) -> Optional[dict]:
    """Token ids and labels for one conversation; labels are -100 outside assistant answers.

    Returns None when truncation to `max_length` leaves no assistant token to learn from.
    """
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length)
    labels = []
    for token_id, (start, _end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        inside = any(span_start <= start < span_end for span_start, span_end in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": encoded["input_ids"], "labels": labels}


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
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def distillation_kl(student_logits, teacher_logits, labels, temperature: float):
    """Forward KL(teacher || student) at a temperature, averaged over the positions that predict an answer token.

    Scaled by temperature squared so its gradients keep their size as the temperature changes (Hinton et al.).
    """
    import torch.nn.functional as F

    # Position t predicts token t+1, as in the causal LM loss.
    mask = labels[:, 1:] != IGNORE_INDEX
    student = student_logits[:, :-1][mask].float() / temperature
    teacher = teacher_logits[:, :-1][mask].float() / temperature
    if student.numel() == 0:
        return student_logits.sum() * 0.0
    kl = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True, reduction="batchmean")
    return kl * temperature**2


def check_same_vocabulary(teacher_tokenizer, student_tokenizer) -> None:
    """Token-level distillation compares distributions over the same tokens: the vocabularies must match."""
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise UserError(
            "training.kd_weight > 0 needs the teacher and the student to share a vocabulary, and they differ "
            f"({len(teacher_tokenizer)} vs {len(student_tokenizer)} tokens); set training.kd_weight=0 "
            "or use a student with the teacher's tokenizer"
        )


def _make_trainer(model, tokenizer, train, validation, args, teacher_model, kd_weight: float, kd_temperature: float, callbacks):
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        """Trainer whose loss mixes SFT with token-level KL to a local teacher."""

        # Our mixed loss is a mean per micro-batch, so the Trainer must divide it by the accumulation steps; left
        # to itself it assumes the model normalised by `num_items_in_batch` (transformers 5 gradient-accumulation fix).
        loss_is_scaled_for_ga = False if (teacher_model is not None and kd_weight > 0) else None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if teacher_model is None or kd_weight == 0:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            import torch

            outputs = model(**inputs)
            with torch.no_grad():
                teacher_logits = teacher_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            kd = distillation_kl(outputs.logits, teacher_logits, inputs["labels"], kd_temperature)
            loss = (1 - kd_weight) * outputs.loss + kd_weight * kd
            return (loss, outputs) if return_outputs else loss

    return DistillationTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=validation or None,
        data_collator=lambda examples: pad_batch(examples, tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def _tracking_callback(tracker: NullTracker, total_steps: int):
    from transformers import TrainerCallback

    class LogToTracker(TrainerCallback):
        """Sends losses to the stage's MLflow run as metric histories, and shows progress."""

        def __init__(self) -> None:
            self.progress: Optional[Progress] = None

        def on_train_begin(self, args, state_, control, **kwargs):
            self.progress = Progress(total_steps, "finetune", unit="steps")
            self.progress.update(state_.global_step)

        def on_step_end(self, args, state_, control, **kwargs):
            if self.progress is not None:
                loss = next((entry["loss"] for entry in reversed(state_.log_history) if "loss" in entry), None)
                self.progress.update(1, **({"loss": f"{loss:.3f}"} if loss is not None else {}))

        def on_log(self, args, state_, control, logs=None, **kwargs):
            logs = logs or {}
            metrics = {}
            for key, value in logs.items():
                if key in ("loss", "eval_loss", "learning_rate", "grad_norm") and isinstance(value, (int, float)):
                    metrics["train_loss" if key == "loss" else key] = value
            tracker.log_metrics(metrics, step=state_.global_step)

        def on_train_end(self, args, state_, control, **kwargs):
            if self.progress is not None:
                self.progress.close()

    return LogToTracker()


def load_conversations(path: Path) -> list[list[Message]]:
    return [row["messages"] for row in iter_jsonl(path)]


def train_student(
    train_conversations: list[list[Message]],
    validation_conversations: list[list[Message]],
    student_path: Path,
    out_dir: Path,
    settings: TrainingConfig,
    teacher_path: Optional[Path] = None,
    tracker: NullTracker = NullTracker(),
    resume: bool = False,
) -> dict:
    """Fine-tune the model at `student_path`; the result goes to `out_dir/model`. Returns a summary.

    `teacher_path` enables token-level distillation when `settings.kd_weight > 0`.
    """
    import torch
    from transformers import TrainingArguments, set_seed

    from azdistill.models import count_parameters, load_model, load_tokenizer, pick_device

    set_seed(settings.seed)
    device = pick_device()
    tokenizer = load_tokenizer(student_path)
    model = load_model(student_path, device)
    teacher_model = None
    if settings.kd_weight > 0:
        if teacher_path is None:
            raise UserError("training.kd_weight > 0 needs a local teacher (teacher.kind: local)")
        check_same_vocabulary(load_tokenizer(teacher_path), tokenizer)
        teacher_model = load_model(teacher_path, device).eval()
        teacher_model.requires_grad_(False)

    def examples(conversations):
        built = [build_example(tokenizer, messages, settings.max_length) for messages in conversations]
        return [example for example in built if example is not None]

    train, validation = examples(train_conversations), examples(validation_conversations)
    if not train:
        raise StageFailed("finetune: no training example has an assistant token within training.max_length")
    dropped = len(train_conversations) - len(train)
    if dropped:
        log.warning("finetune: %d conversations had no answer token within max_length=%d and were skipped", dropped, settings.max_length)

    steps_per_epoch = math.ceil(len(train) / (settings.batch_size * settings.gradient_accumulation_steps))
    total_steps = max(1, math.ceil(steps_per_epoch * settings.epochs))
    checkpoints = out_dir / "checkpoints"
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
        bf16=device.startswith("cuda"),
        use_cpu=device == "cpu",
        report_to="none",
        disable_tqdm=True,  # our own Progress shows steps, as a bar or as log lines
        seed=settings.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = _make_trainer(
        model, tokenizer, train, validation, args, teacher_model, settings.kd_weight, settings.kd_temperature,
        [_tracking_callback(tracker, total_steps)],
    )
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints raw dicts to stdout; our callback logs instead
    last_checkpoint = None
    if resume and checkpoints.is_dir():
        from transformers.trainer_utils import get_last_checkpoint

        last_checkpoint = get_last_checkpoint(str(checkpoints))
        if last_checkpoint:
            log.info("finetune: resuming from %s", last_checkpoint)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    started = time.monotonic()
    result = trainer.train(resume_from_checkpoint=last_checkpoint)
    seconds = time.monotonic() - started
    changed = sum(not torch.equal(before[name], parameter.detach()) for name, parameter in model.named_parameters())

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    tokens = sum(len(example["input_ids"]) for example in train) * settings.epochs
    staging = out_dir / ".model-staging"
    if staging.exists():
        shutil.rmtree(staging)
    trainer.save_model(str(staging))
    tokenizer.save_pretrained(staging)
    target = out_dir / "model"
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the final model supersedes them
    summary = {
        "examples": len(train),
        "validation_examples": len(validation),
        "steps": trainer.state.global_step,
        "epochs": settings.epochs,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "train_loss": result.training_loss,
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
        "parameters": count_parameters(model),
        "parameters_changed": changed,
        "kd_weight": settings.kd_weight,
        "device": device,
    }
    write_json(out_dir / "training.json", summary)
    tracker.log_metrics({key: value for key, value in summary.items() if isinstance(value, (int, float)) and key != "epochs"})
    return summary


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
    """Run the stage on the synthetic set (or, with `on_references`, on the data's own reference answers)."""
    stage = "finetune-reference" if on_references else "finetune"
    out_dir = Path(out_dir or config.stage_dir(stage))
    if on_references:
        from azdistill.data import read_records

        def references(split: str) -> list[list[Message]]:
            records = read_records(getattr(config.data, split), config.task.type, config.data.max_records)
            return [record.messages for record in records if record.reference is not None]

        train, validation = references("train"), references("validation")
        if not train:
            raise UserError(f"{config.data.train}: no record has a reference answer (a final assistant message) to train on")
    else:
        train = load_conversations(synthetic_dir / "train.jsonl")
        validation = load_conversations(synthetic_dir / "validation.jsonl")
    uses_teacher = config.training.kd_weight > 0 and not on_references
    settings = config.training if uses_teacher else config.training.model_copy(update={"kd_weight": 0.0})
    stage_fingerprint = state.fingerprint(
        {
            "inputs": state.fingerprint({"train": train, "validation": validation}),
            "student": state.folder_digest(student_init),
            "teacher": state.folder_digest(teacher_path) if uses_teacher and teacher_path else None,
            # Logging and checkpoint intervals do not change the weights; the distillation settings matter only with a teacher.
            "training": settings.model_dump(
                exclude={"logging_steps", "save_steps"} | (set() if uses_teacher else {"kd_weight", "kd_temperature"})
            ),
        }
    )
    if not force and state.is_done(out_dir, stage_fingerprint):
        log.info("%s: data and settings unchanged, reusing %s (use --force to rerun)", stage, out_dir)
        return out_dir
    resume = state.begin(out_dir, stage_fingerprint, force)
    with tracker.stage(stage):
        tracker.log_params({"stage.student_init": student_init, "stage.examples": len(train)})
        summary = train_student(train, validation, student_init, out_dir, settings, teacher_path if uses_teacher else None, tracker, resume)
        tracker.log_artifact(out_dir / "training.json")
        state.finish(out_dir, stage_fingerprint, OUTPUTS, summary)
    log.info(
        "%s: %d steps in %.0f s, loss %.3f -> %.3f -> %s",
        stage, summary["steps"], summary["seconds"], summary["first_loss"] or float("nan"), summary["final_loss"] or float("nan"), out_dir / "model",
    )
    return out_dir
