"""Training examples: chat records tokenized with a mask on the answer tokens, the teacher's top-k
log-probabilities aligned to them, and batches padded or packed."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Optional

from azdistill.data.files import iter_jsonl
from azdistill.data.records import Message
from azdistill.errors import UserError

IGNORE_INDEX = -100


# Examples: token ids, labels on the assistant answers, and the teacher's top-k where a hosted teacher gave it


def assistant_spans(tokenizer, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant answer (end-of-turn token included).

    Each span is found by rendering the conversation up to that turn with and without the answer, which
    works for any chat template that renders a conversation as a growing prefix.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (full.startswith(before) and full.startswith(through)):
            raise UserError(
                "the student's chat template does not render conversations as growing prefixes; "
                "assistant-only loss needs one that does (ChatML-style templates do)"
            )
        spans.append((len(before), len(through)))
    return full, spans


def build_example(
    tokenizer,
    messages: list[Message],
    max_length: int,
    teacher_turns: Optional[list[dict]] = None,
    token_id: Optional[Callable[[str], Optional[int]]] = None,
) -> Optional[dict]:
    """Token ids and labels for one conversation; labels are -100 outside assistant answers.

    With `teacher_turns` (one row's "turns" from a `<split>.logprobs.jsonl` sidecar) the example also gets
    "topk": (position, candidate ids, log-probabilities) for each position whose next token the teacher's tokens
    line up with (see `align_topk`). Returns None when truncation to `max_length` leaves no assistant token.
    """
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length)
    ids = encoded["input_ids"]
    labels = []
    for token_id_, (start, _end) in zip(ids, encoded["offset_mapping"]):
        inside = any(span_start <= start < span_end for span_start, span_end in spans)
        labels.append(token_id_ if inside else IGNORE_INDEX)
    if all(label == IGNORE_INDEX for label in labels):
        return None
    example = {"input_ids": ids, "labels": labels}
    if teacher_turns:
        answers = [message["content"] for message in messages if message["role"] == "assistant"]
        topk = []
        for turn in teacher_turns:
            number = turn.get("turn", 0)
            if not 1 <= number <= len(spans):
                continue
            span_start, span_end = spans[number - 1]
            first = next((i for i, (start, _) in enumerate(encoded["offset_mapping"]) if span_start <= start < span_end), None)
            if first is None:  # the answer was truncated away
                continue
            last = next((i for i in range(first, len(ids)) if encoded["offset_mapping"][i][0] >= span_end), len(ids))
            pieces = [tokenizer.decode([token]) for token in ids[first:last]]
            topk += align_topk(pieces, first, answers[number - 1], turn, token_id or token_id_lookup(tokenizer))
        example["topk"] = topk
    return example


def token_id_lookup(tokenizer) -> Callable[[str], Optional[int]]:
    """Maps a token's text (as endpoints return it, e.g. " positive") to the student's id, None when the text is
    not exactly one student token."""

    @functools.lru_cache(maxsize=None)
    def lookup(text: str) -> Optional[int]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        return ids[0] if len(ids) == 1 and tokenizer.decode(ids) == text else None

    return lookup


def align_topk(
    pieces: list[str], first_position: int, answer: str, turn: dict, token_id: Callable[[str], Optional[int]]
) -> list[tuple[int, list[int], list[float]]]:
    """Line a hosted teacher's per-token top-k up with the student's tokens of one answer.

    `pieces` are the student's tokens of the answer as text, the first at index `first_position` of the example;
    `turn` is one sidecar turn: {"text": the teacher's answer, "content": [{"token", "logprob", "top_logprobs":
    [{"token", "logprob"}, ...]}, ...]}. A student token is supervised where a teacher token covers exactly the same
    characters of the answer; its candidates are those teacher candidates that are one student token. With the same
    tokenizer on both sides every token lines up; with different ones, those that happen to coincide.

    Returns (position predicting the token, candidate ids, candidate log-probabilities) triples. Nothing lines
    up when the stored text is not the trained answer (e.g. the prompt strategy kept only part of it).
    """
    entries = turn.get("content") or []
    if not entries or (turn.get("text") or "").strip() != answer.strip():
        return []
    teacher_text = "".join(entry.get("token") or "" for entry in entries)
    lead = teacher_text.find(answer)
    if lead < 0:  # tokens given as bytes, or an answer cleaned up after generation
        return []
    teacher_spans: dict[tuple[int, int], dict] = {}
    offset = -lead
    for entry in entries:
        end = offset + len(entry.get("token") or "")
        teacher_spans[(offset, end)] = entry
        offset = end
    aligned = []
    offset = 0
    for index, piece in enumerate(pieces):
        end = offset + len(piece)
        if end > len(answer):
            break  # the end-of-turn tokens after the answer: the teacher's logprobs do not cover them
        entry = teacher_spans.get((offset, end))
        offset = end
        if entry is None:
            continue
        candidates: dict[int, float] = {}
        for top in (entry.get("top_logprobs") or []) + [{"token": entry.get("token"), "logprob": entry.get("logprob")}]:
            if top.get("token") is None or top.get("logprob") is None:
                continue
            candidate = token_id(top["token"])
            if candidate is not None and candidate not in candidates:
                candidates[candidate] = float(top["logprob"])
        if candidates:
            ordered = sorted(candidates.items(), key=lambda pair: -pair[1])
            aligned.append((first_position + index - 1, [pair[0] for pair in ordered], [pair[1] for pair in ordered]))
    return aligned


def _topk_tensors(examples: list[dict], shape: tuple[int, int], offsets: list[tuple[int, int]]):
    """[rows, width, k] candidate ids and log-probabilities (-inf where none) for a batch; None without top-k."""
    import torch

    if not any(example.get("topk") for example in examples):
        return None, None
    k = max(len(ids) for example in examples for _, ids, _ in example.get("topk") or [])
    topk_ids = torch.zeros((*shape, k), dtype=torch.long)
    topk_logprobs = torch.full((*shape, k), float("-inf"))
    for example, (row, start) in zip(examples, offsets):
        for position, ids, logprobs in example.get("topk") or []:
            topk_ids[row, start + position, : len(ids)] = torch.tensor(ids)
            topk_logprobs[row, start + position, : len(ids)] = torch.tensor(logprobs)
    return topk_ids, topk_logprobs


def pad_batch(examples: list[dict], pad_token_id: int) -> dict:
    """Right-pad a list of examples into tensors."""
    import torch

    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"])
        labels[row, :length] = torch.tensor(example["labels"])
        attention_mask[row, :length] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    topk_ids, topk_logprobs = _topk_tensors(examples, (len(examples), width), [(row, 0) for row in range(len(examples))])
    if topk_ids is not None:
        batch.update(topk_ids=topk_ids, topk_logprobs=topk_logprobs)
    return batch


def pack_batch(examples: list[dict]) -> dict:
    """Concatenate a batch into one row without padding; position ids restart at each example.

    With no attention mask, transformers reads the restarts as boundaries and keeps each example's attention to
    itself (varlen kernels under flash attention, a block-diagonal mask under sdpa). Each example's first label is
    -100 already (a prompt token), so no example learns to predict the next one's first token.
    """
    import torch

    input_ids, labels, position_ids, offsets = [], [], [], []
    for example in examples:
        offsets.append((0, len(input_ids)))
        input_ids += example["input_ids"]
        labels += [IGNORE_INDEX] + example["labels"][1:]
        position_ids += range(len(example["input_ids"]))
    batch = {
        "input_ids": torch.tensor([input_ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([position_ids]),
    }
    topk_ids, topk_logprobs = _topk_tensors(examples, (1, len(input_ids)), offsets)
    if topk_ids is not None:
        batch.update(topk_ids=topk_ids, topk_logprobs=topk_logprobs)
    return batch


def load_conversations(path: Path) -> list[list[Message]]:
    return [row["messages"] for row in iter_jsonl(path)]


def load_teacher_topk(path: Path, rows: int) -> list[Optional[list[dict]]]:
    """The teacher's top-k per accepted row from a synthesize sidecar (`<split>.logprobs.jsonl`): for each line of
    `<split>.jsonl`, its "turns" (see docs/training.md), or None where the sidecar has no line for it."""
    if not Path(path).is_file():
        raise UserError(
            f"training.topk_weight > 0 needs the teacher's top-k log-probabilities in {path}; a hosted teacher "
            "writes them with synthesis.top_logprobs > 0 (rerun `azdistill synthesize`), or set training.topk_weight=0"
        )
    turns: list[Optional[list[dict]]] = [None] * rows
    for line in iter_jsonl(path):
        if 0 <= line.get("row", -1) < rows:
            turns[line["row"]] = line.get("turns") or None
    if rows and not any(any(turn.get("content") for turn in row) for row in turns if row):
        raise UserError(
            f"training.topk_weight > 0, and {path} holds no log-probabilities: the endpoint answered without them "
            "(transformers serve ignores synthesis.top_logprobs); set training.topk_weight=0 or synthesize with an endpoint "
            "that returns them"
        )
    return turns
