"""The hosted-teacher client and the synthesize stage against a misbehaving OpenAI-compatible server on loopback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_teacher_server import FakeTeacherServer, default_answer  # noqa: E402

from azdistill.config.schema import DistillConfig  # noqa: E402
from azdistill.errors import StageFailed, UserError  # noqa: E402
from azdistill.secrets import looks_like_secret, redact  # noqa: E402
from azdistill.stages.synthesize import synthesize  # noqa: E402
from azdistill.teachers.base import BudgetExceeded, RecordRejected
from azdistill.teachers.credentials import Credential
from azdistill.teachers.factory import hosted_teacher_factory  # noqa: E402
from azdistill.teachers.hosted import EndpointTeacher, request_url
from azdistill.teachers.limits import AdaptiveRateLimiter, Budget, parse_retry_after

KEY = "f3a9c1d2e4b5a6978877665544332211"  # what an Azure OpenAI key looks like (32 hex characters)
SYSTEM = "Classify the sentiment. Answer positive or negative."
NLI = {"type": "nli", "labels": ["positive", "negative"]}
FAST = {"backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 2.0}


def single(text: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Review: {text}"}]


def write_split(path: Path, rows: list[list[dict]]) -> None:
    path.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in rows))


def hosted_config(tmp_path: Path, url: str, train: list, validation: list, task=NLI, teacher=None, **synthesis) -> DistillConfig:
    for split, rows in (("train", train), ("validation", validation), ("test", validation)):
        write_split(tmp_path / f"{split}.jsonl", rows)
    return DistillConfig.model_validate(
        {
            "name": "t",
            "workdir": str(tmp_path / "work"),
            "task": task,
            "data": {split: str(tmp_path / f"{split}.jsonl") for split in ("train", "validation", "test")},
            "teacher": {"kind": "openai-compatible", "endpoint": f"{url}/v1", "model": "big-teacher", "auth": {"method": "none"}, **FAST, **(teacher or {})},
            "synthesis": {"min_success_ratio": 0.0, "temperature": 0.0, **synthesis},
            # A hosted teacher has no layers to prune: its student is a model of its own (never loaded here).
            "student": {"model": str(tmp_path / "student")},
            "tracking": {"enabled": False},
        }
    )


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def server():
    with FakeTeacherServer() as running:
        yield running


def client(server: FakeTeacherServer, kind="openai-compatible", key=None, **options) -> EndpointTeacher:
    settings = dict(model="big-teacher", timeout_s=2.0, backoff_s=0.01, max_backoff_s=0.05, temperature=0.0)
    settings.update(options)
    return EndpointTeacher(kind=kind, endpoint=f"{server.url}/v1", credential=Credential("key", key=key) if key else Credential("none"), **settings)


# ---------------------------------------------------------------------------------------------------
# Pure parts


def test_retry_hints_prefer_milliseconds_and_read_http_dates():
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "1"}) == 0.25
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({}) is None
    from email.utils import formatdate

    sent_at = 1_800_000_000.0  # an HTTP date has whole seconds
    assert parse_retry_after({"retry-after": formatdate(sent_at + 10, usegmt=True)}, now=lambda: sent_at) == 10.0


def test_urls_and_headers_per_endpoint_kind():
    assert request_url("azure_openai", "https://r.openai.azure.com", "gpt4o", "2024-10-21") == (
        "https://r.openai.azure.com/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21"
    )
    assert request_url("azure_openai", "https://r.openai.azure.com", "gpt4o", "v1") == "https://r.openai.azure.com/openai/v1/chat/completions"
    assert request_url("serverless", "https://m.eastus2.models.ai.azure.com", None, None) == "https://m.eastus2.models.ai.azure.com/chat/completions"
    assert request_url("online_endpoint", "https://e.westus.inference.ml.azure.com", "blue", None) == "https://e.westus.inference.ml.azure.com/v1/chat/completions"
    assert request_url("openai-compatible", "http://h:8000/v1", None, None) == "http://h:8000/v1/chat/completions"

    azure = EndpointTeacher("azure_openai", "https://r.openai.azure.com", Credential("key", key=KEY), deployment="gpt4o", api_version="2024-10-21")
    assert azure.headers()["api-key"] == KEY and "Authorization" not in azure.headers()
    assert "model" not in azure.body  # the deployment in the URL picks the model
    token = Credential("entra", token_provider=lambda: ("eyJtoken.part.sig", time.time() + 3600))
    assert EndpointTeacher("azure_openai", "https://r", token, deployment="d", api_version="v").headers()["Authorization"] == "Bearer eyJtoken.part.sig"
    online = EndpointTeacher("online_endpoint", "https://e", Credential("key", key=KEY), deployment="blue")
    assert online.headers()["Authorization"] == f"Bearer {KEY}" and online.headers()["azureml-model-deployment"] == "blue"


def test_secrets_are_told_from_names_and_redacted():
    for secret in (KEY, "sk-proj-abc123", "eyJhbGciOiJIUzI1NiJ9.e30.sig", "Z8pQ2rT7vX1yB4nM6kL9jH3gF5dS0aWe"):
        assert looks_like_secret(secret), secret
    for name in ("AZURE_OPENAI_API_KEY", "teacher-key", "my-connection", "OPENAI_KEY_2024"):
        assert not looks_like_secret(name), name
    Credential("key", key="s3cr3t-value-XYZ")
    assert redact("header was s3cr3t-value-XYZ here") == "header was *** here"
    assert "abcdefgh123" not in redact("Authorization: Bearer abcdefgh123")


def test_a_literal_key_in_the_config_is_rejected_without_repeating_it(tmp_path):
    from azdistill.config.loading import load_config

    base = textwrap.dedent(
        """
        name: t
        task: {type: qa}
        data: {train: a.jsonl, validation: a.jsonl, test: a.jsonl}
        teacher:
          kind: azure_openai
          endpoint: https://r.openai.azure.com
          deployment: gpt4o
          api_version: 2024-10-21
        """
    )
    path = tmp_path / "c.yaml"
    cases = [
        (base + f"  api_key: {KEY}\n", []),
        (base + f"  auth: {{api_key_env: {KEY}}}\n", []),
        (base, [f"teacher.auth.api_key_env={KEY}"]),
        (base.replace("https://r.openai.azure.com", f"https://r.openai.azure.com?api-key={KEY}"), []),
    ]
    for text, overrides in cases:
        path.write_text(text)
        with pytest.raises(UserError) as caught:
            load_config(path, overrides)
        assert KEY not in str(caught.value)
        assert "key" in str(caught.value)


class FakeClock:
    """A clock that only moves when the limiter sleeps: pacing is asserted exactly, whatever the machine's load."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        assert len(self.sleeps) < 10_000, "the limiter keeps sleeping: it never reaches its slot"
        # At least a microsecond, as a real clock moves: a wait of a rounding error would not move 1000.0 at all.
        self.now += max(seconds, 1e-6)


