"""Label scoring (synthesis.label_constraint scores): a tiny model whose label probabilities are known exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import no_cache_model, tiny_llama

from azdistill.config.sections import SynthesisConfig
from azdistill.models.labels import label_token_ids, score_labels
from azdistill.synthesis.answering import label_logprobs
from azdistill.teachers.local import LocalTeacher

CONVERSATION = [
    {"role": "system", "content": "Classify the sentiment of the review. Answer with one word: positive or negative."},
    {"role": "user", "content": "Review: The soup was cold."},
]


def known_model(folder: Path, logits: dict[str, float]) -> Path:
    """A 1-layer Llama whose next-token distribution is the same after any input: every layer's output projection
    is zero and every embedding is the same vector, so the last hidden state is constant and the logits are the
    lm_head's row sums. A token of `logits` gets that logit; every other token -30."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from azdistill.models.builtin import builtin_teacher_path

    tokenizer = AutoTokenizer.from_pretrained(builtin_teacher_path())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.fill_(-30.0 / config.hidden_size)
        for text, logit in logits.items():
            (token,) = tokenizer(text, add_special_tokens=False)["input_ids"]
            model.lm_head.weight[token].fill_(logit / config.hidden_size)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def three_to_one(tmp_path_factory) -> Path:
    """positive: logit log 3, negative: logit 0, so p(positive) / p(negative) = 3 whatever the prompt."""
    return known_model(tmp_path_factory.mktemp("known"), {"positive": math.log(3.0), "negative": 0.0})


def test_scores_match_the_known_distribution(three_to_one):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(three_to_one).eval()
    tokenizer = AutoTokenizer.from_pretrained(three_to_one)
    other = [CONVERSATION[0], {"role": "user", "content": "Review: Loved every page of it, a gift I will repeat."}]
    scores = score_labels(model, tokenizer, [CONVERSATION, other, CONVERSATION], ["positive", "negative"], batch_size=2)
    assert len(scores) == 3
    for score in scores:  # batched with prompts of other lengths: padding changes nothing
        assert score.probs["positive"] == pytest.approx(0.75, abs=1e-4)
        assert score.probs["negative"] == pytest.approx(0.25, abs=1e-4)
        assert score.label == "positive"
    assert scores[0].prompt_tokens == len(tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True)["input_ids"])


