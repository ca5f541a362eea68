"""Stage bookkeeping: skip a stage whose inputs and settings are unchanged, continue one that was interrupted.

A stage folder holds `stage.json` once the stage finished (its fingerprint, outputs and summary) and
`inprogress.json` while it runs. Partial work written under a different fingerprint is discarded, because
it was produced by other inputs or settings.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from azdistill.data import write_json

DONE_FILE = "stage.json"
IN_PROGRESS_FILE = "inprogress.json"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_digest(path: Path) -> str:
    """Identity of a model folder: each file's name, size and modification time, and the content of its JSON
    files. Hashing gigabytes of weights on every run would cost more than the stages it lets us skip; a model
    written again gets a new modification time, so a retrained model never passes for the old one."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if not file.is_file() or any(part.startswith("checkpoint-") for part in relative.parts[:-1]):
            continue
        status = file.stat()
        digest.update(f"{relative}:{status.st_size}:{status.st_mtime_ns}".encode())
        if file.suffix == ".json":
            digest.update(file.read_bytes())
    return digest.hexdigest()


def fingerprint(parts: dict[str, Any]) -> str:
    """A stable hash of everything a stage's result depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_done(stage_dir: Path, stage_fingerprint: str) -> bool:
    done = Path(stage_dir) / DONE_FILE
    if not done.is_file():
        return False
    manifest = json.loads(done.read_text())
    if manifest.get("fingerprint") != stage_fingerprint:
        return False
    return all((Path(stage_dir) / output).exists() for output in manifest.get("outputs", []))


def read_manifest(stage_dir: Path) -> dict:
    return json.loads((Path(stage_dir) / DONE_FILE).read_text())


def begin(stage_dir: Path, stage_fingerprint: str, force: bool = False) -> bool:
    """Prepare a stage folder; returns True when earlier partial work of the same fingerprint can be continued."""
    stage_dir = Path(stage_dir)
    marker = stage_dir / IN_PROGRESS_FILE
    resumable = False
    if stage_dir.exists():
        previous = json.loads(marker.read_text()).get("fingerprint") if marker.is_file() else None
        if force or previous != stage_fingerprint:
            shutil.rmtree(stage_dir)
        else:
            resumable = True
            (stage_dir / DONE_FILE).unlink(missing_ok=True)
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"fingerprint": stage_fingerprint})
    return resumable


def finish(stage_dir: Path, stage_fingerprint: str, outputs: list[str], summary: dict[str, Any]) -> None:
    write_json(Path(stage_dir) / DONE_FILE, {"fingerprint": stage_fingerprint, "outputs": outputs, "summary": summary})
    (Path(stage_dir) / IN_PROGRESS_FILE).unlink(missing_ok=True)
