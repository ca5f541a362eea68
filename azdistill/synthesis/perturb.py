"""Prompt augmentation by perturbation (synthesis.augment_method perturb): new training inputs made from the
training inputs by dropping words, replacing words and cutting out a span, for the teacher to label.

This is the augmentation of Tang et al. 2019 ("Distilling Task-Specific Knowledge from BERT into Simple Neural
Networks", section 3.3): a student learns its teacher's decision function far better from the teacher's labels on
many inputs near the training inputs than from the training inputs alone, and a perturbed input needs no human
label because the teacher labels it. Their rules, per word: masking (here the word is dropped: a generative teacher
has no [MASK]) with probability 0.1; replacement by another word with probability 0.1 (theirs keeps the part of
speech through a tagger; here the word is drawn from the words of all training inputs, which keeps the domain's
vocabulary and needs no tagger); and, with probability 0.25 per new input, n-gram sampling: a contiguous span is kept
and the rest cut (theirs keeps 1-5 words of a sentence; reviews and premises are one or two sentences, so the span
keeps at least half the words, else most inputs would be left with too little to label).

Only the text after each field label is changed ("Review: ...", "Premise: ...\\nHypothesis: ..."), so the new input
keeps the example's format. Everything is a pure function of the training inputs and the seed: a rerun makes the same
inputs without asking anything, so there is nothing to journal. It is offered for label tasks (nli), where the
teacher's label of a changed input is as meaningful as its label of any input; a perturbed word problem or passage
would no longer have a right answer.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

from azdistill.data.records import Record

DROP = 0.1  # per word: dropped (Tang et al.'s masking)
REPLACE = 0.1  # per word: replaced by a word of another training input
SPAN = 0.25  # per new input: only a contiguous span of at least half its words is kept (n-gram sampling)
TRIES = 20  # attempts per wanted input before giving up on an input too short to vary
# A field label at the start of a line, "Review: ", "Premise: " (the same shape augment.FIELD reads).
FIELD = re.compile(r"^([A-Z][A-Za-z ]{0,24}:[ \t]*)", re.MULTILINE)


def _parts(text: str) -> list[tuple[str, str]]:
    """A user message as (field label, content) pairs; a message without labels is one part with an empty label."""
    pieces = FIELD.split(text)
    parts = [("", pieces[0])] if pieces[0].strip() else []
    return parts + [(pieces[i], pieces[i + 1]) for i in range(1, len(pieces) - 1, 2)]


def vocabulary(examples: Sequence[Record]) -> list[str]:
    """The words replacements are drawn from: every word of every training input's field contents, in order (a
    frequent word is drawn more often, as in the data)."""
    return [word for record in examples for _, content in _parts(record.messages[1]["content"]) for word in content.split()]


def perturb_content(content: str, words: Sequence[str], rng: random.Random) -> str:
    """One field's content with words dropped and replaced, and sometimes only a span of it kept; line breaks inside
    the content become spaces (field contents are a line each in the bundled data)."""
    new = []
    for word in content.split():
        draw = rng.random()
        if draw < DROP:
            continue
        new.append(rng.choice(words) if draw < DROP + REPLACE else word)
    if len(new) > 3 and rng.random() < SPAN:
        length = rng.randint((len(new) + 1) // 2, len(new))
        start = rng.randint(0, len(new) - length)
        new = new[start:start + length]
    return " ".join(new)


def perturb_prompt(text: str, words: Sequence[str], rng: random.Random) -> str:
    """A user message with every field's content perturbed and its labels kept; "" when a field lost all its words."""
    parts = []
    for label, content in _parts(text):
        changed = perturb_content(content, words, rng)
        if not changed:
            return ""
        parts.append(f"{label}{changed}")
    return "\n".join(parts)


def perturbed_prompts(examples: Sequence[Record], per_example: int, seed: int) -> dict[int, dict]:
    """`per_example` perturbed inputs for every training example, as the augmentation journal holds written ones
    ({index: {"index", "texts"}}), so the same choice (duplicates, contamination) applies to them. Each example has
    its own random stream (seed and index), so an example's inputs do not depend on the others'."""
    words = vocabulary(examples)
    made = {}
    for index, record in enumerate(examples):
        rng = random.Random(f"{seed}:{index}")
        original = record.messages[1]["content"]
        texts: list = []
        for _ in range(per_example * TRIES):
            if len(texts) == per_example:
                break
            text = perturb_prompt(original, words, rng)
            if text and text != original and text not in texts:
                texts.append(text)
        made[index] = {"index": index, "texts": texts}
    return made