def test_configured_request_budget_paces_requests():
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(requests_per_minute=1200, clock=clock, sleep=clock.sleep)  # 20 per second
    sent_at = []
    for _ in range(11):
        limiter.acquire()
        sent_at.append(clock.now)
    assert sent_at[0] == 1000.0  # the first request goes at once
    gaps = [later - earlier for earlier, later in zip(sent_at, sent_at[1:])]
    # Then one every 1/19.8 s (1% under the budget, as under a limit found from 429s), no burst and no drift.
    assert gaps == pytest.approx([1 / (20 * 0.99)] * 10)


def test_token_budget_holds_back_big_requests_and_takes_back_what_was_not_used():
    clock = FakeClock()
    # 1000 tokens/s, bucket 10000; requests are not the limit here
    limiter = AdaptiveRateLimiter(requests_per_minute=600000, tokens_per_minute=60000, clock=clock, sleep=clock.sleep)
    limiter.acquire(tokens=9800)
    started = clock.now
    limiter.acquire(tokens=500)  # 300 short: waits for 0.3 s of refill
    assert clock.now - started == pytest.approx(0.3, abs=0.01)
    limiter.refund(5000)  # the answers were shorter than max_new_tokens
    started = clock.now
    limiter.acquire(tokens=4000)
    assert clock.now - started == pytest.approx(0.0, abs=0.01)  # the refund covered it: no wait


def test_budget_refuses_what_could_pass_the_cap():
    budget = Budget(prompt_price=1_000_000, completion_price=2_000_000, max_cost=100)  # 1 per prompt token, 2 per completion token
    reserved = budget.reserve(10, 20)  # worst case 50
    budget.settle(reserved, 10, 5)  # spent 20
    budget.reserve(10, 20)  # 70 reserved or spent
    with pytest.raises(BudgetExceeded, match="synthesis.max_cost 100"):
        budget.reserve(10, 20)


# ---------------------------------------------------------------------------------------------------
# The client against the server


def test_answers_with_usage_and_top_logprobs(server):
    teacher = client(server, top_logprobs=3)
    completion = teacher.complete(single("good film"))
    assert completion.text == "positive" and completion.finish_reason == "stop"
    assert completion.completion_tokens == 1 and completion.prompt_tokens > 0
    assert completion.logprobs[0]["token"] == "positive" and len(completion.logprobs[0]["top_logprobs"]) == 3
    body = server.bodies[-1]
    assert body["logprobs"] is True and body["top_logprobs"] == 3 and body["model"] == "big-teacher" and body["temperature"] == 0.0


