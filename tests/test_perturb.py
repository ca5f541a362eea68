"""Augmentation by perturbation (synthesis.augment_method perturb): the perturbation rules with known outcomes, the
choice that keeps near copies but not duplicates or test copies, and the synthesize stage with a scripted teacher that
labels the perturbed prompts and writes nothing."""

from __future__ import annotations

import json
import random

import pytest
from click.testing import CliRunner
from conftest import line_of
from test_augment import TEST_PROMPT, WritingTeacher, make_config, read

from azdistill.cli import cli
from azdistill.data.records import Record
from azdistill.stages.synthesize import synthesize
from azdistill.synthesis import perturb
from azdistill.synthesis.augment import choose_new_prompts

SYSTEM = "Say whether the premise entails the hypothesis."


def nli(user: str, line: int = 1) -> Record:
    return Record(messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}], line=line)


PAIR = nli("Premise: A girl is laughing with her friends in the park.\nHypothesis: The girl is alone and crying at home.")


def test_every_field_keeps_its_label_and_its_words_come_from_the_training_inputs():
    words = set(perturb.vocabulary([PAIR]))
    made = perturb.perturbed_prompts([PAIR], per_example=8, seed=3)[0]["texts"]
    assert len(made) == 8 and len(set(made)) == 8 and PAIR.messages[1]["content"] not in made
    for text in made:
        premise, hypothesis = text.split("\n")
        assert premise.startswith("Premise: ") and hypothesis.startswith("Hypothesis: ")
        assert set(premise[len("Premise: "):].split()) | set(hypothesis[len("Hypothesis: "):].split()) <= words


def test_the_same_seed_makes_the_same_prompts_and_another_seed_others():
    other = nli("Review: The kettle broke on the first day, and support never answered.")
    first = perturb.perturbed_prompts([PAIR, other], per_example=3, seed=7)
    assert first == perturb.perturbed_prompts([PAIR, other], per_example=3, seed=7)
    assert first[0] != perturb.perturbed_prompts([PAIR, other], per_example=3, seed=8)[0]


def test_the_rules_with_certain_outcomes(monkeypatch):
    rng = random.Random(0)
    monkeypatch.setattr(perturb, "SPAN", 0.0)
    monkeypatch.setattr(perturb, "DROP", 1.0)  # every word dropped: a field with no words left is no prompt
    assert perturb.perturb_prompt("Review: warm socks", ["x"], rng) == ""
    monkeypatch.setattr(perturb, "DROP", 0.0)
    monkeypatch.setattr(perturb, "REPLACE", 1.0)  # every word replaced by a vocabulary word
    assert perturb.perturb_prompt("Premise: a b c\nHypothesis: d", ["x"], rng) == "Premise: x x x\nHypothesis: x"
    monkeypatch.setattr(perturb, "REPLACE", 0.0)
    monkeypatch.setattr(perturb, "SPAN", 1.0)  # only a contiguous span of at least half the words is kept
    words = "one two three four five six seven eight".split()
    for _ in range(50):
        kept = perturb.perturb_content(" ".join(words), ["x"], rng).split()
        start = words.index(kept[0])
        assert len(kept) >= 4 and kept == words[start:start + len(kept)]


def test_drop_and_replace_rates_are_those_of_tang_et_al(monkeypatch):
    # One long input with the span cut off, so every word faces exactly the two per-word rules.
    monkeypatch.setattr(perturb, "SPAN", 0.0)
    words = [f"w{i}" for i in range(20_000)]
    result = perturb.perturb_content(" ".join(words), ["REPLACED"], random.Random(1)).split()
    dropped = (len(words) - len(result)) / len(words)
    replaced = result.count("REPLACED") / len(words)
    assert 0.09 < dropped < 0.11 and 0.09 < replaced < 0.11


def test_perturbed_prompts_are_kept_though_near_copies_but_not_duplicates_or_test_copies():
    examples = [nli("Review: these wool socks are warm and very soft"), nli("Review: the kettle broke on the first day")]
    test = "Review: the desk lamp flickers every evening"
    journal = {0: {"texts": ["Review: these wool socks are warm and soft", "Review: these wool socks are warm and soft",
                             "Review: the kettle broke on the first day"]},
               1: {"texts": ["Review: the desk lamp flickers every evening!", "Review: the kettle broke on first day"]}}
    known = [example.messages[1]["content"] for example in examples]
    choice = choose_new_prompts(journal, examples, known, [test], max_similarity=0.6, perturbed=True)
    assert [prompt for prompt, _ in choice.kept] == ["Review: these wool socks are warm and soft",
                                                     "Review: the kettle broke on first day"]
    assert choice.dropped == {"duplicate": 2, "contaminated": 1}
    # Written prompts this close to a training prompt are dropped as near duplicates.
    written = choose_new_prompts(journal, examples, known, [test], max_similarity=0.6)
    assert written.dropped == {"similar": 3, "duplicate": 1, "contaminated": 1} and written.kept == []


def test_the_stage_labels_perturbed_copies_and_writes_nothing(tmp_path):
    config = make_config(tmp_path, augment=3, augment_method="perturb")
    teacher = WritingTeacher()
    out = synthesize(config, lambda: teacher)

    assert teacher.written == []  # nothing for the teacher to write
    augmented = read(out / "augmented.jsonl")
    assert augmented and all(row["messages"][1]["content"].startswith("Review: ") for row in augmented)
    assert {row["augmented_from"] for row in augmented} <= {1, 2}
    train = read(out / "train.jsonl")
    assert len(train) == 2 + len(augmented) and teacher.chose  # labelled like the originals, by the label constraint
    stats = json.loads((out / "stats.json").read_text())["augmented"]
    assert stats["kept"] == len(augmented) and stats["accepted"] == len(augmented) and stats["completion_tokens"] == 0
    assert TEST_PROMPT not in (out / "train.jsonl").read_text()

    # A rerun makes the same prompts and asks nothing; another method is another fingerprint.
    again = WritingTeacher()
    synthesize(config, lambda: again)
    assert again.answered == [] and read(out / "augmented.jsonl") == augmented
    written = config.model_copy(update={"synthesis": config.synthesis.model_copy(update={"augment_method": "write"})})
    redo = WritingTeacher()
    synthesize(written, lambda: redo)
    assert redo.written  # the teacher writes now


@pytest.mark.parametrize("task", ["qa", "math", "summarization"])
def test_validate_refuses_perturb_where_the_answer_is_not_a_label(make_config, task):
    config = make_config(task, extra="synthesis:\n  augment: 2\n  augment_method: perturb\n")
    result = CliRunner().invoke(cli, ["validate", str(config)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.splitlines() == [
        f"error: {config}:{line_of(config, 'augment_method:')}: synthesis.augment_method: perturb changes words of the "
        f"inputs, which keeps a question answerable only where the answer is a label (task.type nli), not for task.type "
        f"{task}: use write"
    ]
