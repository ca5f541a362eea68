"""Measuring one model on the held-out set: quality, latency, throughput, memory, size and cost.

A local model is measured in a fresh process, so its peak memory is its own; latency is timed with prompts
answered one at a time with transformers (per response, to the first token, and per output token), throughput with
the whole set answered in batches (those answers are the ones scored), by vLLM where `evaluation.engine` resolves to
it (evaluation.engines) and by transformers otherwise. A hosted model is measured through its endpoint with the
client synthesis uses: that client does not stream, so its time to first token is not seen (None)."""

from __future__ import annotations

import logging
import os
import platform
import re
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from azdistill.config.evaluation import EvaluationConfig
from azdistill.config.schema import DistillConfig
from azdistill.config.sections import RuntimeConfig
from azdistill.config.teacher import TeacherConfig
from azdistill.data.records import Message
from azdistill.errors import StageFailed, UserError
from azdistill.evaluation.metrics import percentile

log = logging.getLogger(__name__)


def measure_hosted(
    config: DistillConfig,
    conversations: list[list[Message]],
    description: str = "teacher",
    endpoint: Optional[TeacherConfig] = None,
    key_path: str = "teacher",
) -> dict:
    """Measure a hosted model as a client sees it, through the same client that synthesized the data.

    The model is the hosted teacher, or the served model `endpoint` (an `evaluation.served` entry, whose settings
    are under `key_path`, which its errors name). Latency per response: the first `latency_samples` prompts sent
    one at a time, with the output tokens the endpoint counted for each (latency per output token); the time to
    first token is not measured, as the client asks without streaming (`first_token_s` None). Quality: every
    prompt answered with the endpoint's concurrency (greedy, evaluation.max_new_tokens), whose tokens/s is the
    throughput. Cost: the configured token prices times the
    tokens the endpoint counted. Size and memory cannot be measured for a hosted model: they stay empty (the
    report says "hosted"), parameters are the declared count if any.

    The teacher answers as it did in synthesis: with one of task.labels where synthesis.label_constraint constrains it
    (its answers are the chosen labels). A served model (a student behind an endpoint) always answers freely, as it
    is served: a text generator.
    """
    from azdistill.config.schema import label_method

    labels = list(config.task.labels or []) if endpoint is None and label_method(config) is not None else None
    endpoint = endpoint or config.teacher
    with _errors_naming(key_path, description):
        measured = _measure_endpoint(config, endpoint, conversations, description, labels)
    measured["parameters"] = endpoint.parameters or 0
    return measured


