"""A provider Batch API on loopback (OpenAI `/v1/files` + `/v1/batches`, Azure OpenAI `/openai/...?api-version=`), whose
batches are answered by a `FakeTeacherServer`: each line's body is posted to its `/chat/completions`, so a batch answers
exactly what the online fake answers (the same markers: `[[content_filter]]`, `[[flaky:N]]`, `[[length]]`, ...).

Real sockets (stdlib `ThreadingHTTPServer`). It takes

- `POST /files` (multipart: purpose, file), `GET /files/{id}`, `GET /files/{id}/content`;
- `POST /batches`, `GET /batches` (newest first, `limit`, `after`), `GET /batches/{id}`, `POST /batches/{id}/cancel`;

under `/v1`, `/openai` or `/openai/v1`, and records every call (`calls`: method, path, query), upload (`uploads`: purpose,
file name, lines), create (`creates`) and the credential each call carried (`credentials`, `auth_headers`).

A batch moves one step of `states` per status check (validating, in_progress, finalizing, completed), and is answered when
it reaches the last. Scripted faults:

- `hold`: the batch stays in_progress while it is set (a test kills the client meanwhile, then clears it);
- `expire_after=N`: the batch ends `expired` with only its first N lines answered, the rest `batch_expired` in the error file;
- `invalid=[{"code", "message", "line"}]`: the batch fails validation with these errors;
- `line_status(line, attempt)`: a status to answer a line with instead of the teacher (429, 500, ...), `attempt` counting
  the batches that held this custom_id;
- `throttle_checks=N`: the first N status checks of each batch answer 429 with `Retry-After: 7`;
- `lose_create_answers=N`: the first N creates make the batch and drop the connection instead of answering;
- `fail_checks_after=N`: every status check after the N-th answers 401 (what stops a client mid-wait);
- `file_checks=N`: an uploaded file is `pending` (as Azure's are) until its N-th check;
- `api_key`: the credential every call must carry (`api-key` or `Authorization: Bearer`).

Output lines come in reverse input order: a client must map answers by custom_id.
"""

from __future__ import annotations

import collections
import email.parser
import email.policy
import http.client
import json
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Callable, Optional
from urllib.parse import parse_qs, urlsplit

from fake_teacher_server import _Server  # the same threaded server, quiet about clients that went away

STATES = ("validating", "in_progress", "finalizing", "completed")


