"""Export a config's train/validation/test splits in the format Azure ML's own distillation accepts.

Azure ML's distillation (the `oss_distillation_validate_pipeline` component in Azure/azureml-assets,
assets/training/distillation/src/validate_pipeline.py) checks the train and validation files before it calls the
teacher, with rules stricter than azdistill's:

- single-turn tasks (NLI, NLU_QA, MATH, SUMMARIZATION) take prompts only: each record is exactly
  [system, user]. The SDK's `distillation()` says the data "should contain the questions but not the labels".
  azdistill's `[system, user, assistant]` (a reference answer) is refused ("Expected format: [system, user]");
- CONVERSATION takes complete turns: system, then user and assistant alternating, ending with an assistant reply
  (at least [system, user, assistant]); the teacher regenerates every assistant turn;
- each file needs at least 65 records (40 for MATH): `azdistill.data.splits.AZURE_MINIMUM_RECORDS`;
- the messages are the first column of each row, so a row holds `messages` alone.

The export therefore writes prompts only for single-turn tasks and moves their reference answers to a side file,
`<split>.references.jsonl`, one row per exported record in the same order, so that nothing the user wrote is lost.
Conversation and chat records are written whole; one that ends on a user turn cannot be expressed and is refused.
A split under Azure's minimum is exported and reported (a warning: the user may add records before submitting).
The whole folder is built beside `--out` and moved into place at the end: bad input leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from azdistill import __version__
from azdistill.config.schema import DistillConfig
from azdistill.config.sections import SINGLE_TURN_TASKS
from azdistill.errors import UserError

EXPORT_FORMATS = ("azure",)
SPLITS = ("train", "validation", "test")
# Azure ML's distillation takes a training and a validation file; the test split is exported for the user's own
# evaluation and is not checked against Azure's minimum.
AZURE_CHECKED_SPLITS = ("train", "validation")
# azdistill task type -> Azure's `data_generation_task_type` (NLI, NLU_QA, CONVERSATION, MATH, SUMMARIZATION).
AZURE_TASK_TYPES = {
    "nli": "NLI",
    "qa": "NLU_QA",
    "math": "MATH",
    "summarization": "SUMMARIZATION",
    "conversation": "CONVERSATION",
    "chat": "CONVERSATION",
}
MANIFEST = "export.json"


def references_name(split: str) -> str:
    """The side file holding a single-turn split's reference answers."""
    return f"{split}.references.jsonl"


EXPORT_FILES = frozenset([MANIFEST] + [f"{split}.jsonl" for split in SPLITS] + [references_name(split) for split in SPLITS])


@dataclass
class SplitExport:
    """One exported split: where it came from, what was written, and Azure's minimum (None: not checked there)."""

    split: str
    source: Path
    records: int
    references: int  # reference answers moved to the side file (single-turn tasks only)
    references_file: Optional[str]
    minimum: Optional[int]

    @property
    def below_minimum(self) -> bool:
        return self.minimum is not None and self.records < self.minimum


@dataclass
class ExportSummary:
    """What `export_azure` wrote, for the command's output."""

    out_dir: Path
    task_type: str
    azure_task_type: str
    splits: list[SplitExport] = field(default_factory=list)

    def lines(self) -> list[str]:
        """One line per split, then where the task mapping is written."""
        lines = []
        for item in self.splits:
            moved = f"; {item.references} reference answers in {item.references_file}" if item.references_file else ""
            checked = "" if item.minimum is not None else " (not sent to Azure's distillation: for your own evaluation)"
            lines.append(f"{item.split}: {item.records} records -> {self.out_dir / (item.split + '.jsonl')}{moved}{checked}")
        lines.append(
            f"task {self.task_type} exported as Azure ML's data_generation_task_type {self.azure_task_type}; "
            f"mapping in {self.out_dir / MANIFEST}"
        )
        return lines

    def warnings(self) -> list[str]:
        """One line per split that Azure ML's distillation would refuse for its size."""
        return [
            f"{item.split}: {item.records} record{'s' if item.records != 1 else ''}, fewer than the {item.minimum} that "
            f"Azure ML's distillation requires for task {self.azure_task_type}; it will refuse "
            f"{self.out_dir / (item.split + '.jsonl')} until the split has {item.minimum}"
            for item in self.splits
            if item.below_minimum
        ]


def azure_minimum(task_type: str) -> int:
    """The fewest records per file Azure ML's distillation accepts for an azdistill task type."""
    from azdistill.data.splits import AZURE_MINIMUM_DEFAULT, AZURE_MINIMUM_RECORDS

    return AZURE_MINIMUM_RECORDS.get(task_type, AZURE_MINIMUM_DEFAULT)