@pytest.mark.parametrize("marker", ["flaky:2", "reset:2", "slow:1", "bad_json"])
def test_transient_faults_are_retried_until_answered(marker):
    with FakeTeacherServer(hang_s=0.4) as server:
        teacher = client(server, timeout_s=0.2)
        prompt = single(f"good [[{marker}]]")
        assert teacher.complete(prompt).text == "positive"
        assert teacher.stats.retries >= 1
        assert server.per_prompt[prompt[-1]["content"]] >= 2


def test_429_retry_after_is_honoured_by_every_worker():
    with FakeTeacherServer(rate_limit=5, rate_window_s=0.5) as server:
        teacher = client(server, max_concurrency=8)
        teacher.limiter = AdaptiveRateLimiter(initial_rate=100.0)  # start far too fast, on purpose
        answers = teacher.answer([single(f"good {i}") for i in range(20)])
        assert [a.text for a in answers] == ["positive"] * 20
        assert server.counts["throttled"] >= 1 and server.counts["answered"] == 20
        # Never more than the limit in any window: the server would have refused them.
        times = server.answered_at
        assert all(sum(1 for t in times if start <= t < start + 0.49) <= 5 for start in times)


def test_what_retrying_cannot_fix_is_not_retried(server):
    teacher = client(server)
    with pytest.raises(RecordRejected, match=r"content filter rejected the prompt \(violence\)"):
        teacher.complete(single("[[content_filter]]"))
    with pytest.raises(RecordRejected, match="context_length_exceeded"):
        teacher.complete(single("[[context_length]]"))
    assert server.per_prompt["Review: [[content_filter]]"] == 1
    with pytest.raises(UserError, match="HTTP 401"):
        teacher.complete(single("[[unauthorized]]"))
    assert server.per_prompt["Review: [[unauthorized]]"] == 1


def test_wrong_key_stops_at_once_naming_where_it_came_from():
    with FakeTeacherServer(api_key=KEY) as server:
        teacher = client(server, key="wrong-key-0000")
        teacher.credential.source = "environment variable TEACHER_KEY"
        with pytest.raises(UserError, match="refused the credential from environment variable TEACHER_KEY"):
            teacher.complete(single("good"))
        assert server.counts["requests"] == 1


def test_persistent_faults_give_up_as_retryable(server):
    teacher = client(server, max_retries=2)
    with pytest.raises(RecordRejected) as caught:
        teacher.complete(single("[[flaky:99]]"))
    assert caught.value.retryable and "failed 3 times" in str(caught.value)


# ---------------------------------------------------------------------------------------------------
# The stage against the server


def test_stage_puts_every_record_exactly_once_in_input_order_with_reasons(tmp_path, server):
    texts = ["good 1", "bad 2", "[[content_filter]] 3", "good [[flaky:1]] 4", "[[length]] 5", "[[empty]] 6",
             "good [[reset:1]] 7", "[[filtered_output]] 8", "bad 9", "bad 9", "[[context_length]] 11"]
    config = hosted_config(tmp_path, server.url, [single(t) for t in texts], [single("good v")], teacher={"max_concurrency": 4})
    out = synthesize(config, hosted_teacher_factory(config))

    accepted = [row["messages"][1]["content"] for row in read(out / "train.jsonl")]
    assert accepted == ["Review: good 1", "Review: bad 2", "Review: good [[flaky:1]] 4", "Review: good [[reset:1]] 7", "Review: bad 9"]
    rejected = {row["line"]: row["reason"] for row in read(out / "rejected.jsonl")}
    assert rejected[3] == "content filter rejected the prompt (violence)"
    assert rejected[5].startswith("answer cut off (finish_reason=length)")
    assert rejected[6] == "empty answer"
    assert rejected[8].startswith("answer removed by the teacher's content filter")
    assert rejected[10] == "exact duplicate of the example from input line 9"
    assert "context_length_exceeded" in rejected[11]
    assert len(accepted) + len(rejected) == len(texts)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["endpoint"]["retries"] >= 2 and stats["splits"]["validation"]["accepted"] == 1
    assert server.per_prompt["Review: [[content_filter]] 3"] == 1  # not retried


def test_a_record_hung_at_the_end_is_hedged_and_kept_once(tmp_path):
    """The endpoint never answers one request in time (it hangs 3 s; the client would wait 30): once every record was
    handed out, an idle worker asks that record again and the first answer is the one kept, exactly once."""
    texts = [f"good {n}" for n in range(20)] + ["bad [[slow:1]] hung"]
    with FakeTeacherServer(hang_s=3.0) as server:
        config = hosted_config(tmp_path, server.url, [single(t) for t in texts], [single("good v")],
                               teacher={"max_concurrency": 4, "timeout_s": 30.0})
        out = synthesize(config, hosted_teacher_factory(config))
        assert server.per_prompt["Review: bad [[slow:1]] hung"] == 2  # the hung request and its hedge
    kept = [row["messages"][1]["content"] for row in read(out / "train.jsonl")]
    assert kept == [f"Review: {t}" for t in texts]  # every record once, in input order, the hung one included
    assert read(out / "train.jsonl")[-1]["messages"][-1]["content"] == "negative"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["endpoint"]["hedged"] == 1 and stats["endpoint"]["retries"] == 0


