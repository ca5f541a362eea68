"""Prompt strategies: what the teacher is asked, and how its answer becomes the student's training target.

- plain: the record's own prompt; the answer is the target. With `keep_rationale` and a hosted reasoning model,
  the model's own reasoning trace followed by `Answer: ...` (the same distilling-step-by-step target as below).
- chain_of_thought (nli, qa, math): the teacher explains its reasoning, then answers, as one JSON object
  `{"reason": ..., "answer_choice": ...}` (math: `{"reason": ..., "answer": <number>}`), as Azure ML's
  distillation asks. The target is the answer alone, or with `keep_rationale` the reasoning followed by
  `Answer: ...` ("distilling step by step": the student learns the rationale too).
- chain_of_density (summarization): the teacher writes a first summary and then ever denser ones, as a JSON
  list of `{"Missing_Entities": ..., "Denser_Summary": ...}`; the last summary is the target.

The student always trains on the record's original system message: the strategy's instructions are for the
teacher only.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional, Sequence

from azdistill.errors import UserError
from azdistill.evaluation.metrics import parse_label, parse_number

STRATEGY_TASKS = {
    "chain_of_thought": ("nli", "qa", "math"),
    "chain_of_density": ("summarization",),
}


def check_strategy(strategy: str, task_type: str) -> None:
    """A strategy that does not fit the task is a config mistake."""
    allowed = STRATEGY_TASKS.get(strategy)
    if allowed is not None and task_type not in allowed:
        raise UserError(
            f"synthesis.prompt_strategy {strategy} works with task types {', '.join(allowed)}, not {task_type}; "
            f"use prompt_strategy: plain"
        )


def check_rationale(keep_rationale: bool, strategy: str, hosted: bool) -> None:
    """keep_rationale needs a rationale to keep: the chain-of-thought JSON's reason, or a hosted teacher's reasoning trace."""
    if keep_rationale and not (strategy == "chain_of_thought" or (strategy == "plain" and hosted)):
        where = "a local or logged teacher" if strategy == "plain" else f"prompt_strategy {strategy}"
        raise UserError(
            f"synthesis.keep_rationale needs a rationale to keep, and {where} gives none: use prompt_strategy "
            f"chain_of_thought (its 'reason' is kept), or prompt_strategy plain with a hosted reasoning teacher (its "
            f"reasoning trace is kept), or set synthesis.keep_rationale: false"
        )


def teacher_system_prompt(system: str, strategy: str, task_type: str, labels: Optional[Sequence[str]], iterations: int = 4, max_words: int = 80) -> str:
    """The system message the teacher sees: the record's own, plus the strategy's answer format."""
    if strategy == "chain_of_thought":
        if task_type == "math":
            fmt = 'a JSON object {"reason": "<your step-by-step reasoning>", "answer": <the final number>}'
        elif task_type == "nli":
            choices = ", ".join(f'"{label}"' for label in labels or [])
            fmt = f'a JSON object {{"reason": "<your step-by-step reasoning>", "answer_choice": <one of {choices}>}}'
        else:
            fmt = 'a JSON object {"reason": "<your step-by-step reasoning>", "answer_choice": "<your final answer>"}'
        return (
            f"{system}\n\nThink step by step before answering. Reply with only {fmt}, "
            "with no text before or after it."
        )
    if strategy == "chain_of_density":
        return (
            f"{system}\n\nWrite {iterations} summaries of the text, each denser than the last. The first has at most "
            f"{max_words} words and names a few key entities. Each next one finds 1-3 informative entities the previous "
            "summary missed and fits them in without getting longer: fuse, compress and drop filler, never drop an "
            f"entity already named. Reply with only a JSON list of {iterations} objects with the keys "
            '"Missing_Entities" and "Denser_Summary", in order.'
        )
    return system


def _json_payload(text: str) -> Any:
    """The JSON in an answer, tolerating a ```json fence or prose around a single object or list."""
    stripped = text.strip()
    fence = re.match(r"^```(?:json)?\s*(.*?)\s*```$", stripped, re.S)
    if fence:
        stripped = fence.group(1)
    try:
        return json.loads(stripped)
    except ValueError:
        pass
    for opener, closer in (("{", "}"), ("[", "]")):
        start, end = stripped.find(opener), stripped.rfind(closer)
        if 0 <= start < end:
            try:
                return json.loads(stripped[start : end + 1])
            except ValueError:
                continue
    raise ValueError("no JSON")


def with_rationale(rationale: str, answer: str) -> str:
    """The distilling-step-by-step target: the rationale, then the answer."""
    return f"{rationale}\n\nAnswer: {answer}"


def training_target(
    text: str, strategy: str, task_type: str, labels: Optional[Sequence[str]], keep_rationale: bool = False, max_words: int = 80,
    reasoning: Optional[str] = None,
) -> tuple[Optional[str], Optional[str]]:
    """`(target, None)` for a usable answer, `(None, why)` for one that is not.

    `reasoning` is a reasoning model's trace beside the answer: with plain and `keep_rationale` it is the rationale
    (an answer without one is trained alone); chain_of_thought keeps the JSON's reason instead.
    """
    if strategy == "chain_of_thought":
        try:
            data = _json_payload(text)
        except ValueError:
            return None, "chain-of-thought answer is not the JSON asked for"
        key = "answer" if task_type == "math" else "answer_choice"
        if not isinstance(data, dict) or key not in data:
            return None, f"chain-of-thought JSON has no '{key}'"
        answer = data[key]
        if isinstance(answer, (dict, list)) or answer is None or not str(answer).strip():
            return None, f"chain-of-thought '{key}' is empty or not a single value"
        answer_text = str(answer).strip()
        if task_type == "nli":
            label = parse_label(answer_text, labels or [])
            if label is None:
                return None, f"chain-of-thought answer_choice names none or several of the labels {list(labels or [])}"
            answer_text = label
        if task_type == "math":
            number = parse_number(answer_text)
            if number is None:
                return None, "chain-of-thought 'answer' is not a number"
            answer_text = str(int(number)) if float(number).is_integer() else repr(float(number))
        reason = str(data.get("reason") or "").strip()
        if keep_rationale:
            if not reason:
                return None, "chain-of-thought JSON has no 'reason' to keep"
            return with_rationale(reason, answer_text), None
        return answer_text, None
    if strategy == "chain_of_density":
        try:
            data = _json_payload(text)
        except ValueError:
            return None, "chain-of-density answer is not the JSON list asked for"
        if isinstance(data, dict):
            data = next((value for value in data.values() if isinstance(value, list)), [data])
        summaries = [
            str(item.get("Denser_Summary") or item.get("denser_summary") or "").strip()
            for item in data if isinstance(item, dict)
        ] if isinstance(data, list) else []
        summaries = [summary for summary in summaries if summary]
        if not summaries:
            return None, "chain-of-density JSON has no Denser_Summary"
        last = summaries[-1]
        if len(last.split()) > max_words * 1.5:
            return None, f"chain-of-density summary has {len(last.split())} words (asked for at most {max_words})"
        return last, None
    if keep_rationale and reasoning and reasoning.strip():
        return with_rationale(reasoning.strip(), text), None
    return text, None