def _azure_rows(config: DistillConfig, split: str) -> tuple[Path, list[dict], list[dict]]:
    """Read one split (as the stages do, data.max_records applied) and convert it: (source, rows, references).

    `references` is empty for conversation tasks, whose assistant turns stay in the messages."""
    from azdistill.data.records import read_records

    task = config.task.type
    source = Path(getattr(config.data, split))
    rows, references = [], []
    for record in read_records(source, task, config.data.max_records):
        # Only role and content: the teacher endpoint receives these messages as they are.
        messages = [{"role": message["role"], "content": message["content"]} for message in record.messages]
        if task in SINGLE_TURN_TASKS:
            rows.append({"messages": messages[:2]})
            references.append({"source_line": record.line, "reference": record.reference})
            continue
        if messages[-1]["role"] != "assistant":
            raise UserError(
                f"{source}:{record.line}: ends with a user turn; Azure ML's CONVERSATION task (task {task}) needs every "
                "user turn answered: add the reference reply as a final assistant message, or remove the record"
            )
        rows.append({"messages": messages})
    return source, rows, references


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an --out that is not a folder this command may (re)fill: new, empty, or an earlier export."""
    if not out_dir.exists():
        blocker = next((parent for parent in out_dir.parents if parent.exists() and not parent.is_dir()), None)
        if blocker is not None:
            raise UserError(f"--out {out_dir}: cannot be created ({blocker} is a file, not a folder)")
        return
    if not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: is a file; give a new folder, an empty one, or an earlier export's")
    entries = sorted(entry.name for entry in out_dir.iterdir())
    foreign = [name for name in entries if name not in EXPORT_FILES]
    if foreign:
        raise UserError(
            f"--out {out_dir}: holds {foreign[0]!r}, which is not an export's file; give a new folder, an empty one, or "
            "an earlier export's (it is replaced whole)"
        )
    if entries and MANIFEST not in entries:
        raise UserError(f"--out {out_dir}: holds data files but no {MANIFEST}, so it is not an earlier export; give a new or empty folder")


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Put the finished folder at `out_dir`, replacing an earlier export or an empty folder there."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    previous = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.previous-"))
    try:
        os.rename(out_dir, previous / out_dir.name)
    except BaseException:
        previous.rmdir()
        raise
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(previous / out_dir.name, out_dir)  # the earlier export stays as it was
        previous.rmdir()
        raise
    shutil.rmtree(previous, ignore_errors=True)  # only once the new export is in place


def export_azure(config: DistillConfig, out_dir: Path) -> ExportSummary:
    """Write the config's splits into `out_dir` in the format Azure ML's distillation accepts; see the module doc.

    Every split is read and converted before anything is written; the files are written to a temporary folder beside
    `out_dir`, which replaces it only when all of them are complete. Bad data is a UserError naming file and line.
    """
    from azdistill.data.files import current_umask, write_json, write_jsonl

    task = config.task.type
    azure_task = AZURE_TASK_TYPES[task]
    out_dir = Path(out_dir).resolve()
    _check_out_dir(out_dir)
    converted = {split: _azure_rows(config, split) for split in SPLITS}

    summary = ExportSummary(out_dir, task, azure_task)
    for split, (source, rows, references) in converted.items():
        with_reference = sum(item["reference"] is not None for item in references)
        summary.splits.append(SplitExport(
            split=split, source=source, records=len(rows), references=with_reference,
            references_file=references_name(split) if with_reference else None,
            minimum=azure_minimum(task) if split in AZURE_CHECKED_SPLITS else None,
        ))
    manifest = {
        "format": "azure",
        "azdistill_version": __version__,
        "name": config.name,
        "task_type": task,
        "data_generation_task_type": azure_task,
        "task_types": AZURE_TASK_TYPES,
        "references": "single-turn tasks: prompts only ([system, user]); each split's reference answers are in "
        "<split>.references.jsonl, one row per record in the same order. Conversation tasks: written whole.",
        "splits": {
            item.split: {
                "file": f"{item.split}.jsonl",
                "source": str(item.source),
                "records": item.records,
                "references_file": item.references_file,
                "azure_minimum": item.minimum,
                "below_azure_minimum": item.below_minimum,
            }
            for item in summary.splits
        },
    }

    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out {out_dir}: cannot be created ({error.strerror})") from None
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.export-"))
    try:
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it private; the export is an ordinary folder
        for item, (_, rows, references) in zip(summary.splits, converted.values()):
            write_jsonl(staging / f"{item.split}.jsonl", rows)
            if item.references_file:
                write_jsonl(staging / item.references_file, references)
        write_json(staging / MANIFEST, manifest)
        _move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once moved into place
    return summary
