"""Writing files so that nothing is ever half-written (atomic replace), and append-only journals that
survive a kill."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator


def iter_jsonl(path: Path) -> Iterator[dict]:
    """Yield the objects of a JSONL file written by this project (a torn last line is skipped)."""
    with Path(path).open(encoding="utf-8") as handle:
        for raw in handle:
            if not raw.endswith("\n"):
                break  # an interrupted append: the line is incomplete
            if raw.strip():
                yield json.loads(raw)


@contextmanager
def atomic_writer(path: Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside `path` and move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    # mkstemp creates files readable by the owner only; outputs should get the usual permissions.
    os.chmod(temporary, 0o666 & ~current_umask())
    try:
        with os.fdopen(descriptor, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Write rows atomically; returns how many were written."""
    count = 0
    with atomic_writer(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_json(path: Path, data: Any) -> None:
    with atomic_writer(path) as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False, default=str)
        handle.write("\n")


class AppendLog:
    """An append-only JSONL journal flushed per row, so an interrupted stage can continue from it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.path)
        self._handle = self.path.open("a", encoding="utf-8")

    def append(self, row: dict) -> None:
        self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "AppendLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drop_torn_tail(path: Path) -> None:
    """Cut an incomplete last line left by a killed writer, so the next append starts on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with path.open("r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def read_journal(path: Path) -> list[dict]:
    """Rows of a journal written by `AppendLog`; a missing journal is empty."""
    path = Path(path)
    if not path.exists():
        return []
    return list(iter_jsonl(path))
