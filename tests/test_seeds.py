"""`azdistill run --seeds N`: the student trained and evaluated once per seed, and the spread of its figures.

The stages are stand-ins that record what they were asked (seed, folder, models) and return made-up reports, so
the loop is tested without training; the aggregation is tested as a pure function with known answers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from retrains import QuickTracker, make_report, retrain_config

from azdistill.cli import cli
from azdistill.config.loading import load_config
from azdistill.evaluation.seeds import (
    format_spread,
    render_seeds_markdown,
    seeds_headline,
    seeds_to_dict,
    student_seed_metrics,
    summarise_seeds,
)
from azdistill.stages import evaluate as evaluate_module
from azdistill.stages import finetune as finetune_module
from azdistill.stages import run as local_runner
from azdistill.stages import state
from azdistill.stages import synthesize as synthesize_module
from azdistill.tracking.tracker import log_evaluation

AGREEMENT_BY_SEED = {42: 0.8, 43: 0.9, 44: 1.0}
ACCURACY_BY_SEED = {42: 0.7, 43: 0.75, 44: 0.8}


def seed_reports(config) -> dict:
    """One made-up report per seed 42, 43, 44: the student's agreement 0.8, 0.9, 1.0 and accuracy 0.7, 0.75, 0.8."""
    by_seed = {seed: (AGREEMENT_BY_SEED[seed], ACCURACY_BY_SEED[seed]) for seed in AGREEMENT_BY_SEED}
    return {seed: make_report(config, agreement=agreement, accuracy=accuracy) for seed, (agreement, accuracy) in by_seed.items()}


# The aggregation, with known answers ------------------------------------------------------------------------------


def test_the_spread_of_each_row_and_metric_is_its_mean_sample_sd_and_range(tmp_path):
    summary = summarise_seeds(seed_reports(retrain_config(tmp_path, "1")))
    assert summary.seeds == [42, 43, 44] and summary.primary_metric == "accuracy"
    agreement = summary.spread("student", "agreement")
    assert agreement.n == 3 and agreement.fraction
    assert agreement.mean == pytest.approx(0.9) and agreement.sd == pytest.approx(0.1)  # sample sd: n - 1
    assert (agreement.low, agreement.high) == (0.8, 1.0)
    assert summary.spread("student", "accuracy").sd == pytest.approx(0.05)
    teacher = summary.spread("teacher", "accuracy")  # the same model in every seed
    assert teacher.mean == pytest.approx(0.9) and teacher.sd == 0.0
    assert [row["seed"] for row in summary.per_seed] == [42, 43, 44]
    assert summary.per_seed[1]["metrics"]["student"]["agreement"] == 0.9


def test_a_figure_missing_in_one_seed_is_left_out_of_that_rows_spread(tmp_path):
    reports = seed_reports(retrain_config(tmp_path, "1"))
    reports[43].models[1].metrics["agreement"] = float("nan")  # could not be computed in that seed
    summary = summarise_seeds(reports)
    agreement = summary.spread("student", "agreement")
    assert agreement.n == 2 and agreement.mean == pytest.approx(0.9) and agreement.sd == pytest.approx(math.sqrt(0.02))
    # seeds.json stays strict JSON: the missing figure is null.
    data = json.loads(json.dumps(seeds_to_dict(summary), allow_nan=False))
    assert data["per_seed"][1]["metrics"]["student"]["agreement"] is None


def test_one_seed_has_no_standard_deviation(tmp_path):
    config = retrain_config(tmp_path, "1")
    summary = summarise_seeds({7: make_report(config, agreement=0.85, accuracy=0.8)})
    spread = summary.spread("student", "agreement")
    assert spread.sd is None and format_spread(spread) == "85.0% +- n/a (85.0-85.0)"
    assert "student_agreement_seed_sd" not in student_seed_metrics(summary)


