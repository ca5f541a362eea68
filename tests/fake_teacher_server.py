"""An OpenAI-compatible chat-completions server on loopback that misbehaves on purpose.

Real sockets, real HTTP/1.1 keep-alive (stdlib `ThreadingHTTPServer`), so the client is tested as it runs
against Azure. It answers `POST .../chat/completions` for every endpoint kind's URL shape, and can:

- add latency to every answer (`latency_s`);
- enforce a request rate (`rate_limit` requests per `rate_window_s`, a sliding window) and answer the excess
  with 429, `Retry-After` (whole seconds) and `retry-after-ms`, as Azure OpenAI does;
- inject random transient faults on a share of requests (`fault_rate`: 500, 503, dropped connections and
  answers slower than the client's timeout, in turn);
- misbehave on a record whose prompt holds a marker: `[[content_filter]]` (400 content filter),
  `[[context_length]]` (400), `[[length]]` (finish_reason length), `[[empty]]`, `[[filtered_output]]`
  (finish_reason content_filter), `[[flaky:N]]` (503 the first N times), `[[reset:N]]` (drop the connection
  the first N times), `[[slow:N]]` (time out the first N times), `[[echo_auth]]` (400 echoing the request's
  credential back, like a careless proxy), `[[unauthorized]]` (401), `[[bad_json]]` (a 200 that is not JSON);
- require a credential (`api_key`: accepted as `api-key` or `Authorization: Bearer`);
- return top-k log-probabilities when asked;
- answer like a reasoning model (`reasoning=True`, o-series / DeepSeek-R1): refuse `max_tokens`, a temperature or
  top_p other than 1 and the penalties with OpenAI's 400 `unsupported_parameter` / `unsupported_value`, and
  return the thinking as `reasoning_content` beside the content; `[[think_inline]]` puts it in the content as a
  `<think>...</think>` block instead (R1 served without a reasoning parser), `[[no_reasoning]]` leaves it out;
- answer `response_format` json_schema with `{"label": ...}`, a label of the schema's enum (`structured` picks it
  from the free answer), or refuse
  it with a 400 naming response_format as endpoints without structured outputs do (`structured_outputs=False`);
  `[[bad_structured]]` answers text that is not JSON (naming a label; `[[bad_structured_hedge]]` naming both);
- return `n` choices (`choices` scripts their texts; `max_choices` caps them, as endpoints that ignore `n` do);
- script the top log-probabilities at the label's position (`label_logprobs`: the first token of a free answer,
  the label value's first token of a structured one).

Run it in a thread (`FakeTeacherServer(...).start()`) or as a process:
`python tests/fake_teacher_server.py --latency 0.05 --rate-limit 40` prints `PORT <n>`.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import re
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

MARKER = re.compile(r"\[\[(\w+)(?::(\d+))?\]\]")


def default_reasoning(messages: list[dict]) -> str:
    """A reasoning model's thinking before it answers: names both labels, so a check that read it would fail."""
    return f"The user asks about {messages[-1]['content'].strip()[:100]!r}. Is it positive or negative? Let me weigh it."


def default_structured(text: str, labels: list[str]) -> str:
    """A structured answer's label: the first of `labels` that the free answer `text` names, else the first label."""
    return next((label for label in labels if label.lower() in text.lower()), labels[0])


def label_position_tokens(text: str) -> tuple[list[str], int]:
    """An answer split into tokens the way BPE tokenizers split it (a word with its leading space, punctuation runs),
    and the index of the label's token: a structured answer's label value, else the first token."""
    tokens = re.findall(r"\s*\w+|\s*[^\w\s]+|\s+", text)
    offset = 0
    value = re.search(r'"label"\s*:\s*"', text)
    for index, token in enumerate(tokens):
        if value is None or offset >= value.end():
            return tokens, index
        offset += len(token)
    return tokens, 0


def default_answer(messages: list[dict]) -> str:
    """A deterministic answer: a sentiment label for reviews, an echo of the question otherwise."""
    text = messages[-1]["content"]
    if "Review:" in text:
        return "positive" if "good" in text else "negative"
    return f"Answer to: {text.strip()[:200]}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def handle_error(self, request, client_address):
        # A client that went away (killed on purpose by a test) is not the server's error: no traceback on stderr.
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


