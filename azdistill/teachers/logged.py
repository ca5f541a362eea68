"""`teacher.kind: logged`: the answers already in the data (imported chat logs, say) are the teacher's."""

from __future__ import annotations

from typing import Sequence

from azdistill.data.records import Message
from azdistill.models.generation import Completion
from azdistill.teachers.base import Teacher


class LoggedTeacher(Teacher):
    """`teacher.kind: logged`: the assistant turns already in the data (e.g. imported chat logs) are the answers.

    They go through the same checks as a live teacher's; nothing is called.
    """

    name = "logged"
    mode = "logged"

    def __init__(self, batch_size: int = 64):
        self.batch_size = batch_size

    def logged_answer(self, messages: Sequence[Message], user_position: int) -> Completion:
        following = messages[user_position + 1] if user_position + 1 < len(messages) else None
        if following is None or following["role"] != "assistant":
            return Completion(text="", finish_reason="refused: no logged answer to this turn", prompt_tokens=0, completion_tokens=0)
        return Completion(text=following["content"].strip(), finish_reason="stop", prompt_tokens=0, completion_tokens=0)

    def answer(self, conversations: Sequence[list[Message]]) -> list[Completion]:
        raise TypeError("a logged teacher only replays the answers in the data; it cannot answer new prompts")