def _measure_endpoint(
    config: DistillConfig, endpoint: TeacherConfig, conversations: list[list[Message]], description: str,
    labels: Optional[list[str]] = None,
) -> dict:
    """`measure_hosted`'s requests: timed one at a time, then every prompt at the endpoint's concurrency; with
    `labels`, each answer constrained to one of them (`choose`)."""
    from azdistill.console import Progress
    from azdistill.teachers.base import RecordRejected
    from azdistill.teachers.hosted import build_endpoint_teacher

    evaluation = config.evaluation
    greedy = config.synthesis.model_copy(
        update={"max_new_tokens": evaluation.max_new_tokens, "temperature": 0.0, "top_p": 1.0, "top_logprobs": 0,
                "presence_penalty": 0.0, "frequency_penalty": 0.0, "max_cost": None, "self_consistency": 1}
    )
    # The endpoint client reads the teacher section; a served model's settings have the same keys.
    teacher = build_endpoint_teacher(config.model_copy(update={"synthesis": greedy, "teacher": endpoint}))
    try:
        latencies: list[float] = []
        output_tokens: list[int] = []
        timed = conversations[: evaluation.latency_samples]
        with Progress(len(timed), f"latency {description} (endpoint)", unit="answers") as progress:
            for messages in timed:
                started = time.perf_counter()
                try:
                    timed_answer = teacher.choose_one(messages, labels) if labels is not None else teacher.complete(messages)
                except RecordRejected:
                    pass  # a refused prompt tells nothing about latency
                else:
                    latencies.append(time.perf_counter() - started)
                    output_tokens.append(timed_answer.completion_tokens)  # 0 when the endpoint reported no usage
                progress.update(1)
        started = time.perf_counter()
        with Progress(len(conversations), f"answer {description} (endpoint)", unit="answers") as progress:
            completions = []
            for start in range(0, len(conversations), teacher.batch_size):
                batch = conversations[start : start + teacher.batch_size]
                completions += teacher.choose(batch, labels) if labels is not None else teacher.answer(batch)
                progress.update(len(completions) - progress.count)
        seconds = time.perf_counter() - started
    finally:
        teacher.close()
    refused = [completion for completion in completions if completion.finish_reason.startswith("refused")]
    if len(refused) == len(conversations):
        raise StageFailed(
            f"evaluate: the {description} endpoint answered none of the {len(conversations)} held-out prompts; first: "
            f"{refused[0].finish_reason}"
        )
    if refused:
        log.warning(
            "evaluate: the %s endpoint refused %d of %d held-out prompts (scored as empty answers)",
            description, len(refused), len(conversations),
        )
    prompt_tokens = sum(completion.prompt_tokens for completion in completions)
    generated_tokens = sum(completion.completion_tokens for completion in completions)
    priced = endpoint.price_per_million_prompt_tokens is not None or endpoint.price_per_million_completion_tokens is not None
    cost = teacher.budget.cost(prompt_tokens, generated_tokens) if priced else None
    return {
        "answers": [completion.text for completion in completions],
        "latencies_s": latencies,
        # Not measured: the client asks without streaming, so the first token arrives with the whole answer. Timing
        # the whole answer here would report latency per response under another name.
        "first_token_s": None,
        "output_tokens": output_tokens,
        "throughput_tokens_per_s": generated_tokens / seconds if seconds > 0 else 0.0,
        "generated_tokens": generated_tokens,
        "prompt_tokens": prompt_tokens,
        "seconds": seconds,
        "weights_bytes": None,
        "peak_memory_bytes": None,
        "size_on_disk_bytes": None,
        "device": "hosted",
        "hosted": True,
        "refused": len(refused),
        "cost": cost,
        "cost_per_1k_answers": cost / len(conversations) * 1000 if cost is not None else None,
        "endpoint": teacher.stats.as_dict(),
    }


@contextmanager
def _errors_naming(key_path: str, description: str) -> Iterator[None]:
    """Let the endpoint client's errors name a served model's keys: it names the teacher's ("teacher.auth",
    "teacher endpoint ..."), which is right only when the teacher is measured."""
    if key_path == "teacher":
        yield
        return
    teacher_keys = re.compile(r"\bteacher\.(?=(" + "|".join(TeacherConfig.model_fields) + r")\b)")
    try:
        yield
    except UserError as error:
        message = teacher_keys.sub(f"{key_path}.", str(error))
        message = message.replace("teacher endpoint", f"{description} endpoint").replace("the teacher's key", "its key")
        raise UserError(message) from None


def measure_logged(records: list) -> dict:
    """`teacher.kind: logged`: the teacher's answers are the logged ones in the test split; nothing is timed."""
    answers = [record.reference or "" for record in records]
    if not any(answers):
        raise UserError("evaluate: teacher.kind logged takes the teacher's answers from the test split, and none of its records has one")
    return {
        "answers": answers, "latencies_s": [], "first_token_s": None, "output_tokens": None,
        "throughput_tokens_per_s": float("nan"), "generated_tokens": 0, "seconds": 0.0,
        "parameters": 0, "weights_bytes": None, "peak_memory_bytes": None, "size_on_disk_bytes": None, "device": "logged",
        "hosted": True, "cost_per_1k_answers": None,
    }


