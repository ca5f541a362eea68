"""Which teacher a config gets, built only when a stage has work for it."""

from __future__ import annotations

from azdistill.teachers.logged import LoggedTeacher


def hosted_teacher_factory(config):
    """Builds the teacher of a config whose teacher is not local (the key is resolved only when it is built)."""

    def build():
        if config.teacher.kind == "logged":
            return LoggedTeacher()
        from azdistill.teachers.hosted import build_endpoint_teacher

        return build_endpoint_teacher(config)

    return build
