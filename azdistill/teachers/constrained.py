"""Hosted teachers made to commit: answers restricted to the task's labels (a structured output whose label is one of
them, or the top log-probabilities over the labels' first tokens) and self-consistency votes over sampled answers.

`CommittingTeacher` is the part of the hosted client that asks for and reads such answers; the client itself (one
request through the rate limiter, budget and retries: `_ask`) is `hosted.EndpointTeacher`. The functions below it
are pure: request settings, and what an answer's text and log-probabilities say.

Votes: every sampled answer that names a label (nli) or has a number (math) casts one vote; the winner is the answer
with the most votes, and on a tie the one given first (in the order the endpoint returned its choices). Vote shares
are over the votes cast, so they sum to one; the winner's share is the answer's `confidence`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

from azdistill.config.schema import label_method
from azdistill.data.answers import format_number, parse_label, parse_number
from azdistill.data.records import Message
from azdistill.models.generation import Completion
from azdistill.teachers.base import EndpointCompletion, RecordRejected, Teacher

log = logging.getLogger(__name__)

# The most top log-probabilities OpenAI and vLLM (its default max_logprobs) return per position.
LABEL_TOP_LOGPROBS = 20
# A label answer in logprobs mode needs its first token only; a few more let the text name the label when the
# first position holds none (an answer that starts "The answer is ...").
LOGPROBS_MAX_TOKENS = 8
# Where a structured answer's label value starts: after `"label": "`.
_LABEL_VALUE = re.compile(r'"label"\s*:\s*"')
_SEPARATORS = re.compile(r"[\s_\-]+")
_TOKEN_EDGES = " \t\r\n\"'`:.,;!?*()[]{}"


class StructuredOutputRefused(Exception):
    """The endpoint refused `response_format` json_schema (HTTP 400): it has no structured outputs."""


@dataclass
class VotedCompletion(EndpointCompletion):
    """A self-consistent answer: the majority of several sampled answers, with its vote share and every vote."""

    confidence: Optional[float] = None
    votes: Optional[dict] = None


class CommittingTeacher(Teacher):
    """Label-constrained answers (`choose`, `choose_one`) and self-consistency votes for a hosted teacher.

    Set by the client: `label_mode` ("json_schema" or "logprobs"; the former falls back to the latter for the rest of
    the run when the endpoint refuses structured outputs), `self_consistency` (answers sampled per prompt),
    `vote_task` and `vote_labels` (what a free answer's vote is read as: "nli" labels or "math" numbers; None: no vote).
    """

    label_mode: str = "json_schema"
    self_consistency: int = 1
    vote_task: Optional[str] = None
    vote_labels: Sequence[str] = ()
    url: str
    max_new_tokens: int
    body: dict

    def _ask(self, messages, stop=None, extra: Optional[dict] = None, choices: int = 1) -> list[EndpointCompletion]:
        raise NotImplementedError

    def complete(self, messages: Sequence[Message], stop: Optional[threading.Event] = None) -> EndpointCompletion:
        """Answer one conversation, retrying what can be retried; with self-consistency, the majority answer of several.
        Raises RecordRejected, UserError, BudgetExceeded or Stopped."""
        if self.self_consistency > 1 and self.vote_task:
            return self._free_vote(messages, stop)
        return self._ask(messages, stop)[0]

    def choose(self, conversations: Sequence[list[Message]], labels: Sequence[str]) -> list[Completion]:
        """`choose_one` for a batch, concurrently and in order; a refused record gets an empty answer naming why."""
        def one(messages):
            try:
                return self.choose_one(messages, labels)
            except RecordRejected as error:
                return EndpointCompletion(text="", finish_reason=f"refused: {error}", prompt_tokens=0, completion_tokens=0)

        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(conversations)))) as pool:
            return list(pool.map(one, conversations))

    def choose_one(self, messages: Sequence[Message], labels: Sequence[str],
                   stop: Optional[threading.Event] = None) -> Completion:
        """The teacher's label for one conversation: a structured output restricted to `labels`, or (endpoints without
        structured outputs) the label its top log-probabilities favour. An answer naming no label comes back refused
        (`finish_reason` "refused: <why>"), so the reject ledger keeps it with the reason."""
        if self.label_mode == "json_schema":
            try:
                return self._choose_structured(messages, labels, stop)
            except StructuredOutputRefused as error:
                self._fall_back_to_logprobs(str(error))
        return self._choose_by_logprobs(messages, labels, stop)

    # -- the two constraints ---------------------------------------------------------------------------

    def _choose_structured(self, messages, labels: Sequence[str], stop) -> Completion:
        answers = self._sample(messages, stop, {"response_format": structured_output_format(labels)})
        readings = []
        for answer in answers:
            label, problem = read_structured_label(answer.text, labels, answer.finish_reason)
            if problem and problem.startswith("structured answer is not a JSON object"):
                # An endpoint that takes response_format without honouring it (transformers serve does) answers free
                # text: read its label from the text as a free answer is read, and say so once.
                self._warn_schema_ignored(answer.text)
                free = parse_label(answer.text, labels)
                problem = None if free is not None else (
                    f"the endpoint ignored the structured-output request and its free answer names none or several of "
                    f"the labels {list(labels)}: {answer.text[:80]!r}")
                readings.append((free, one_hot(free, labels) if free is not None else None, problem, None))
                continue
            probs = None
            if label is not None:
                offset = structured_value_offset(answer.text)
                probs = label_probs_from_logprobs(answer.logprobs, labels, offset) if offset is not None else None
                probs = probs or one_hot(label, labels)
            readings.append((label, probs, problem, None))
        return self._committed(answers, readings, labels)

    def _choose_by_logprobs(self, messages, labels: Sequence[str], stop) -> Completion:
        extra: dict = {"logprobs": True, "top_logprobs": LABEL_TOP_LOGPROBS}
        field = next((name for name in ("max_tokens", "max_completion_tokens") if name in self.body), "max_tokens")
        if field == "max_tokens":  # a reasoning model (max_completion_tokens) needs its whole budget to think first
            extra[field] = min(self.max_new_tokens, LOGPROBS_MAX_TOKENS)
        answers = self._sample(messages, stop, extra)
        readings = []
        for answer in answers:
            free = parse_label(answer.text, labels) if answer.finish_reason != "content_filter" else None
            probs = label_probs_from_logprobs(answer.logprobs, labels, 0)
            if probs:
                label = max(labels, key=lambda name: probs[name])  # the first-named label on a tie (max keeps the first)
                readings.append((label, probs, None, "logprobs" if free is None else None))
            elif free is not None:
                readings.append((free, one_hot(free, labels), None, None))
            elif answer.finish_reason == "content_filter" or not answer.text.strip():
                readings.append((None, None, read_structured_label(answer.text, labels, answer.finish_reason)[1], None))
            else:
                where = "its top tokens" if answer.logprobs else "its text (the endpoint returned no log-probabilities)"
                readings.append((None, None, f"no allowed label {list(labels)} in {where}", None))
        return self._committed(answers, readings, labels)

    def _warn_schema_ignored(self, text: str) -> None:
        """One warning per run that the endpoint answers structured-output requests with free text."""
        with self._mode_lock:
            if getattr(self, "_schema_ignored", False):
                return
            self._schema_ignored = True
        log.warning(
            "teacher endpoint %s ignores structured outputs (it answered %r): labels are read from its free answers, "
            "and answers naming no single label are rejected", self.url.split("?")[0], text[:60],
        )

    def _fall_back_to_logprobs(self, detail: str) -> None:
        """Switch this teacher to logprobs mode for the rest of the run, with one warning however many threads see it."""
        with self._mode_lock:
            if self.label_mode == "logprobs":
                return
            self.label_mode = "logprobs"
        log.warning(
            "teacher endpoint %s has no structured outputs (%s): its labels come from the top log-probabilities of a "
            "short answer for the rest of this run", self.url.split("?")[0], detail[:200],
        )

    # -- sampling and voting ---------------------------------------------------------------------------

    def _sample(self, messages, stop, extra: dict) -> list[EndpointCompletion]:
        """`self_consistency` answers: asked as `n` choices in one request, and again for the rest where the endpoint
        returns fewer; usage of every request is summed on the first answer."""
        wanted = max(1, self.self_consistency)
        answers: list[EndpointCompletion] = []
        while len(answers) < wanted:
            missing = wanted - len(answers)
            got = self._ask(messages, stop, dict(extra, n=missing) if missing > 1 else extra, choices=missing)
            if answers:
                answers[0].prompt_tokens += got[0].prompt_tokens
                answers[0].completion_tokens += got[0].completion_tokens
                got[0].prompt_tokens = got[0].completion_tokens = 0
            answers += got[:missing]
        return answers

    def _committed(self, answers: list[EndpointCompletion], readings: list[tuple], labels: Sequence[str]) -> Completion:
        """One label answer from the readings `(label, probs, problem, rescued_by)` of the sampled answers."""
        first = answers[0]
        tokens = {"prompt_tokens": first.prompt_tokens, "completion_tokens": first.completion_tokens}
        outcome = vote([label for label, *_ in readings])
        if outcome is None:
            problem = readings[0][2]
            if len(answers) > 1:
                problem = f"none of the {len(answers)} sampled answers named one of the labels {list(labels)}; first: {problem}"
            return EndpointCompletion(text=first.text, finish_reason=f"refused: {problem}", reasoning=first.reasoning, **tokens)
        winner, shares = outcome
        if len(answers) == 1:
            label, probs, _, rescued_by = readings[0]
            return EndpointCompletion(text=label, finish_reason="stop", reasoning=first.reasoning, label_probs=probs,
                                      rescued_by=rescued_by, **tokens)
        rescued_by = "self-consistency" if readings[0][0] is None else readings[0][3]
        chosen = answers[[label for label, *_ in readings].index(winner)]
        return VotedCompletion(text=winner, finish_reason="stop", reasoning=chosen.reasoning,
                               label_probs={name: shares.get(name, 0.0) for name in labels}, rescued_by=rescued_by,
                               confidence=shares[winner], votes=shares, **tokens)

    def _free_vote(self, messages, stop) -> EndpointCompletion:
        """Self-consistency on free answers: the majority label (nli, whose text is the label) or number (math, the
        full text of the first answer with that number)."""
        answers = self._sample(messages, stop, {})
        keys = [vote_key(self.vote_task, answer, self.vote_labels) for answer in answers]
        outcome = vote(keys)
        first = answers[0]
        tokens = {"prompt_tokens": first.prompt_tokens, "completion_tokens": first.completion_tokens}
        if outcome is None:
            what = "named one of the labels" if self.vote_task == "nli" else "had a number"
            reason = f"none of the {len(answers)} sampled answers {what}"
            return EndpointCompletion(text=first.text, finish_reason=f"refused: {reason}", reasoning=first.reasoning, **tokens)
        winner, shares = outcome
        chosen = answers[keys.index(winner)]
        nli = self.vote_task == "nli"
        return VotedCompletion(
            text=winner if nli else chosen.text, finish_reason="stop", reasoning=chosen.reasoning,
            logprobs=None if nli else chosen.logprobs,
            label_probs={name: shares.get(name, 0.0) for name in self.vote_labels} if nli else None,
            rescued_by="self-consistency" if keys[0] is None else None, confidence=shares[winner], votes=shares, **tokens,
        )


def commitment(config) -> dict:
    """The `CommittingTeacher` settings of a config: its label mode (`synthesis.label_constraint` resolved; json_schema
    when it names none, for the answers `choose` is asked for anyway) and its self-consistency votes."""
    synthesis, task = config.synthesis, config.task
    voting = synthesis.self_consistency > 1 and task.type in ("nli", "math")
    return {
        "label_mode": label_method(config) if label_method(config) in ("json_schema", "logprobs") else "json_schema",
        "self_consistency": synthesis.self_consistency if voting else 1,
        "vote_task": task.type if voting else None,
        "vote_labels": list(task.labels or []),
    }


# -- pure functions ----------------------------------------------------------------------------------------


def structured_output_format(labels: Sequence[str]) -> dict:
    """The `response_format` that restricts an answer to `{"label": <one of labels>}` (OpenAI / Azure OpenAI
    structured outputs; vLLM and llama.cpp's server take the same shape)."""
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": list(labels)}},
        "required": ["label"],
        "additionalProperties": False,
    }
    return {"type": "json_schema", "json_schema": {"name": "label", "strict": True, "schema": schema}}