def hosted_cost_per_1k_answers(
    endpoint: TeacherConfig, prompt_tokens: int, generated_tokens: int, answers: int
) -> Optional[float]:
    """A hosted model's cost per 1,000 answers: its token prices times the tokens its endpoint counted; None without prices.

    Worked out when the report is made, from the saved token counts, so a changed price needs no request."""
    prompt_price, completion_price = endpoint.price_per_million_prompt_tokens, endpoint.price_per_million_completion_tokens
    if (prompt_price is None and completion_price is None) or not answers:
        return None
    return ((prompt_price or 0.0) * prompt_tokens + (completion_price or 0.0) * generated_tokens) / 1e6 / answers * 1000


def local_cost_per_1k_answers(settings: EvaluationConfig, seconds: float, answers: int) -> Optional[float]:
    """A local model's cost per 1,000 answers: the serving machine's hourly price over the measured answering time."""
    if settings.serving_price_per_hour is None or not answers:
        return None
    return settings.serving_price_per_hour * seconds / 3600 / answers * 1000


def measure_model(path: str, conversations: list[list[Message]], settings: dict, description: str) -> dict:
    """Load one model and answer every conversation; runs in a child process (see module docstring).

    `settings["engine"]` ("transformers" or "vllm", see evaluation.engines) picks what answers the whole set for the
    quality figures and the throughput; the latency is timed with transformers either way, one prompt at a time."""
    import psutil

    from azdistill.console import Progress, configure_logging
    from azdistill.determinism import make_repeatable
    from azdistill.models.files import size_on_disk, weights_bytes
    from azdistill.models.generation import GenerationSettings
    from azdistill.models.loading import count_parameters, load_model, load_tokenizer, pick_device

    configure_logging()
    make_repeatable(0, settings["threads"], settings["deterministic"])  # answers are greedy: the seed is for form's sake
    device = pick_device()
    before_load = psutil.Process().memory_info().rss
    tokenizer = load_tokenizer(Path(path))
    model = load_model(Path(path), device).eval()
    generation = GenerationSettings(max_new_tokens=settings["max_new_tokens"], batch_size=settings["batch_size"])

    labels = settings.get("labels")
    # Label scoring has no vLLM counterpart here: a teacher constrained to the labels always answers with transformers.
    engine = "vllm" if settings.get("engine") == "vllm" and not labels else "transformers"
    timed = conversations[: settings["latency_samples"]]
    with Progress(len(timed), f"latency {description}", unit="answers") as progress:
        if labels:
            latencies = timed_single_choices(model, tokenizer, timed, labels, progress)
            # A chosen label arrives whole: its first token is the whole answer, and no token is generated one by one.
            first_tokens, output_tokens = list(latencies), None
        else:
            timings = timed_single_answers(model, tokenizer, timed, generation, progress)
            latencies = [timing.seconds for timing in timings]
            first_tokens = [timing.first_token_s for timing in timings]
            output_tokens = [timing.output_tokens for timing in timings]

    parameters, model_bytes = count_parameters(model), weights_bytes(model)
    with Progress(len(conversations), f"answer {description} ({engine})", unit="answers") as progress:
        if engine == "vllm":
            # vLLM preallocates its KV cache, so the GPU's peak after it is vLLM's reservation, not what the model
            # needs: the peak kept is the one of the latency phase above, where transformers answered alone.
            peak = _peak_memory(device, before_load)
            del model  # vLLM loads its own copy: this one would only take GPU memory from its KV cache
            _release_memory(device)
            from azdistill.evaluation.engines import answer_with_vllm

            answers, generated_tokens, seconds = answer_with_vllm(path, conversations, settings["max_new_tokens"])
            progress.update(len(answers))
        else:
            started = time.perf_counter()
            if labels:
                answers, generated_tokens = _chosen_labels(
                    model, tokenizer, conversations, labels, settings["batch_size"], progress
                )
            else:
                answers, generated_tokens = _generated_answers(model, tokenizer, conversations, generation, progress)
            seconds = time.perf_counter() - started
            peak = _peak_memory(device, before_load)
    return {
        "answers": answers,
        "latencies_s": latencies,
        "first_token_s": first_tokens,
        "output_tokens": output_tokens,
        "throughput_tokens_per_s": generated_tokens / seconds if seconds > 0 else 0.0,
        "generated_tokens": generated_tokens,
        "seconds": seconds,
        "parameters": parameters,
        "weights_bytes": model_bytes,
        "peak_memory_bytes": max(peak, 0),
        "size_on_disk_bytes": size_on_disk(Path(path)),
        "device": device,
        "engine": engine,
    }