def test_a_record_answered_but_not_yet_collected_is_not_hedged(monkeypatch):
    """A worker that has answered a record is done with it: its next request (another record's, long out) must not
    make the tail hedging ask the answered record again."""
    from types import SimpleNamespace

    from azdistill.synthesis import answering

    monkeypatch.setattr(answering, "_answer_item", lambda item, teacher, context, journal, stop: {"answer": "positive"})

    class Teacher:
        concurrency = 2

        def median_request_s(self) -> float:
            return 0.01

        def request_out_since(self, thread: int) -> float:
            return 0.0  # every worker is waiting on a request sent long ago (at clock 100 below)

    class Stream:
        context = journal = None
        started: list = []

        def start(self, record, index):
            self.started.append(index)
            return SimpleNamespace(index=index)

    stream = Stream()
    pool = answering._Pool(Teacher(), clock=lambda: 100.0)
    try:
        pool.submit(answering._Job(stream, SimpleNamespace(index=0), record=object()))
        for _ in range(500):  # until the worker has handed the answer over (not collected: the main thread is elsewhere)
            if pool.results.qsize():
                break
            time.sleep(0.01)
        assert pool.results.qsize() == 1
        pool.hedge_the_tail()
        assert pool.hedged == 0 and stream.started == []
    finally:
        pool.close()


def test_a_hedged_record_whose_first_copy_answers_late_counts_both_copies_in_the_cost(tmp_path):
    """The endpoint bills both copies of a hedged record: the copy that answers second is dropped from the outputs
    but its tokens are in stats.json and in the cost. 'late' answers its first request after 1 s (a hedge goes
    out after 4x the median request time, at least 0.2 s, and answers at once); 'slow' takes 3 s every time, so the
    stage is still running when the late copy comes back."""
    calls: dict = {}
    lock = threading.Lock()

    def answer(messages):
        text = messages[-1]["content"]
        with lock:
            calls[text] = calls.get(text, 0) + 1
            first = calls[text] == 1
        if "slow" in text or ("late" in text and first):
            time.sleep(3.0 if "slow" in text else 1.0)
        return default_answer(messages)

    texts = [f"good {n}" for n in range(12)] + ["bad late", "bad slow"]
    with FakeTeacherServer(answer=answer) as server:
        config = hosted_config(tmp_path, server.url, [single(t) for t in texts], [single("good v")],
                               teacher={"max_concurrency": 4, "timeout_s": 30.0, "price_per_million_prompt_tokens": 1.0,
                                        "price_per_million_completion_tokens": 1.0})
        out = synthesize(config, hosted_teacher_factory(config))
    assert calls["Review: bad late"] == 2
    train = read(out / "train.jsonl")
    assert [row["messages"][1]["content"] for row in train] == [f"Review: {t}" for t in texts]  # each record once
    stats = json.loads((out / "stats.json").read_text())
    endpoint = stats["endpoint"]
    assert endpoint["hedged"] == 2
    # The late copy's prompt, as the fake counts it (a quarter of its characters, plus one); the slow record's hedge
    # is usually still out when the stage ends, and is not waited for (nor counted).
    late_prompt = sum(len(m["content"]) for m in single("bad late")) // 4 + 1
    assert endpoint["hedge_prompt_tokens"] in {late_prompt, 2 * late_prompt} and endpoint["hedge_completion_tokens"] > 0
    kept = sum(split["prompt_tokens"] + split["completion_tokens"] for split in stats["splits"].values())
    billed = kept + endpoint["hedge_prompt_tokens"] + endpoint["hedge_completion_tokens"]
    assert stats["cost"] == pytest.approx(billed / 1e6) and billed > kept


def test_conversations_are_regenerated_turn_by_turn_and_logprobs_kept_beside_them(tmp_path, server):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "human 1"},
        {"role": "user", "content": "How are you?"},
    ]
    config = hosted_config(tmp_path, server.url, [conversation, single("good")], [conversation[:2]], task={"type": "conversation"}, top_logprobs=2)
    out = synthesize(config, hosted_teacher_factory(config))
    second_turn = [body for body in server.bodies if body["messages"][-1]["content"] == "How are you?"]
    assert second_turn[0]["messages"][2] == {"role": "assistant", "content": "Answer to: Hi"}
    rows = read(out / "train.jsonl")
    assert [m["content"] for m in rows[0]["messages"]] == ["Be brief.", "Hi", "Answer to: Hi", "How are you?", "Answer to: How are you?"]
    sidecar = read(out / "train.logprobs.jsonl")
    assert [row["row"] for row in sidecar] == [0, 1]
    assert [turn["turn"] for turn in sidecar[0]["turns"]] == [1, 2]
    assert sidecar[0]["turns"][1]["content"][0]["token"] == "Answer" and len(sidecar[0]["turns"][1]["content"][0]["top_logprobs"]) == 2