class FakeBatchAPI:
    def __init__(
        self,
        teacher,
        states: tuple[str, ...] = STATES,
        api_key: Optional[str] = None,
        hold: bool = False,
        expire_after: Optional[int] = None,
        invalid: Optional[list[dict]] = None,
        line_status: Optional[Callable[[dict, int], Optional[int]]] = None,
        throttle_checks: int = 0,
        lose_create_answers: int = 0,
        fail_checks_after: Optional[int] = None,
        file_checks: int = 0,
    ):
        self.teacher, self.states, self.api_key, self.hold = teacher, states, api_key, hold
        self.expire_after, self.invalid, self.line_status = expire_after, invalid, line_status
        self.throttle_checks, self.lose_create_answers = throttle_checks, lose_create_answers
        self.fail_checks_after, self.file_checks = fail_checks_after, file_checks
        self.lock = threading.RLock()  # a status check answers the batch while holding it
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.calls: list[tuple[str, str, dict]] = []
        self.uploads: list[dict] = []
        self.creates: list[dict] = []
        self.cancels: list[str] = []
        self.credentials: list[str] = []
        self.auth_headers: list[str] = []  # which header carried it: api-key (Azure) or authorization (Bearer)
        self.seen: collections.Counter = collections.Counter()  # custom_id -> batches that held it
        self.checks = 0
        self.httpd = _Server(("127.0.0.1", 0), self._handler())
        self.port = self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "FakeBatchAPI":
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def batch_lines(self, index: int = 0) -> list[dict]:
        """The request lines of the `index`-th batch created."""
        return self.files[self.creates[index]["input_file_id"]]["lines"]

    # -- answering a batch ---------------------------------------------------------------------------------

    def _ask_teacher(self, body: dict) -> tuple[int, object]:
        connection = http.client.HTTPConnection("127.0.0.1", self.teacher.port, timeout=30)
        try:
            connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            raw = response.read().decode("utf-8")
        finally:
            connection.close()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw

    def _answer(self, batch: dict, final: str) -> None:
        """Answer the batch's lines into an output file (200s) and an error file (the rest), in reverse order."""
        lines = self.files[batch["input_file_id"]]["lines"]
        output, errors = [], []
        for number, line in enumerate(lines):
            request = f"batch_req_{batch['id']}_{number}"
            if self.expire_after is not None and number >= self.expire_after:
                expired = {"code": "batch_expired",
                           "message": "This request could not be executed before the completion window expired."}
                errors.append({"id": request, "custom_id": line["custom_id"], "response": None, "error": expired})
                continue
            with self.lock:
                self.seen[line["custom_id"]] += 1
                attempt = self.seen[line["custom_id"]]
            status = self.line_status(line, attempt) if self.line_status else None
            if status is not None:
                body: object = {"error": {"code": str(status), "message": "scripted fault"}}
            else:
                status, body = self._ask_teacher(line["body"])
            response = {"status_code": status, "request_id": request, "body": body}
            answer = {"id": request, "custom_id": line["custom_id"], "response": response, "error": None}
            (output if status == 200 else errors).append(answer)
        for name, rows in (("output_file_id", output), ("error_file_id", errors)):
            if rows:
                file_id = f"file-{len(self.files) + 1}"
                self.files[file_id] = {"id": file_id, "purpose": "batch_output", "lines": rows[::-1]}
                batch[name] = file_id
        batch["request_counts"] = {"total": len(lines), "completed": len(output), "failed": len(errors)}
        batch["status"] = final

    def _check(self, batch: dict) -> None:
        """One status check: the batch moves one step on (answered when it reaches its end)."""
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return
        if batch["status"] == "cancelling":
            batch["status"] = "cancelled"
            return
        if self.hold and batch["status"] == "in_progress":
            return
        if self.invalid is not None:
            batch.update(status="failed", errors={"object": "list", "data": self.invalid})
            return
        batch["step"] += 1
        state = self.states[min(batch["step"], len(self.states) - 1)]
        total = len(self.files[batch["input_file_id"]]["lines"])
        if state == self.states[-1]:
            self._answer(batch, "expired" if self.expire_after is not None else "completed")
        else:
            completed = total // 2 if state != "validating" else 0
            batch.update(status=state, request_counts={"total": total, "completed": completed, "failed": 0})

    # -- HTTP ------------------------------------------------------------------------------------------------

    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: object, headers: Optional[dict] = None, raw: Optional[bytes] = None) -> None:
                data = raw if raw is not None else json.dumps(body).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def _route(self) -> Optional[tuple[list[str], dict]]:
                parts = urlsplit(self.path)
                path = parts.path
                for prefix in ("/openai/v1", "/openai", "/v1"):
                    if path.startswith(prefix + "/"):
                        path = path[len(prefix):]
                        break
                query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
                credential = self.headers.get("api-key") or (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                with api.lock:
                    api.calls.append((self.command, parts.path, query))
                    api.credentials.append(credential)
                    api.auth_headers.append("api-key" if self.headers.get("api-key") else "authorization")
                if api.api_key is not None and credential != api.api_key:
                    self._send(401, {"error": {"code": "401", "message": "Access denied due to invalid subscription key."}})
                    return None
                return [piece for piece in path.split("/") if piece], query

            def do_GET(self) -> None:
                routed = self._route()
                if routed is None:
                    return
                pieces, query = routed
                with api.lock:
                    if pieces == ["batches"]:
                        ordered = sorted(api.batches.values(), key=lambda batch: -batch["number"])
                        if "after" in query:
                            ordered = ordered[[batch["id"] for batch in ordered].index(query["after"]) + 1:]
                        limit = int(query.get("limit", 20))
                        shown = [_public(batch) for batch in ordered[:limit]]
                        self._send(200, {"object": "list", "data": shown, "has_more": len(ordered) > limit})
                    elif len(pieces) == 2 and pieces[0] == "batches" and pieces[1] in api.batches:
                        api.checks += 1
                        batch = api.batches[pieces[1]]
                        if api.fail_checks_after is not None and api.checks > api.fail_checks_after:
                            self._send(401, {"error": {"code": "401", "message": "Access denied: the key was rotated."}})
                            return
                        batch["checks"] += 1
                        if batch["checks"] <= api.throttle_checks:
                            self._send(429, {"error": {"code": "429", "message": "Too many requests."}}, {"Retry-After": "7"})
                            return
                        api._check(batch)
                        self._send(200, _public(batch))
                    elif len(pieces) == 2 and pieces[0] == "files" and pieces[1] in api.files:
                        uploaded = api.files[pieces[1]]
                        uploaded["checks"] = uploaded.get("checks", 0) + 1
                        status = "pending" if uploaded["checks"] < api.file_checks else "processed"
                        self._send(200, {"id": uploaded["id"], "object": "file", "purpose": uploaded["purpose"],
                                         "status": status})
                    elif len(pieces) == 3 and pieces[0] == "files" and pieces[2] == "content" and pieces[1] in api.files:
                        lines = api.files[pieces[1]]["lines"]
                        self._send(200, None, raw="".join(json.dumps(line) + "\n" for line in lines).encode("utf-8"))
                    else:
                        self._send(404, {"error": {"code": "NotFound", "message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                routed = self._route()
                if routed is None:
                    return
                pieces, _ = routed
                if pieces == ["files"]:
                    fields = _multipart(self.headers.get("Content-Type", ""), raw)
                    content = fields["file"][1].decode("utf-8")
                    with api.lock:
                        file_id = f"file-{len(api.files) + 1}"
                        lines = [json.loads(line) for line in content.splitlines() if line.strip()]
                        api.files[file_id] = {"id": file_id, "purpose": fields["purpose"][1].decode(), "lines": lines}
                        api.uploads.append({"purpose": fields["purpose"][1].decode(), "filename": fields["file"][0],
                                            "lines": lines})
                    status = "pending" if api.file_checks else "processed"
                    self._send(200, {"id": file_id, "object": "file", "purpose": "batch", "bytes": len(content),
                                     "status": status})
                elif pieces == ["batches"]:
                    body = json.loads(raw)
                    with api.lock:
                        api.creates.append(body)
                        number = len(api.batches) + 1
                        batch = {"id": f"batch_{number}", "object": "batch", "number": number, "step": 0, "checks": 0,
                                 "status": api.states[0], "input_file_id": body["input_file_id"], "endpoint": body["endpoint"],
                                 "completion_window": body["completion_window"], "created_at": int(time.time()),
                                 "output_file_id": None, "error_file_id": None, "errors": None,
                                 "request_counts": {"total": 0, "completed": 0, "failed": 0}}
                        api.batches[batch["id"]] = batch
                        lose = api.lose_create_answers > 0
                        api.lose_create_answers -= lose
                    if lose:  # the batch exists; the answer never arrives
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.close_connection = True
                        self.connection.close()
                        return
                    self._send(200, _public(batch))
                elif len(pieces) == 3 and pieces[0] == "batches" and pieces[2] == "cancel" and pieces[1] in api.batches:
                    with api.lock:
                        api.cancels.append(pieces[1])
                        batch = api.batches[pieces[1]]
                        batch["status"] = "cancelling"
                    self._send(200, _public(batch))
                else:
                    self._send(404, {"error": {"code": "NotFound", "message": f"no route {self.path}"}})

        return Handler


def _public(batch: dict) -> dict:
    """A batch as the API shows it (without the fake's bookkeeping)."""
    return {key: value for key, value in batch.items() if key not in ("number", "step", "checks")}


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[Optional[str], bytes]]:
    """The fields of a multipart/form-data body: name -> (file name, content)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    return {
        part.get_param("name", header="content-disposition"): (part.get_filename(), part.get_payload(decode=True))
        for part in message.iter_parts()
    }