def _peak_memory(device: str, before_load: int) -> int:
    """The measuring process's peak memory so far: the GPU's allocations on a GPU; on a CPU its peak resident memory
    less what it held before loading the model (interpreter, torch), so the figure is the model's."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated()
    return peak_resident_bytes() - before_load


def _release_memory(device: str) -> None:
    """Give back the memory of a model just deleted: collected now, and on a GPU returned by torch's caching
    allocator, which would otherwise keep it from the next engine."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _generated_answers(model, tokenizer, conversations: list[list[Message]], generation, progress) -> tuple[list, int]:
    """Every conversation answered by generation in batches; the answers in input order and the tokens generated."""
    from azdistill.models.generation import generate_in_batches

    answers: list[Optional[str]] = [None] * len(conversations)
    generated_tokens = 0
    for batch in generate_in_batches(model, tokenizer, conversations, generation):
        for index, completion in batch:
            answers[index] = completion.text
            generated_tokens += completion.completion_tokens
        progress.update(len(batch))
    return answers, generated_tokens


def _chosen_labels(model, tokenizer, conversations: list[list[Message]], labels: list[str], batch_size: int, progress) -> tuple[list, int]:
    """A teacher constrained to the labels (synthesis.label_constraint scores) answers as it did in synthesis: the
    most likely label of each conversation; one label token counted per answer."""
    from azdistill.models.labels import score_labels

    answers: list[Optional[str]] = []
    for start in range(0, len(conversations), batch_size):
        answers += [scores.label for scores in score_labels(model, tokenizer, conversations[start : start + batch_size], labels, batch_size)]
        progress.update(len(answers) - progress.count)
    return answers, len(answers)


@dataclass
class ResponseTiming:
    """One prompt answered alone: seconds to the whole answer, to its first token (None if no token came), and the
    tokens it generated (the stop token included, as the throughput counts them)."""

    seconds: float
    first_token_s: Optional[float]
    output_tokens: int


