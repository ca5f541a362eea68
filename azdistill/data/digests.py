"""Digests that identify inputs: a file's content, a model folder, the settings a stage's result depends on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


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
