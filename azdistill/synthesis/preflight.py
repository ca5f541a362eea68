"""Pre-flight checks before a hosted teacher answers a whole dataset: the endpoint answers, one sample call
passes the checks, the parameters are in range, and the estimated cost fits the budget.

Parameter ranges are enforced by the config itself (temperature and top_p in [0, 1], penalties in [0, 2]);
the report repeats them so that the person about to spend money sees what will be sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from azdistill.config.schema import DistillConfig, label_method
from azdistill.data.records import count_records, iter_records
from azdistill.data.splits import AZURE_MINIMUM_DEFAULT, AZURE_MINIMUM_RECORDS
from azdistill.errors import StageFailed, UserError
from azdistill.models.generation import Completion
from azdistill.synthesis.answering import start_item
from azdistill.synthesis.checks import judge
from azdistill.synthesis.outputs import SPLITS
from azdistill.synthesis.prompts import check_rationale
from azdistill.teachers.base import BudgetExceeded, RecordRejected
from azdistill.teachers.hosted import EndpointTeacher
from azdistill.teachers.limits import estimate_tokens


@dataclass
class PreflightReport:
    lines: list[str] = field(default_factory=list)
    expected_cost: Optional[float] = None  # of what is left to answer
    worst_cost: Optional[float] = None  # every answer as long as max_new_tokens
    spent: float = 0.0
    max_cost: Optional[float] = None
    sample_ok: bool = False
    # The sample call's prompt and answer: paid for, so the stage uses it as that record's answer (never asks twice).
    sample_prompt: Optional[list] = None
    sample_completion: Optional[object] = None

    def raise_for_budget(self) -> None:
        """Stop before the run if even the expected cost does not fit synthesis.max_cost."""
        if self.max_cost is not None and self.expected_cost is not None and self.spent + self.expected_cost > self.max_cost:
            raise StageFailed(
                f"preflight: the estimated teacher cost {self.spent + self.expected_cost:.4g} (spent {self.spent:.4g} + "
                f"{self.expected_cost:.4g} to go) exceeds synthesis.max_cost {self.max_cost:g}; raise the budget, lower "
                f"data.max_records or synthesis.max_new_tokens"
            )


def _turn_prompts_tokens(config: DistillConfig, answer_tokens: float) -> tuple[int, int]:
    """Estimated prompt tokens over all train and validation requests, and the number of requests."""
    total = requests = 0
    for split in SPLITS:
        for index, record in enumerate(iter_records(getattr(config.data, split), config.task.type, config.data.max_records)):
            item = start_item(record, index, config)
            for turn in range(len(item.user_turns)):
                item.answers = ["x" * int(answer_tokens * 4)] * turn  # earlier answers, of the expected length
                total += estimate_tokens(item.teacher_prompt())
                requests += 1
    return total, requests


def preflight(
    config: DistillConfig, teacher: EndpointTeacher, counts: Optional[dict[str, int]] = None, done: int = 0, sample: bool = True
) -> PreflightReport:
    """Check the endpoint with one real call and estimate the cost of the run; see `PreflightReport`.

    `sample=False` (a run that continues: the endpoint has answered it already) makes no call and estimates from
    the settings alone."""
    report = PreflightReport(max_cost=config.synthesis.max_cost, spent=teacher.budget.spent)
    check_rationale(config.synthesis.keep_rationale, config.synthesis.prompt_strategy, config.teacher.hosted)
    if counts is None:
        counts = {split: count_records(getattr(config.data, split), config.task.type, config.data.max_records) for split in SPLITS}
    report.lines.append(_parameters_line(config))
    report.lines.append(_records_line(config, counts, done))
    record = next(iter_records(config.data.train, config.task.type, 1))
    prompt = start_item(record, 0, config).teacher_prompt()
    labels = list(config.task.labels or []) if label_method(config) is not None else None
    completion = _sample_call(teacher, prompt, sample, done, report, labels)
    answer_tokens, prompt_token_ratio = float(config.synthesis.max_new_tokens), 1.0
    if completion is not None:
        answer_tokens, prompt_token_ratio = _read_sample(config, teacher, prompt, completion, report)
    _add_estimates(config, teacher, report, sum(counts.values()), done, answer_tokens, prompt_token_ratio)
    return report


def _parameters_line(config: DistillConfig) -> str:
    """What will be sent with every request, with the ranges the config allows."""
    synthesis = config.synthesis
    if config.teacher.sampling_parameters:
        sampling = (
            f"temperature {synthesis.temperature} (0-1), top_p {synthesis.top_p} (0-1], presence_penalty "
            f"{synthesis.presence_penalty} (0-2), frequency_penalty {synthesis.frequency_penalty} (0-2)"
        )
    else:
        sampling = "no sampling parameters (teacher.sampling_parameters false)"
    effort = f", reasoning_effort {config.teacher.reasoning_effort}" if config.teacher.reasoning_effort else ""
    return (
        f"parameters: {sampling}, {config.teacher.max_tokens_field} {synthesis.max_new_tokens}{effort}, "
        f"prompt_strategy {synthesis.prompt_strategy}"
    )


def _records_line(config: DistillConfig, counts: dict[str, int], done: int) -> str:
    """How many records each split has and how many are answered already, with a warning for a small training set."""
    minimum = AZURE_MINIMUM_RECORDS.get(config.task.type, AZURE_MINIMUM_DEFAULT)
    size_note = "" if counts["train"] >= minimum else f" (warning: fewer than {minimum} training records; the student may learn little)"
    return f"records: {counts['train']} train, {counts['validation']} validation, {done} already answered{size_note}"


def _sample_call(
    teacher: EndpointTeacher, prompt: list, sample: bool, done: int, report: PreflightReport, labels: Optional[list] = None
) -> Optional[Completion]:
    """The teacher's answer to the first training prompt (kept in the report, as it is paid for), or None when no call
    is made or the endpoint refuses that record; an endpoint that does not answer is a UserError. With `labels` (a
    label constraint) the sample is asked the way the run asks, so it also finds out whether the endpoint has
    structured outputs."""
    retries = teacher.max_retries
    teacher.max_retries = min(retries, 2)  # a dead endpoint should be reported in seconds, not minutes
    try:
        if not sample:
            report.lines.append(f"sample call: none (the run continues from {done} answered records)")
            return None
        completion = teacher.choose_one(prompt, labels) if labels is not None else teacher.complete(prompt)
        report.sample_prompt, report.sample_completion = prompt, completion
        return completion
    except BudgetExceeded:
        report.lines.append("sample call: not made: even one request could take the spend past synthesis.max_cost")
        return None
    except RecordRejected as error:
        if error.retryable:
            raise UserError(f"preflight: the teacher endpoint {teacher.url.split('?')[0]} does not answer: {error}") from None
        report.lines.append(f"sample call: the endpoint refused the first training record: {error}")
        return None
    finally:
        teacher.max_retries = retries


def _read_sample(config: DistillConfig, teacher: EndpointTeacher, prompt: list, completion: Completion,
                 report: PreflightReport) -> tuple[float, float]:
    """Judge the sample answer and report it; returns the answer length to expect (in tokens) and how the endpoint's
    prompt tokens compare with our estimate.

    Top-k distillation with an endpoint that returns no log-probabilities is a UserError: found out on one call rather
    than after the whole synthesis is paid for and finetune has nothing to learn from.
    """
    synthesis = config.synthesis
    _, problem = judge(completion, config)
    report.sample_ok = problem is None
    verdict = "passes the checks" if problem is None else f"would be rejected: {problem}"
    logprobs = ""
    if label_method(config) is not None:
        # The label distribution is the soft target (training.topk_weight), whatever top_logprobs asked for.
        how = "structured output" if teacher.label_mode == "json_schema" else "top log-probabilities (no structured outputs)"
        logprobs = f", label chosen by {how}"
    elif synthesis.top_logprobs:
        returned = getattr(completion, "logprobs", None)
        logprobs = ", top logprobs returned" if returned else ", NO logprobs returned (the endpoint ignores top_logprobs)"
        if not returned and config.training.topk_weight > 0:
            raise UserError(
                f"preflight: training.topk_weight needs the teacher's log-probabilities, and {teacher.url.split('?')[0]} "
                "answered without them although synthesis.top_logprobs asked (transformers serve ignores it; vLLM, "
                "llama.cpp's server, Azure OpenAI and OpenAI return them): set training.topk_weight: 0 or use such an endpoint"
            )
    shown = " ".join(completion.text.split())
    report.lines.append(
        f"sample call: {teacher.url.split('?')[0]} answered in {completion.prompt_tokens} + {completion.completion_tokens} "
        f"tokens, finish_reason {completion.finish_reason}{logprobs}; the answer {verdict}: {shown[:120]!r}"
    )
    answer_tokens, prompt_token_ratio = float(synthesis.max_new_tokens), 1.0
    if completion.completion_tokens and completion.finish_reason == "stop":
        answer_tokens = float(completion.completion_tokens)
    if completion.prompt_tokens:
        prompt_token_ratio = completion.prompt_tokens / max(1, estimate_tokens(prompt))
    return answer_tokens, prompt_token_ratio


def _add_estimates(config: DistillConfig, teacher: EndpointTeacher, report: PreflightReport, total: int, done: int,
                   answer_tokens: float, prompt_token_ratio: float) -> None:
    """The tokens and (with prices) the cost of the records still to answer: expected, and at worst every answer
    as long as max_new_tokens."""
    max_new_tokens = config.synthesis.max_new_tokens * teacher.self_consistency  # every sampled answer is paid for
    prompt_tokens, requests = _turn_prompts_tokens(config, answer_tokens)
    prompt_tokens = int(prompt_tokens * prompt_token_ratio)
    left = (total - done) / total if total else 0.0
    expected = (prompt_tokens * left, requests * answer_tokens * left)
    worst = (prompt_tokens * left, requests * max_new_tokens * left)
    report.lines.append(
        f"tokens: about {expected[0]:,.0f} prompt + {expected[1]:,.0f} completion still to go over {requests * left:,.0f} "
        f"requests (at most {worst[1]:,.0f} completion tokens)"
    )
    prices = (config.teacher.price_per_million_prompt_tokens, config.teacher.price_per_million_completion_tokens)
    if any(price is not None for price in prices):
        report.expected_cost = teacher.budget.cost(int(expected[0]), int(expected[1]))
        report.worst_cost = teacher.budget.cost(int(worst[0]), int(worst[1]))
        cap = f"; budget synthesis.max_cost {report.max_cost:g}" if report.max_cost is not None else "; no budget cap (synthesis.max_cost)"
        report.lines.append(
            f"cost: about {report.expected_cost:.4g} to go (at most {report.worst_cost:.4g}), {report.spent:.4g} spent{cap}"
        )
    else:
        report.lines.append("cost: set teacher.price_per_million_prompt_tokens and _completion_tokens for an estimate")