class FirstTokenClock:
    """A transformers streamer (the `put` / `end` of `BaseStreamer`) that notes when the first answer token is chosen.

    `generate` calls `put` once with the prompt, then with each new token as soon as it is picked, so the second
    call is the first token: timed inside the one generation that also gives the whole answer's time."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.prompt_seen = False
        self.first_token_at: Optional[float] = None

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
        elif self.first_token_at is None:
            self.first_token_at = self.clock()

    def end(self) -> None:
        pass


def timed_single_answers(
    model, tokenizer, conversations: Sequence[list[Message]], settings, progress=None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[ResponseTiming]:
    """Latency as a user sees it, prompts answered one at a time: each response's seconds, its time to first token
    and its output tokens (`settings`: the `GenerationSettings` of the scored answers; `clock`: seconds, monotonic)."""
    from azdistill.models.generation import GenerationSettings, generate_batch

    single = GenerationSettings(settings.max_new_tokens, 0.0, 1.0, 1, settings.seed)
    generate_batch(model, tokenizer, [conversations[0]], GenerationSettings(4, 0.0, 1.0, 1))  # warm-up
    timings = []
    for messages in conversations:
        first_token = FirstTokenClock(clock)
        started = clock()
        (completion,) = generate_batch(model, tokenizer, [messages], single, streamer=first_token)
        seconds = clock() - started
        at = first_token.first_token_at
        timings.append(ResponseTiming(seconds, None if at is None else at - started, completion.completion_tokens))
        if progress is not None:
            progress.update(1)
    return timings


def latency_figures(measured: dict) -> dict[str, Optional[float]]:
    """The report's latency figures from a model's saved measurements: latency per response (p50, p95; NaN when
    nothing was timed), time to first token (p50) and seconds per output token (p50: each response's seconds over
    its output tokens). The last two are None where they were not measured, saved answers from before they were
    included."""
    latencies = measured["latencies_s"]
    first_tokens = [value for value in measured.get("first_token_s") or [] if value is not None]
    tokens = measured.get("output_tokens") or []
    per_token = [seconds / count for seconds, count in zip(latencies, tokens) if count > 0]
    return {
        "latency_p50_s": percentile(latencies, 50) if latencies else float("nan"),
        "latency_p95_s": percentile(latencies, 95) if latencies else float("nan"),
        "ttft_p50_s": percentile(first_tokens, 50) if first_tokens else None,
        "latency_per_token_p50_s": percentile(per_token, 50) if per_token else None,
    }


def timed_single_choices(model, tokenizer, conversations: list[list[Message]], labels: list[str], progress=None) -> list[float]:
    """Seconds per answer of a teacher constrained to the labels, prompts scored one at a time (its latency as
    synthesis uses it)."""
    from azdistill.models.labels import score_labels

    score_labels(model, tokenizer, conversations[:1], labels, 1)  # warm-up
    latencies = []
    for messages in conversations:
        started = time.perf_counter()
        score_labels(model, tokenizer, [messages], labels, 1)
        latencies.append(time.perf_counter() - started)
        if progress is not None:
            progress.update(1)
    return latencies


def peak_resident_bytes() -> int:
    """This process's peak resident memory.

    Read from VmHWM, which starts afresh with the process image; ru_maxrss would not do: Linux carries it over
    from the parent across fork and exec, so every child would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss  # no /proc: current resident memory is the best we have


def measure_in_child(
    path: Path, conversations: list[list[Message]], settings: EvaluationConfig, runtime: RuntimeConfig, description: str,
    labels: Optional[list[str]] = None,
) -> dict:
    """`measure_model` for the model in `path`, run in a fresh child process so its peak memory is its own; with
    `labels`, the model answers by choosing the most likely label (a teacher constrained to the labels).

    `settings.engine` answers the quality prompts: the evaluate stage passes the one it resolved for this machine
    (transformers or vllm); auto is resolved here."""
    from azdistill.evaluation.engines import engine_on_this_machine

    engine = engine_on_this_machine(settings.engine)  # before the child starts: a missing vLLM stops it here
    # "spawn" gives a clean process (no copy of the parent's models or torch threads) and exact peak memory.
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"), initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
        future = pool.submit(
            measure_model,
            str(path),
            conversations,
            {**{key: getattr(settings, key) for key in ("max_new_tokens", "batch_size", "latency_samples")}, **runtime.model_dump(),
             "labels": labels, "engine": engine},
            description,
        )
        return future.result()


def _die_with_parent(parent: int) -> None:
    """Make the measuring child end when azdistill does: killed with SIGKILL, the parent cannot stop its pool, and
    the child would otherwise wait forever holding a model in memory (seen after the kill-at-random test)."""
    import signal

    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        return  # not Linux: the child still ends when its work is done
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def device_description() -> str:
    """The device the local models were measured on, as the report names it: the GPU's name, or the CPU's cores."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores, {platform.machine()})"


def megabytes(value: Optional[int]) -> float:
    """Bytes as MB (2**20) for the report; NaN for a size that was not measured (a hosted or logged teacher)."""
    return float("nan") if value is None else value / 2**20