def refuses_structured_output(status: int, text: str) -> bool:
    """Whether an error answer to a request with `response_format` says the endpoint has no structured outputs."""
    lowered = text.lower()
    return status in (400, 422) and any(word in lowered for word in ("response_format", "json_schema", "structured output"))


def read_structured_label(text: str, labels: Sequence[str], finish_reason: str = "stop") -> tuple[Optional[str], Optional[str]]:
    """`(label, None)` for a structured answer `{"label": ...}` naming one of `labels` (spelled as in `labels`), else
    `(None, why)`."""
    if finish_reason == "content_filter":
        return None, "answer removed by the teacher's content filter (finish_reason=content_filter)"
    if not text.strip():
        return None, "empty answer"
    if finish_reason == "length":  # even where what came is valid JSON, the endpoint says it stopped it early
        return None, "answer cut off (finish_reason=length); raise synthesis.max_new_tokens"
    body = text.strip()
    if body.startswith("```"):  # a fenced block, from endpoints that take the schema as a hint only
        body = body.strip("`").removeprefix("json").strip()
    try:
        value = json.loads(body).get("label")
    except (ValueError, AttributeError):
        return None, f"structured answer is not a JSON object: {text[:80]!r}"
    spelled = {str(label).strip().lower(): label for label in labels}
    if isinstance(value, str) and value.strip().lower() in spelled:
        return spelled[value.strip().lower()], None
    return None, f"structured answer names no allowed label ({value!r}; allowed: {list(labels)})"


