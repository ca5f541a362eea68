"""Checks that a teacher and a student can work together, run by `validate` before anything loads."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from azdistill.errors import UserError
from azdistill.models.builtin import resolve_teacher
from azdistill.models.files import model_folder, vocabulary_size, weights_folder

if TYPE_CHECKING:
    from azdistill.config.schema import DistillConfig


# Which models a config needs, and whether they fit together


def check_vocabularies(config: "DistillConfig", teacher: Optional[Path], student: Path) -> None:
    """Logit losses compare the two models' distributions token by token: their vocabularies must be the same size."""
    training = config.training
    needs = [name for name in ("kd_weight", "on_policy_ratio") if getattr(training, name) > 0]
    if not needs or teacher is None:
        return
    teacher_size, student_size = vocabulary_size(teacher), vocabulary_size(student)
    if teacher_size != student_size:
        raise UserError(
            f"training.{needs[0]}: logit distillation needs the teacher's and the student's vocabularies to match, and "
            f"they differ: teacher {teacher_size} tokens ({teacher}), student {student_size} tokens ({student}); set "
            f"{' and '.join(f'training.{name}' for name in needs)} to 0 or pick a student of the teacher's family "
            "(training.topk_weight with a hosted teacher works across vocabularies)"
        )


def check_models(config: "DistillConfig") -> None:
    """What `validate` checks of the model folders without building anything: they exist and fit the losses."""
    weights = config.teacher.weights
    teacher = None
    if weights is not None and weights != "builtin":
        teacher = resolve_teacher(weights, config.teacher.weights_key)
    if config.student.model != "pruned-teacher" and not config.student.model.startswith("azureml:"):  # a registered
        # student (azure.student_model) is mounted by the job, which passes its folder to the steps that load it
        student = Path(config.student.model)
        if not (student / "MLmodel").is_file():
            model_folder(student, "student.model")
        if weights == "builtin" and (config.training.kd_weight > 0 or config.training.on_policy_ratio > 0):
            teacher = resolve_teacher("builtin")
        check_vocabularies(config, teacher, weights_folder(student))
