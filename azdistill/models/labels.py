"""Label scoring: a local causal LM's probability of each allowed label as the whole answer to a chat prompt.

A small teacher asked to "answer with one word: positive or negative" hedges or rambles on many prompts; scored
over the label set it always commits, and the distribution it gives is a soft target for the student. Each label
is scored as the tokens the chat template renders for an assistant turn holding exactly that label (the end-of-turn
token excluded: it measures formatting more than the decision; on the demo's test set it cost 1.3 points of
accuracy). transformers' generation can be constrained (`prefix_allowed_tokens_fn`) but returns no normalised
distribution over whole multi-token labels, hence this short scorer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from azdistill.data.records import Message
from azdistill.models.generation import render_prompts


@dataclass
class LabelScores:
    """One prompt scored over the labels."""

    probs: dict  # label -> probability, normalised over the labels
    prompt_tokens: int

    @property
    def label(self) -> str:
        """The most likely label (the first of the labels on a tie, so the choice is repeatable)."""
        return max(self.probs, key=lambda name: self.probs[name])


def label_token_ids(tokenizer, conversation: list[Message], prompt_ids: list[int], label: str) -> list[int]:
    """The tokens of `label` as the chat template renders it as the assistant's answer after `conversation`."""
    rendered = tokenizer.apply_chat_template([*conversation, {"role": "assistant", "content": label}], tokenize=False)
    full = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    if full[: len(prompt_ids)] != prompt_ids:
        # A template that renders the answer's turn differently from the generation prompt: score the label's own tokens.
        return tokenizer(label, add_special_tokens=False)["input_ids"]
    answer = full[len(prompt_ids) :]
    for count in range(1, len(answer) + 1):
        if tokenizer.decode(answer[:count]).strip() == label.strip():
            return answer[:count]
    return tokenizer(label, add_special_tokens=False)["input_ids"]


def score_labels(model, tokenizer, conversations: Sequence[list[Message]], labels: Sequence[str], batch_size: int = 8) -> list[LabelScores]:
    """Each conversation's label distribution: the log-probability of every label's tokens after its prompt,
    normalised over the labels. Prompts are scored in batches of `batch_size`.

    Each prompt runs through the model once, and its labels read it from the attention cache (`_cached_logprobs`),
    as multiple-choice scorers do: with n labels, about n times fewer tokens than a sequence per label. A model that
    keeps no cache is scored a sequence per label (`_sequence_logprobs`)."""
    prompts = render_prompts(tokenizer, conversations)
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]
    candidates = [[label_token_ids(tokenizer, list(conversation), ids, label) for label in labels]
                  for conversation, ids in zip(conversations, prompt_ids)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[LabelScores] = []
    caches = True  # until the model shows it keeps no cache: then the rest is scored a sequence per label too
    for start in range(0, len(conversations), batch_size):
        rows = range(start, min(start + batch_size, len(conversations)))
        batch_prompts, batch_candidates = [prompt_ids[row] for row in rows], [candidates[row] for row in rows]
        cacheable = caches and min(map(len, batch_prompts)) > 1
        totals = _cached_logprobs(model, batch_prompts, batch_candidates, pad) if cacheable else None
        if totals is None:
            caches = caches and not cacheable
            totals = _sequence_logprobs(model, batch_prompts, batch_candidates, pad)
        for prompt, row_totals in zip(batch_prompts, totals):
            top = max(row_totals)
            weights = [math.exp(total - top) for total in row_totals]
            results.append(LabelScores({label: weight / sum(weights) for label, weight in zip(labels, weights)}, len(prompt)))
    return results


def _right_padded(sequences: Sequence[list[int]], pad: int):
    """[rows, width] token ids and attention mask of `sequences`, right-padded: each keeps its positions."""
    import torch

    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for index, sequence in enumerate(sequences):
        input_ids[index, : len(sequence)] = torch.tensor(sequence)
        attention[index, : len(sequence)] = 1
    return input_ids, attention


def _cached_logprobs(model, prompts: list[list[int]], candidates: list[list[list[int]]], pad: int) -> Optional[list[list[float]]]:
    """Every label's log-probability per prompt, each prompt run once: its tokens but the last fill an attention
    cache (the prompts as one right-padded batch), which is repeated once per label; each label row then runs the
    prompt's last token and the label's tokens at their own positions, the prompt's padding masked. None where the
    model filled no cache. Hand-written: transformers caches a prompt only for generation, which gives no normalised
    probability of whole multi-token labels."""
    import torch
    from transformers import DynamicCache

    per_prompt = len(candidates[0])
    context = [prompt[:-1] for prompt in prompts]
    context_ids, context_mask = _right_padded(context, pad)
    cache = DynamicCache(config=getattr(model, "config", None))
    with torch.inference_mode():
        model(input_ids=context_ids.to(model.device), attention_mask=context_mask.to(model.device), past_key_values=cache,
              use_cache=True, logits_to_keep=1)
        if cache.get_seq_length() != context_ids.shape[1]:
            return None
        cache.batch_repeat_interleave(per_prompt)
        tails = [[prompt[-1], *tokens] for prompt, labels in zip(prompts, candidates) for tokens in labels]
        tail_ids, tail_mask = _right_padded(tails, pad)
        starts = torch.tensor([len(row) for row in context]).repeat_interleave(per_prompt)
        positions = starts[:, None] + torch.arange(tail_ids.shape[1])[None, :]
        mask = torch.cat([context_mask.repeat_interleave(per_prompt, dim=0), tail_mask], dim=1)
        logits = model(input_ids=tail_ids.to(model.device), attention_mask=mask.to(model.device), position_ids=positions.to(model.device),
                       past_key_values=cache, use_cache=True).logits
        logprobs = logits.float().log_softmax(-1).cpu()
    # Position 0 of each row holds the prompt's last token, which predicts the label's first.
    return _label_totals(logprobs, candidates, [0] * len(prompts))


def _sequence_logprobs(model, prompts: list[list[int]], candidates: list[list[list[int]]], pad: int) -> list[list[float]]:
    """Every label's log-probability per prompt, a sequence (prompt + label) per label, for models without a cache."""
    import torch

    sequences = [prompt + tokens for prompt, labels in zip(prompts, candidates) for tokens in labels]
    input_ids, attention = _right_padded(sequences, pad)
    width = input_ids.shape[1]
    # Logits only from the position before the shortest prompt's end: a full [rows, width, vocabulary] tensor would
    # make the scorer's memory several times the model's (1.7 GB against 0.5 GB for the built-in teacher).
    kept = width - (min(map(len, prompts)) - 1)
    with torch.inference_mode():
        logits = model(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device), logits_to_keep=kept).logits
        logprobs = logits.float().log_softmax(-1).cpu()
    # The kept positions start at width - kept; a prompt's last token predicts its label's first.
    return _label_totals(logprobs, candidates, [len(prompt) - 1 - (width - kept) for prompt in prompts])


def _label_totals(logprobs, candidates: list[list[list[int]]], firsts: list[int]) -> list[list[float]]:
    """Each label's summed log-probability per prompt, from `logprobs` [rows, positions, vocabulary] with a row per
    (prompt, label) in order; `firsts[i]` is the position, in prompt i's rows, whose distribution is its labels' first
    token's."""
    totals, index = [], 0
    for labels, first in zip(candidates, firsts):
        row_totals = []
        for tokens in labels:
            row_totals.append(sum(logprobs[index, first + offset, token].item() for offset, token in enumerate(tokens)))
            index += 1
        totals.append(row_totals)
    return totals
