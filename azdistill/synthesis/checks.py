"""Whether a teacher answer can be used as training data: empty, cut off, filtered, unparseable label,
number or chain-of-thought JSON."""

from __future__ import annotations

from typing import Optional, Sequence

from azdistill.config.schema import DistillConfig
from azdistill.evaluation.metrics import parse_label, parse_number
from azdistill.models.generation import Completion
from azdistill.synthesis.prompts import training_target


def check_completion(completion: Completion) -> Optional[str]:
    """Why the answer as the teacher ended it is unusable (refused, filtered, empty, cut off), or None."""
    if completion.finish_reason.startswith("refused: "):
        return completion.finish_reason[len("refused: ") :]
    if completion.finish_reason == "content_filter":
        return "answer removed by the teacher's content filter (finish_reason=content_filter)"
    if not completion.text.strip():
        return "empty answer"
    if completion.finish_reason != "stop":
        return f"answer cut off (finish_reason={completion.finish_reason}); raise synthesis.max_new_tokens"
    return None


def check_target(text: str, task_type: str, labels: Optional[Sequence[str]]) -> Optional[str]:
    """Why an answer's text is unusable for the task (nli: not exactly one label; math: no number), or None."""
    if task_type == "nli" and parse_label(text, labels or []) is None:
        return f"answer names none or several of the labels {list(labels or [])}"
    if task_type == "math" and parse_number(text) is None:
        return "answer has no number"
    return None


def judge(completion: Completion, config: DistillConfig) -> tuple[Optional[str], Optional[str]]:
    """`(training target, None)` for a usable answer, `(None, reason)` for one that is not."""
    problem = check_completion(completion)
    if problem:
        return None, problem
    synthesis = config.synthesis
    target, problem = training_target(
        completion.text, synthesis.prompt_strategy, config.task.type, config.task.labels,
        synthesis.keep_rationale, synthesis.max_summary_words, completion.reasoning,
    )
    if problem:
        return None, problem
    if synthesis.prompt_strategy == "plain":
        # The answer is checked, not a reasoning trace put in front of it (which may name every label on its way).
        problem = check_target(completion.text, config.task.type, config.task.labels)
        if problem:
            return None, problem
    return target, None
