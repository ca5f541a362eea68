"""Which inference engine answers the held-out prompts for the quality figures (`evaluation.engine`), and vLLM's glue.

vLLM answers the whole set in one call where the model runs on a CUDA GPU and the `vllm` package is installed;
transformers answers everywhere else, and always times the latency one prompt at a time and scores the labels of a
teacher constrained to them (vLLM has no counterpart here of that two-label scoring)."""

from __future__ import annotations

import importlib.util
import time
from typing import Callable

from azdistill.data.records import Message
from azdistill.errors import UserError

# vLLM takes this share of the GPU's memory for the weights and its KV cache (its own default is 0.9): modest, so a
# held-out set of a few hundred prompts still fits its batches and the GPU is not taken from anything else on it.
VLLM_GPU_MEMORY_SHARE = 0.5


def resolve_engine(requested: str, vllm_installed: bool, cuda_available: bool) -> str:
    """The engine that answers the quality prompts: "vllm" or "transformers", for `evaluation.engine` `requested`
    (auto, transformers or vllm) on a machine with or without the `vllm` package and a CUDA GPU.

    Raises UserError where vllm is required and the machine lacks what it needs."""
    if requested == "transformers":
        return "transformers"
    if vllm_installed and cuda_available:
        return "vllm"
    if requested == "auto":
        return "transformers"
    missing = [
        *([] if vllm_installed else ["the vllm package (not installed here)"]),
        *([] if cuda_available else ["a CUDA GPU (torch sees none here)"]),
    ]
    fix = "pip install vllm on a GPU machine" if not vllm_installed else "run the evaluation on a machine with a CUDA GPU"
    raise UserError(
        f"evaluation.engine vllm needs {' and '.join(missing)}: {fix}, or set evaluation.engine to auto (vLLM where it "
        "can run, transformers elsewhere) or transformers"
    )


def engine_on_this_machine(requested: str) -> str:
    """`resolve_engine` for this machine. torch is only imported where vLLM could answer (the package is installed,
    or it is required and the message should say all that is missing): without it, auto means transformers anyway."""
    if requested == "transformers":
        return "transformers"
    vllm_installed = importlib.util.find_spec("vllm") is not None
    cuda_available = False
    if vllm_installed or requested == "vllm":
        import torch

        cuda_available = torch.cuda.is_available()
    return resolve_engine(requested, vllm_installed, cuda_available)


def answer_with_vllm(
    path: str, conversations: list[list[Message]], max_new_tokens: int, clock: Callable[[], float] = time.perf_counter
) -> tuple[list[str], int, float]:
    """Every conversation answered greedily by vLLM from the model folder `path`: the answers in input order, the
    tokens generated (the stop token included, as the transformers path counts them) and the seconds the answering
    took (`clock`: seconds, monotonic), loading the model not included, as with transformers."""
    from vllm import LLM, SamplingParams

    # dtype auto: vLLM's choice from the folder's config (16-bit on a GPU); enforce_eager False: CUDA graphs, as vLLM serves.
    llm = LLM(model=path, seed=0, dtype="auto", gpu_memory_utilization=VLLM_GPU_MEMORY_SHARE, enforce_eager=False)
    greedy = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    started = clock()
    # LLM.chat renders each conversation with the model's chat template and returns one RequestOutput per
    # conversation, in input order.
    outputs = llm.chat(conversations, greedy, use_tqdm=False)
    seconds = clock() - started
    # Stripped as the transformers path strips its decoded answers, so both engines' answers score alike.
    answers = [output.outputs[0].text.strip() for output in outputs]
    return answers, sum(len(output.outputs[0].token_ids) for output in outputs), seconds
