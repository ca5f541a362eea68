"""The LLM judge (`evaluation.judge`): the exact prompts of both orders, a position-biased judge cancelled to ties, a
consistent one giving wins and losses, free answers read for a verdict (and the unreadable ones counted), verdicts
reused on a rerun, the settings `validate` refuses, and the judge's section in report.md.

The judge is scripted: a fake teacher whose verdict depends on which answer it reads in position A. The stage test
runs the evaluate stage on a summarization task with a loopback teacher endpoint and fake local students, so no
model loads."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Optional

import pytest
from click.testing import CliRunner

from azdistill.cli import cli
from azdistill.config.evaluation import JudgeConfig
from azdistill.config.loading import load_config
from azdistill.errors import UserError
from azdistill.evaluation.judge import (
    JUDGE_PROMPT,
    judge_metrics,
    outcome,
    pairwise_prompts,
    parse_verdict,
    render_judge_section,
    summarize,
)
from azdistill.models.generation import Completion
from azdistill.stages.judging import ask_verdicts, build_judge
from azdistill.teachers.base import Teacher
from azdistill.tracking.tracker import NullTracker

STUDENT, TEACHER = "the student's summary", "the teacher's summary"
ANSWER_A = re.compile(r"\[Assistant A's answer\]\n(.*)\n\[End of assistant A's answer\]", re.DOTALL)


class ScriptedJudge(Teacher):
    """A judge whose verdict is `script(answer in position A)`; it records every prompt and the labels it was offered.

    `constrained=False` makes it a judge that cannot be constrained: `choose` raises and `answer` is used instead."""

    name = "scripted judge"
    mode = "batched"
    batch_size = 3

    def __init__(self, script: Callable[[str], str], constrained: bool = True):
        self.script, self.constrained = script, constrained
        self.prompts: list[list[dict]] = []
        self.labels: list[tuple[str, ...]] = []

    def _verdicts(self, conversations) -> list[Completion]:
        self.prompts += conversations
        texts = [self.script(ANSWER_A.search(messages[-1]["content"]).group(1)) for messages in conversations]
        return [Completion(text=text, finish_reason="stop", prompt_tokens=1, completion_tokens=1) for text in texts]

    def choose(self, conversations, labels):
        if not self.constrained:
            return super().choose(conversations, labels)
        self.labels.append(tuple(labels))
        return self._verdicts(conversations)

    def answer(self, conversations):
        return self._verdicts(conversations)


def _prefers(best: str) -> Callable[[str], str]:
    """A consistent judge: "A" when `best` is in position A, else "B"."""
    return lambda answer_a: "A" if answer_a.startswith(best) else "B"


def _conversations(count: int) -> list[list[dict]]:
    return [[{"role": "system", "content": "Summarise the text in one sentence."},
             {"role": "user", "content": f"Text number {index}."}] for index in range(count)]


def test_each_item_is_asked_in_both_orders_with_the_answers_swapped():
    conversations = _conversations(2)
    prompts = pairwise_prompts(conversations, [f"{STUDENT} 0", f"{STUDENT} 1"], [f"{TEACHER} 0", f"{TEACHER} 1"])
    judge = ScriptedJudge(_prefers(STUDENT))
    verdicts, texts, method = ask_verdicts(judge, prompts)

    question = "System: Summarise the text in one sentence.\n\nUser: Text number 1."
    assert judge.prompts[2:] == [
        [{"role": "user", "content": JUDGE_PROMPT.format(question=question, answer_a=f"{STUDENT} 1", answer_b=f"{TEACHER} 1")}],
        [{"role": "user", "content": JUDGE_PROMPT.format(question=question, answer_a=f"{TEACHER} 1", answer_b=f"{STUDENT} 1")}],
    ]
    assert len(judge.prompts) == 4 and judge.labels == [("A", "B", "tie")] * 2  # batches of 3: two calls
    assert verdicts == ["A", "B", "A", "B"] and texts == verdicts and method == "answers constrained to A, B or tie"
    assert "Reply with A if assistant A's answer is" in JUDGE_PROMPT and "B if assistant B's answer is better" in JUDGE_PROMPT


def test_a_judge_that_always_prefers_position_a_gives_only_ties():
    prompts = pairwise_prompts(_conversations(4), [STUDENT] * 4, [TEACHER] * 4)
    verdicts, _, _ = ask_verdicts(ScriptedJudge(lambda answer_a: "A"), prompts)
    summary = summarize(list(zip(verdicts[0::2], verdicts[1::2])), "scripted judge", "constrained")

    assert (summary["wins"], summary["ties"], summary["losses"]) == (0, 4, 0)
    assert summary["tie_rate"] == 1.0 and summary["consistent"] == 0.0  # every pair of verdicts followed the position


@pytest.mark.parametrize("best, wins, losses", [(STUDENT, 3, 0), (TEACHER, 0, 3)])
def test_a_consistent_judge_gives_wins_or_losses(best, wins, losses):
    prompts = pairwise_prompts(_conversations(3), [STUDENT] * 3, [TEACHER] * 3)
    verdicts, _, _ = ask_verdicts(ScriptedJudge(_prefers(best)), prompts)
    summary = summarize(list(zip(verdicts[0::2], verdicts[1::2])), "scripted judge", "constrained")

    assert (summary["wins"], summary["ties"], summary["losses"], summary["consistent"]) == (wins, 0, losses, 1.0)
    assert judge_metrics(summary) == {"judge_win_rate": wins / 3, "judge_tie_rate": 0.0, "judge_loss_rate": losses / 3}


@pytest.mark.parametrize(
    "student_first, teacher_first, expected",
    [("A", "B", "win"), ("B", "A", "loss"), ("A", "A", "tie"), ("B", "B", "tie"), ("tie", "B", "tie"),
     ("tie", "tie", "tie"), (None, "B", "no_verdict"), ("A", None, "no_verdict")],
)
def test_an_items_outcome_needs_both_orders_to_agree(student_first, teacher_first, expected):
    assert outcome(student_first, teacher_first) == expected


@pytest.mark.parametrize(
    "text, verdict",
    [("A", "A"), ("B.", "B"), ("Tie", "tie"), ("[[B]]", "B"), ("[[C]]", "tie"), ("**A**", "A"), ("Verdict: B", "B"),
     ("A tie.", "tie"), ("A is better.", "A"), ("I prefer assistant B's answer", "B"), ("Both are fine, so a tie", "tie"),
     ("A better summary would be shorter", None), ("I cannot tell", None), ("", None)],
)
def test_a_free_answer_is_read_for_the_first_verdict_it_names(text, verdict):
    assert parse_verdict(text) == verdict


def test_a_judge_that_cannot_be_constrained_answers_freely_and_unreadable_answers_are_counted():
    free = {STUDENT: "Assistant A is clearly better.", TEACHER: "Hard to say."}
    judge = ScriptedJudge(lambda answer_a: free[answer_a], constrained=False)
    verdicts, texts, method = ask_verdicts(judge, pairwise_prompts(_conversations(2), [STUDENT] * 2, [TEACHER] * 2))
    summary = summarize(list(zip(verdicts[0::2], verdicts[1::2])), "scripted judge", method)

    assert method == "free answers read for a verdict" and texts[:2] == ["Assistant A is clearly better.", "Hard to say."]
    assert verdicts == ["A", None, "A", None]
    assert (summary["items"], summary["judged"], summary["no_verdict"], summary["win_rate"]) == (2, 0, 2, None)
    assert judge_metrics(summary) == {}
    assert "gave no usable verdict on any of the 2 items" in "\n".join(render_judge_section(summary))


def test_report_md_shows_the_judges_counts_and_its_prompt():
    summary = summarize([("A", "B"), ("A", "A"), ("B", "A"), ("A", "B"), (None, "B")], "gpt-judge", "constrained")
    text = "\n".join(render_judge_section(summary))

    assert "## Judged by an LLM: student vs teacher" in text
    assert "| gpt-judge | 4 | 2 (50.0%) | 1 (25.0%) | 1 (25.0%) | 75.0% |" in text
    assert "1 of 5 items got an answer naming no verdict" in text
    assert "<details><summary>The judge's prompt</summary>" in text and JUDGE_PROMPT in text
    assert render_judge_section(None) == []


@pytest.mark.parametrize(
    "task, teacher_kind, judge, applies",
    [("summarization", "local", {}, True), ("chat", "openai-compatible", {}, True), ("nli", "local", {}, False),
     ("math", "local", {}, False), ("qa", "logged", {}, False),
     ("qa", "logged", {"endpoint": {"endpoint": "http://127.0.0.1:9/v1", "model": "judge"}}, True),
     ("summarization", "local", {"enabled": False}, False), ("conversation", "local", {"enabled": True}, True)],
)
def test_auto_judges_open_ended_tasks_with_a_teacher_or_an_endpoint_that_can_judge(task, teacher_kind, judge, applies):
    assert JudgeConfig(**judge).applies(task, teacher_kind) is applies


LOGGED_TEACHER = """
teacher:
  kind: logged
