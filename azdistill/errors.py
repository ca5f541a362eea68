"""The one exception type that reaches users as a one-line message and exit status 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (config, data, arguments), reported without a traceback.

    The message must say where the problem is (file, line, key), what was given and what is allowed.
    """

    exit_code = 2


class StageFailed(Exception):
    """A stage ran but its result is unusable (e.g. too few teacher answers passed the checks)."""

    exit_code = 1
