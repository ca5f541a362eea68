"""The shared prompt prefix of a padded batch runs once: same logits and gradients, fewer tokens through the model."""

from __future__ import annotations

import pytest
import torch
from conftest import no_cache_model, tiny_llama

from azdistill.config.sections import TrainingConfig
from azdistill.models.builtin import builtin_teacher_path
from azdistill.models.loading import load_tokenizer
from azdistill.models.prefix import MIN_SHARED_TOKENS, shared_prefix_length
from azdistill.training import trainer as trainer_module
from azdistill.training.examples import IGNORE_INDEX, build_example, pad_batch
from azdistill.training.loop import train_student
from azdistill.training.trainer import answer_forward, predicting_positions

SYSTEM = "Classify the sentiment of the review. Answer with one word: positive or negative."
REVIEWS = ["Great.", "The battery died after two days of light use.", "Loved every minute of it!", "Meh, it works I guess"]


def reviews(count: int) -> list[list[dict]]:
    return [
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Review: {REVIEWS[index % len(REVIEWS)]} ({index})"},
            {"role": "assistant", "content": "negative" if index % 3 else "positive"},
        ]
        for index in range(count)
    ]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(builtin_teacher_path())


def batch_of(ids: list[list[int]], answer_from: list[int]) -> dict:
    """A right-padded batch of the given token rows, each answering from the given position on."""
    examples = [
        {"input_ids": row, "labels": [IGNORE_INDEX] * start + row[start:]} for row, start in zip(ids, answer_from)
    ]
    return pad_batch(examples, pad_token_id=0)


def test_the_shared_prefix_stops_before_the_first_predicted_position_and_any_padding():
    common = list(range(1, 21))  # 20 tokens every row starts with
    batch = batch_of([common + [30, 31, 32], common + [40, 41, 42, 43]], [21, 22])
    predict = predicting_positions(batch["labels"])
    assert shared_prefix_length(batch["input_ids"], batch["attention_mask"], predict) == 20
    # A row that answers from token 18 on needs the logits of position 17: the prefix stops there.
    early = batch_of([common + [30], common + [40]], [18, 21])
    assert shared_prefix_length(early["input_ids"], early["attention_mask"], predicting_positions(early["labels"])) == 17
    # A row whose tokens end inside the common part: the prefix stops at its padding.
    short = batch_of([common[:18], common + [40, 41]], [17, 21])
    assert shared_prefix_length(short["input_ids"], short["attention_mask"], predicting_positions(short["labels"])) == 16


def test_no_prefix_is_shared_when_it_would_not_pay():
    few = list(range(1, MIN_SHARED_TOKENS))  # one token short of the minimum
    batch = batch_of([few + [30, 31], few + [40, 41]], [len(few) + 1] * 2)
    assert shared_prefix_length(batch["input_ids"], batch["attention_mask"], predicting_positions(batch["labels"])) == 0
    single = batch_of([list(range(1, 40))], [35])
    assert shared_prefix_length(single["input_ids"], single["attention_mask"], predicting_positions(single["labels"])) == 0


def test_sharing_the_prefix_gives_the_same_logits_and_gradients_with_fewer_tokens(tokenizer):
    model = tiny_llama(tokenizer).train()
    batch = pad_batch([build_example(tokenizer, messages, 256) for messages in reviews(4)], tokenizer.pad_token_id)
    predict = predicting_positions(batch["labels"])
    targets = batch["labels"][:, 1:][batch["labels"][:, 1:] != IGNORE_INDEX]
    prefix = shared_prefix_length(batch["input_ids"], batch["attention_mask"], predict)
    rows, width = batch["input_ids"].shape
    assert prefix >= MIN_SHARED_TOKENS and (batch["attention_mask"].sum(1) < width).any()  # a padded row is in it

    tokens_seen = []
    model.model.embed_tokens.register_forward_hook(lambda module, args, output: tokens_seen.append(args[0].numel()))
    results = {}
    for share in (False, True):
        tokens_seen.clear()
        model.zero_grad()
        logits = answer_forward(model, batch, predict, share_prefix=share)
        torch.nn.functional.cross_entropy(logits, targets).backward()
        results[share] = (logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}, sum(tokens_seen))
    (full_logits, full_grads, full_tokens), (shared_logits, shared_grads, shared_tokens) = results[False], results[True]
    torch.testing.assert_close(shared_logits, full_logits, atol=1e-5, rtol=1e-5)
    for name, grad in full_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert full_tokens == rows * width
    assert shared_tokens == prefix + rows * (width - prefix)


def test_a_model_that_keeps_no_cache_runs_the_whole_batch_as_usual(tokenizer, caplog):
    inner = tiny_llama(tokenizer).eval()
    batch = pad_batch([build_example(tokenizer, messages, 256) for messages in reviews(3)], tokenizer.pad_token_id)
    predict = predicting_positions(batch["labels"])
    with torch.no_grad(), caplog.at_level("WARNING"):
        logits = answer_forward(no_cache_model(inner), batch, predict, share_prefix=True)
        expected = answer_forward(inner, batch, predict)
    torch.testing.assert_close(logits, expected)
    assert "keeps no attention cache" in caplog.text


@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_shares_the_prefix_on_every_batch_and_trains_the_same_weights(tokenizer, tmp_path, monkeypatch, method):
    from safetensors.torch import load_file

    folder = tmp_path / "student"
    tiny_llama(tokenizer, seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    calls = []
    shared_forward = trainer_module.prefix_shared_forward
    monkeypatch.setattr(trainer_module, "prefix_shared_forward", lambda *args, **kwargs: calls.append(args[3]) or shared_forward(*args, **kwargs))
    weights, summaries = {}, {}
    for share in (True, False):
        calls.clear()
        # No LoRA dropout: with it the rows would share the prefix's dropout mask, and draw other masks than without.
        lora = {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}} if method == "lora" else {}
        settings = TrainingConfig(learning_rate=5e-3, batch_size=4, epochs=2, save_steps=100, shared_prefix=share, seed=3, **lora)
        summaries[share] = train_student(reviews(8), [], folder, tmp_path / f"out-{share}", settings)
        weights[share] = load_file(tmp_path / f"out-{share}" / "model" / "model.safetensors")
        assert len(calls) == (summaries[share]["steps"] if share else 0)
    assert all(prefix >= MIN_SHARED_TOKENS for prefix in calls) or not calls
    assert summaries[True]["parameters_changed"] == summaries[True]["trainable_tensors"]
    for name, tensor in weights[False].items():
        torch.testing.assert_close(weights[True][name], tensor, atol=1e-4, rtol=1e-3, msg=name)


def test_hidden_state_matching_and_gradient_checkpointing_train_without_sharing(tokenizer):
    class Args:
        world_size = 1

    for settings, shares in (
        (TrainingConfig(), True),
        (TrainingConfig(shared_prefix=False), False),
        (TrainingConfig(hidden_weight=1.0), False),
        (TrainingConfig(gradient_checkpointing=True), False),
    ):
        assert trainer_module.shares_prefix(settings, Args()) is shares
    Args.world_size = 2
    assert trainer_module.shares_prefix(TrainingConfig(), Args()) is False