def test_a_label_of_several_tokens_is_scored_on_all_of_them(tmp_path):
    """'not sure' is two tokens: its probability is the product of both, each 1/(3+1+1+e^-30...) here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = known_model(tmp_path / "m", {"positive": math.log(3.0), "not": 0.0, " sure": 0.0})
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer(tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
    assert len(label_token_ids(tokenizer, CONVERSATION, prompt, "not sure")) == 2
    (score,) = score_labels(model, tokenizer, [CONVERSATION], ["positive", "not sure"])
    # Per position the three named tokens share nearly all the mass: p(positive) = 3/5, p(not) = p( sure) = 1/5.
    p_positive, p_not_sure = 3 / 5, (1 / 5) ** 2
    assert score.probs["positive"] == pytest.approx(p_positive / (p_positive + p_not_sure), abs=1e-4)
    assert score.label == "positive"


def test_the_local_teacher_commits_and_keeps_the_distribution(three_to_one):
    teacher = LocalTeacher(three_to_one, SynthesisConfig(batch_size=4))
    (completion,) = teacher.choose([CONVERSATION], ["negative", "positive"])
    assert completion.text == "positive" and completion.finish_reason == "stop"
    assert completion.label_probs == pytest.approx({"negative": 0.25, "positive": 0.75}, abs=1e-4)
    assert completion.completion_tokens == 1 and completion.prompt_tokens > 0


def test_the_distribution_becomes_a_top_k_soft_target():
    """In the sidecar's form every label is a candidate at the answer's position, with its log-probability."""
    (entry,) = label_logprobs("positive", {"positive": 0.75, "negative": 0.25, "neutral": 0.0})
    assert entry["token"] == "positive" and entry["logprob"] == pytest.approx(math.log(0.75))
    assert [top["token"] for top in entry["top_logprobs"]] == ["positive", "negative", "neutral"]
    assert entry["top_logprobs"][1]["logprob"] == pytest.approx(math.log(0.25))
    assert entry["top_logprobs"][2]["logprob"] < -1000  # an impossible label: a finite, negligible log-probability


def test_a_constrained_teacher_answers_the_held_out_set_by_scoring_and_students_generate(make_config, tmp_path, monkeypatch):
    """Evaluation asks the teacher as synthesis did (its labels scored, label_constraint scores) and the students as
    they are served (generation); turning the constraint off makes the teacher generate, and answers again."""
    import json

    from azdistill.config.loading import load_config
    from azdistill.stages import evaluate as stage

    asked: dict[str, object] = {}

    def fake_measure(path, conversations, settings, runtime, description, labels=None):
        asked[description] = labels
        return {"answers": ["positive"] * len(conversations), "latencies_s": [0.1], "throughput_tokens_per_s": 10.0,
                "generated_tokens": 10, "seconds": 1.0, "parameters": 10, "weights_bytes": 40, "peak_memory_bytes": 100,
                "size_on_disk_bytes": 40, "device": "cpu"}

    monkeypatch.setattr(stage, "measure_in_child", fake_measure)
    models = {}
    for role in ("teacher", "student", "baseline"):
        (tmp_path / role).mkdir()
        (tmp_path / role / "config.json").write_text(json.dumps({"role": role}))
        models[role] = tmp_path / role
    config_path = make_config(extra="synthesis:\n  min_success_ratio: 0.0\n")  # nli, a local teacher
    teacher = models.pop("teacher")
    stage.evaluate(load_config(config_path), teacher, models)
    assert asked == {"teacher": ["positive", "negative"], "student": None, "baseline": None}
    asked.clear()
    stage.evaluate(load_config(config_path, ["synthesis.label_constraint=off"]), teacher, models)
    assert asked == {"teacher": None}  # only the teacher's answers depend on the constraint


REVIEWS = ["Great.", "The battery died after two days of light use and support never answered.", "Loved it!",
           "Meh, it works I guess", "Cold soup, rude staff, long wait."]


def test_each_prompt_runs_once_and_its_labels_read_it_from_the_cache(monkeypatch):
    """Scored from the attention cache, every label gets the probability it gets as a whole sequence (prompts of
    several lengths in one batch, labels of one and two tokens), with the prompts run through the model once
    instead of once per label."""
    from azdistill.models import labels as labels_module
    from azdistill.models.builtin import builtin_teacher_path
    from azdistill.models.loading import load_tokenizer

    tokenizer = load_tokenizer(builtin_teacher_path())
    model = tiny_llama(tokenizer).eval()
    conversations = [[CONVERSATION[0], {"role": "user", "content": f"Review: {text}"}] for text in REVIEWS]
    candidates = ["positive", "negative", "not sure"]
    tokens = []
    model.model.embed_tokens.register_forward_hook(lambda module, inputs, output: tokens.append(inputs[0].numel()))

    cached = score_labels(model, tokenizer, conversations, candidates, batch_size=3)
    cached_tokens, tokens[:] = sum(tokens), []
    monkeypatch.setattr(labels_module, "_cached_logprobs", lambda *args: None)
    sequences = score_labels(model, tokenizer, conversations, candidates, batch_size=3)
    sequence_tokens = sum(tokens)

    for with_cache, whole in zip(cached, sequences):
        assert with_cache.probs == pytest.approx(whole.probs, abs=1e-5)
        assert with_cache.prompt_tokens == whole.prompt_tokens
    assert len({round(score.probs["positive"], 4) for score in cached}) == len(REVIEWS)  # the test can tell prompts apart
    assert cached_tokens < 0.5 * sequence_tokens  # three labels: each prompt ran once, not three times


def test_a_model_that_keeps_no_cache_is_scored_a_sequence_per_label():
    """Scored a sequence per label, with the same probabilities; after the first batch shows it keeps no cache, the
    later batches do not try the cache again."""
    from azdistill.models.builtin import builtin_teacher_path
    from azdistill.models.loading import load_tokenizer

    tokenizer = load_tokenizer(builtin_teacher_path())
    inner = tiny_llama(tokenizer).eval()
    conversations = [[CONVERSATION[0], {"role": "user", "content": f"Review: {text}"}] for text in REVIEWS[:3]]
    expected = score_labels(inner, tokenizer, conversations, ["positive", "negative"], batch_size=2)
    model = no_cache_model(inner)
    scores = score_labels(model, tokenizer, conversations, ["positive", "negative"], batch_size=2)
    for score, reference in zip(scores, expected):
        assert score.probs == pytest.approx(reference.probs, abs=1e-5)
    assert model.cached_calls == 1  # two batches, the cache tried on the first only
