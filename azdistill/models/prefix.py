"""A batch's shared prompt prefix, run through the model once instead of once per row.

Distillation data mostly repeats one system prompt (and the chat template's tokens around it) on every record: on
the demo's data 27 of a batch's first ~50 tokens are the same in every row. A padded batch runs those tokens
through every layer once per row, forward and backward. Here the prefix runs once, as a batch of one, and its keys
and values are repeated over the rows as the attention cache that the rest of each row reads. Autograd carries
every row's gradient back through the repeat into that single pass, so the loss and its gradients are those of the
full batch (up to the order of float additions), with the prefix's layer work done once.

Written here because neither transformers' Trainer nor TRL shares prefixes in training (they do so only when
generating); it needs right-padded rows, so packed batches (no rows to share across) run as before.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# Below this a second forward call costs more than the rows' shared tokens save.
MIN_SHARED_TOKENS = 16
_WARNED: set[str] = set()


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, predict: torch.Tensor) -> int:
    """How many leading tokens every row of a right-padded batch shares and no row predicts from: 0 when sharing
    them would not pay (a single row, or fewer than MIN_SHARED_TOKENS).

    `predict` [rows, width] marks positions whose logits the loss reads; they must all come after the prefix, whose
    logits are never computed. The prefix also stops before any row's padding.
    """
    rows = input_ids.shape[0]
    if rows < 2 or input_ids.shape[1] == 0:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0) & attention_mask.bool().all(dim=0)
    length = int(same.long().cumprod(dim=0).sum())
    predicted = predict.any(dim=0).nonzero()
    if predicted.numel():
        length = min(length, int(predicted[0]))
    return length if length >= MIN_SHARED_TOKENS else 0


def prefix_shared_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix: int, keeps_logits: bool, **kwargs):
    """The model's output on the tokens after `prefix`, the shared prefix having run once (see the module's doc), or
    None where the model filled no attention cache with the prefix (then run the batch as usual).

    `keeps_logits`: the model's forward takes `logits_to_keep` (then the prefix's pass projects one position onto
    the vocabulary, not all). `kwargs` go to the call on the rows' remaining tokens.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=getattr(model, "config", None))
    model(input_ids=input_ids[:1, :prefix], past_key_values=cache, use_cache=True, **({"logits_to_keep": 1} if keeps_logits else {}))
    if cache.get_seq_length() != prefix:
        # A model that keeps no cache of its own (or drops it): the rows could not read the prefix, so the caller runs
        # the whole batch as usual instead.
        if type(model).__name__ not in _WARNED:
            _WARNED.add(type(model).__name__)
            log.warning("%s keeps no attention cache: its batches run their shared prompt prefix once per row", type(model).__name__)
        return None
    rows, width = input_ids.shape
    cache.batch_repeat_interleave(rows)
    positions = torch.arange(prefix, width, device=input_ids.device).expand(rows, -1)
    return model(
        input_ids=input_ids[:, prefix:], attention_mask=attention_mask, past_key_values=cache,
        position_ids=positions, use_cache=True, **kwargs,
    )
