"""The teacher's key appears nowhere: not in an error, a log line, rejected.jsonl, a journal, MLflow or the CLI output.

Keys are chosen to break naive redaction: a line break (the HTTP library prints the header through repr(), so
the second half shows up escaped), quotes and a backslash (escaped differently by repr() and JSON), characters
outside Latin-1 (http.client encodes headers as Latin-1). Every check looks for the key in each form a library
prints it, and for every run of five or more letters and digits of it, so a half-masked key counts as a leak.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_teacher_server import FakeTeacherServer  # noqa: E402

from azdistill.config.loading import load_config  # noqa: E402
from azdistill.config.teacher import TeacherConfig
from azdistill.errors import UserError  # noqa: E402
from azdistill.secrets import redact, register_secret  # noqa: E402
from azdistill.teachers import credentials
from azdistill.teachers.credentials import Credential, resolve_credential

VARIABLE = "AZDISTILL_TEACHER_KEY"
# Each run of letters and digits is five characters or more, so a partial leak is caught too.
LINE_BREAK_KEY = "Nw4Xq7Lp2Rz\nHt5Ky8Mv3Bc"
CRLF_KEY = "Nw4Xq7Lp2Rz\r\nHt5Ky8Mv3Bc"
QUOTES_KEY = "Qx7Lm'Kp2Vn\"Zr9Tb\\Wm4Hs-3f8a2c1e9b7d6a5c"
NON_LATIN1_KEY = "Ue6Pd3Fw9\u00e9\u65e5\U0001f600Gs2Jk5Lq8"  # é, a CJK character, an emoji
ACCENT_KEY = "Ue6Pd3Fw9\u00e9Gs2Jk5Lq8"  # é alone is Latin-1, yet no provider's key holds it
PLAIN_KEY = "f3a9c1d2e4b5a6978877665544332211"


def forms(key: str) -> set[str]:
    """Every way a library prints the key (itself, repr/ascii/JSON escapes, percent-encoding), each line of it, and
    each run of five or more letters and digits (what is left of a key masked only in part)."""
    found = {key, repr(key)[1:-1], ascii(key)[1:-1], json.dumps(key)[1:-1], json.dumps(key, ensure_ascii=False)[1:-1],
             quote(key, safe=""), quote_plus(key), repr(key.encode("utf-8"))[2:-1]}
    found |= {line for line in key.splitlines() if len(line) >= 4}
    found |= set(re.findall(r"[A-Za-z0-9]{5,}", key))
    return found


def leaks(text: str, key: str) -> list[str]:
    return sorted(form for form in forms(key) if form in text)


def file_leaks(folder: Path, key: str) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path.relative_to(folder)}: {form!r}" for form in forms(key) if form.encode("utf-8") in data]
    return found


def teacher(**auth) -> TeacherConfig:
    return TeacherConfig.model_validate({"kind": "openai-compatible", "endpoint": "http://127.0.0.1:9/v1", "model": "m", "auth": auth})


# ---------------------------------------------------------------------------------------------------
# A key a header cannot carry is refused where it is read, naming where it came from


@pytest.mark.parametrize(
    "key, what",
    [
        (LINE_BREAK_KEY, "a line break"),
        (CRLF_KEY, "a line break"),
        ("Nw4Xq7Lp2Rz\tHt5Ky8Mv3Bc", "a tab"),
        ("Nw4Xq7Lp2Rz\x00Ht5Ky8Mv3Bc", "a NUL character"),
        ("Nw4Xq7Lp2Rz\x1bHt5Ky8Mv3Bc", "a control character"),
        ("Nw4Xq7Lp2Rz\u200bHt5Ky8Mv3Bc", "a control character"),  # zero-width space (category Cf)
        ("Nw4Xq7Lp2Rz\u2028Ht5Ky8Mv3Bc", "a line break"),  # Unicode line separator
        ("Nw4Xq7Lp2Rz Ht5Ky8Mv3Bc", "a space"),
        (NON_LATIN1_KEY, "a character outside ASCII"),
        (ACCENT_KEY, "a character outside ASCII"),
    ],
)
def test_a_key_a_header_cannot_carry_is_refused_naming_the_variable_never_the_value(key, what):
    with pytest.raises(UserError) as caught:
        resolve_credential(teacher(api_key_env=VARIABLE), environ={VARIABLE: key})
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert f"the key in environment variable {VARIABLE} holds {what}" in message
    assert "export it again without it" in message
    assert leaks(message, key) == []


def test_whitespace_around_a_key_is_removed_with_a_note(caplog):
    caplog.set_level(logging.INFO, logger="azdistill")
    credential = resolve_credential(teacher(api_key_env=VARIABLE), environ={VARIABLE: f"  {PLAIN_KEY}\r\n"})
    assert credential.secret() == PLAIN_KEY
    assert f"removed the whitespace around the key in environment variable {VARIABLE}" in caplog.text
    assert PLAIN_KEY not in caplog.text
    with pytest.raises(UserError, match=f"environment variable {VARIABLE} is not set"):
        resolve_credential(teacher(api_key_env=VARIABLE), environ={VARIABLE: " \n"})


def test_every_way_of_getting_a_key_refuses_one_a_header_cannot_carry(monkeypatch):
    monkeypatch.setattr(credentials, "_key_vault_secret", lambda url, name: LINE_BREAK_KEY)
    monkeypatch.setattr(credentials, "_connection_key", lambda auth, azure, environ: NON_LATIN1_KEY)
    vault = teacher(method="key_vault", key_vault_url="https://v.vault.azure.net", key_vault_secret="teacher-key")
    with pytest.raises(UserError, match="the key in Key Vault secret teacher-key holds a line break") as caught:
        resolve_credential(vault)
    assert leaks(str(caught.value), LINE_BREAK_KEY) == []
    connection = teacher(method="workspace_connection", connection="teacher-conn")
    with pytest.raises(UserError, match="the key in workspace connection teacher-conn holds a character outside ASCII") as caught:
        resolve_credential(connection)
    assert leaks(str(caught.value), NON_LATIN1_KEY) == []

    token = "eyJhbGciOiJIUzI1NiJ9.e30\nQx7Lm2Kp9Vn"
    entra = Credential("entra", token_provider=lambda: (token, time.time() + 3600), source="Entra ID token for s")
    with pytest.raises(UserError, match="the Entra ID token for s holds a line break") as caught:
        entra.secret()
    assert leaks(str(caught.value), token) == []


@pytest.mark.parametrize("name", ["abc123xyz", "Hy7Tq2Wz", "sk_live_4f8a"])
def test_a_name_that_may_be_a_key_is_not_echoed_when_no_such_variable_is_set(name):
    with pytest.raises(UserError) as caught:
        resolve_credential(teacher(api_key_env=name), environ={})
    assert name not in str(caught.value)
    assert "teacher.auth.api_key_env" in str(caught.value) and "is not set" in str(caught.value)
    # A name that looks like one is named, to help.
    with pytest.raises(UserError, match="the environment variable OPENAI_API_KEY is not set"):
        resolve_credential(teacher(api_key_env="OPENAI_API_KEY"), environ={})


# ---------------------------------------------------------------------------------------------------
# Redaction covers every form a library prints


@pytest.mark.parametrize("key", [LINE_BREAK_KEY, QUOTES_KEY, NON_LATIN1_KEY, "Zq8Wd4Lm2Np6Rt\x00Bx3Cv7Hj9Kl"])
def test_redact_masks_the_key_in_every_form_a_library_prints(key):
    register_secret(key)
    texts = [
        key, repr(key), ascii(key), json.dumps(key), json.dumps({"message": f"bad header value {key!r}"}),
        f"Authorization: Bearer {key}", f"api-key: {key}", repr({"api-key": key}), repr({"Authorization": f"Bearer {key}"}),
        # what requests' InvalidHeader says about a header holding a line break
        f"Invalid leading whitespace, reserved character(s), or return character(s) in header value: {f'Bearer {key}'!r}",
        f"https://h/v1?api-key={quote(key, safe='')}", f"https://h/v1?api-key={quote_plus(key)}",
        repr(f"Bearer {key}".encode("utf-8")),
    ]
    texts += [f"echoed: {line}" for line in key.splitlines()]
    for text in texts:
        assert leaks(redact(text), key) == [], text


def test_authorization_values_are_masked_even_when_never_registered():
    unknown = "Zq8Wd4Lm2Np6RtYe5"
    for text in (f"Authorization: Bearer {unknown}", f"{{'api-key': '{unknown}'}}", f'{{"api-key": "{unknown}"}}',
                 f"api_key={unknown}", f"'Bearer {unknown}\\nXy7Gh3Jk'"):
        assert unknown not in redact(text), text


def test_the_log_filter_masks_messages_and_tracebacks():
    register_secret(QUOTES_KEY)
    stream = __import__("io").StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        register_secret(QUOTES_KEY)  # installs the filter on the handlers there are now
        log = logging.getLogger("azdistill.test_secrets")
        log.warning("header %r refused", {"Authorization": f"Bearer {QUOTES_KEY}"})
        try:
            raise ValueError(f"bad header {QUOTES_KEY!r}")
        except ValueError:
            log.exception("request failed")
    finally:
        root.removeHandler(handler)
    assert "request failed" in stream.getvalue() and "ValueError" in stream.getvalue()
    assert leaks(stream.getvalue(), QUOTES_KEY) == []


# ---------------------------------------------------------------------------------------------------
# Nothing typed where a name belongs is echoed by a config error


def _config(tmp_path: Path, auth: str = "{api_key_env: MY_TEACHER_KEY}") -> Path:
    (tmp_path / "a.jsonl").write_text("")
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(
        f"""
        name: t
        task: {{type: qa}}
        data: {{train: a.jsonl, validation: a.jsonl, test: a.jsonl}}
        student: {{model: s}}
        teacher: {{kind: openai-compatible, endpoint: "http://127.0.0.1:9/v1", model: m, auth: {auth}}}
        """
    ))
    return path


@pytest.mark.parametrize(
    "override, value",
    [
        ("teacher.auth.api_key_env.x=sk-Qx7Lm2Kp9Vn4Zr8Tb", "Qx7Lm2Kp9Vn4Zr8Tb"),  # api_key_env already holds a name
        ("teacher.auth.api_key_env.x=abc123xyz", "abc123xyz"),
        ("teacher.auth.api_key_env=abc def", "abc def"),
        ("teacher.auth.api_key_env=Hy7Tq-2Wz", "Hy7Tq-2Wz"),
        ("teacher.auth.key_vault_secret=[Hy7Tq2Wz]", "Hy7Tq2Wz"),
        ("teacher..api_key=Hy7Tq2Wz", "Hy7Tq2Wz"),
        ("teacher.auth.token.x=Hy7Tq2Wz", "Hy7Tq2Wz"),
        ("teacher.auth.password=Hy7Tq2Wz", "Hy7Tq2Wz"),
    ],
)
def test_an_override_of_a_secret_bearing_key_is_never_echoed(tmp_path, override, value):
    with pytest.raises(UserError) as caught:
        load_config(_config(tmp_path), [override])
    assert value not in str(caught.value)
    assert str(caught.value).startswith("--set ")


def test_an_override_of_any_other_key_still_shows_what_was_given(tmp_path):
    with pytest.raises(UserError, match=r"teacher.timeout_s: .*\(given: 'soon'\)"):
        load_config(_config(tmp_path), ["teacher.timeout_s=soon"])


# ---------------------------------------------------------------------------------------------------
# The secret scan: a whole synthesize run through the CLI against a teacher that echoes the key back


def _run_config(tmp_path: Path, url: str, api_key_env: str = VARIABLE, tracking: bool = False) -> Path:
    system = "Classify the sentiment. Answer positive or negative."
    rows = ["good 1", "[[echo_auth]] 2", "bad [[flaky:1]] 3", "good 4"]
    for split, texts in (("train", rows), ("validation", ["good v"]), ("test", ["good t"])):
        (tmp_path / f"{split}.jsonl").write_text("".join(
            json.dumps({"messages": [{"role": "system", "content": system}, {"role": "user", "content": f"Review: {text}"}]}) + "\n"
            for text in texts
        ))
    config = {
        "name": "t", "workdir": str(tmp_path / "work"), "task": {"type": "nli", "labels": ["positive", "negative"]},
        "data": {split: str(tmp_path / f"{split}.jsonl") for split in ("train", "validation", "test")},
        "teacher": {"kind": "openai-compatible", "endpoint": f"{url}/v1", "model": "big-teacher",
                    "auth": {"method": "api_key_env", "api_key_env": api_key_env},
                    "backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 2.0},
        "synthesis": {"min_success_ratio": 0.0, "temperature": 0.0},
        "student": {"model": str(tmp_path / "student")},
        "tracking": {"enabled": True, "uri": f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"} if tracking else {"enabled": False},
    }
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@pytest.mark.parametrize(
    "key, sent, tracking",
    [
        (QUOTES_KEY, QUOTES_KEY, True),
        (f" {PLAIN_KEY}\n", PLAIN_KEY, False),  # a trailing line break, as `cat key.txt` leaves: removed
        (LINE_BREAK_KEY, None, True),
        (CRLF_KEY, None, False),
        (NON_LATIN1_KEY, None, False),
        (ACCENT_KEY, None, False),
    ],
)
def test_secret_scan_no_key_in_any_file_log_line_or_cli_output(tmp_path, monkeypatch, caplog, key, sent, tracking):
    from click.testing import CliRunner

    from azdistill.cli import cli

    monkeypatch.setenv(VARIABLE, key)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    caplog.set_level(logging.DEBUG)
    with FakeTeacherServer(api_key=sent or "unused") as server:
        result = CliRunner().invoke(cli, ["synthesize", str(_run_config(tmp_path, server.url, tracking=tracking))])
    output = result.output + result.stderr
    if sent is None:
        assert result.exit_code == 2, output
        assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: teacher.auth: the key in")
        assert VARIABLE in result.stderr
        assert server.counts["requests"] == 0  # refused before anything was sent
    else:
        assert result.exit_code == 0, (output, result.exception)
        assert server.headers_seen[0]["authorization"] == f"Bearer {sent}"  # the key did go to the endpoint
        rejected = [json.loads(line) for line in (tmp_path / "work" / "runs" / "t" / "synthesize" / "rejected.jsonl").read_text().splitlines()]
        assert any("***" in row["reason"] for row in rejected)  # the server echoed the key; we masked it
    assert "Traceback" not in output
    assert leaks(output, key) == []
    assert leaks(caplog.text, key) == []
    assert file_leaks(tmp_path, key) == []
    if tracking and sent:
        assert (tmp_path / "work" / "mlflow.db").exists()


def test_secret_scan_a_key_typed_where_the_variable_name_belongs(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from azdistill.cli import cli

    short_key = "Hy7Tq2Wz"  # too short for looks_like_secret, and a valid variable name
    monkeypatch.delenv(short_key, raising=False)
    with FakeTeacherServer() as server:
        path = _run_config(tmp_path, server.url, api_key_env=short_key)
        result = CliRunner().invoke(cli, ["synthesize", str(path)])
        assert result.exit_code == 2 and "is not set" in result.stderr
        assert short_key not in result.output + result.stderr
        result = CliRunner().invoke(cli, ["synthesize", str(path), "--set", f"teacher.auth.api_key_env.x={short_key}x"])
        assert result.exit_code == 2 and result.stderr.startswith("error: --set teacher.auth.api_key_env")
        assert short_key not in result.output + result.stderr
    if (tmp_path / "work").exists():
        assert file_leaks(tmp_path / "work", short_key) == []
