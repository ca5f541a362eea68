"""The two exceptions that reach users as one line and an exit status, never a traceback: `UserError` (bad input,
exit 2) and `StageFailed` (a stage ran but its result is unusable, exit 1)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (config, data, arguments), reported without a traceback.

    The message must say where the problem is (file, line, key), what was given and what is allowed.
    """

    exit_code = 2


class StageFailed(Exception):
    """A stage ran but its result is unusable (e.g. too few teacher answers passed the checks)."""

    exit_code = 1
