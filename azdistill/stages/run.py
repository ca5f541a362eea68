"""Running stages on this machine: the whole distillation (synthesize -> finetune (-> finetune on references) ->
evaluate) in this process, or one stage as its command runs it, with the models and teacher it needs.

With `--seeds N` the student is also trained and evaluated with the next N - 1 seeds, each in its own folders under
`<run_dir>/seeds/`, and the spread of its figures is written beside the first seed's report (`seeds.json`, `seeds.md`).

The same stage functions run inside the Azure ML components; here they are chained under one MLflow parent
run with a nested run per stage. A stage whose inputs and settings are unchanged is skipped; an interrupted
one continues from what it had written. A rerun that skips every stage leaves no MLflow run: it says which
earlier run holds its results.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from azdistill.config.schema import DistillConfig
from azdistill.data.files import atomic_writer, write_json
from azdistill.data.records import count_records, has_references
from azdistill.errors import UserError
from azdistill.evaluation.report import Report
from azdistill.evaluation.seeds import SeedsSummary, render_seeds_markdown, seeds_to_dict, student_seed_metrics, summarise_seeds
from azdistill.teachers.factory import synthesis_teacher
from azdistill.tracking.headline import pipeline_tags
from azdistill.tracking.tracker import NullTracker, make_tracker

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    report: Report
    report_dir: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)
    registered_version: Optional[str] = None
    tracking_uri: Optional[str] = None
    run_id: Optional[str] = None
    promotion: Optional[object] = None  # registry.PromotionDecision: champion or challenger, and why
    # Whether this run left a new MLflow run: not with tracking off, nor when every stage reused its outputs and
    # nothing was logged (run_id is then the earlier run holding those outputs).
    new_run: bool = True
    seeds: Optional[SeedsSummary] = None  # with --seeds N > 1: the spread of every figure over the N students


@dataclass
class Models:
    """Where the teacher's weights and the student's starting point live for a config."""

    teacher: Optional[Path]  # a local teacher, or a hosted teacher's local_copy; None: the teacher is only an endpoint
    student_init: Path


def prepare_models(config: DistillConfig) -> Models:
    from azdistill.models.builtin import resolve_teacher
    from azdistill.models.checks import check_vocabularies
    from azdistill.models.files import file_lock
    from azdistill.models.students import resolve_student

    weights = config.teacher.weights
    teacher = resolve_teacher(weights, config.teacher.weights_key) if weights is not None else None
    # Under torchrun every process gets here: the first builds the pruned student, the others then reuse it.
    with file_lock(config.run_dir / ".student-init.lock"):
        student_init = resolve_student(config.student.model, teacher, config.student.keep_layers, config.run_dir / "student-init")
    check_vocabularies(config, teacher, student_init)
    return Models(teacher, student_init)



def wants_reference_baseline(config: DistillConfig, references: Optional[bool] = None) -> bool:
    """Whether to also train the student on the data's own answers: asked for, and the training data has them
    (`references`, where a pass over the training data already found out; else it is read)."""
    if not config.evaluation.reference_baseline:
        return False
    if references is None:
        references = has_references(config.data.train, config.task.type, config.data.max_records)
    return references



def require_stage_output(stage_dir: Path, stage: str) -> Path:
    """A finished stage's folder; a missing, failed or interrupted one is a user error naming the command to run."""
    from azdistill.stages.state import DONE_FILE, verify_outputs

    if not (stage_dir / DONE_FILE).is_file():
        raise UserError(f"{stage_dir} holds no finished {stage} stage: run `azdistill {stage}` with this config first (or `azdistill run`)")
    verify_outputs(stage_dir, stage.split()[0])  # as that stage wrote them: never a truncated or emptied output
    return stage_dir


@contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    seconds[stage] = round(time.monotonic() - started, 1)


def register_student(config: DistillConfig, tracker: NullTracker, student: Path, report: Report) -> Optional[str]:
    """Register the student in the model registry, once per distinct model: a rerun that changed nothing
    reuses the version registered before instead of piling up identical versions."""
    from azdistill.data.digests import folder_digest
    from azdistill.data.files import write_json

    marker = config.run_dir / "registered.json"
    digest = folder_digest(student)
    if marker.is_file():
        previous = json.loads(marker.read_text())
        if previous == {**previous, "digest": digest, "tracking_uri": config.tracking_uri, "name": config.registered_model_name}:
            log.info("register: this student is already version %s of '%s'", previous["version"], config.registered_model_name)
            return previous["version"]
    metrics = next(model for model in report.models if model.role == "student").metrics
    version = tracker.log_student(
        student,
        {
            "teacher": config.teacher.label,
            "data_version": config.data.version,
            "promote": str(report.promote).lower(),
            **{f"metric.{name}": f"{value:.4f}" for name, value in metrics.items()},
        },
    )
    write_json(marker, {"digest": digest, "version": version, "tracking_uri": config.tracking_uri, "name": config.registered_model_name})
    return version