def test_chain_of_thought_asks_for_json_and_trains_on_the_answer_or_the_rationale(tmp_path):
    def reasoned(messages):
        text = messages[-1]["content"]
        if "broken" in text:
            return "I think it is positive"
        label = "positive" if "good" in text else "negative"
        return json.dumps({"reason": f"The review sounds {label}.", "answer_choice": label})

    with FakeTeacherServer(answer=reasoned) as server:
        config = hosted_config(tmp_path, server.url, [single("good"), single("broken")], [single("bad")], prompt_strategy="chain_of_thought")
        out = synthesize(config, hosted_teacher_factory(config))
        assert '"answer_choice"' in server.bodies[0]["messages"][0]["content"]
        rows = read(out / "train.jsonl")
        assert rows[0]["messages"] == single("good") + [{"role": "assistant", "content": "positive"}]  # the student sees the original system
        assert read(out / "rejected.jsonl")[0]["reason"] == "chain-of-thought answer is not the JSON asked for"

        keep = config.model_copy(update={"synthesis": config.synthesis.model_copy(update={"keep_rationale": True})})
        out = synthesize(keep, hosted_teacher_factory(keep))
        assert read(out / "train.jsonl")[0]["messages"][-1]["content"] == "The review sounds positive.\n\nAnswer: positive"


def test_a_wrong_key_stops_the_stage_at_once_and_keeps_what_was_answered(tmp_path, monkeypatch):
    with FakeTeacherServer(api_key=KEY) as server:
        monkeypatch.setenv("TEACHER_KEY", "not-the-key-1234")
        config = hosted_config(tmp_path, server.url, [single(f"good {i}") for i in range(30)], [single("bad")],
                               teacher={"auth": {"method": "api_key_env", "api_key_env": "TEACHER_KEY"}}, preflight=False)
        with pytest.raises(UserError, match="refused the credential from environment variable TEACHER_KEY"):
            synthesize(config, hosted_teacher_factory(config))
        assert server.counts["requests"] <= config.teacher.max_concurrency  # no request after the first refusal came back
        monkeypatch.setenv("TEACHER_KEY", KEY)
        out = synthesize(config, hosted_teacher_factory(config))
        assert len(read(out / "train.jsonl")) == 30


def test_budget_cap_stops_the_run_before_it_is_exceeded_and_a_bigger_one_continues(tmp_path, server):
    prices = {"price_per_million_prompt_tokens": 1_000_000.0, "price_per_million_completion_tokens": 1_000_000.0}  # 1 per token
    config = hosted_config(tmp_path, server.url, [single(f"good {i}") for i in range(20)], [single("bad")],
                           teacher={**prices, "max_concurrency": 2}, max_new_tokens=10, max_cost=200.0, preflight=False)
    with pytest.raises(StageFailed, match="synthesis.max_cost 200"):
        synthesize(config, hosted_teacher_factory(config))
    journal = read(config.stage_dir("synthesize") / "train.journal.jsonl")
    spent = sum(row["prompt_tokens"] + row["completion_tokens"] for row in journal)
    assert 0 < len(journal) < 20 and spent <= 200
    bigger = config.model_copy(update={"synthesis": config.synthesis.model_copy(update={"max_cost": 10_000.0})})
    out = synthesize(bigger, hosted_teacher_factory(bigger))
    assert len(read(out / "train.jsonl")) == 20
    assert sum(server.per_prompt[f"Review: good {i}"] for i in range(20)) == 20  # none asked twice


def test_preflight_reports_the_sample_and_the_cost_and_refuses_a_budget_too_small(tmp_path, server):
    from click.testing import CliRunner

    from azdistill.cli import cli

    rows = [single(f"good {i}") for i in range(10)]
    config = hosted_config(tmp_path, server.url, rows, [single("bad")])
    yaml_path = tmp_path / "c.yaml"
    import yaml

    data = config.model_dump(mode="json")
    data["teacher"].update(price_per_million_prompt_tokens=3.0, price_per_million_completion_tokens=12.0)
    yaml_path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(cli, ["preflight", str(yaml_path)])
    assert result.exit_code == 0, result.output
    assert "sample call:" in result.output and "passes the checks" in result.output and "cost: about" in result.output
    assert "preflight OK" in result.output
    result = CliRunner().invoke(cli, ["preflight", str(yaml_path), "--set", "synthesis.max_cost=0.000001"])
    assert result.exit_code == 1 and "exceeds synthesis.max_cost" in result.output


# ---------------------------------------------------------------------------------------------------
# Kill and resume


RUNNER = """
import sys
from azdistill.config.loading import load_config
from azdistill.stages.synthesize import synthesize
from azdistill.teachers.factory import hosted_teacher_factory
config = load_config(sys.argv[1])
synthesize(config, hosted_teacher_factory(config))
"""


