"""Which teacher a config gets, built only when a stage has work for it, and its identity for fingerprints."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from azdistill.config.schema import DistillConfig
from azdistill.config.teacher import TeacherConfig
from azdistill.data.digests import fingerprint, folder_digest
from azdistill.teachers.logged import LoggedTeacher


def hosted_teacher_factory(config: DistillConfig):
    """Builds the teacher of a config whose teacher is not local (the key is resolved only when it is built)."""

    def build():
        if config.teacher.kind == "logged":
            return LoggedTeacher()
        from azdistill.teachers.hosted import build_endpoint_teacher

        return build_endpoint_teacher(config)

    return build


def local_teacher_factory(config: DistillConfig, teacher_path: Path):
    """Builds a local teacher from its folder, on the best device there is."""

    def build():
        from azdistill.models.loading import pick_device
        from azdistill.teachers.local import LocalTeacher

        return LocalTeacher(teacher_path, config.synthesis, pick_device(), config.runtime)

    return build


def teacher_identity(teacher_path: Path) -> str:
    """A local teacher's identity: the digest of its folder, so new weights behind the same name count as a change."""
    return folder_digest(teacher_path)


def endpoint_identity(endpoint: TeacherConfig) -> str:
    """What a hosted model's answers depend on: which endpoint, kind and model (or deployment) answer; its limits,
    prices and key do not change an answer. Used for a hosted teacher, a served model and a judge endpoint.

    What is deployed behind them is not seen: after a redeploy behind the same URL and model name, measure again
    with `--force` (or name the new deployment in `deployment`)."""
    return fingerprint(endpoint.model_dump(include={"kind", "endpoint", "model", "deployment", "api_version"}))


def synthesis_teacher(config: DistillConfig, teacher_path: Optional[Path]):
    """The teacher that answers the prompts, and its identity for the stage's fingerprint.

    A local teacher is loaded from its folder (whose digest makes new weights behind the same name count as a
    change); a hosted or logged one is built from the config's teacher section, which is its identity.
    """
    if config.teacher.kind == "local":
        assert teacher_path is not None, "a local teacher answers from its folder"
        return local_teacher_factory(config, teacher_path), teacher_identity(teacher_path)
    return hosted_teacher_factory(config), None