def test_a_figure_the_same_in_every_seed_shows_a_mean_equal_to_it(tmp_path):
    # 69 of 80 in each of three seeds: fmean comes out a hair above 0.8625, which printed as 86.3% beside 86.2-86.2.
    config = retrain_config(tmp_path, "1")
    summary = summarise_seeds({seed: make_report(config, agreement=0.8625, accuracy=0.8) for seed in (42, 43, 44)})
    spread = summary.spread("student", "agreement")
    assert spread.mean == 0.8625 and format_spread(spread) == "86.2% +- 0.0 (86.2-86.2)"


def test_the_console_line_markdown_and_mlflow_metrics_show_the_students_spread(tmp_path):
    summary = summarise_seeds(seed_reports(retrain_config(tmp_path, "1")))
    assert seeds_headline(summary) == "over 3 seeds: agreement 90.0% +- 10.0 (80.0-100.0), accuracy 75.0% +- 5.0 (70.0-80.0)"
    markdown = render_seeds_markdown(summary)
    assert markdown.startswith("# Spread over 3 seeds\n")
    assert "| student model | Agreement | 90.0% +- 10.0 (80.0-100.0) | 3 |" in markdown
    assert "| teacher model | Accuracy | 90.0% +- 0.0 (90.0-90.0) | 3 |" in markdown
    assert "| 43 | 75.0% | 90.0% | 95.0% |" in markdown  # student accuracy, agreement, parse rate of seed 43
    metrics = student_seed_metrics(summary)
    assert metrics["student_agreement_seed_mean"] == pytest.approx(0.9)
    assert metrics["student_agreement_seed_sd"] == pytest.approx(0.1)
    assert not any(key.startswith("teacher") for key in metrics)


def test_a_raw_scale_metric_keeps_its_own_scale(tmp_path):
    config = retrain_config(tmp_path, "1")
    reports = {}
    for seed, bleu in ((1, 20.0), (2, 30.0)):
        report = make_report(config, agreement=0.5, accuracy=0.5)
        report.models[1].metrics = {"bleu": bleu}
        reports[seed] = report
    spread = summarise_seeds(reports).spread("student", "bleu")
    assert not spread.fraction and format_spread(spread) == "25.0 +- 7.1 (20.0-30.0)"


# The loop, with stand-in stages -----------------------------------------------------------------------------------


class StandInStages:
    """Stand-ins for synthesize, finetune and evaluate that record their calls, as the real ones are called."""

    def __init__(self, tmp_path: Path, reports: dict, log_to_tracker: bool = False):
        self.tmp_path, self.reports, self.log_to_tracker = tmp_path, reports, log_to_tracker
        self.synthesized = 0
        self.finetuned: list[tuple[int, Path, bool]] = []
        self.evaluated: list[tuple[int, Path, dict]] = []

    def install(self, monkeypatch) -> None:
        student_init = self.tmp_path / "student-init"
        student_init.mkdir(exist_ok=True)
        monkeypatch.setattr(local_runner, "prepare_models", lambda config: local_runner.Models(None, student_init))
        monkeypatch.setattr(local_runner, "synthesis_teacher", lambda config, teacher: (None, None))
        monkeypatch.setattr(synthesize_module, "synthesize", self.synthesize)
        monkeypatch.setattr(finetune_module, "finetune", self.finetune)
        monkeypatch.setattr(evaluate_module, "evaluate", self.evaluate)

    def synthesize(self, config, factory, tracker, force, teacher_identity=None):
        self.synthesized += 1
        return config.stage_dir("synthesize")

    def finetune(self, config, student_init, teacher, synthetic, tracker, force, out_dir=None, on_references=False):
        out_dir = Path(out_dir or config.stage_dir("finetune-reference" if on_references else "finetune"))
        (out_dir / "model").mkdir(parents=True, exist_ok=True)
        (out_dir / "model" / "weights.txt").write_text(f"seed {config.training.seed}")
        self.finetuned.append((config.training.seed, out_dir, on_references))
        if self.log_to_tracker:
            with tracker.stage("finetune"):
                tracker.log_metrics({"train_loss": 1.0}, step=0)
        return out_dir

    def evaluate(self, config, teacher, models, tracker, force, out_dir=None):
        out_dir = Path(out_dir or config.stage_dir("evaluate"))
        state.check_writable(out_dir, "evaluate")  # as the real stage does first: it refuses a folder that is not its own
        predictions = out_dir / "predictions"
        predictions.mkdir(parents=True, exist_ok=True)
        for role in ["teacher", *models]:  # answers saved as the real stage saves them, under a key; reused while it holds
            if not (predictions / f"{role}.json").is_file():
                (predictions / f"{role}.json").write_text(json.dumps({"key": f"{role}-key", "measured_in": str(out_dir)}))
        self.evaluated.append((config.training.seed, out_dir, dict(models)))
        report = self.reports[config.training.seed]
        if self.log_to_tracker:
            with tracker.stage("evaluate"):
                log_evaluation(tracker, report, {})
        return report


