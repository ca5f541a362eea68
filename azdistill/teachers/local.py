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
