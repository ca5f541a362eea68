"""The teacher behind a small interface, so the synthesis stage can be driven by any back end (or a fake in tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

from azdistill.config import SynthesisConfig
from azdistill.data import Message
from azdistill.generation import Completion, GenerationSettings, generate_batch


class Teacher(Protocol):
    """Answers chat conversations. `batch_size` is how many it prefers to receive at once."""

    name: str
    batch_size: int

    def answer(self, conversations: Sequence[list[Message]]) -> list[Completion]: ...


class LocalTeacher:
    """A Hugging Face causal LM running in this process (the built-in SmolLM2 teacher or a local folder)."""

    def __init__(self, path: Path, settings: SynthesisConfig, device: str = "cpu"):
        import torch

        from azdistill.models import load_model, load_tokenizer

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
        torch.manual_seed(settings.seed)

    def answer(self, conversations: Sequence[list[Message]]) -> list[Completion]:
        return generate_batch(self.model, self.tokenizer, conversations, self.settings)