student:
  model: unused-student
"""


@pytest.mark.parametrize(
    "task, extra, fragments",
    [
        ("nli", "evaluation:\n  judge: {enabled: true}\n", ["evaluation.judge.enabled: true compares open-ended answers",
                                                             "task.type nli", "set it to auto or false"]),
        ("math", "evaluation:\n  judge: {enabled: true}\n", ["evaluation.judge.enabled", "task.type math"]),
        ("summarization", LOGGED_TEACHER + "evaluation:\n  judge: {enabled: true}\n",
         ["evaluation.judge.endpoint: is needed", "teacher.kind logged answers cannot judge"]),
        ("summarization", "evaluation:\n  judge: {endpoint: {endpoint: 'http://127.0.0.1:9/v1'}}\n",
         ["evaluation.judge.endpoint.model", "missing required key"]),
        ("summarization", "evaluation:\n  judge: {endpoint: {endpoint: 'http://127.0.0.1:9/v1', model: j, kind: logged}}\n",
         ["evaluation.judge.endpoint.kind", "openai-compatible"]),
        ("summarization", "evaluation:\n  judge: {enabled: sometimes}\n", ["evaluation.judge.enabled"]),
        ("summarization", "evaluation:\n  judge: {max_items: 0}\n", ["evaluation.judge.max_items"]),
    ],
    ids=["nli", "math", "logged-without-endpoint", "endpoint-without-model", "endpoint-kind", "enabled-value", "max-items"],
)
def test_validate_refuses_a_judge_that_cannot_work_in_one_line_naming_the_key(make_config, task, extra, fragments):
    config = make_config(task=task, extra=extra)
    result = CliRunner().invoke(cli, ["validate", str(config)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {config}") and "Traceback" not in result.output, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_a_logged_teacher_with_a_judge_endpoint_passes_validation(make_config):
    extra = LOGGED_TEACHER + "evaluation:\n  judge: {enabled: true, endpoint: {endpoint: 'http://127.0.0.1:9/v1', model: j}}\n"
    config = load_config(make_config(task="summarization", extra=extra))
    assert config.evaluation.judge.endpoint.auth.api_key_env == "AZDISTILL_JUDGE_KEY"


HOSTED_TEACHER = """
teacher:
  kind: openai-compatible
  endpoint: {teacher_url}/v1
  model: big-teacher
  auth: {{method: api_key_env, api_key_env: TEACHER_KEY}}
