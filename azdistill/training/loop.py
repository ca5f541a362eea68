"""Training a student end to end: load it (full or LoRA), train with the distillation trainer, resume from the
last complete checkpoint, save ordinary weights."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from transformers import PrinterCallback, TrainingArguments

from azdistill.config.sections import RuntimeConfig, TrainingConfig
from azdistill.data.files import write_json
from azdistill.data.records import Message
from azdistill.determinism import make_repeatable
from azdistill.errors import StageFailed, UserError
from azdistill.models.loading import count_parameters, load_tokenizer
from azdistill.tracking.tracker import NullTracker
from azdistill.training.distributed import is_main_process, wait_for_everyone
from azdistill.training.examples import IGNORE_INDEX, build_example, pack_batch, pad_batch, token_id_lookup
from azdistill.training.trainer import (
    LOSS_NAMES,
    DistillationTrainer,
    LogToTracker,
    check_same_vocabulary,
    loss_weights,
    teacher_layer_map,
)

log = logging.getLogger(__name__)


def _wants_bf16(settings: TrainingConfig) -> bool:
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
    make_repeatable(settings.seed, runtime.threads, runtime.deterministic)
    tokenizer = load_tokenizer(student_path)
    _check_teacher_inputs(settings, tokenizer, teacher_path, train_topk)
    train, validation = _build_datasets(
        tokenizer, settings, train_conversations, validation_conversations, train_topk, validation_topk
    )
    bf16 = _wants_bf16(settings)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    total_steps = _total_steps(settings, len(train), world)
    args = _training_arguments(settings, out_dir / "checkpoints", total_steps, bf16, evaluate=bool(validation))
    model, teacher_model, layer_map = _load_models(student_path, teacher_path, settings, args.device, bf16)
    trainer = DistillationTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=validation or None,
        data_collator=pack_batch if settings.batching == "packed" else (lambda batch: pad_batch(batch, tokenizer.pad_token_id)),
        processing_class=tokenizer,
        callbacks=[LogToTracker(tracker, total_steps, is_main_process())],
        training=settings,
        teacher=teacher_model,
        layer_map=layer_map,
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts to stdout; our callback logs instead
    run = _run_training(trainer, model, out_dir / "checkpoints", resume)
    summary = _summary(trainer, model, settings, train, validation, run, world, bf16)
    if trainer.is_world_process_zero():
        _save_student(trainer, tokenizer, out_dir, settings)
        write_json(out_dir / "training.json", summary)
        tracker.log_metrics({
            key: value for key, value in summary.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epochs"
        })
    wait_for_everyone()
    return summary


def _check_teacher_inputs(settings: TrainingConfig, tokenizer, teacher_path: Optional[Path], train_topk) -> None:
    """Refuse settings whose teacher inputs are missing or cannot work with this student, before any model loads."""
    if settings.uses_teacher_model and teacher_path is None:
        raise UserError(
            "training.kd_weight, hidden_weight and on_policy_ratio need the teacher's weights "
            "(teacher.kind: local, or teacher.local_copy)"
        )
    if settings.topk_weight > 0 and train_topk is None:
        raise UserError(
            "training.topk_weight > 0 needs the teacher's top-k log-probabilities (synthesis.top_logprobs with a hosted teacher)"
        )
    if teacher_path is not None and (settings.kd_weight > 0 or settings.on_policy_ratio > 0):
        check_same_vocabulary(load_tokenizer(teacher_path), tokenizer)


def _build_datasets(
    tokenizer, settings: TrainingConfig, train_conversations, validation_conversations, train_topk, validation_topk
) -> tuple[list[dict], list[dict]]:
    """The training and validation examples; conversations with no answer token within max_length are skipped."""
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
        log.warning(
            "finetune: %d conversations had no answer token within max_length=%d and were skipped", dropped, settings.max_length
        )
    if settings.topk_weight > 0:
        _check_topk_coverage(train)
    return train, validation


def _check_topk_coverage(train: list[dict]) -> None:
    """Log how many answer tokens the teacher's top-k covers, and refuse a set where it covers none."""
    covered = sum(1 for example in train if example.get("topk"))
    positions = sum(len(example.get("topk") or []) for example in train)
    answer_tokens = sum(sum(label != IGNORE_INDEX for label in example["labels"]) for example in train)
    log.info(
        "finetune: teacher top-k lines up with %d of %d answer tokens in %d of %d examples",
        positions, answer_tokens, covered, len(train),
    )
    if positions == 0:
        raise UserError(
            "training.topk_weight > 0, but none of the teacher's top-k tokens line up with the training answers "
            "(the stored texts differ from the answers, e.g. a prompt strategy that keeps only part of them)"
        )