class FakeTeacherServer:
    def __init__(
        self,
        latency_s: float = 0.0,
        rate_limit: Optional[int] = None,
        rate_window_s: float = 1.0,
        fault_rate: float = 0.0,
        hang_s: float = 1.0,
        api_key: Optional[str] = None,
        answer: Callable[[list[dict]], str] = default_answer,
        seed: int = 0,
        keep_bodies: bool = True,
        port: int = 0,
        reasoning: bool = False,
        think: Callable[[list[dict]], str] = default_reasoning,
        logprobs: bool = True,
        structured_outputs: bool = True,
        structured: Callable[[str, list[str]], str] = default_structured,
        choices: Optional[Callable[[list[dict], int], list[str]]] = None,
        max_choices: Optional[int] = None,
        label_logprobs: Optional[Callable[[list[dict]], dict[str, float]]] = None,
        limit_change: Optional[tuple[int, int]] = None,
    ):
        self.latency_s, self.rate_limit, self.rate_window_s = latency_s, rate_limit, rate_window_s
        # (admitted requests, new limit): the endpoint's limit changes once that many requests were admitted.
        self.limit_change = limit_change
        self.fault_rate, self.hang_s, self.api_key, self.answer = fault_rate, hang_s, api_key, answer
        self.random = random.Random(seed)
        self.keep_bodies = keep_bodies
        self.reasoning, self.think = reasoning, think
        self.logprobs = logprobs  # False: ignore `logprobs` requests, as some servers (transformers serve) do
        self.structured_outputs, self.structured = structured_outputs, structured
        self.choices, self.max_choices, self.label_logprobs = choices, max_choices, label_logprobs
        self.lock = threading.Lock()
        self.window: collections.deque = collections.deque()
        self.counts: collections.Counter = collections.Counter()  # what happened: answered, throttled, ...
        self.per_prompt: collections.Counter = collections.Counter()  # requests per last user message
        self.bodies: list[dict] = []
        self.headers_seen: list[dict] = []
        self.answered_at: list[float] = []
        self._fault_turn = 0
        self.httpd = _Server(("127.0.0.1", port), self._handler())
        self.port = self.httpd.server_address[1]
        self.thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeTeacherServer":
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "FakeTeacherServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- decisions ---------------------------------------------------------------------------------------

    def _throttle(self) -> Optional[float]:
        """Seconds until a slot frees if this request is over the limit, else None (and the request is counted)."""
        if not self.rate_limit:
            return None
        with self.lock:
            now = time.monotonic()
            while self.window and self.window[0] <= now - self.rate_window_s:
                self.window.popleft()
            if self.limit_change and self.counts["admitted"] >= self.limit_change[0]:
                self.rate_limit, self.limit_change = self.limit_change[1], None
            if len(self.window) >= self.rate_limit:
                # Until enough admitted requests have left the window (more than one when the limit was lowered).
                return self.window[len(self.window) - self.rate_limit] + self.rate_window_s - now
            self.window.append(now)
            self.counts["admitted"] += 1
            return None

    def remaining_requests(self) -> int:
        """What Azure OpenAI and OpenAI put in `x-ratelimit-remaining-requests`: the requests the limit still allows
        now (here: in the sliding window; 1 when the server has no limit, as before)."""
        if not self.rate_limit:
            return 1
        with self.lock:
            now = time.monotonic()
            return max(0, self.rate_limit - sum(1 for admitted in self.window if admitted > now - self.rate_window_s))

    def _random_fault(self) -> Optional[str]:
        if not self.fault_rate:
            return None
        with self.lock:
            if self.random.random() >= self.fault_rate:
                return None
            self._fault_turn += 1
            return ("500", "503", "reset", "timeout")[self._fault_turn % 4]

    def _refused_parameter(self, body: dict) -> Optional[dict]:
        """The 400 error body an o-series model answers to a request key it does not take, or None."""
        if not self.reasoning:
            return None
        for name in ("max_tokens", "presence_penalty", "frequency_penalty"):
            if name in body:
                hint = " Use 'max_completion_tokens' instead." if name == "max_tokens" else ""
                return {"message": f"Unsupported parameter: '{name}' is not supported with this model.{hint}",
                        "type": "invalid_request_error", "param": name, "code": "unsupported_parameter"}
        for name in ("temperature", "top_p"):
            if name in body and body[name] != 1:
                return {"message": f"Unsupported value: '{name}' does not support {body[name]} with this model. Only the "
                                   "default (1) value is supported.", "type": "invalid_request_error", "param": name, "code": "unsupported_value"}
        if "reasoning_effort" in body and body["reasoning_effort"] not in ("minimal", "low", "medium", "high"):
            return {"message": f"Invalid value: '{body['reasoning_effort']}'. Supported values are: 'minimal', 'low', 'medium', and 'high'.",
                    "type": "invalid_request_error", "param": "reasoning_effort", "code": "invalid_value"}
        return None

    def _choice(self, index: int, text: str, markers: dict, body: dict, messages: list[dict]) -> tuple[dict, list[str]]:
        """One choice of an answer (`finish_reason`, thinking and log-probabilities as the markers and body ask), and its
        tokens."""
        finish = "stop"
        if "empty" in markers:
            text = ""
        if "length" in markers:
            finish = "length"
        if "filtered_output" in markers:
            text, finish = "", "content_filter"
        message: dict = {"role": "assistant", "content": text}
        thought = self.think(messages) if self.reasoning and "no_reasoning" not in markers else ""
        if thought and "think_inline" in markers:
            message["content"] = f"<think>\n{thought}\n</think>\n\n{text}"
        elif thought:
            message["reasoning_content"] = thought
        choice: dict = {"index": index, "message": message, "finish_reason": finish}
        words = text.split()
        if body.get("logprobs") and self.logprobs:
            k = int(body.get("top_logprobs") or 0)
            if self.label_logprobs is not None:
                tokens, at = label_position_tokens(text)
                scripted = sorted(self.label_logprobs(messages).items(), key=lambda pair: -pair[1])[:k]
                choice["logprobs"] = {"content": [
                    {"token": token, "logprob": -0.1, "bytes": None,
                     "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in scripted] if i == at else
                     [{"token": token, "logprob": -0.1, "bytes": None}]}
                    for i, token in enumerate(tokens)
                ]}
            else:
                choice["logprobs"] = {"content": [
                    {"token": word, "logprob": -0.1 * (i % 5), "bytes": list(word.encode()),
                     "top_logprobs": [{"token": word if j == 0 else f"{word}~{j}", "logprob": -0.1 * (i % 5) - j, "bytes": None} for j in range(k)]}
                    for i, word in enumerate(words)
                ]}
        return choice, words

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes; with Nagle's algorithm on, the body waits for the
            # client's delayed ACK (~40 ms) and every answer would look 40 ms slower than configured.
            disable_nagle_algorithm = True

            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, status: int, body: dict | str, headers: Optional[dict] = None) -> None:
                data = (body if isinstance(body, str) else json.dumps(body)).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def _reset(self) -> None:
                # SO_LINGER 0: close() sends a TCP RST, what a crashed proxy or a dropped connection looks like.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def do_GET(self) -> None:
                self._send(200, {"status": "ok"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if not self.path.split("?")[0].endswith("/chat/completions"):
                    self._send(404, {"error": {"code": "NotFound", "message": f"no route {self.path}"}})
                    return
                credential = self.headers.get("api-key") or (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                with server.lock:
                    server.counts["requests"] += 1
                    if server.keep_bodies:
                        server.headers_seen.append({k.lower(): v for k, v in self.headers.items()})
                try:
                    body = json.loads(raw)
                    messages = body["messages"]
                except (ValueError, KeyError):
                    self._send(400, {"error": {"code": "invalid_request", "message": "body is not a chat request"}})
                    return
                prompt = messages[-1]["content"]
                with server.lock:
                    server.per_prompt[prompt] += 1
                    seen = server.per_prompt[prompt]
                    if server.keep_bodies:
                        server.bodies.append(body)
                markers = {name: int(count or 0) for name, count in MARKER.findall(prompt)}
                if "echo_auth" in markers:
                    self._send(400, {"error": {"code": "invalid_request", "message": f"bad header value {credential!r}"}})
                    return
                if server.api_key is not None and credential != server.api_key or "unauthorized" in markers:
                    server.counts["unauthorized"] += 1
                    self._send(401, {"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint."}})
                    return
                refused = server._refused_parameter(body)
                if refused is not None:
                    with server.lock:
                        server.counts["refused_parameter"] += 1
                    self._send(400, {"error": refused})
                    return
                wait = server._throttle()
                if wait is not None:
                    with server.lock:
                        server.counts["throttled"] += 1
                    self._send(429, {"error": {"code": "429", "message": "Rate limit reached; retry later."}},
                               {"Retry-After": str(max(1, math.ceil(wait))), "retry-after-ms": str(max(1, int(wait * 1000)))})
                    return
                fault = server._random_fault()
                if "flaky" in markers and seen <= markers["flaky"]:
                    fault = "503"
                if "reset" in markers and seen <= markers["reset"]:
                    fault = "reset"
                if "slow" in markers and seen <= markers["slow"]:
                    fault = "timeout"
                if fault:
                    with server.lock:
                        server.counts[f"fault_{fault}"] += 1
                    if fault == "reset":
                        self._reset()
                        return
                    if fault == "timeout":
                        time.sleep(server.hang_s)
                        self._reset()
                        return
                    self._send(int(fault), {"error": {"code": fault, "message": "The server had an error while processing your request."}})
                    return
                if "content_filter" in markers:
                    server.counts["content_filter"] += 1
                    self._send(400, {"error": {
                        "message": "The response was filtered due to the prompt triggering content management policy.",
                        "type": None, "param": "prompt", "code": "content_filter", "status": 400,
                        "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {
                            "hate": {"filtered": False, "severity": "safe"}, "violence": {"filtered": True, "severity": "high"}}},
                    }})
                    return
                if "context_length" in markers:
                    self._send(400, {"error": {"code": "context_length_exceeded", "message": "This model's maximum context length is 8192 tokens."}})
                    return
                if server.latency_s:
                    time.sleep(server.latency_s)
                if "bad_json" in markers and seen <= max(1, markers["bad_json"]):
                    self._send(200, "<html>upstream error</html>")
                    return
                response_format = body.get("response_format") or {}
                if response_format and not server.structured_outputs:
                    with server.lock:
                        server.counts["refused_response_format"] += 1
                    message = "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model."
                    self._send(400, {"error": {"message": message, "type": "invalid_request_error", "param": "response_format",
                                               "code": None}})
                    return
                wanted = int(body.get("n") or 1)
                texts = server.choices(messages, wanted) if server.choices else [server.answer(messages)] * wanted
                texts = texts[: min(wanted, server.max_choices or wanted)]
                if response_format.get("type") == "json_schema":
                    enum = response_format["json_schema"]["schema"]["properties"]["label"]["enum"]
                    texts = [json.dumps({"label": server.structured(text, enum)}) for text in texts]
                    if "bad_structured" in markers:
                        texts = ["I would say it is positive"] * len(texts)
                    if "bad_structured_hedge" in markers:
                        texts = ["It could be positive or negative"] * len(texts)
                built = [server._choice(index, text, markers, body, messages) for index, text in enumerate(texts)]
                choices = [choice for choice, _ in built]
                words = [word for _, tokens in built for word in tokens]
                usage = {"prompt_tokens": sum(len(m["content"]) for m in messages) // 4 + 1, "completion_tokens": len(words)}
                thought = server.think(messages) if server.reasoning and "no_reasoning" not in markers else ""
                if server.reasoning:  # reasoning tokens are billed as completion tokens, and counted apart
                    usage["completion_tokens"] += len(thought.split()) * len(choices)
                    usage["completion_tokens_details"] = {"reasoning_tokens": len(thought.split()) * len(choices)}
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                with server.lock:
                    server.counts["answered"] += 1
                    server.answered_at.append(time.monotonic())
                self._send(200, {"id": f"chatcmpl-{seen}", "object": "chat.completion", "created": int(time.time()),
                                 "model": body.get("model", "fake"), "choices": choices, "usage": usage},
                           {"x-ratelimit-remaining-requests": str(server.remaining_requests())})

        return Handler


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--rate-limit", type=int, default=None)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--hang", type=float, default=1.0)
    parser.add_argument("--limit-change", default=None, metavar="N:LIMIT",
                        help="After N admitted requests the rate limit becomes LIMIT (e.g. 500:20 halves 40/s midway).")
    parser.add_argument("--api-key-env", default=None, help="Require the key held in this environment variable.")
    parser.add_argument("--reasoning", action="store_true", help="Answer like a reasoning model (o-series, DeepSeek-R1).")
    args = parser.parse_args(argv)
    import os

    server = FakeTeacherServer(
        latency_s=args.latency, rate_limit=args.rate_limit, fault_rate=args.fault_rate, hang_s=args.hang,
        api_key=os.environ[args.api_key_env] if args.api_key_env else None, keep_bodies=False, port=args.port,
        reasoning=args.reasoning,
        limit_change=tuple(int(part) for part in args.limit_change.split(":")) if args.limit_change else None,
    )
    print(f"PORT {server.port}", flush=True)
    try:
        server.httpd.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass
    finally:
        counts = dict(server.counts)
        print(json.dumps(counts), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