student:
  model: unused-student
evaluation:
  latency_samples: 1
  max_new_tokens: 16
{judge}"""


def test_a_judge_endpoint_is_sent_its_own_key_never_the_teachers(make_config, monkeypatch):
    judge = "  judge:\n    endpoint: {endpoint: 'http://127.0.0.1:9/v1', model: judge-model}\n"
    extra = HOSTED_TEACHER.format(teacher_url="http://127.0.0.1:9", judge=judge)
    config = load_config(make_config(task="summarization", extra=extra))
    monkeypatch.setenv("TEACHER_KEY", "teacher-key-0123456789")
    monkeypatch.delenv("AZDISTILL_JUDGE_KEY", raising=False)
    with pytest.raises(UserError) as error:
        build_judge(config, None)
    assert str(error.value).startswith("evaluation.judge.endpoint.auth.api_key_env: the environment variable AZDISTILL_JUDGE_KEY")

    monkeypatch.setenv("AZDISTILL_JUDGE_KEY", "judge-key-9876543210")
    endpoint_judge = build_judge(config, None)
    assert endpoint_judge.headers()["Authorization"] == "Bearer judge-key-9876543210"
    assert (endpoint_judge.name, endpoint_judge.url) == ("judge-model", "http://127.0.0.1:9/v1/chat/completions")
    assert endpoint_judge.max_new_tokens == 32  # room for a verdict, not an essay


class RecordingTracker(NullTracker):
    def __init__(self):
        self.metrics: dict[str, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.metrics.update(metrics)


@pytest.fixture
def summarization_stage(make_config, tmp_path, monkeypatch):
    """Evaluate a summarization student against a loopback teacher; the local rows answer through a fake
    `measure_in_child`."""
    from fake_teacher_server import FakeTeacherServer

    from azdistill.stages import evaluate as stage

    def fake_measure(path, conversations, *args, **kwargs):
        return {"answers": [f"{STUDENT} of {messages[-1]['content']}" for messages in conversations], "latencies_s": [0.1],
                "throughput_tokens_per_s": 10.0, "generated_tokens": 10, "seconds": 1.0, "parameters": 10,
                "weights_bytes": 40, "peak_memory_bytes": 100, "size_on_disk_bytes": 40, "device": "cpu"}

    monkeypatch.setattr(stage, "measure_in_child", fake_measure)
    monkeypatch.setenv("TEACHER_KEY", "teacher-key-0123456789")
    models = {}
    for role in ("student", "baseline"):
        (tmp_path / role).mkdir()
        (tmp_path / role / "config.json").write_text(json.dumps({"role": role}))
        models[role] = tmp_path / role
    with FakeTeacherServer(answer=lambda messages: f"{TEACHER} of {messages[-1]['content']}") as server:
        def run(judge_settings: str = "", *overrides: str):
            path = make_config(task="summarization", counts={"test": 4},
                               extra=HOSTED_TEACHER.format(teacher_url=server.url, judge=judge_settings))
            tracker = RecordingTracker()
            report = stage.evaluate(load_config(path, list(overrides)), None, models, tracker)
            return report, tracker, load_config(path).stage_dir("evaluate")

        yield run, server


@pytest.fixture
def scripted_judge(monkeypatch) -> ScriptedJudge:
    """The judge the evaluate stage builds: a scripted one that prefers the student's answers."""
    from azdistill.stages import judging

    judge = ScriptedJudge(_prefers(STUDENT))
    monkeypatch.setattr(judging, "build_judge", lambda config, teacher_path: judge)
    return judge


