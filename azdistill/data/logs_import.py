"""Training sets from logged traffic: chat logs in, `{"messages": [...]}` splits out.

Accepted lines (one JSON object each, formats may be mixed):

- Azure OpenAI / OpenAI stored completions, as exported or listed by the API: a `chat.completion` object
  (`choices[0].message`, `finish_reason`, `model`, `metadata`) with its input under `input_messages`,
  `messages` or `request.messages`;
- plain request/response pairs: `{"request": {"messages": [...]}, "response": <chat completion or text>}`;
- fine-tuning records that already end with the assistant's answer: `{"messages": [...]}`.

The logged answer is kept as the final assistant turn. Then either reuse it (`teacher.kind: logged`: the
synthesize stage checks the answers and builds the training set from them, no teacher calls) or regenerate it
with a hosted teacher (the logged answer becomes the reference the report compares with); `--drop-answers`
writes prompts only. Records land in train/validation/test by a hash of their content, so importing the same
logs again gives the same splits.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from azdistill.config.sections import TASK_TYPES
from azdistill.data.files import atomic_writer, write_json
from azdistill.data.records import check_messages
from azdistill.errors import UserError

DEFAULT_SYSTEM = "You are a helpful assistant."


@dataclass
class ImportSummary:
    read: int = 0
    written: dict[str, int] = field(default_factory=lambda: {"train": 0, "validation": 0, "test": 0})
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _text(content: Any) -> Optional[str]:
    """Message content as text: a string, or the text parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type", "text") in ("text", "input_text", "output_text")]
        return "".join(parts) if parts else None
    return None


def _messages(raw: Any) -> Optional[list[dict]]:
    if isinstance(raw, dict) and isinstance(raw.get("data"), list):  # GET /chat/completions/{id}/messages
        raw = raw["data"]
    if not isinstance(raw, list):
        return None
    messages = []
    for message in raw:
        if not isinstance(message, dict):
            return None
        role = {"developer": "system"}.get(message.get("role"), message.get("role"))
        text = _text(message.get("content"))
        if role not in ("system", "user", "assistant") or text is None:
            return None  # tool calls and other roles have no place in a chat training record
        messages.append({"role": role, "content": text})
    return messages


def parse_log_line(row: Any) -> tuple[Optional[list[dict]], Optional[dict], str]:
    """`(messages ending with the answer, facts for filtering, "")` or `(None, None, why it was skipped)`."""
    if not isinstance(row, dict):
        return None, None, "not a JSON object"
    facts = {"model": row.get("model"), "metadata": row.get("metadata") or {}}
    if "request" in row and "response" in row:  # a plain request/response pair
        request, response = row["request"], row["response"]
        prompt = _messages(request.get("messages") if isinstance(request, dict) else None)
        facts["model"] = facts["model"] or (request.get("model") if isinstance(request, dict) else None)
        if isinstance(response, str):
            answer, finish = response, "stop"
        elif isinstance(response, dict) and response.get("choices"):
            choice = response["choices"][0]
            answer, finish = _text((choice.get("message") or {}).get("content")), choice.get("finish_reason") or "stop"
            facts["model"] = facts["model"] or response.get("model")
        else:
            return None, None, "response is neither text nor a chat completion"
    elif row.get("choices"):  # a stored completion
        prompt = _messages(row.get("input_messages") or row.get("messages") or (row.get("request") or {}).get("messages"))
        choice = row["choices"][0]
        answer, finish = _text((choice.get("message") or {}).get("content")), choice.get("finish_reason") or "stop"
    elif isinstance(row.get("messages"), list):  # already a training record
        messages = _messages(row["messages"])
        if not messages or messages[-1]["role"] != "assistant":
            return None, None, "messages do not end with an assistant answer"
        return messages, facts, ""
    else:
        return None, None, "unknown format (expected a stored completion, a request/response pair or messages)"
    if prompt is None:
        return None, None, "no readable input messages"
    if finish != "stop":
        return None, None, f"logged answer was cut off (finish_reason={finish})"
    if not answer or not answer.strip():
        return None, None, "empty logged answer"
    return prompt + [{"role": "assistant", "content": answer}], facts, ""


def _split_of(messages: list[dict], validation_share: float, test_share: float) -> str:
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    if position < test_share:
        return "test"
    if position < test_share + validation_share:
        return "validation"
    return "train"


def import_logs(
    sources: Iterable[Path],
    out_dir: Path,
    task_type: str,
    system_prompt: Optional[str] = None,
    model: Optional[str] = None,
    metadata: Optional[dict[str, str]] = None,
    validation_share: float = 0.1,
    test_share: float = 0.1,
    drop_answers: bool = False,
) -> ImportSummary:
    """Convert chat logs into train/validation/test JSONL under `out_dir`; returns what was written and skipped."""
    if task_type not in TASK_TYPES:
        raise UserError(f"--task {task_type}: choose one of {', '.join(TASK_TYPES)}")
    if not (0 <= validation_share < 1 and 0 <= test_share < 1 and validation_share + test_share < 1):
        raise UserError("--validation-share and --test-share must be in [0, 1) and leave some records for training")
    summary = ImportSummary()
    seen: set[bytes] = set()
    out_dir = Path(out_dir)
    with atomic_writer(out_dir / "train.jsonl") as train, atomic_writer(out_dir / "validation.jsonl") as validation, atomic_writer(out_dir / "test.jsonl") as test:
        writers = {"train": train, "validation": validation, "test": test}
        for source in sources:
            source = Path(source)
            if not source.is_file():
                raise UserError(f"{source}: log file not found")
            with source.open("rb") as handle:
                for number, raw in enumerate(handle, start=1):
                    if not raw.strip():
                        continue
                    summary.read += 1
                    try:
                        row = json.loads(raw)
                    except ValueError:
                        summary.skip("malformed JSON")
                        continue
                    messages, facts, why = parse_log_line(row)
                    if messages is None:
                        summary.skip(why)
                        continue
                    if model and facts.get("model") != model:
                        summary.skip("other model")
                        continue
                    if metadata and any(str((facts.get("metadata") or {}).get(key)) != value for key, value in metadata.items()):
                        summary.skip("metadata does not match")
                        continue
                    if messages[0]["role"] != "system":
                        messages = [{"role": "system", "content": system_prompt or DEFAULT_SYSTEM}] + messages
                    elif system_prompt:
                        messages[0] = {"role": "system", "content": system_prompt}
                    problem = check_messages(messages, task_type)
                    if problem:
                        summary.skip(f"not a {task_type} record: {problem.split(' (')[0]}")
                        continue
                    key = hashlib.blake2b(json.dumps(messages, sort_keys=True).encode("utf-8"), digest_size=16).digest()
                    if key in seen:
                        summary.skip("exact duplicate")
                        continue
                    seen.add(key)
                    split = _split_of(messages, validation_share, test_share)
                    kept = messages[:-1] if drop_answers else messages
                    writers[split].write(json.dumps({"messages": kept}, ensure_ascii=False) + "\n")
                    summary.written[split] += 1
        if not summary.written["train"]:
            raise UserError(
                f"no usable training records in the logs ({summary.read} lines read; skipped: "
                f"{', '.join(f'{why} ({count}x)' for why, count in summary.skipped.items()) or 'none'})"
            )
    write_json(out_dir / "import.json", {"read": summary.read, "written": summary.written, "skipped": summary.skipped})
    return summary
