"""Batched chat generation with a local causal LM, shared by the local teacher and evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from azdistill.data.records import Message


@dataclass
class Completion:
    """One generated answer, shaped like an OpenAI chat completion choice plus usage."""

    text: str
    finish_reason: str  # "stop" when the model ended its turn, "length" when cut at max_new_tokens
    prompt_tokens: int
    completion_tokens: int
    # A reasoning model's thinking before `text`, when the teacher returned it apart from the answer (hosted
    # reasoning models: `reasoning_content`, `reasoning` or a leading <think> block); None otherwise.
    reasoning: Optional[str] = None
    # A label task's answer constrained to `task.labels` (synthesis.label_constraint): the teacher's probability of
    # each label (scored by a local teacher, read from a hosted one's log-probabilities, or the vote shares of
    # self-consistency); `text` is then the most likely label. None for a free answer.
    label_probs: Optional[dict] = None
    # The measure that made this answer usable where the free answer would have been rejected ("label scoring",
    # "structured output", "logprobs", "self-consistency"), for the reject ledger; None when the free answer was usable.
    rescued_by: Optional[str] = None


@dataclass
class GenerationSettings:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    batch_size: int = 8
    seed: int = 0


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def render_prompts(tokenizer, conversations: Sequence[list[Message]]) -> list[str]:
    return [tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) for messages in conversations]


def generate_batch(
    model, tokenizer, conversations: Sequence[list[Message]], settings: GenerationSettings, streamer: Optional[object] = None
) -> list[Completion]:
    """Answer up to one batch of conversations together (left padding, so all prompts end aligned); `streamer`, a
    transformers streamer (`put` with the prompt, then each new token as it is chosen), watches one conversation."""
    import torch

    texts = render_prompts(tokenizer, conversations)
    tokenizer.padding_side = "left"
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    stops = stop_token_ids(model, tokenizer)
    sampling = settings.temperature > 0
    with torch.inference_mode():
        output = model.generate(
            **encoded,
            max_new_tokens=settings.max_new_tokens,
            do_sample=sampling,
            temperature=settings.temperature if sampling else None,
            top_p=settings.top_p if sampling else None,
            top_k=None,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
        )
    prompt_width = encoded["input_ids"].shape[1]
    completions = []
    for row, mask in zip(output, encoded["attention_mask"]):
        generated = row[prompt_width:].tolist()
        stopped_at = next((i for i, token in enumerate(generated) if token in stops), None)
        kept = generated if stopped_at is None else generated[:stopped_at]
        completions.append(
            Completion(
                text=tokenizer.decode(kept, skip_special_tokens=True).strip(),
                finish_reason="length" if stopped_at is None else "stop",
                prompt_tokens=int(mask.sum()),
                completion_tokens=len(kept) + (0 if stopped_at is None else 1),
            )
        )
    return completions


def generate_in_batches(
    model, tokenizer, conversations: Sequence[list[Message]], settings: GenerationSettings
) -> Iterator[list[tuple[int, Completion]]]:
    """Yield `(index, completion)` pairs batch by batch, grouping prompts of similar length to waste less padding."""
    import torch

    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    lengths = [len(text) for text in render_prompts(tokenizer, conversations)]
    order = sorted(range(len(conversations)), key=lambda index: lengths[index])
    for start in range(0, len(order), settings.batch_size):
        indices = order[start : start + settings.batch_size]
        completions = generate_batch(model, tokenizer, [conversations[i] for i in indices], settings)
        yield list(zip(indices, completions))