def run_local(config: DistillConfig, force: bool = False, tracker: Optional[NullTracker] = None, seeds: int = 1) -> RunResult:
    """Run every stage of a distillation on this machine; returns the evaluation report and stage timings.

    With `seeds` above 1 the student is trained and evaluated once per seed (see `run_other_seeds`); the report,
    registration and promotion stay the first seed's. The workdir is held for the whole run (`state.workdir_lock`):
    a second run on it is refused, not raced."""
    from azdistill.stages.state import workdir_lock

    with workdir_lock(config.workdir):
        return _run_stages(config, force, tracker, seeds)


def _run_stages(config: DistillConfig, force: bool, tracker: Optional[NullTracker], seeds: int = 1) -> RunResult:
    from azdistill.evaluation.engines import engine_on_this_machine
    from azdistill.stages.evaluate import evaluate
    from azdistill.stages.finetune import finetune
    from azdistill.stages.synthesize import synthesize

    # Fail on bad data before loading any model; nothing is held. The pass over the training data also finds out
    # whether it has reference answers (the reference baseline), so the file is read once here.
    references = has_references(config.data.train, config.task.type, config.data.max_records)
    for split in ("validation", "test"):
        count_records(getattr(config.data, split), config.task.type, config.data.max_records)
    # evaluation.engine vllm on a machine without vLLM or a GPU: refused now, not after synthesis and training.
    engine_on_this_machine(config.evaluation.engine)
    tracker = tracker or make_tracker(config)
    seconds: dict[str, float] = {}
    with tracker.pipeline(tags=pipeline_tags(config, mode="local")):
        with _timed(seconds, "prepare"):
            models = prepare_models(config)
        with _timed(seconds, "synthesize"):
            factory, identity = synthesis_teacher(config, models.teacher)
            synthetic = synthesize(config, factory, tracker, force, teacher_identity=identity)
        with _timed(seconds, "finetune"):
            student = finetune(config, models.student_init, models.teacher, synthetic, tracker, force) / "model"
        evaluated = {"student": student, "baseline": models.student_init}
        if wants_reference_baseline(config, references):
            with _timed(seconds, "finetune-reference"):
                evaluated["reference_sft"] = finetune(config, models.student_init, None, synthetic, tracker, force, on_references=True) / "model"
        with _timed(seconds, "evaluate"):
            report = evaluate(config, models.teacher, evaluated, tracker, force)
        spread = None
        if seeds > 1:
            with _timed(seconds, "other-seeds"):
                spread = run_other_seeds(config, models, synthetic, evaluated, report, tracker, force, seeds)
        else:
            _remove_seed_summary(config)
        version = promotion = None
        if config.tracking.enabled:
            with _timed(seconds, "register"):
                version = register_student(config, tracker, student, report)
                # No run started yet: every stage reused its outputs and this student was registered before, so the
                # run that made them decided its promotion; deciding again would start a run that records nothing new.
                if version is not None and tracker.run_id is not None:
                    promotion = tracker.promote_student(version, report)
        run_id = tracker.run_id
        if run_id is not None:
            # The pipeline run's own metrics come after the student is logged: they are not the model's.
            tracker.log_headline(report, promotion)
            tracker.log_metrics({f"stage_seconds_{stage}": value for stage, value in seconds.items()})
            if spread is not None:
                tracker.log_params({"seeds": seeds})
                tracker.log_metrics(student_seed_metrics(spread))
    new_run = run_id is not None
    if config.tracking.enabled and not new_run:
        run_id = _say_nothing_changed(tracker, pipeline_tags(config, mode="local"))
    write_json(config.run_dir / "run.json", {"stage_seconds": seconds, "registered_version": version, "run_id": run_id})
    tracking_uri = config.tracking_uri if config.tracking.enabled else None
    return RunResult(report, config.stage_dir("evaluate"), seconds, version, tracking_uri, run_id, promotion, new_run, spread)


SEEDS_FILES = ("seeds.json", "seeds.md")


