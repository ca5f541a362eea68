"""A teacher running in this process: a Hugging Face causal LM (the built-in SmolLM2 teacher or a local folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from azdistill.config.sections import RuntimeConfig, SynthesisConfig
from azdistill.data.records import Message
from azdistill.models.generation import Completion, GenerationSettings, generate_batch
from azdistill.teachers.base import Teacher


class LocalTeacher(Teacher):
    """A Hugging Face causal LM running in this process (the built-in SmolLM2 teacher or a local folder).

    It answers in batches of `synthesis.batch_size`, bills nothing and holds no connection.
    """

    def __init__(self, path: Path, settings: SynthesisConfig, device: str = "cpu", runtime: RuntimeConfig = RuntimeConfig()):
        from azdistill.determinism import make_repeatable
        from azdistill.models.loading import load_model, load_tokenizer

        make_repeatable(settings.seed, runtime.threads, runtime.deterministic)
        self.path = Path(path)
        self.name = self.path.name
        self.batch_size = settings.batch_size
        self.tokenizer = load_tokenizer(self.path)
        self.model = load_model(self.path, device).eval()
        self.settings = GenerationSettings(
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            batch_size=settings.batch_size,
            seed=settings.seed,
        )

    def answer(self, conversations: Sequence[list[Message]]) -> list[Completion]:
        return generate_batch(self.model, self.tokenizer, conversations, self.settings)

    def choose(self, conversations: Sequence[list[Message]], labels: Sequence[str]) -> list[Completion]:
        """Every label scored as the whole answer (`models.labels.score_labels`); the most likely one is the answer.

        No `rescued_by`: whether the free answer would have been rejected is only known by generating it, which is
        the cost scoring saves (docs/quality.md has the measured share on the demo)."""
        from azdistill.models.labels import score_labels

        completions = []
        for scores in score_labels(self.model, self.tokenizer, conversations, labels, self.batch_size):
            label = scores.label
            completions.append(Completion(
                text=label, finish_reason="stop", prompt_tokens=scores.prompt_tokens,
                completion_tokens=len(self.tokenizer(label, add_special_tokens=False)["input_ids"]),
                label_probs={name: round(p, 6) for name, p in scores.probs.items()},
            ))
        return completions
