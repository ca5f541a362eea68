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

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from azdistill.config.schema import DistillConfig
from azdistill.config.sections import TrainingConfig
from azdistill.data import digests
from azdistill.data.records import Message
from azdistill.errors import UserError
from azdistill.stages import state
from azdistill.tracking.tracker import NullTracker
from azdistill.training.distributed import is_main_process, wait_for_everyone
from azdistill.training.examples import load_conversations, load_teacher_topk

log = logging.getLogger(__name__)


OUTPUTS = ["model", "training.json"]
# Everything the stage writes into its folder: what a rerun under other inputs or settings removes (nothing else).
OWNED = [*OUTPUTS, "adapter", "checkpoints"]


@dataclass
class TrainingData:
    """What the stage trains on: the conversations, the hosted teacher's top-k where a loss needs it, and the
    training settings in force for them."""

    train: list[list[Message]]
    validation: list[list[Message]]
    settings: TrainingConfig
    train_topk: Optional[list[Optional[list[dict]]]] = None
    validation_topk: Optional[list[Optional[list[dict]]]] = None


# Training settings added after stages were first fingerprinted, with the default that trains as before they existed.
SETTINGS_ADDED_LATER = {"freeze_embeddings": False}


def training_key(settings: TrainingConfig) -> dict:
    """The training settings that decide the weights: logging, checkpoint intervals, memory savers and the shared prefix
    (the same sums in another order) do not. A setting added later counts only when set otherwise than its default,
    so a student trained before it existed (the one that default trains) is not trained again after an upgrade."""
    excluded = {"logging_steps", "save_steps", "gradient_checkpointing", "shared_prefix"}
    excluded |= {name for name, default in SETTINGS_ADDED_LATER.items() if getattr(settings, name) == default}
    return settings.model_dump(exclude=excluded)


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
    data = _reference_answers(config) if on_references else _teacher_answers(config, synthetic_dir)
    settings = data.settings
    uses_teacher = settings.uses_teacher_model
    stage_fingerprint = digests.fingerprint(
        {
            "inputs": digests.fingerprint({"train": data.train, "validation": data.validation, "topk": data.train_topk}),
            "student": digests.folder_digest(student_init),
            "teacher": digests.folder_digest(teacher_path) if uses_teacher and teacher_path else None,
            "training": training_key(settings),
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
    # Imported only now: the training loop brings torch and transformers, which commands that merely reach this
    # module (e.g. `azdistill finetune` refusing to run before synthesize) should not wait for.
    from azdistill.training.loop import train_student

    with tracker.stage(stage):
        tracker.log_params({"stage.student_init": student_init, "stage.examples": len(data.train)})
        summary = train_student(
            data.train, data.validation, student_init, out_dir, settings, teacher_path if uses_teacher else None, tracker, resume,
            data.train_topk, data.validation_topk, config.runtime,
        )
        if main:
            tracker.log_artifact(out_dir / "training.json")
            state.finish(out_dir, stage_fingerprint, OUTPUTS, summary, stage=stage)
    wait_for_everyone()
    log.info(
        "%s: %d steps in %.0f s, loss %.3f -> %.3f -> %s",
        stage, summary["steps"], summary["seconds"], summary["first_loss"] or float("nan"), summary["final_loss"] or float("nan"),
        out_dir / "model",
    )
    return out_dir


def _reference_answers(config: DistillConfig) -> TrainingData:
    """The data's own reference answers, for the 'no teacher' baseline: SFT on the references alone."""
    from azdistill.data.records import read_records

    def references(split: str) -> list[list[Message]]:
        records = read_records(getattr(config.data, split), config.task.type, config.data.max_records)
        return [record.messages for record in records if record.reference is not None]

    train, validation = references("train"), references("validation")
    if not train:
        raise UserError(f"{config.data.train}: no record has a reference answer (a final assistant message) to train on")
    settings = config.training.model_copy(
        update={"sft_weight": None, "kd_weight": 0.0, "topk_weight": 0.0, "hidden_weight": 0.0, "on_policy_ratio": 0.0}
    )
    return TrainingData(train, validation, settings)


def _teacher_answers(config: DistillConfig, synthetic_dir: Path) -> TrainingData:
    """The synthetic set as the synthesize stage wrote it, with the teacher's top-k where topk_weight needs it."""
    # A truncated or edited file is named, never trained on. (A folder without the stage's record, e.g. one prepared
    # by hand, is taken as it is; the CLI requires it.)
    if (Path(synthetic_dir) / state.DONE_FILE).is_file():
        state.verify_outputs(synthetic_dir, "synthesize")
    data = TrainingData(
        load_conversations(synthetic_dir / "train.jsonl"), load_conversations(synthetic_dir / "validation.jsonl"), config.training
    )
    if data.settings.topk_weight > 0:
        data.train_topk = load_teacher_topk(synthetic_dir / "train.logprobs.jsonl", len(data.train))
        validation_path = synthetic_dir / "validation.logprobs.jsonl"
        data.validation_topk = load_teacher_topk(validation_path, len(data.validation)) if validation_path.is_file() else None
    return data