def test_the_evaluate_stage_judges_the_student_and_reuses_the_verdicts_on_a_rerun(summarization_stage, scripted_judge):
    (run, _), judge = summarization_stage, scripted_judge
    report, tracker, out_dir = run("  judge: {max_items: 3}\n")

    assert len(judge.prompts) == 6  # three items, both orders
    assert (report.judge["wins"], report.judge["ties"], report.judge["losses"], report.judge["items"]) == (3, 0, 0, 3)
    assert report.judge["judge"] == "the teacher (openai-compatible:big-teacher)"
    assert {"judge_win_rate": 1.0, "judge_tie_rate": 0.0, "judge_loss_rate": 0.0}.items() <= tracker.metrics.items()
    saved = json.loads((out_dir / "report.json").read_text())
    assert saved["judge"]["win_rate"] == 1.0 and saved["judge"]["prompt"] == JUDGE_PROMPT
    markdown = (out_dir / "report.md").read_text()
    assert markdown.index("## Judged by an LLM") < markdown.index("## Promotion") and JUDGE_PROMPT in markdown
    assert "ROUGE-L" in markdown  # beside the reference metrics
    verdicts = json.loads((out_dir / "predictions" / "judge.json").read_text())
    assert verdicts["verdicts"] == ["A", "B"] * 3

    # A threshold changed: the report is rebuilt, the answers and the verdicts are reused, the judge is asked nothing.
    report, _, _ = run("  judge: {max_items: 3}\n", "evaluation.promotion.min_agreement=0.5")
    assert len(judge.prompts) == 6 and report.judge["wins"] == 3
    # One more item to judge: a new key, so every verdict is asked again.
    report, _, _ = run("  judge: {max_items: 4}\n")
    assert len(judge.prompts) == 6 + 8 and report.judge["items"] == 4

    # Turned off: no judge entry, and its saved verdicts are removed.
    report, _, _ = run("  judge: {enabled: false}\n")
    assert report.judge is None and not (out_dir / "predictions" / "judge.json").exists()
    assert "Judged by an LLM" not in (out_dir / "report.md").read_text()
    assert report_path_holds_no_key(out_dir)


def report_path_holds_no_key(out_dir: Path) -> bool:
    """No file of the stage holds the teacher's key."""
    return all(not path.is_file() or b"teacher-key-0123456789" not in path.read_bytes() for path in out_dir.rglob("*"))


def test_a_judge_endpoint_judges_through_structured_outputs_with_its_own_key(summarization_stage, monkeypatch):
    from fake_teacher_server import FakeTeacherServer

    run, teacher_server = summarization_stage
    monkeypatch.setenv("AZDISTILL_JUDGE_KEY", "judge-key-9876543210")

    def verdict(messages: list[dict]) -> str:
        """A judge endpoint that prefers the teacher's answers, whichever position they are in."""
        return _prefers(TEACHER)(ANSWER_A.search(messages[-1]["content"]).group(1))

    with FakeTeacherServer(answer=verdict, api_key="judge-key-9876543210", structured=lambda text, enum: text) as judge:
        settings = f"  judge:\n    endpoint: {{endpoint: '{judge.url}/v1', model: judge-model, max_retries: 0}}\n"
        report, _, out_dir = run(settings)

    # Each of the 4 items asked twice for a label of [A, B, tie]; the teacher's endpoint saw no judge prompt.
    assert judge.counts["requests"] == 8
    assert all(body["response_format"]["json_schema"]["schema"]["properties"]["label"]["enum"] == ["A", "B", "tie"]
               for body in judge.bodies)
    assert all("impartial judge" not in json.dumps(body) for body in teacher_server.bodies)
    sent = [headers.get("authorization", "") for headers in judge.headers_seen]
    assert all(credential == "Bearer judge-key-9876543210" for credential in sent)
    assert (report.judge["losses"], report.judge["judge"]) == (4, "openai-compatible:judge-model")
    assert report.judge["method"] == "answers constrained to A, B or tie"
    assert report_path_holds_no_key(out_dir) and all(
        not path.is_file() or b"judge-key-9876543210" not in path.read_bytes() for path in out_dir.rglob("*"))