def _dump_config(config: DistillConfig, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def _kill_when(journal: Path, process: subprocess.Popen, lines: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if journal.exists() and journal.read_bytes().count(b"\n") >= lines:
            break
        if process.poll() is not None:
            raise AssertionError(f"the run ended before it could be killed: {process.stderr.read().decode()[-2000:]}")
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.parametrize("kill_after", [3, 17])
def test_sigkill_at_any_moment_then_rerun_loses_nothing_and_duplicates_nothing(tmp_path, kill_after):
    texts = [f"good {i}" if i % 3 else f"bad {i}" for i in range(40)]
    with FakeTeacherServer(latency_s=0.03) as server:
        config = hosted_config(tmp_path, server.url, [single(t) for t in texts], [single("good v")], teacher={"max_concurrency": 4}, preflight=False)
        path = _dump_config(config, tmp_path / "c.yaml")
        journal = config.stage_dir("synthesize") / "train.journal.jsonl"
        process = subprocess.Popen([sys.executable, "-c", RUNNER, str(path)], stderr=subprocess.PIPE, cwd=tmp_path)
        _kill_when(journal, process, kill_after)
        answered_before = {row["index"] for row in read(journal)} if journal.exists() else set()
        asked_before = dict(server.per_prompt)
        assert len(answered_before) < len(texts)

        out = synthesize(config, hosted_teacher_factory(config))
        rows = read(out / "train.jsonl")
        assert [row["messages"][1]["content"] for row in rows] == [f"Review: {t}" for t in texts]
        assert [row["messages"][-1]["content"] for row in rows] == ["positive" if t.startswith("good") else "negative" for t in texts]
        for index in answered_before:  # what the killed run had journaled was not asked again
            assert server.per_prompt[f"Review: {texts[index]}"] == asked_before[f"Review: {texts[index]}"]
        for index, text in enumerate(texts):
            assert server.per_prompt[f"Review: {text}"] <= 2  # at most once more: in flight when the kill came


def test_a_killed_conversation_resumes_after_its_answered_turns(tmp_path):
    turns = [{"role": "system", "content": "Be brief."}]
    for n in range(6):
        turns += [{"role": "user", "content": f"question {n}"}, {"role": "assistant", "content": f"human {n}"}]
    with FakeTeacherServer(latency_s=0.05) as server:
        hello = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
        config = hosted_config(tmp_path, server.url, [turns[:-1]], [hello], task={"type": "conversation"}, preflight=False)
        path = _dump_config(config, tmp_path / "c.yaml")
        journal = config.stage_dir("synthesize") / "train.journal.jsonl"
        process = subprocess.Popen([sys.executable, "-c", RUNNER, str(path)], stderr=subprocess.PIPE, cwd=tmp_path)
        _kill_when(journal, process, 3)  # three turns answered and journaled
        journaled_turns = [row["turn"] for row in read(journal) if row.get("partial")]
        assert journaled_turns[:3] == [1, 2, 3]
        out = synthesize(config, hosted_teacher_factory(config))
        (row,) = read(out / "train.jsonl")
        assert [m["content"] for m in row["messages"][2::2]] == [f"Answer to: question {n}" for n in range(6)]
        for n in journaled_turns:
            assert server.per_prompt[f"question {n - 1}"] == 1


# ---------------------------------------------------------------------------------------------------
# The key never leaks


def test_the_key_is_in_no_output_file_log_line_or_mlflow_param(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("AZDISTILL_TEACHER_KEY", KEY)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    caplog.set_level("DEBUG")
    with FakeTeacherServer(api_key=KEY) as server:
        rows = [single("good 1"), single("[[echo_auth]] 2"), single("bad [[flaky:1]] 3"), single("[[content_filter]] 4")]
        config = hosted_config(tmp_path, server.url, rows, [single("good v")], teacher={"auth": {"method": "api_key_env"}})
        data = config.model_dump(mode="json")
        data["tracking"] = {"enabled": True, "uri": f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"}
        data["teacher"]["endpoint"] = f"{server.url}/v1"
        path = tmp_path / "c.yaml"
        import yaml

        path.write_text(yaml.safe_dump(data))
        from azdistill.config.loading import load_config
        from azdistill.tracking.tracker import make_tracker

        loaded = load_config(path)
        synthesize(loaded, hosted_teacher_factory(loaded), make_tracker(loaded))
        assert server.headers_seen[0]["authorization"] == f"Bearer {KEY}"  # the key did go to the endpoint

    echoed = [row for row in read(config.stage_dir("synthesize") / "rejected.jsonl") if row["line"] == 2]
    assert "***" in echoed[0]["reason"]  # the server echoed the key back; we masked it
    leaks = [str(file) for file in tmp_path.rglob("*") if file.is_file() and KEY.encode() in file.read_bytes()]
    assert leaks == []
    assert KEY not in caplog.text

    import mlflow

    mlflow.set_tracking_uri(data["tracking"]["uri"])
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert runs
    for run in runs:
        assert all(KEY not in f"{key}={value}" for key, value in run.data.params.items())
        assert all(KEY not in f"{key}={value}" for key, value in run.data.tags.items())
        assert run.data.params.get("teacher.auth.api_key_env") == "AZDISTILL_TEACHER_KEY"


def test_prompt_strategies_parse_what_they_ask_for():
    from azdistill.synthesis.prompts import check_strategy, teacher_system_prompt, training_target

    assert '"answer": <the final number>' in teacher_system_prompt("Solve.", "chain_of_thought", "math", None)
    assert training_target('```json\n{"reason": "3 + 4", "answer": "7.0"}\n```', "chain_of_thought", "math", None) == ("7", None)
    assert training_target('{"reason": "3 + 4", "answer": 7}', "chain_of_thought", "math", None, keep_rationale=True) == ("3 + 4\n\nAnswer: 7", None)
    assert training_target('{"reason": "x", "answer": "many"}', "chain_of_thought", "math", None)[1] == "chain-of-thought 'answer' is not a number"
    densities = json.dumps([{"Missing_Entities": "a", "Denser_Summary": "First summary."}, {"Missing_Entities": "b", "Denser_Summary": "Denser summary."}])
    assert training_target(densities, "chain_of_density", "summarization", None) == ("Denser summary.", None)
    assert training_target("Just a summary.", "chain_of_density", "summarization", None)[1] == "chain-of-density answer is not the JSON list asked for"
    assert "4 summaries" in teacher_system_prompt("Summarise.", "chain_of_density", "summarization", None)
    with pytest.raises(UserError, match="works with task types summarization, not qa"):
        check_strategy("chain_of_density", "qa")


# ---------------------------------------------------------------------------------------------------
# Reasoning-model teachers (o-series, DeepSeek-R1)


def test_request_body_sends_exactly_the_configured_keys(tmp_path):
    from azdistill.teachers.hosted import build_endpoint_teacher

    usual = hosted_config(tmp_path, "http://127.0.0.1:9", [single("good")], [single("bad")], presence_penalty=0.5)
    assert set(build_endpoint_teacher(usual).body) == {"max_tokens", "temperature", "top_p", "presence_penalty", "seed", "model"}

    reasoning = hosted_config(
        tmp_path, "http://127.0.0.1:9", [single("good")], [single("bad")], presence_penalty=0.5, max_new_tokens=2000,
        teacher={"max_tokens_field": "max_completion_tokens", "reasoning_effort": "high", "sampling_parameters": False},
    )
    assert build_endpoint_teacher(reasoning).body == {"max_completion_tokens": 2000, "reasoning_effort": "high", "seed": 0, "model": "big-teacher"}


def test_a_reasoning_model_refuses_the_usual_body_with_the_setting_to_change():
    with FakeTeacherServer(reasoning=True) as server:
        with pytest.raises(UserError, match=r"Unsupported parameter: 'max_tokens'.*set teacher.max_tokens_field: max_completion_tokens"):
            client(server).complete(single("good"))
        with pytest.raises(UserError, match=r"Unsupported value: 'temperature'.*set teacher.sampling_parameters: false"):
            client(server, max_tokens_field="max_completion_tokens").complete(single("good"))
        assert server.counts["refused_parameter"] == 2  # each stopped at once, not retried or tried on other records

        teacher = client(server, max_tokens_field="max_completion_tokens", sampling_parameters=False, reasoning_effort="low")
        completion = teacher.complete(single("good film"))
        assert set(server.bodies[-1]) == {"messages", "max_completion_tokens", "reasoning_effort", "model"}
        assert completion.text == "positive" and completion.reasoning.startswith("The user asks about 'Review: good film'")
        assert completion.completion_tokens > 1  # the thinking is billed as completion tokens


class _Answer:
    """A stand-in for an HTTP response holding one chat completion."""

    def __init__(self, message: dict):
        self.message = message

    def json(self) -> dict:
        return {"choices": [{"message": {"role": "assistant", **self.message}, "finish_reason": "stop"}], "usage": {}}


@pytest.mark.parametrize(
    "message, text, reasoning",
    [
        ({"content": "positive"}, "positive", None),
        ({"content": "positive", "reasoning_content": " It says good. "}, "positive", "It says good."),  # DeepSeek, vLLM
        ({"content": "positive", "reasoning": "It says good."}, "positive", "It says good."),  # newer vLLM, Ollama
        ({"content": "positive", "reasoning_content": "Same.", "reasoning": "Same."}, "positive", "Same."),  # vLLM while renaming
        ({"content": "\n<think>\nIt says good.\n</think>\n\npositive"}, "positive", "It says good."),  # R1 without a reasoning parser
        ({"content": "It says good.\n</think>\n\npositive"}, "positive", "It says good."),  # <think> opened in the prompt
        ({"content": "<think>\nIt says good, so"}, "", "It says good, so"),  # cut off while thinking
        ({"content": None, "reasoning_content": "Hmm."}, "", "Hmm."),
        ({"content": "I <think> it is positive"}, "I <think> it is positive", None),  # not a leading block
    ],
)
def test_the_reasoning_trace_is_parsed_apart_from_the_answer(message, text, reasoning):
    teacher = EndpointTeacher("openai-compatible", "http://127.0.0.1:9/v1", Credential("none"), model="r1")
    completion = teacher._parse(_Answer(message))
    assert (completion.text, completion.reasoning) == (text, reasoning)


def _reasoning_yaml(tmp_path: Path, teacher: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(
        """
        name: t
        task: {type: qa}
        data: {train: a.jsonl, validation: a.jsonl, test: a.jsonl}
        student: {model: student-folder}
        teacher:
        """
    ) + textwrap.indent(textwrap.dedent(teacher), "  "))
    return path


def test_an_unquoted_api_version_read_by_yaml_as_a_date_is_taken_as_text(tmp_path):
    from azdistill.config.loading import load_config

    config = load_config(_reasoning_yaml(tmp_path, """\
        kind: azure_openai
        endpoint: https://r.openai.azure.com
        deployment: o3-mini
        api_version: 2024-10-21
        max_tokens_field: max_completion_tokens
        reasoning_effort: medium
        sampling_parameters: false
        """))
    assert config.teacher.api_version == "2024-10-21"
    assert (config.teacher.max_tokens_field, config.teacher.reasoning_effort, config.teacher.sampling_parameters) == ("max_completion_tokens", "medium", False)


def test_reasoning_settings_on_a_local_teacher_are_refused_naming_the_key(tmp_path):
    from azdistill.config.loading import load_config

    with pytest.raises(UserError) as caught:
        load_config(_reasoning_yaml(tmp_path, "kind: local\nreasoning_effort: high\n"))
    assert str(caught.value) == (
        f"{tmp_path / 'c.yaml'}:8: teacher.reasoning_effort: is only sent to hosted teachers (teacher.kind openai-compatible, "
        "azure_openai, serverless, online_endpoint), not teacher.kind local; remove teacher.reasoning_effort (given: 'high')"
    )
    with pytest.raises(UserError, match=r"c.yaml:7: teacher.sampling_parameters: is only sent to hosted teachers"):
        load_config(_reasoning_yaml(tmp_path, "sampling_parameters: false\n"))
    with pytest.raises(UserError, match=r"teacher.reasoning_effort: Input should be 'minimal', 'low', 'medium' or 'high'"):
        load_config(_reasoning_yaml(tmp_path, "kind: openai-compatible\nendpoint: http://h/v1\nmodel: r1\nreasoning_effort: max\n"))


# ---------------------------------------------------------------------------------------------------
# What the HTTP library and the endpoint say about a key never shows it


def _forms(key: str) -> set[str]:
    """The key as libraries print it (itself, repr/JSON escapes) and each run of five or more letters and digits."""
    import re

    return {key, repr(key)[1:-1], ascii(key)[1:-1], json.dumps(key)[1:-1]} | set(re.findall(r"[A-Za-z0-9]{5,}", key))


def _raw_credential(key: str) -> Credential:
    """A credential holding `key` as is, past the checks `Credential` makes (what a header the library refuses looks like)."""
    from azdistill.secrets import register_secret

    credential = Credential("key", key="placeholder-key-1234", source="environment variable TEACHER_KEY")
    credential._key = key
    register_secret(key)
    return credential


@pytest.mark.parametrize("key", ["Nw4Xq7Lp2Rz\nHt5Ky8Mv3Bc", "Ue6Pd3Fw9\u65e5\U0001f600Gs2Jk5Lq8"])
def test_a_header_the_http_library_refuses_stops_at_once_without_showing_the_key(server, key):
    teacher = EndpointTeacher("openai-compatible", f"{server.url}/v1", _raw_credential(key), model="m", **FAST)
    with pytest.raises(UserError, match="the credential from environment variable TEACHER_KEY cannot go into an HTTP header") as caught:
        teacher.complete(single("good"))
    assert [form for form in _forms(key) if form in str(caught.value)] == []
    assert server.counts["requests"] == 0 and teacher.stats.retries == 0  # not retried: it cannot succeed


def test_a_key_the_endpoint_echoes_back_is_masked_in_the_rejection(server):
    key = "Qx7Lm'Kp2Vn\"Zr9Tb\\Wm4Hs-3f8a2c1e9b7d6a5c"
    teacher = client(server, key=key)
    with pytest.raises(RecordRejected) as caught:
        teacher.complete(single("[[echo_auth]] good"))
    assert "***" in str(caught.value)
    assert [form for form in _forms(key) if form in str(caught.value)] == []
