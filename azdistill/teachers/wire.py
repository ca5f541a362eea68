"""What an OpenAI-compatible endpoint's answers and errors say: a choice's answer, thinking and log-probabilities, and
the one-line reason or fix an error body gives (shared by the online client, hosted.py, and the Batch API's, batch.py)."""

from __future__ import annotations

import json
from typing import Optional

from azdistill.teachers.base import EndpointCompletion


def read_choice(choice: dict) -> EndpointCompletion:
    """One choice of a chat completion: its answer, the thinking apart from it, and its top log-probabilities."""
    message = choice.get("message") or {}
    content = message.get("content")
    if isinstance(content, list):  # some servers return content parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    answer, thought = split_think_block(content or "")
    # DeepSeek and vLLM's reasoning parser return the thinking as reasoning_content; newer vLLM, Ollama and
    # OpenRouter as reasoning (vLLM sent both, alike, while it renamed the field). R1 served without a reasoning
    # parser leaves it in the content as <think>...</think>.
    traces = [message.get("reasoning_content"), message.get("reasoning"), thought]
    traces = [trace.strip() for trace in traces if isinstance(trace, str) and trace.strip()]
    reasoning = "\n\n".join(dict.fromkeys(traces)) or None
    logprobs = None
    if isinstance(choice.get("logprobs"), dict) and choice["logprobs"].get("content"):
        logprobs = [
            {
                "token": entry.get("token"),
                "logprob": entry.get("logprob"),
                "top_logprobs": [{"token": top.get("token"), "logprob": top.get("logprob")} for top in entry.get("top_logprobs") or []],
            }
            for entry in choice["logprobs"]["content"]
        ]
    return EndpointCompletion(
        text=answer.strip(),
        finish_reason=choice.get("finish_reason") or "unknown",
        prompt_tokens=0,
        completion_tokens=0,
        reasoning=reasoning,
        logprobs=logprobs,
    )


def split_think_block(content: str) -> tuple[str, Optional[str]]:
    """`(answer, thinking)` of an answer that starts with a `<think>...</think>` block, else `(content, None)`.

    A block never closed (the answer was cut off while thinking) is all thinking. An answer holding only the closing
    tag is thinking up to it: R1's newer chat templates open the `<think>` in the prompt, so the model never writes it.
    """
    stripped = content.lstrip()
    if stripped.startswith("<think>"):
        thought, closed, answer = stripped[len("<think>") :].partition("</think>")
        return (answer, thought) if closed else ("", thought)
    if "<think>" not in content and "</think>" in content:
        thought, _, answer = content.partition("</think>")
        return answer, thought
    return content, None


def error_detail(text: str) -> str:
    """The message of an OpenAI-style error body (`{"error": {"code", "message"}}`), else the start of the body."""
    try:
        data = json.loads(text)
        error = data.get("error", data) if isinstance(data, dict) else {}
        if isinstance(error, dict):
            code, message = error.get("code"), error.get("message")
            if message:
                return f"{code}: {message}" if code else str(message)
        elif isinstance(error, str):
            return error
    except (ValueError, AttributeError):
        pass
    return " ".join(text.split())[:300] or "no details"


def unsupported_setting_fix(text: str) -> Optional[str]:
    """How to fix a request key the model refuses (OpenAI's `unsupported_parameter` / `unsupported_value`), else None."""
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return None
    if not isinstance(error, dict) or error.get("code") not in ("unsupported_parameter", "unsupported_value"):
        return None
    param = str(error.get("param") or "")
    if param == "max_tokens":
        return "set teacher.max_tokens_field: max_completion_tokens (reasoning models need it)"
    if param in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        return "set teacher.sampling_parameters: false (reasoning models take no sampling parameters)"
    if param == "reasoning_effort":
        return "remove teacher.reasoning_effort or pick a level this model supports"
    if param in ("logprobs", "top_logprobs"):
        return "set synthesis.top_logprobs: 0 (this model returns no log-probabilities)"
    return "check the teacher and synthesis settings against what this model supports"


def rejection_reason(status: int, text: str, detail: str) -> str:
    try:
        error = json.loads(text).get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    code = str(error.get("code") or "") if isinstance(error, dict) else ""
    inner = error.get("innererror") or {} if isinstance(error, dict) else {}
    if code == "content_filter" or "content_filter" in text or "ResponsibleAIPolicyViolation" in text:
        results = inner.get("content_filter_result") or {}
        categories = sorted(name for name, verdict in results.items() if isinstance(verdict, dict) and verdict.get("filtered"))
        return "content filter rejected the prompt" + (f" ({', '.join(categories)})" if categories else "")
    if code == "context_length_exceeded" or "maximum context length" in text:
        return "prompt too long for the teacher (context_length_exceeded); shorten it or lower synthesis.max_new_tokens"
    return f"teacher refused the request (HTTP {status}: {detail[:300]})"
