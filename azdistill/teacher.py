"""The teacher behind a small interface, so the synthesis stage can be driven by any back end (or a fake in tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

from azdistill.config import RuntimeConfig, SynthesisConfig
from azdistill.data import Message
from azdistill.generation import Completion, GenerationSettings, generate_batch


class Teacher(Protocol):
    """Answers chat conversations. `batch_size` is how many it prefers to receive at once."""

    name: str
    batch_size: int

    def answer(self, conversations: Sequence[list[Message]]) -> list[Completion]: ...


class LocalTeacher:
    """A Hugging Face causal LM running in this process (the built-in SmolLM2 teacher or a local folder)."""

    def __init__(self, path: Path, settings: SynthesisConfig, device: str = "cpu", runtime: RuntimeConfig = RuntimeConfig()):
        from azdistill.determinism import make_repeatable
        from azdistill.models import load_model, load_tokenizer

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


class LoggedTeacher:
    """`teacher.kind: logged`: the assistant turns already in the data (e.g. imported chat logs) are the answers.

    They go through the same checks as a live teacher's; nothing is called.
    """

    name = "logged"
    answers_from_record = True

    def __init__(self, batch_size: int = 64):
        self.batch_size = batch_size

    def logged_answer(self, messages: Sequence[Message], user_position: int) -> Completion:
        following = messages[user_position + 1] if user_position + 1 < len(messages) else None
        if following is None or following["role"] != "assistant":
            return Completion(text="", finish_reason="refused: no logged answer to this turn", prompt_tokens=0, completion_tokens=0)
        return Completion(text=following["content"].strip(), finish_reason="stop", prompt_tokens=0, completion_tokens=0)

    def answer(self, conversations: Sequence[list[Message]]) -> list[Completion]:
        raise TypeError("a logged teacher only replays the answers in the data; it cannot answer new prompts")


def hosted_teacher_factory(config):
    """Builds the teacher of a config whose teacher is not local (the key is resolved only when it is built)."""

    def build():
        if config.teacher.kind == "logged":
            return LoggedTeacher()
        from azdistill.endpoints import build_endpoint_teacher

        return build_endpoint_teacher(config)

    return build