def _total_steps(settings: TrainingConfig, examples: int, world: int) -> int:
    """Optimizer steps over all epochs, across every process of a launcher."""
    steps_per_epoch = math.ceil(examples / (settings.batch_size * settings.gradient_accumulation_steps * world))
    return max(1, math.ceil(steps_per_epoch * settings.epochs))


def _training_arguments(
    settings: TrainingConfig, checkpoints: Path, total_steps: int, bf16: bool, evaluate: bool
) -> TrainingArguments:
    """The Trainer's arguments: the schedule, checkpoints and precision the settings ask for."""
    return TrainingArguments(
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
        eval_strategy="epoch" if evaluate else "no",
        prediction_loss_only=True,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        disable_tqdm=True,  # our own Progress shows steps, as a bar or as log lines
        seed=settings.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if settings.batching == "length_grouped" else "random",
        # Every parameter takes part in every step, so DDP need not search the graph for unused ones.
        ddp_find_unused_parameters=False,
    )


def _load_models(student_path: Path, teacher_path: Optional[Path], settings: TrainingConfig, device, bf16: bool):
    """The student ready to train (LoRA-wrapped for method lora), the frozen teacher where a loss needs it, and the
    teacher layer of each student layer where hidden states are matched."""
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
    if settings.freeze_embeddings and settings.method == "full":
        # A tied output head is this same tensor, so it stays too; the Trainer's optimizer takes only trainable weights.
        model.get_input_embeddings().weight.requires_grad_(False)
    if settings.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if settings.method == "lora":
        model = _apply_lora(model, settings)
    return model, teacher_model, layer_map


@dataclass
class TrainingRun:
    """What one call of the Trainer did: its result, how long it took, and which trainable tensors it changed."""

    result: object  # transformers' TrainOutput
    seconds: float
    cpu_seconds: float
    trainable_parameters: int
    trainable_tensors: int
    parameters_changed: int


def _run_training(trainer: DistillationTrainer, model, checkpoints: Path, resume: bool) -> TrainingRun:
    """Train, from the last complete checkpoint when resuming, and measure the time and the tensors changed."""
    last_checkpoint = last_complete_checkpoint(checkpoints) if resume else None
    if last_checkpoint:
        log.info("finetune: resuming from %s", last_checkpoint)
    trainable = {name: parameter.detach().clone() for name, parameter in model.named_parameters() if parameter.requires_grad}
    started, cpu_started = time.monotonic(), time.process_time()
    result = trainer.train(resume_from_checkpoint=last_checkpoint)
    seconds, cpu_seconds = time.monotonic() - started, time.process_time() - cpu_started
    changed = sum(
        not torch.equal(trainable[name], parameter.detach()) for name, parameter in model.named_parameters() if name in trainable
    )
    return TrainingRun(
        result=result, seconds=seconds, cpu_seconds=cpu_seconds,
        trainable_parameters=sum(parameter.numel() for parameter in trainable.values()), trainable_tensors=len(trainable),
        parameters_changed=changed,
    )


def _summary(
    trainer: DistillationTrainer, model, settings: TrainingConfig, train: list[dict], validation: list[dict], run: TrainingRun,
    world: int, bf16: bool,
) -> dict:
    """What the run did, for training.json and the stage's metrics: sizes, losses first and last, time, the setup."""
    history = trainer.state.log_history
    losses_logged = [entry["loss"] for entry in history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    tokens = sum(len(example["input_ids"]) for example in train) * settings.epochs
    summary = {
        "examples": len(train),
        "validation_examples": len(validation),
        "steps": trainer.state.global_step,
        "epochs": settings.epochs,
        "seconds": round(run.seconds, 2),
        "tokens_per_s": round(tokens / run.seconds, 1) if run.seconds > 0 else None,
        "cpu_seconds": round(run.cpu_seconds, 2),  # this process's CPU time: the work done, whatever else shares the machine
        "first_loss": losses_logged[0] if losses_logged else None,
        "final_loss": losses_logged[-1] if losses_logged else None,
        "train_loss": run.result.training_loss,
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
        "parameters": count_parameters(model.get_base_model() if settings.method == "lora" else model),
        "trainable_parameters": run.trainable_parameters,
        "trainable_tensors": run.trainable_tensors,
        "parameters_changed": run.parameters_changed,
        "method": settings.method,
        "loss_weights": loss_weights(settings),
        "kd_weight": settings.kd_weight,
        "device": str(trainer.args.device),
        "processes": world,
        "on_policy_batches": trainer.on_policy_batches,
        "bf16": bf16,
    }
    for name in LOSS_NAMES:
        logged = [entry[f"loss_{name}"] for entry in history if f"loss_{name}" in entry]
        if logged:
            summary[f"first_loss_{name}"], summary[f"final_loss_{name}"] = logged[0], logged[-1]
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
        complete = all((folder / name).is_file() for name in CHECKPOINT_FILES) and any(
            (folder / name).is_file() for name in CHECKPOINT_WEIGHTS
        )
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
