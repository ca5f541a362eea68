"""The LLM judge's side of the report: its pairwise prompt, reading its verdicts, both orders combined, the summary.

Each held-out item is judged twice, once with the student's answer in position A and the teacher's in B, once
swapped. The student wins an item only when both orders prefer it and loses only when both prefer the teacher;
anything else (a tie verdict, or verdicts that follow the position rather than the answer) is a tie, so a judge that
always prefers the first answer it reads scores all ties instead of a false win or loss.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from azdistill.data.records import Message

# What the judge may answer: the label scoring of a local teacher and structured answers score exactly these.
VERDICTS = ("A", "B", "tie")
OUTCOMES = ("win", "tie", "loss", "no_verdict")

# An MT-Bench style pairwise prompt, asking for the verdict alone so that it can be constrained to the three labels.
JUDGE_PROMPT = """Please act as an impartial judge and compare two AI assistants' answers to the request below.
Choose the answer that follows the request better and is more helpful, accurate and relevant. Do not let the
order in which the answers are shown or their length influence you. Reply with A if assistant A's answer is
better, B if assistant B's answer is better, or tie if they are equally good; reply with that one word only.

[Request]
{question}

[Assistant A's answer]
{answer_a}
[End of assistant A's answer]

[Assistant B's answer]
{answer_b}
[End of assistant B's answer]"""

# Verdict forms, tried in turn: MT-Bench's [[A]], a reply that starts with its verdict, then a verdict named in prose.
_BRACKETED = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
_LEADING = re.compile(
    r"^[\s\"'*_`(\[]*(?i:(?:final )?(?:verdict|answer)\s*:)?\s*[\"'*_`(\[]*(A|B|(?i:tie))"
    r"(?=\s*$|\s*[.,:;!)\]*\"'\n]|\s+(?:is|wins)\b)"
)
# In prose a capital A is an article as often as a verdict ("A tie", "A better answer..."): it counts only when named
# as an assistant's, answer's or response's, or followed by "is" or "wins".
_NAMED = re.compile(
    r"\b(?:assistant|answer|response)\s+(A|B)\b|\b(tie)\b|(?<![\w'])(B)(?![\w'])|(?<![\w'])(A)(?=\s+(?:is|wins)\b)",
    re.IGNORECASE,
)


def render_question(messages: Sequence[Message]) -> str:
    """The request as the judge reads it: a lone user turn as it is, else every turn with its role."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{message['role'].capitalize()}: {message['content']}" for message in messages)


def judge_messages(messages: Sequence[Message], answer_a: str, answer_b: str) -> list[Message]:
    """The conversation sent to the judge for one order of one item: a single user turn holding the whole prompt."""
    prompt = JUDGE_PROMPT.format(question=render_question(messages), answer_a=answer_a, answer_b=answer_b)
    return [{"role": "user", "content": prompt}]


def pairwise_prompts(
    conversations: Sequence[Sequence[Message]], student_answers: Sequence[str], teacher_answers: Sequence[str]
) -> list[list[Message]]:
    """Two judge prompts per item, in item order: the student's answer as A first, then the teacher's as A."""
    prompts = []
    for messages, student, teacher in zip(conversations, student_answers, teacher_answers):
        prompts.append(judge_messages(messages, student, teacher))
        prompts.append(judge_messages(messages, teacher, student))
    return prompts


def parse_verdict(text: Optional[str]) -> Optional[str]:
    """The verdict a judge's answer names ("A", "B" or "tie"), or None when it names none (MT-Bench's [[C]] is a tie)."""
    if not text:
        return None
    for pattern in (_BRACKETED, _LEADING):
        match = pattern.search(text)
        if match:
            return _canonical(match.group(1))
    match = _NAMED.search(text)
    if match:
        return _canonical(next(group for group in match.groups() if group))
    return None


def _canonical(named: str) -> str:
    """A verdict as `VERDICTS` spells it."""
    upper = named.upper()
    return "tie" if upper in ("TIE", "C") else upper


def preferred(verdict: Optional[str], student_position: str) -> Optional[str]:
    """Whose answer a verdict prefers ("student", "teacher" or "tie") given the student's position; None without one."""
    if verdict is None or verdict == "tie":
        return verdict
    return "student" if verdict == student_position else "teacher"


def outcome(student_first: Optional[str], teacher_first: Optional[str]) -> str:
    """One item's result for the student from its two verdicts: win or loss only when both orders agree on it."""
    preferences = {preferred(student_first, "A"), preferred(teacher_first, "B")}
    if None in preferences:
        return "no_verdict"
    if preferences == {"student"}:
        return "win"
    if preferences == {"teacher"}:
        return "loss"
    return "tie"


def summarize(verdict_pairs: Sequence[tuple[Optional[str], Optional[str]]], judge: str, method: str) -> dict:
    """The report's `judge` entry: counts and rates of wins, ties and losses, consistency, the judge and its prompt.

    `verdict_pairs` holds each item's (student-first, teacher-first) verdicts. Rates are shares of the items with both
    verdicts; `consistent` is the share of those whose two verdicts prefer the same answer (or both say tie), which is
    low for a judge swayed by position.
    """
    outcomes = [outcome(first, second) for first, second in verdict_pairs]
    counts = {name: outcomes.count(name) for name in OUTCOMES}
    judged = len(outcomes) - counts["no_verdict"]
    consistent = sum(preferred(first, "A") == preferred(second, "B") for first, second in verdict_pairs
                     if first is not None and second is not None)
    return {
        "judge": judge,
        "method": method,
        "items": len(outcomes),
        "judged": judged,
        "wins": counts["win"],
        "ties": counts["tie"],
        "losses": counts["loss"],
        "no_verdict": counts["no_verdict"],
        "win_rate": counts["win"] / judged if judged else None,
        "tie_rate": counts["tie"] / judged if judged else None,
        "loss_rate": counts["loss"] / judged if judged else None,
        "consistent": consistent / judged if judged else None,
        "prompt": JUDGE_PROMPT,
    }


def judge_metrics(summary: Optional[dict]) -> dict[str, float]:
    """The judge's MLflow metrics: `judge_win_rate`, `judge_tie_rate`, `judge_loss_rate` (none when nothing was judged)."""
    if not summary:
        return {}
    return {f"judge_{name}": float(summary[name]) for name in ("win_rate", "tie_rate", "loss_rate")
            if summary.get(name) is not None}


def render_judge_section(summary: Optional[dict]) -> list[str]:
    """report.md's judge section: the student's wins, ties and losses against the teacher, and the prompt the judge read."""
    if not summary:
        return []
    out = ["## Judged by an LLM: student vs teacher", ""]
    if not summary["judged"]:
        out += [f"The judge ({summary['judge']}) gave no usable verdict on any of the {summary['items']} items.", ""]
    else:
        out += [
            "| Judge | Items | Student wins | Ties | Student losses | Consistent across orders |",
            "|---|---:|---:|---:|---:|---:|",
            f"| {summary['judge']} | {summary['judged']} | {_share(summary, 'wins', 'win_rate')} | "
            f"{_share(summary, 'ties', 'tie_rate')} | {_share(summary, 'losses', 'loss_rate')} | "
            f"{summary['consistent']:.1%} |",
            "",
        ]
    notes = (
        f"Each item was judged twice, with the student's answer first and then the teacher's ({summary['method']}). "
        "The student wins an item when both orders prefer its answer and loses when both prefer the teacher's; "
        "a tie verdict or two verdicts that follow the position count as a tie."
    )
    if summary["no_verdict"]:
        notes += f" {summary['no_verdict']} of {summary['items']} items got an answer naming no verdict and are left out."
    out += [notes, "", "<details><summary>The judge's prompt</summary>", "", "```text", summary["prompt"], "```", "",
            "</details>", ""]
    return out


def _share(summary: dict, count: str, rate: str) -> str:
    """A count with its share of the judged items: "7 (70.0%)"."""
    return f"{summary[count]} ({summary[rate]:.1%})"
