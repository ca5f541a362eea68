"""Stage bookkeeping: skip a stage whose inputs and settings are unchanged, continue one that was interrupted.

A stage folder holds `stage.json` once the stage finished (its fingerprint, outputs, and the size and digest of
every output file) and `inprogress.json` while it runs; both name the stage. Those markers make a folder the
stage's own: a stage writes only into an empty folder or one of its own, and a rerun under other inputs or
settings removes only the files that stage writes (its `owned` names), never anything else a user put there.
Outputs are verified against `stage.json` before they are reused or read by the next stage.
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from azdistill.data.digests import file_digest
from azdistill.data.files import write_json
from azdistill.errors import UserError

DONE_FILE = "stage.json"
IN_PROGRESS_FILE = "inprogress.json"


# Files up to this size are verified by their SHA-256; larger ones (model weights) by their size, which a truncated,
# emptied or deleted file still fails: hashing gigabytes on every reuse would cost more than the stage it saves.
HASHED_BYTES = 64 * 2**20
# Temporary files of atomic writes (data.atomic_writer) and staging folders: a stage's own leftovers.
LEFTOVERS = (".*.tmp", ".*-staging", ".model-staging")
# A kill while a stage wrote its first marker leaves only that marker's temporary file in a folder that holds no work
# yet: the folder is still the stage's own.
MARKER_LEFTOVERS = tuple(f".{name}.*.tmp" for name in (IN_PROGRESS_FILE, DONE_FILE))


def _read_marker(path: Path) -> Optional[dict]:
    """A marker's content; None for a marker that cannot be read (a kill while it was written counts as ours)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _marker(stage_dir: Path) -> Optional[dict]:
    for name in (IN_PROGRESS_FILE, DONE_FILE):
        if (stage_dir / name).is_file():
            return _read_marker(stage_dir / name) or {}
    return None


def check_writable(stage_dir: Path, stage: str) -> None:
    """Refuse a folder a stage must not write into: one holding files it did not write, or another stage's."""
    stage_dir = Path(stage_dir)
    if not stage_dir.exists():
        return
    if not stage_dir.is_dir():
        raise UserError(f"{stage_dir} is a file, not a folder: give the {stage} stage a folder to write into")
    marker = _marker(stage_dir)
    if marker is None:
        entries = sorted(entry.name for entry in stage_dir.iterdir()
                         if not any(fnmatch.fnmatch(entry.name, pattern) for pattern in MARKER_LEFTOVERS))
        if entries:
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            raise UserError(
                f"{stage_dir} holds files azdistill did not write ({shown}); the {stage} stage writes only into an empty "
                "folder or one of its own: give it a new or empty folder"
            )
    elif marker.get("stage") not in (None, stage):
        raise UserError(f"{stage_dir} holds the outputs of the {marker['stage']} stage, not {stage}: give the {stage} stage its own folder")


def _remove_owned(stage_dir: Path, owned: Sequence[str]) -> None:
    """Remove what the stage writes (names and glob patterns in `owned`), its leftovers and its markers; nothing else."""
    for pattern in (*owned, *LEFTOVERS, DONE_FILE, IN_PROGRESS_FILE):
        for path in stage_dir.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def _file_record(path: Path) -> dict:
    size = path.stat().st_size
    return {"size": size, "sha256": file_digest(path)} if size <= HASHED_BYTES else {"size": size}


def _output_files(stage_dir: Path, outputs: Sequence[str]) -> dict[str, dict]:
    files: dict[str, dict] = {}
    for output in outputs:
        path = stage_dir / output
        members = sorted(member for member in path.rglob("*") if member.is_file()) if path.is_dir() else [path]
        for member in members:
            if member.is_file():
                files[str(member.relative_to(stage_dir))] = _file_record(member)
    return files


def verify_outputs(stage_dir: Path, stage: str, manifest: Optional[dict] = None) -> None:
    """Check a finished stage's outputs against what it recorded when it finished; a difference is a UserError
    naming the file and what to run. A stage.json from before the records were kept is checked for existence."""
    stage_dir = Path(stage_dir)
    manifest = manifest if manifest is not None else read_manifest(stage_dir, stage)
    redo = f"run `azdistill {stage} --force` (or `azdistill run --force`) to redo the stage"
    for output in manifest.get("outputs", []):
        if not (stage_dir / output).exists():
            raise UserError(f"{stage_dir / output} is missing, though the {stage} stage wrote it; {redo}")
    for name, recorded in (manifest.get("files") or {}).items():
        path = stage_dir / name
        if not path.is_file():
            raise UserError(f"{path} is missing, though the {stage} stage wrote it; {redo}")
        size = path.stat().st_size
        if size != recorded.get("size"):
            raise UserError(f"{path} has {size} bytes, not the {recorded.get('size')} the {stage} stage wrote (truncated or changed); {redo}")
        if "sha256" in recorded and file_digest(path) != recorded["sha256"]:
            raise UserError(f"{path} changed since the {stage} stage wrote it (its content differs); {redo}")