def structured_value_offset(text: str) -> Optional[int]:
    """Where the label value starts in a structured answer's text, or None."""
    match = _LABEL_VALUE.search(text)
    return match.end() if match else None


def label_probs_from_logprobs(logprobs: Optional[list], labels: Sequence[str], start: int = 0) -> Optional[dict]:
    """The probability of each label from the top log-probabilities at the first token that starts at or after
    character `start` of the answer (blank tokens skipped): a token counts for the one label it begins
    (case-insensitively, separators and quotes aside), a token that begins several labels for none. Normalised over
    the labels found (the others 0); None when no top token begins a label."""
    position = _token_at(logprobs or [], start)
    if position is None:
        return None
    mass = {label: 0.0 for label in labels}
    for candidate in position.get("top_logprobs") or [{"token": position.get("token"), "logprob": position.get("logprob")}]:
        label = _label_begun(str(candidate.get("token") or ""), labels)
        if label is not None and candidate.get("logprob") is not None:
            mass[label] += math.exp(float(candidate["logprob"]))
    total = sum(mass.values())
    return {label: value / total for label, value in mass.items()} if total > 0 else None


def _token_at(logprobs: list, start: int) -> Optional[dict]:
    offset = 0
    for entry in logprobs:
        token = str(entry.get("token") or "")
        end = offset + len(token)
        if end > start and token[max(0, start - offset) :].strip(_TOKEN_EDGES):
            return entry
        offset = end
    return None


