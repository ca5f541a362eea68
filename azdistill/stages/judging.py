"""The evaluate stage's judging step: the teacher or a judge endpoint compares the student's answers with the teacher's.

Each item is judged in both orders (`evaluation.judge`); the verdicts are saved and reused while the answers, the
judge and its prompt are the same.

A local or batched judge is asked with `choose` (its answer constrained to A, B or tie), a hosted one with
`choose_one`, concurrently; a judge that cannot be constrained answers freely and its answer is read for a verdict.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

from azdistill.config.schema import DistillConfig
from azdistill.data import digests
from azdistill.data.files import write_json
from azdistill.data.records import Message
from azdistill.errors import UserError
from azdistill.evaluation.judge import JUDGE_PROMPT, VERDICTS, judge_metrics, pairwise_prompts, parse_verdict, summarize
from azdistill.stages.state import saved_under_key
from azdistill.teachers.base import RecordRejected, Teacher
from azdistill.teachers.factory import endpoint_identity
from azdistill.tracking.tracker import NullTracker

log = logging.getLogger(__name__)

JUDGE_FILE = "judge.json"  # in the evaluate stage's predictions folder, beside each model's answers
# A verdict is one word; a judge answering freely gets room for a short sentence around it.
JUDGE_MAX_NEW_TOKENS = 32


def judge_student(
    config: DistillConfig,
    teacher_path: Optional[Path],
    records: list,
    measured: dict[str, dict],
    teacher_identity: str,
    predictions_dir: Path,
    tracker: NullTracker = NullTracker(),
    force: bool = False,
) -> Optional[dict]:
    """The report's `judge` entry for this evaluation, or None when the judge is off (its saved verdicts removed).

    Verdicts saved in `predictions/judge.json` are reused while the answers, the judge and its prompt are the same.
    """
    settings = config.evaluation.judge
    cached = Path(predictions_dir) / JUDGE_FILE
    if not settings.applies(config.task.type, config.teacher.kind) or "student" not in measured:
        cached.unlink(missing_ok=True)
        return None
    items = len(records) if settings.max_items is None else min(settings.max_items, len(records))
    conversations = [record.prompt for record in records[:items]]
    student, teacher = (measured[role]["answers"][:items] for role in ("student", "teacher"))
    name = judge_name(config)
    key = digests.fingerprint({
        "conversations": conversations, "student": student, "teacher": teacher, "prompt": JUDGE_PROMPT,
        "judge": endpoint_identity(settings.endpoint) if settings.endpoint else teacher_identity,
    })
    saved = None if force else saved_under_key(cached, key)
    if saved is not None:
        log.info("evaluate: reusing the judge's verdicts (answers and judge unchanged)")
        verdicts, texts, method = saved["verdicts"], saved["texts"], saved["method"]
    else:
        log.info("evaluate: %s judges the student against the teacher on %d items, in both orders", name, items)
        judge = build_judge(config, teacher_path)
        try:
            verdicts, texts, method = ask_verdicts(judge, pairwise_prompts(conversations, student, teacher))
        finally:
            judge.close()
        write_json(cached, {"key": key, "judge": name, "method": method, "verdicts": verdicts, "texts": texts})
    summary = summarize(list(zip(verdicts[0::2], verdicts[1::2])), name, method)
    if summary["no_verdict"]:
        log.warning("evaluate: the judge named no verdict on %d of %d items (left out)", summary["no_verdict"], items)
    tracker.log_metrics(judge_metrics(summary))
    return summary


def judge_name(config: DistillConfig) -> str:
    """The judge as the report names it: the judge endpoint's kind and model, or the teacher."""
    endpoint = config.evaluation.judge.endpoint
    return endpoint.label if endpoint is not None else f"the teacher ({config.teacher.label})"


def build_judge(config: DistillConfig, teacher_path: Optional[Path]) -> Teacher:
    """The judge as a teacher answering greedily: the judge endpoint with its own key, else the teacher itself."""
    from azdistill.teachers.factory import hosted_teacher_factory, local_teacher_factory

    greedy = config.synthesis.model_copy(update={
        "max_new_tokens": JUDGE_MAX_NEW_TOKENS, "temperature": 0.0, "top_p": 1.0, "top_logprobs": 0,
        "presence_penalty": 0.0, "frequency_penalty": 0.0, "max_cost": None, "self_consistency": 1,
    })
    endpoint = config.evaluation.judge.endpoint
    if endpoint is not None:
        try:
            # The endpoint client reads the teacher section; the judge endpoint's settings have the same keys.
            return hosted_teacher_factory(config.model_copy(update={"synthesis": greedy, "teacher": endpoint}))()
        except UserError as error:
            message = str(error).replace("teacher.auth", "evaluation.judge.endpoint.auth")
            raise UserError(message.replace("the teacher's key", "its key")) from None
    if config.teacher.kind == "local":
        assert teacher_path is not None, "a local teacher judges from its folder"
        return local_teacher_factory(config.model_copy(update={"synthesis": greedy}), teacher_path)()
    return hosted_teacher_factory(config.model_copy(update={"synthesis": greedy}))()


def ask_verdicts(judge: Teacher, prompts: Sequence[list[Message]]) -> tuple[list[Optional[str]], list[str], str]:
    """The judge's verdict on every prompt (None where its answer names none), its answers, and how it was asked.

    Constrained to the verdicts where the judge can be (`choose` in batches, `choose_one` concurrently); else its
    free answers are read for a verdict."""
    try:
        texts, method = _constrained_answers(judge, prompts), "answers constrained to A, B or tie"
    except NotImplementedError:
        texts, method = _free_answers(judge, prompts), "free answers read for a verdict"
    return [parse_verdict(text) for text in texts], texts, method


def _constrained_answers(judge: Teacher, prompts: Sequence[list[Message]]) -> list[str]:
    """Every prompt answered with one of `VERDICTS`; NotImplementedError if the judge cannot be constrained."""
    if judge.mode == "concurrent":
        def one(messages: list[Message]) -> str:
            try:
                return judge.choose_one(messages, VERDICTS).text
            except RecordRejected:
                return ""  # refused: no verdict

        with ThreadPoolExecutor(max_workers=max(1, min(judge.concurrency, len(prompts)))) as pool:
            return list(pool.map(one, prompts))
    texts: list[str] = []
    for start in range(0, len(prompts), judge.batch_size):
        texts += [completion.text for completion in judge.choose(prompts[start : start + judge.batch_size], VERDICTS)]
    return texts


def _free_answers(judge: Teacher, prompts: Sequence[list[Message]]) -> list[str]:
    """Every prompt answered freely, in batches (a hosted judge answers each batch concurrently)."""
    texts: list[str] = []
    for start in range(0, len(prompts), judge.batch_size):
        texts += [completion.text for completion in judge.answer(prompts[start : start + judge.batch_size])]
    return texts