def test_run_with_three_seeds_trains_and_evaluates_each_in_its_own_folders(make_config, tmp_path, monkeypatch):
    config = load_config(make_config(), ["training.seed=42"])
    stages = StandInStages(tmp_path, seed_reports(config))
    stages.install(monkeypatch)

    result = local_runner.run_local(config, seeds=3)

    run_dir = config.run_dir
    assert stages.synthesized == 1  # the teacher's answers do not depend on the student's seed
    assert stages.finetuned == [
        (42, run_dir / "finetune", False),  # the first seed: the ordinary folders, as without --seeds
        (42, run_dir / "finetune-reference", True),  # the reference baseline: trained once
        (43, run_dir / "seeds" / "seed-43" / "finetune", False),
        (44, run_dir / "seeds" / "seed-44" / "finetune", False),
    ]
    assert [(seed, out_dir) for seed, out_dir, _ in stages.evaluated] == [
        (42, run_dir / "evaluate"),
        (43, run_dir / "seeds" / "seed-43" / "evaluate"),
        (44, run_dir / "seeds" / "seed-44" / "evaluate"),
    ]
    for seed, _, models in stages.evaluated[1:]:
        assert models["student"] == run_dir / "seeds" / f"seed-{seed}" / "finetune" / "model"
        assert models["baseline"] == tmp_path / "student-init"
        assert models["reference_sft"] == run_dir / "finetune-reference" / "model"
    # The teacher's and baselines' answers come from the first seed; the student's are the seed's own.
    seed_predictions = run_dir / "seeds" / "seed-43" / "evaluate" / "predictions"
    assert json.loads((seed_predictions / "teacher.json").read_text())["measured_in"] == str(run_dir / "evaluate")
    assert json.loads((seed_predictions / "baseline.json").read_text())["measured_in"] == str(run_dir / "evaluate")
    assert json.loads((seed_predictions / "student.json").read_text())["measured_in"] == str(seed_predictions.parent)

    assert result.report is stages.reports[42] and result.report_dir == run_dir / "evaluate"
    saved = json.loads((run_dir / "evaluate" / "seeds.json").read_text())
    assert saved["seeds"] == [42, 43, 44]
    agreement = next(s for s in saved["spreads"] if s["role"] == "student" and s["metric"] == "agreement")
    assert agreement["mean"] == pytest.approx(0.9) and agreement["sd"] == pytest.approx(0.1)
    assert "90.0% +- 10.0 (80.0-100.0)" in (run_dir / "evaluate" / "seeds.md").read_text()
    assert seeds_headline(result.seeds).startswith("over 3 seeds: agreement 90.0% +- 10.0")
    assert "other-seeds" in result.stage_seconds


def test_run_with_one_seed_is_the_run_it_always_was(make_config, tmp_path, monkeypatch):
    config = load_config(make_config(), ["training.seed=42"])
    stages = StandInStages(tmp_path, seed_reports(config))
    stages.install(monkeypatch)
    stale = config.stage_dir("evaluate") / "seeds.json"  # left by an earlier run with several seeds
    state.claim(stale.parent, "evaluate")  # in the evaluate stage's own folder
    stale.write_text("{}")

    result = local_runner.run_local(config)

    assert [seed for seed, _, references in stages.finetuned if not references] == [42]
    assert [out_dir for _, out_dir, _ in stages.evaluated] == [config.run_dir / "evaluate"]
    assert result.seeds is None and not stale.exists() and not (config.run_dir / "seeds").exists()
    assert "other-seeds" not in result.stage_seconds


