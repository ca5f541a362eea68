"""What an answer says: the one label a free-form answer names, and a math answer's final number.

Pure functions of strings, below every part that reads answers: the teachers (self-consistency votes on them), the
synthesis checks and the evaluation metrics.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

# Spaces, hyphens and underscores inside a label are interchangeable, so "not_entailment" (as GLUE
# spells it) is found in "not entailment" and "not-entailment".
_LABEL_SEPARATOR = r"[\s_\-]+"
# A hyphen counts as part of a word at a label's edges: "non-negative" must not name "negative".
_WORD_BEFORE = r"(?<![\w\-])"
_WORD_AFTER = r"(?![\w\-])"

_ANSWER_MARKER = re.compile(r"answer\s*:", re.IGNORECASE)
# A minus sign only makes a number negative when it is not a subtraction ("10-3", "(4)-1"); the
# thousands-separated form comes first so "1,250" is one number rather than 1 and 250.
_NUMBER = re.compile(
    r"(?P<sign>(?<![\w)\]])[-\u2212])?"
    r"(?P<digits>\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)


def _label_pattern(label: str) -> re.Pattern[str] | None:
    parts = [re.escape(part) for part in re.split(_LABEL_SEPARATOR, label.strip()) if part]
    if not parts:
        return None
    return re.compile(_WORD_BEFORE + _LABEL_SEPARATOR.join(parts) + _WORD_AFTER, re.IGNORECASE)


def parse_label(text: str, labels: Sequence[str]) -> str | None:
    """Return the one label that a free-form answer names, spelled as in `labels`, else None.

    Matching is case-insensitive and on whole words, so "Answer: Positive!" names "positive" but
    "negatively" does not name "negative". A longer label wins over a shorter one it contains: with
    labels "entailment" and "not entailment", the text "not entailment" names only the latter. An
    answer that names no label, or several different ones, returns None so that hedged answers never
    count as correct.
    """
    # Longest labels claim their spans first; a shorter label found inside a claimed span is part of
    # the longer one, not a second answer.
    order = sorted(range(len(labels)), key=lambda i: len(labels[i].strip()), reverse=True)
    claimed: list[tuple[int, int]] = []
    named: set[int] = set()
    for index in order:
        pattern = _label_pattern(labels[index])
        if pattern is None:
            continue
        for match in pattern.finditer(text):
            start, end = match.span()
            if any(start < c_end and c_start < end for c_start, c_end in claimed):
                continue
            claimed.append((start, end))
            named.add(index)
    distinct = {labels[i].strip().lower() for i in named}
    if len(distinct) != 1:
        return None
    return labels[min(named)]


def _to_float(match: re.Match[str]) -> float:
    value = float(match.group("digits").replace(",", ""))
    return -value if match.group("sign") else value


def parse_number(text: str) -> float | None:
    """Return the final numeric answer of a math response, or None if it contains no number.

    The first number after the last "Answer:" (any case) is preferred; without one, the last number
    in the text is used, so "3 + 4 = 7 apples." gives 7. Negative numbers, decimals, thousands
    separators ("1,250") and surrounding units or currency signs ("$12.50") are handled. A number too
    large to represent as a finite float counts as no number.
    """
    markers = list(_ANSWER_MARKER.finditer(text))
    match = _NUMBER.search(text, markers[-1].end()) if markers else None
    if match is None:
        numbers = list(_NUMBER.finditer(text))
        if not numbers:
            return None
        match = numbers[-1]
    value = _to_float(match)
    return value if math.isfinite(value) else None


def format_number(value: float) -> str:
    """A number as answers are compared: "7" for 7.0, the shortest exact form otherwise."""
    # Integers are written without ".0" so "7", "7.0" and "7.00" all give the same key.
    if value.is_integer():
        return str(int(value))
    return repr(value)
