"""Hosted teachers made to commit (issue 15, point 1): structured outputs restricted to the labels, the fallback to top
log-probabilities where an endpoint has none, self-consistency votes, and what the reject ledger and the sidecar keep;
against the loopback fake server (real sockets)."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_teacher_server import FakeTeacherServer  # noqa: E402
from test_endpoints import hosted_config, read, single  # noqa: E402

from azdistill.cli import cli  # noqa: E402
from azdistill.evaluation.measure import measure_hosted  # noqa: E402
from azdistill.stages.synthesize import synthesize  # noqa: E402
from azdistill.teachers.constrained import (  # noqa: E402
    label_probs_from_logprobs,
    read_structured_label,
    structured_output_format,
    vote,
)
from azdistill.teachers.credentials import Credential  # noqa: E402
from azdistill.teachers.factory import hosted_teacher_factory  # noqa: E402
from azdistill.teachers.hosted import EndpointTeacher  # noqa: E402

LABELS = ["positive", "negative"]
HEDGE = "Hard to say: positive or negative, it depends"
HOSTED = "teacher:\n  kind: openai-compatible\n  endpoint: http://127.0.0.1:9/v1\n  model: m\n  auth: {method: none}\n"


def client(server: FakeTeacherServer, **options) -> EndpointTeacher:
    settings = dict(model="big-teacher", timeout_s=2.0, backoff_s=0.01, max_backoff_s=0.05, temperature=0.7)
    settings.update(options)
    return EndpointTeacher(kind="openai-compatible", endpoint=f"{server.url}/v1", credential=Credential("none"), **settings)


def scripted(*texts: str):
    """Choices that are always `texts` (as many as asked, in turn)."""
    return lambda messages, n: [texts[i % len(texts)] for i in range(n)]


# ---------------------------------------------------------------------------------------------------
# Pure parts


def test_the_structured_output_format_restricts_the_label_to_the_task_labels():
    assert structured_output_format(["entailment", "not_entailment"]) == {
        "type": "json_schema",
        "json_schema": {"name": "label", "strict": True, "schema": {
            "type": "object", "properties": {"label": {"type": "string", "enum": ["entailment", "not_entailment"]}},
            "required": ["label"], "additionalProperties": False}},
    }


@pytest.mark.parametrize("text, finish, label, reason", [
    ('{"label": "positive"}', "stop", "positive", None),
    ('{"label": "Negative"}', "stop", "negative", None),  # spelled as in task.labels
    ('```json\n{"label": "negative"}\n```', "stop", "negative", None),
    ('{"label": "neutral"}', "stop", None, "structured answer names no allowed label ('neutral'"),
    ("I think positive", "stop", None, "structured answer is not a JSON object"),
    ('{"label": "posi', "length", None, "answer cut off (finish_reason=length)"),
    ("", "stop", None, "empty answer"),
])
def test_a_structured_answer_is_read_or_rejected_with_its_reason(text, finish, label, reason):
    read_label, problem = read_structured_label(text, LABELS, finish)
    assert read_label == label
    assert (problem is None) if reason is None else problem.startswith(reason), problem


def test_label_probabilities_come_from_the_first_token_that_begins_one_label():
    logprobs = [{"token": " Pos", "logprob": math.log(0.6), "top_logprobs": [
        {"token": " Pos", "logprob": math.log(0.6)}, {"token": "negative", "logprob": math.log(0.2)},
        {"token": "positive", "logprob": math.log(0.1)}, {"token": "Hard", "logprob": math.log(0.1)}]}]
    probs = label_probs_from_logprobs(logprobs, LABELS)
    assert probs == pytest.approx({"positive": 0.7 / 0.9, "negative": 0.2 / 0.9})
    # "not" begins only "not entailment"; "ent" is ambiguous with "entails"-like labels only when two labels share it.
    nli = [{"token": "not", "logprob": math.log(0.5), "top_logprobs": [{"token": "not", "logprob": math.log(0.5)},
                                                                      {"token": "ent", "logprob": math.log(0.5)}]}]
    assert label_probs_from_logprobs(nli, ["entailment", "not_entailment"]) == pytest.approx(
        {"entailment": 0.5, "not_entailment": 0.5})
    no_label = [{"token": "Hmm", "logprob": 0.0, "top_logprobs": [{"token": "Hmm", "logprob": 0.0}]}]
    assert label_probs_from_logprobs(no_label, LABELS) is None


def test_the_label_of_a_structured_answer_is_read_at_its_value_token():
    text = '{"label": "negative"}'
    tokens = ['{"', "label", '":', ' "', "neg", 'ative', '"}']
    logprobs = [{"token": t, "logprob": 0.0, "top_logprobs": [{"token": t, "logprob": 0.0}]} for t in tokens]
    logprobs[4]["top_logprobs"] = [{"token": "neg", "logprob": math.log(0.75)}, {"token": "pos", "logprob": math.log(0.25)}]
    probs = label_probs_from_logprobs(logprobs, LABELS, text.index("negative"))
    assert probs == pytest.approx({"positive": 0.25, "negative": 0.75})


def test_a_vote_goes_to_the_majority_and_a_tie_to_the_answer_given_first():
    assert vote(["negative", None, "positive", "positive"]) == ("positive", {"negative": 1 / 3, "positive": 2 / 3})
    assert vote(["negative", "positive"])[0] == "negative"
    assert vote(["positive", "negative"])[0] == "positive"
    assert vote([None, None]) is None


# ---------------------------------------------------------------------------------------------------
# The client against the fake endpoint


def test_a_hosted_teacher_is_asked_for_a_structured_answer_restricted_to_the_labels():
    with FakeTeacherServer() as server:
        completion = client(server).choose_one(single("good film"), LABELS)
    assert server.bodies[-1]["response_format"] == structured_output_format(LABELS)
    assert "n" not in server.bodies[-1]
    assert completion.text == "positive" and completion.finish_reason == "stop"
    assert completion.label_probs == {"positive": 1.0, "negative": 0.0}  # no log-probabilities asked: one-hot
    assert completion.rescued_by is None


def test_with_top_logprobs_a_structured_label_keeps_the_distribution_at_its_value_token():
    scores = {"neg": math.log(0.6), "pos": math.log(0.3), "maybe": math.log(0.1)}
    with FakeTeacherServer(structured=lambda text, labels: "negative", label_logprobs=lambda messages: scores) as server:
        completion = client(server, top_logprobs=5).choose_one(single("film"), LABELS)
    assert server.bodies[-1]["logprobs"] is True and "response_format" in server.bodies[-1]
    assert completion.text == "negative" and completion.label_probs == pytest.approx({"positive": 1 / 3, "negative": 2 / 3})


def test_an_endpoint_without_structured_outputs_switches_the_teacher_to_logprobs_once(caplog):
    with FakeTeacherServer(structured_outputs=False, answer=lambda messages: HEDGE,
                           label_logprobs=lambda messages: {"Positive": -0.2, " negative": -1.8, "Hard": -2.5}) as server:
        teacher = client(server)
        with caplog.at_level(logging.WARNING, logger="azdistill.teachers.constrained"):
            completions = teacher.choose([single(f"film {i}") for i in range(6)], LABELS)
            completions.append(teacher.choose_one(single("one more"), LABELS))
    warnings = [record for record in caplog.records if "structured outputs" in record.getMessage()]
    assert len(warnings) == 1 and teacher.label_mode == "logprobs"
    refused = server.counts["refused_response_format"]
    assert 1 <= refused <= 6  # at most the requests already in flight when the first refusal came back
    assert sum("response_format" in body for body in server.bodies) == refused
    assert all(body["top_logprobs"] == 20 and body["max_tokens"] == 8 for body in server.bodies if "response_format" not in body)
    p_positive = math.exp(-0.2) / (math.exp(-0.2) + math.exp(-1.8))
    for completion in completions:
        assert completion.text == "positive" and completion.rescued_by == "logprobs"  # the free text hedged
        assert completion.label_probs == pytest.approx({"positive": p_positive, "negative": 1 - p_positive})


def test_an_answer_naming_no_label_anywhere_is_refused_naming_the_labels():
    with FakeTeacherServer(answer=lambda messages: "Hmm", label_logprobs=lambda messages: {"Hmm": -0.1, "Well": -2.0}) as server:
        completion = client(server, label_mode="logprobs").choose_one(single("x"), LABELS)
    assert completion.finish_reason == "refused: no allowed label ['positive', 'negative'] in its top tokens"
    assert completion.text == "Hmm" and completion.label_probs is None


def test_self_consistency_asks_n_choices_and_keeps_the_majority_with_its_vote_shares():
    with FakeTeacherServer(choices=scripted("negative", "positive", "positive")) as server:
        completion = client(server, self_consistency=3).choose_one(single("film"), LABELS)
    assert server.counts["requests"] == 1 and server.bodies[0]["n"] == 3
    assert completion.text == "positive" and completion.confidence == pytest.approx(2 / 3)
    assert completion.label_probs == pytest.approx({"positive": 2 / 3, "negative": 1 / 3})
    assert completion.rescued_by is None


def test_an_endpoint_that_ignores_n_is_asked_again_for_the_rest_and_every_answer_is_paid_for():
    with FakeTeacherServer(choices=scripted("negative", "negative"), max_choices=1) as server:
        teacher = client(server, self_consistency=3, label_mode="logprobs")
        completion = teacher.choose_one(single("film"), LABELS)
    assert [body.get("n") for body in server.bodies] == [3, 2, None]
    assert completion.text == "negative" and completion.completion_tokens == 3  # one token per answer, all counted
    assert teacher.stats.as_dict()["answered"] == 3


def test_a_tie_goes_to_the_answer_given_first_and_an_unreadable_first_answer_is_rescued_by_the_vote():
    with FakeTeacherServer(choices=scripted("negative", "positive")) as server:
        assert client(server, self_consistency=2, label_mode="logprobs").choose_one(single("a"), LABELS).text == "negative"
    with FakeTeacherServer(choices=scripted("no idea", "positive", "negative", "positive")) as server:
        completion = client(server, self_consistency=4, label_mode="logprobs").choose_one(single("b"), LABELS)
    assert completion.text == "positive" and completion.rescued_by == "self-consistency"
    assert completion.label_probs == pytest.approx({"positive": 2 / 3, "negative": 1 / 3})


def test_math_self_consistency_keeps_the_whole_answer_of_the_majority_number():
    answers = ("Answer: 5", "3 + 4 = 7. Answer: 7", "It is 7", "no idea")
    with FakeTeacherServer(choices=scripted(*answers)) as server:
        completion = client(server, self_consistency=4, vote_task="math").complete(single("3 + 4?"))
    assert completion.text == "3 + 4 = 7. Answer: 7" and completion.confidence == pytest.approx(2 / 3)
    assert completion.votes == pytest.approx({"5": 1 / 3, "7": 2 / 3}) and completion.label_probs is None
    with FakeTeacherServer(choices=scripted("no idea", "none")) as server:
        completion = client(server, self_consistency=2, vote_task="math").complete(single("3 + 4?"))
    assert completion.finish_reason == "refused: none of the 2 sampled answers had a number"


# ---------------------------------------------------------------------------------------------------
# Through the synthesize stage and evaluation


def test_logprobs_rescue_hedged_answers_in_the_ledger_and_the_sidecar_holds_the_label_distribution(tmp_path):
    scores = {"Positive": -0.3, "negative": -1.5}
    with FakeTeacherServer(answer=lambda messages: HEDGE, label_logprobs=lambda messages: scores) as server:
        config = hosted_config(tmp_path, server.url, [single("good 1"), single("bad 2"), single("good 3")], [single("good v")],
                               label_constraint="logprobs")
        out = synthesize(config, hosted_teacher_factory(config))
    stats = json.loads((out / "stats.json").read_text())["splits"]["train"]
    assert stats["accepted"] == 3 and stats["constrained_labels"] == 3 and stats["rescued_by"] == {"logprobs": 3}
    assert [row["messages"][-1]["content"] for row in read(out / "train.jsonl")] == ["positive"] * 3
    sidecar = read(out / "train.logprobs.jsonl")
    entry = sidecar[0]["turns"][0]["content"][0]
    p_positive = math.exp(-0.3) / (math.exp(-0.3) + math.exp(-1.5))
    assert entry["token"] == "positive"
    assert {top["token"]: math.exp(top["logprob"]) for top in entry["top_logprobs"]} == pytest.approx(
        {"positive": p_positive, "negative": 1 - p_positive})


def test_an_endpoint_that_ignores_structured_outputs_is_read_as_free_text_and_hedges_are_rejected(tmp_path, caplog):
    """transformers serve takes response_format and answers free text: the label is read from that text (one warning),
    and a free answer naming both labels is rejected with its reason."""
    records = [single("good 1"), single("[[bad_structured]] 2"), single("[[bad_structured_hedge]] 3"),
               single("[[bad_structured]] 4")]
    with FakeTeacherServer() as server, caplog.at_level(logging.WARNING, logger="azdistill"):
        config = hosted_config(tmp_path, server.url, records, [single("good v")])
        out = synthesize(config, hosted_teacher_factory(config))
    assert all(body["response_format"]["type"] == "json_schema" for body in server.bodies)
    assert [row["messages"][-1]["content"] for row in read(out / "train.jsonl")] == ["positive"] * 3
    [rejected] = read(out / "rejected.jsonl")
    assert rejected["line"] == 3 and rejected["answer"] == "It could be positive or negative"
    assert rejected["reason"].startswith("the endpoint ignored the structured-output request and its free answer names none or several")
    assert caplog.text.count("ignores structured outputs") == 1
    stats = json.loads((out / "stats.json").read_text())["splits"]["train"]
    assert stats["constrained_labels"] == 3 and stats["rescued_by"] == {}


def test_the_teacher_is_measured_constrained_and_a_served_model_answers_freely(tmp_path):
    with FakeTeacherServer(answer=lambda messages: HEDGE, structured=lambda text, labels: "negative") as server:
        config = hosted_config(tmp_path, server.url, [single("good 1")], [single("good v")])
        conversations = [single("good 1"), single("bad 2")]
        teacher = measure_hosted(config, conversations)
        assert all("response_format" in body for body in server.bodies)
        assert teacher["answers"] == ["negative", "negative"]
        server.bodies.clear()
        served = measure_hosted(config, conversations, "student", endpoint=config.teacher, key_path="evaluation.served[0]")
    assert not any("response_format" in body or "logprobs" in body for body in server.bodies)
    assert served["answers"] == [HEDGE, HEDGE]


# ---------------------------------------------------------------------------------------------------
# Settings that cannot work, refused by validate


@pytest.mark.parametrize("extra, key, fix", [
    ("synthesis:\n  label_constraint: json_schema\n", "synthesis.label_constraint", "use scores (or auto) for a local teacher"),
    ("synthesis:\n  self_consistency: 3\n  temperature: 0.7\n", "synthesis.self_consistency", "set it to 1"),
    ("synthesis:\n  self_consistency: 3\n  temperature: 0\n" + HOSTED, "synthesis.self_consistency",
     "set synthesis.temperature above 0"),
    ("synthesis:\n  label_constraint: scores\n" + HOSTED, "synthesis.label_constraint", "use json_schema or logprobs (or auto)"),
])
def test_constraints_a_teacher_cannot_honour_are_refused_at_validate_in_one_line(make_config, tmp_path, extra, key, fix):
    student = tmp_path / "student"  # a model folder as far as validate reads it: a hosted teacher needs a student of its own
    student.mkdir()
    (student / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 100}))
    (student / "tokenizer_config.json").write_text("{}")
    result = CliRunner().invoke(cli, ["validate", str(make_config(extra=extra)), "--set", f"student.model={student}"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.strip().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"{key}:" in errors[0] and fix in errors[0], result.output


def test_math_self_consistency_through_the_stage_counts_what_the_vote_saved(tmp_path):
    with FakeTeacherServer(choices=scripted("no idea", "3 + 4 = 7. Answer: 7", "Answer: 7")) as server:
        config = hosted_config(tmp_path, server.url, [single("3 + 4?"), single("4 + 3?")], [single("7?")],
                               task={"type": "math"}, temperature=0.7, self_consistency=3)
        out = synthesize(config, hosted_teacher_factory(config))
    assert all(body["n"] == 3 for body in server.bodies)
    assert [row["messages"][-1]["content"] for row in read(out / "train.jsonl")] == ["3 + 4 = 7. Answer: 7"] * 2
    stats = json.loads((out / "stats.json").read_text())["splits"]["train"]
    assert stats["rescued_by"] == {"self-consistency": 2}
    assert stats["completion_tokens"] == 2 * (2 + 7 + 2)  # every sampled answer counted