def test_a_seeds_answers_measured_under_the_same_key_are_left_alone(tmp_path):
    first, target = tmp_path / "first", tmp_path / "seed" / "predictions"
    first.mkdir()
    target.mkdir(parents=True)
    (first / "teacher.json").write_text(json.dumps({"key": "k1", "answers": ["a"]}))
    (first / "baseline.json").write_text(json.dumps({"key": "k2", "answers": ["b"]}))
    (first / "student.json").write_text(json.dumps({"key": "k3", "answers": ["c"]}))
    kept = json.dumps({"key": "k1", "answers": ["a"], "latencies_s": [0.1]})  # this seed's own, finished output
    (target / "teacher.json").write_text(kept)
    (target / "baseline.json").write_text(json.dumps({"key": "old"}))  # measured under other settings

    local_runner._share_seed_independent_answers(first, target)

    assert (target / "teacher.json").read_text() == kept
    assert json.loads((target / "baseline.json").read_text())["key"] == "k2"
    assert not (target / "student.json").exists()


def test_mlflow_keeps_the_first_seeds_figures_on_the_pipeline_run_and_adds_the_spread(tmp_path, write_dataset, monkeypatch):
    base = retrain_config(tmp_path, "1")
    config = base.model_copy(update={
        "data": base.data.model_copy(update=write_dataset()),
        "evaluation": base.evaluation.model_copy(update={"reference_baseline": False}),
        "training": base.training.model_copy(update={"seed": 42}),
    })
    stages = StandInStages(tmp_path, seed_reports(config), log_to_tracker=True)
    stages.install(monkeypatch)
    tracker = QuickTracker(config)

    result = local_runner.run_local(config, tracker=tracker, seeds=3)

    client = tracker.client
    parent = client.get_run(result.run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'")
    label = f"data-v1 #{result.run_id[:6]}"
    assert sorted(run.info.run_name for run in children) == [
        f"{label} / {stage}"
        for stage in ("evaluate", "evaluate-seed-43", "evaluate-seed-44", "finetune", "finetune-seed-43", "finetune-seed-44")
    ]
    assert parent.data.params["seeds"] == "3"
    assert parent.data.metrics["agreement"] == 0.8  # the headline is the first seed's student, the one registered
    (evaluate,) = [run for run in children if run.data.tags["azdistill.stage"] == "evaluate"]
    assert evaluate.data.metrics["student_agreement"] == 0.8 and "student_agreement" not in parent.data.metrics
    assert parent.data.metrics["student_agreement_seed_mean"] == pytest.approx(0.9)
    assert parent.data.metrics["student_agreement_seed_sd"] == pytest.approx(0.1)
    tracker.mlflow.set_tracking_uri(None)


# The command line --------------------------------------------------------------------------------------------------


def test_seeds_below_one_are_refused_with_exit_2(minimal_config):
    result = CliRunner().invoke(cli, ["run", str(minimal_config), "--seeds", "0"])
    assert result.exit_code == 2 and "--seeds" in result.output and "Traceback" not in result.output


def test_the_run_command_passes_the_seeds_and_prints_their_spread(minimal_config, tmp_path, monkeypatch):
    calls = []
    config = load_config(minimal_config)
    reports = seed_reports(config)

    def run_local(settings, force=False, seeds=1):
        calls.append(seeds)
        summary = summarise_seeds(reports) if seeds > 1 else None
        return local_runner.RunResult(reports[42], tmp_path / "evaluate", {}, seeds=summary)

    monkeypatch.setattr(local_runner, "run_local", run_local)
    many = CliRunner().invoke(cli, ["run", str(minimal_config), "--seeds", "3"])
    one = CliRunner().invoke(cli, ["run", str(minimal_config)])
    assert many.exit_code == 0 and one.exit_code == 0, (many.output, one.output)
    assert calls == [3, 1]
    assert "  over 3 seeds: agreement 90.0% +- 10.0 (80.0-100.0), accuracy 75.0% +- 5.0 (70.0-80.0)" in many.output
    assert "seeds" not in one.output