def seed_dir(config: DistillConfig, seed: int) -> Path:
    """The folder of a seed other than the first: its own `finetune` and `evaluate` stage folders."""
    return config.run_dir / "seeds" / f"seed-{seed}"


def run_other_seeds(
    config: DistillConfig, models: Models, synthetic: Path, evaluated: dict[str, Path], first_report: Report,
    tracker: NullTracker, force: bool, seeds: int,
) -> SeedsSummary:
    """Train and evaluate the student with seeds training.seed + 1 ... training.seed + seeds - 1 on the same
    synthetic data, then write the spread over all the seeds beside the first seed's report; returns it.

    The teacher's answers do not depend on the student's seed, so synthesis is not repeated, and the teacher's and
    baselines' evaluation answers are shared from the first seed (see `_share_seed_independent_answers`). The
    reference-trained baseline is trained once, with the first seed: training it per seed would double the cost of
    every seed for a row that is not the one being measured. Each seed's stages skip when unchanged, like any stage.
    """
    from azdistill.stages import state
    from azdistill.stages.evaluate import evaluate
    from azdistill.stages.finetune import finetune

    first_seed = config.training.seed
    reports = {first_seed: first_report}
    for seed in range(first_seed + 1, first_seed + seeds):
        log.info("seed %d (%d of %d): the student trains and is evaluated again", seed, seed - first_seed + 1, seeds)
        seed_config = config.model_copy(update={"training": config.training.model_copy(update={"seed": seed})})
        folder, stages = seed_dir(config, seed), _SeedTracker(tracker, seed)
        student = finetune(
            seed_config, models.student_init, models.teacher, synthetic, stages, force, out_dir=folder / "finetune"
        ) / "model"
        state.claim(folder / "evaluate", "evaluate")  # the shared answers go into a folder the stage will own
        _share_seed_independent_answers(config.stage_dir("evaluate") / "predictions", folder / "evaluate" / "predictions")
        seed_models = {**evaluated, "student": student}
        reports[seed] = evaluate(seed_config, models.teacher, seed_models, stages, force, out_dir=folder / "evaluate")
    summary = summarise_seeds(reports)
    out_dir = config.stage_dir("evaluate")
    write_json(out_dir / "seeds.json", seeds_to_dict(summary))
    with atomic_writer(out_dir / "seeds.md") as handle:
        handle.write(render_seeds_markdown(summary))
    log.info("seeds: the spread over %d seeds is in %s", seeds, out_dir / "seeds.md")
    return summary


def _share_seed_independent_answers(first: Path, target: Path) -> None:
    """Give a seed's evaluation the first seed's saved answers of every model but the student (the teacher, the
    baselines and served models answer the same whatever the student's seed).

    A saved answer file is copied where the seed has none or has one measured under another key; the evaluation
    itself still checks each key before reusing it. One with the same key is left alone: it is this seed's
    finished output, and replacing it with an equal measurement would fail the stage's check of its outputs."""
    if not first.is_dir():
        return
    target.mkdir(parents=True, exist_ok=True)
    for source in first.glob("*.json"):
        if source.stem == "student":
            continue
        destination = target / source.name
        if _answers_key(destination) != _answers_key(source):
            shutil.copyfile(source, destination)