def is_done(stage_dir: Path, stage_fingerprint: str, stage: str = "this") -> bool:
    """Whether the stage finished with this fingerprint; its outputs are then verified (a UserError if they changed)."""
    done = Path(stage_dir) / DONE_FILE
    if not done.is_file():
        return False
    manifest = read_manifest(stage_dir, stage)
    if manifest.get("fingerprint") != stage_fingerprint:
        return False
    verify_outputs(Path(stage_dir), stage, manifest)
    return True


def read_manifest(stage_dir: Path, stage: str = "this") -> dict:
    path = Path(stage_dir) / DONE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not valid JSON"
        raise UserError(f"{path}: unreadable ({reason}); run `azdistill {stage} --force` to redo the stage") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a stage record; run `azdistill {stage} --force` to redo the stage")
    return data


def needs_reset(stage_dir: Path, stage_fingerprint: str, force: bool = False) -> bool:
    """Whether `begin` will remove earlier work (there is some, and it is forced or of other inputs and settings)."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir() or _marker(stage_dir) is None:
        return False
    previous = _read_marker(stage_dir / IN_PROGRESS_FILE) if (stage_dir / IN_PROGRESS_FILE).is_file() else None
    return force or (previous or {}).get("fingerprint") != stage_fingerprint


def begin(stage_dir: Path, stage_fingerprint: str, force: bool = False, stage: str = "this", owned: Sequence[str] = ()) -> bool:
    """Prepare a stage folder; returns True when earlier partial work of the same fingerprint can be continued.

    Refuses a folder that is not empty and not the stage's own (see `check_writable`); clears only `owned`.
    """
    stage_dir = Path(stage_dir)
    check_writable(stage_dir, stage)
    marker = stage_dir / IN_PROGRESS_FILE
    resumable = False
    if stage_dir.is_dir() and _marker(stage_dir) is not None:
        if needs_reset(stage_dir, stage_fingerprint, force):
            _remove_owned(stage_dir, owned)
        else:
            resumable = True
            (stage_dir / DONE_FILE).unlink(missing_ok=True)
    stage_dir.mkdir(parents=True, exist_ok=True)
    for pattern in MARKER_LEFTOVERS:
        for leftover in stage_dir.glob(pattern):
            leftover.unlink(missing_ok=True)
    write_json(marker, {"stage": stage, "fingerprint": stage_fingerprint})
    return resumable


def claim(stage_dir: Path, stage: str) -> None:
    """Mark a new or empty folder as the stage's, unfinished (a fingerprint no run has), so that inputs can be put in
    it before the stage runs (a seed's evaluation gets the first seed's saved answers); the stage then starts as on
    any unfinished folder of its own. A folder that already has a marker is left as it is."""
    stage_dir = Path(stage_dir)
    check_writable(stage_dir, stage)
    if stage_dir.is_dir() and _marker(stage_dir) is not None:
        return
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json(stage_dir / IN_PROGRESS_FILE, {"stage": stage, "fingerprint": ""})


def finish(stage_dir: Path, stage_fingerprint: str, outputs: list[str], summary: dict[str, Any], stage: Optional[str] = None) -> None:
    stage_dir = Path(stage_dir)
    record = {"fingerprint": stage_fingerprint, "outputs": outputs, "files": _output_files(stage_dir, outputs), "summary": summary}
    if stage is not None:
        record = {"stage": stage, **record}
    write_json(stage_dir / DONE_FILE, record)
    (stage_dir / IN_PROGRESS_FILE).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------
# One run per workdir

LOCK_FILE = ".azdistill.lock"


@contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """Hold the workdir for this process: a second azdistill on the same workdir gets a one-line UserError naming
    this one. Taken before anything is written (the MLflow store included); the system frees it when the process
    ends, however it ends. Under a launcher (torchrun) only rank 0 takes it: its peers are part of the same run."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"workdir {workdir} is a file, not a folder: set workdir to a folder")
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    handle = path.open("a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _read_holder(handle.read())
            raise UserError(
                f"another azdistill is using the workdir {workdir} ({holder}); wait for it to finish, or give this "
                "run another workdir (--set workdir=...)"
            ) from None
        handle.seek(0)
        handle.truncate()
        from azdistill.secrets import redact

        command = redact(" ".join(["azdistill", *sys.argv[1:]]))[:300]  # another user of the workdir reads it
        handle.write(json.dumps({"pid": os.getpid(), "command": command, "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        handle.flush()
        yield
    finally:
        if created and [entry.name for entry in workdir.iterdir()] == [LOCK_FILE]:
            # The command stopped before writing anything (e.g. on bad input): leave no trace of it.
            path.unlink(missing_ok=True)
            workdir.rmdir()
        handle.close()


def _read_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']}, `{holder['command']}`, since {holder['since']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not said which"


def saved_under_key(cached: Path, key: str) -> Optional[dict]:
    """What a stage saved in `cached` (a model's answers, a judge's verdicts) if it was saved under `key`; None if
    nothing is there, a file cut short by a kill, or one saved under another key (asked again)."""
    if not cached.is_file():
        return None
    try:
        previous = json.loads(cached.read_text())
    except ValueError:
        return None
    return previous if previous.get("key") == key else None
