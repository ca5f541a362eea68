"""What a user sees while work runs: readable log lines on stderr, and progress for long work (a bar on a terminal,
plain log lines when output goes to a file or CI)."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Optional

log = logging.getLogger("azdistill")


class Progress:
    """Counts units of work (records, steps, tokens). Use as a context manager and call `update(n)`."""

    def __init__(self, total: Optional[int], description: str, unit: str = "it", log_every_s: float = 15.0):
        self.total, self.description, self.unit = total, description, unit
        self.count = 0
        self._started = time.monotonic()
        self._last_log = self._started
        self._log_every_s = log_every_s
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, **postfix: object) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            return
        now = time.monotonic()
        finished = self.total is not None and self.count >= self.total
        if now - self._last_log >= self._log_every_s or finished:
            self._last_log = now
            self._log_line(postfix)

    def _log_line(self, postfix: dict) -> None:
        elapsed = time.monotonic() - self._started
        rate = self.count / elapsed if elapsed > 0 else 0.0
        of_total = f"/{self.total}" if self.total is not None else ""
        extra = "".join(f" {key}={value}" for key, value in postfix.items())
        log.info("%s: %d%s %s (%.1f %s/s)%s", self.description, self.count, of_total, self.unit, rate, self.unit, extra)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def configure_logging(verbose: bool = False) -> None:
    """Readable progress lines on stderr; third-party chatter kept to warnings."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # transformers resets its logger to TRANSFORMERS_VERBOSITY when it is first imported, and its progress bars
    # follow HF_HUB_DISABLE_PROGRESS_BARS: set through the environment, so that no command imports transformers
    # (seconds on a small machine) before it needs a model.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    root = logging.getLogger()
    if not any(getattr(handler, "_azdistill", False) for handler in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        handler._azdistill = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("azdistill").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("transformers", "mlflow", "alembic", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    transformers = sys.modules.get("transformers")
    if transformers is not None:  # imported already (a caller's, in the same process): the environment is read
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