def _label_begun(token: str, labels: Sequence[str]) -> Optional[str]:
    """The one label this token is the beginning of (or the whole of), else None."""
    piece = _SEPARATORS.sub(" ", token.strip(_TOKEN_EDGES).lower())
    if not piece:
        return None
    spelled = {_SEPARATORS.sub(" ", label.strip().lower()): label for label in labels}
    if piece in spelled:
        return spelled[piece]
    begun = [label for name, label in spelled.items() if name.startswith(piece)]
    return begun[0] if len(begun) == 1 else None


def one_hot(label: str, labels: Sequence[str]) -> dict:
    """All of the probability on `label`: what is known of an answer whose log-probabilities are not."""
    return {name: float(name == label) for name in labels}


def vote_key(task_type: Optional[str], answer: Completion, labels: Sequence[str]) -> Optional[str]:
    """What a free answer votes for: its label (nli) or its number written canonically (math); None for an answer
    that names neither, or that was cut off, filtered or empty."""
    if answer.finish_reason != "stop" or not answer.text.strip():
        return None
    if task_type == "nli":
        return parse_label(answer.text, labels)
    number = parse_number(answer.text)
    return None if number is None else format_number(number)


def vote(keys: Sequence[Optional[str]]) -> Optional[tuple[str, dict]]:
    """`(winner, vote shares)` over the keys that are not None, or None when there are none; a tie goes to the key
    given first."""
    cast = [key for key in keys if key is not None]
    if not cast:
        return None
    counts: dict[str, int] = {}
    for key in cast:
        counts[key] = counts.get(key, 0) + 1
    winner = max(counts, key=counts.__getitem__)  # dicts keep first-given order, and max keeps the first of equals
    return winner, {key: count / len(cast) for key, count in counts.items()}
