"""Progress for long work: a bar on a terminal, plain log lines when output goes to a file or CI."""

from __future__ import annotations

import logging
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