def _answers_key(path: Path) -> Optional[str]:
    """The key a saved answers file was measured under; None when there is none or it cannot be read."""
    try:
        return json.loads(path.read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def _remove_seed_summary(config: DistillConfig) -> None:
    """A run with one seed removes the spread an earlier run with several left: it would describe other students."""
    for name in SEEDS_FILES:
        (config.stage_dir("evaluate") / name).unlink(missing_ok=True)


class _SeedTracker(NullTracker):
    """The run's tracker, for the stages of a seed other than the first: their stages are `<stage>-seed-<seed>`
    (runs named `data-v<version> #<id> / evaluate-seed-43`), so none passes for the first seed's stages (the
    `evaluate` run is the one `azdistill runs list` reads and whose student figures the logged model carries), and
    they leave the pipeline run's note alone (`set_pipeline_note` does nothing here)."""

    def __init__(self, tracker: NullTracker, seed: int):
        self._tracker, self._seed = tracker, seed

    @property
    def run_id(self) -> Optional[str]:  # type: ignore[override]
        return self._tracker.run_id

    @contextmanager
    def stage(self, name: str) -> Iterator["_SeedTracker"]:
        with self._tracker.stage(f"{name}-seed-{self._seed}"):
            yield self

    def log_params(self, params: dict) -> None:
        self._tracker.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self._tracker.log_metrics(metrics, step)

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self._tracker.log_artifact(path, artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._tracker.set_tags(tags)


def _say_nothing_changed(tracker: NullTracker, tags: dict[str, str]) -> Optional[str]:
    """Log that a rerun reused every stage and left no run; returns the id of the earlier run holding the results."""
    previous = tracker.last_pipeline_run(tags)
    if previous is None:
        log.info("nothing changed: every stage reused; no new MLflow run")
        return None
    log.info("nothing changed since run %s (%s): every stage reused; no new MLflow run", previous.info.run_id, previous.info.run_name)
    return previous.info.run_id


# One stage at a time, as `azdistill synthesize | finetune | evaluate | preflight` run them (and the Azure ML components
# that call those commands): each checks its output folder is writable, holds the workdir, and wires the models.


def run_synthesize(config: DistillConfig, force: bool = False, out_dir: Optional[Path] = None) -> Path:
    """The synthesize stage on its own; returns its output folder."""
    from azdistill.models.builtin import resolve_teacher
    from azdistill.stages.state import check_writable, workdir_lock
    from azdistill.stages.synthesize import synthesize

    check_writable(out_dir or config.stage_dir("synthesize"), "synthesize")
    teacher = None
    if config.teacher.kind == "local":  # hosted or logged: the stage streams and checks the data itself
        for split in ("train", "validation"):  # report bad data before spending time on the teacher
            count_records(getattr(config.data, split), config.task.type, config.data.max_records)
        teacher = resolve_teacher(config.teacher.model)
    factory, identity = synthesis_teacher(config, teacher)
    with workdir_lock(config.workdir):
        return synthesize(config, factory, make_tracker(config), force, out_dir=out_dir, teacher_identity=identity)


def run_finetune(
    config: DistillConfig, force: bool = False, out_dir: Optional[Path] = None, on_references: bool = False,
    synthetic_dir: Optional[Path] = None,
) -> Path:
    """The finetune stage on its own (on the teacher's answers, or on the data's references); returns its folder."""
    from azdistill.stages.finetune import finetune
    from azdistill.stages.state import check_writable, workdir_lock

    synthetic = synthetic_dir or config.stage_dir("synthesize")
    stage = "finetune-reference" if on_references else "finetune"
    check_writable(out_dir or config.stage_dir(stage), stage)
    with workdir_lock(config.workdir):
        if not on_references:
            require_stage_output(synthetic, "synthesize")
        models = prepare_models(config)
        return finetune(
            config, models.student_init, models.teacher, synthetic, make_tracker(config), force, out_dir=out_dir, on_references=on_references
        )


def run_evaluate(
    config: DistillConfig, force: bool = False, out_dir: Optional[Path] = None, student_dir: Optional[Path] = None,
    reference_dir: Optional[Path] = None,
) -> Report:
    """The evaluate stage on its own: teacher, the finished student and the baselines; returns the report."""
    from azdistill.stages.evaluate import evaluate
    from azdistill.stages.state import check_writable, workdir_lock

    check_writable(out_dir or config.stage_dir("evaluate"), "evaluate")
    with workdir_lock(config.workdir):
        student = require_stage_output(student_dir or config.stage_dir("finetune"), "finetune") / "model"
        reference = None
        if reference_dir is not None or wants_reference_baseline(config):
            reference = require_stage_output(reference_dir or config.stage_dir("finetune-reference"), "finetune --on-references") / "model"
        models = prepare_models(config)
        evaluated = {"student": student, "baseline": models.student_init}
        if reference is not None:
            evaluated["reference_sft"] = reference
        return evaluate(config, models.teacher, evaluated, make_tracker(config), force, out_dir=out_dir)


def run_preflight(config: DistillConfig):
    """A hosted teacher checked before the run (see synthesis/preflight.py): the records per split, and the
    preflight report (None for a teacher with no endpoint)."""
    from azdistill.data.splits import check_split
    from azdistill.synthesis.outputs import SPLITS
    from azdistill.synthesis.preflight import preflight
    from azdistill.synthesis.prompts import check_strategy
    from azdistill.teachers.hosted import build_endpoint_teacher

    check_strategy(config.synthesis.prompt_strategy, config.task.type)
    counts = {split: check_split(getattr(config.data, split), config.task.type, config.data.max_records).records for split in SPLITS}
    if not config.teacher.hosted:
        return counts, None
    teacher = build_endpoint_teacher(config)
    try:
        return counts, preflight(config, teacher, counts)
    finally:
        teacher.close()
