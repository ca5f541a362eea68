"""Re-measure the quality of distillation: the demo and the six sample tasks, one Markdown table for docs/quality.md.

    .venv/bin/python bench/quality.py --workdir /tmp/qbench                      # all seven tasks, one seed
    .venv/bin/python bench/quality.py --tasks nli,math --seeds 3 --workdir /tmp/qbench
    .venv/bin/python bench/quality.py --workdir /tmp/qbench --report-only --markdown quality-table.md

Each task runs `azdistill run CONFIG --seeds N` as the Makefile runs the demo (the embedded demo config for
"sentiment", `data/<task>/config.yaml` for the others) in its own work folder, tracking off, so one failed task
leaves the others running. Then every task's `evaluate/report.json` (and `evaluate/seeds.json` with N > 1) is read
back and shown as one row: the student's size and speed against the teacher, the primary metric of the teacher,
the student (with its 95% interval) and both baselines, agreement with the teacher, the paired test of student
against the untrained baseline, and the LLM judge's verdicts on open-ended tasks. The comparison in one row is
the distilled student against the teacher and the baselines on the same held-out items and machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without an install, as the other benches can

from azdistill.evaluation.error_bars import quality_cell  # noqa: E402  (after the path is set)
from azdistill.evaluation.report import (  # noqa: E402
    RAW_SCALE_METRICS,
    PairedComparison,
    Report,
    comparison,
    format_metric,
    is_fraction_metric,
    metric_label,
    model_of,
    report_from_dict,
)

TASKS = ("sentiment", "nli", "qa", "math", "summarization", "conversation", "chat")
DEMO_TASK = "sentiment"  # the demo's own data; its config is the embedded one `azdistill run` uses by default


@dataclass
class TaskRun:
    """How one task's `azdistill run` went: whether it finished, how long it took, and its last log line."""

    task: str
    ok: bool
    seconds: float
    last_line: str = ""


@dataclass
class TaskResult:
    """What one task's work folder holds once its run is over: the report, the spread over seeds, the data counts."""

    task: str
    report: Report
    seeds: Optional[dict]  # seeds.json (evaluation.seeds.seeds_to_dict), present only when run with --seeds N > 1
    train_records: Optional[int]  # training prompts the teacher was asked
    train_kept: Optional[int]  # of those, the answers kept as training data


def config_of(task: str) -> Path:
    """The config a task runs: the embedded demo for the demo's data, else the sample's own config."""
    if task == DEMO_TASK:
        return ROOT / "azdistill" / "defaults" / "demo.yaml"
    return ROOT / "data" / task / "config.yaml"


def run_dir_of(task: str, workdir: Path) -> Path:
    """Where `azdistill run` puts a task's stage outputs: `<workdir>/<task>/runs/<the config's name>`."""
    name = yaml.safe_load(config_of(task).read_text(encoding="utf-8"))["name"]
    return workdir / task / "runs" / name


def azdistill_command() -> list[str]:
    """The installed `azdistill` beside this interpreter, else the package run as a module."""
    script = Path(sys.executable).parent / "azdistill"
    return [str(script)] if script.exists() else [sys.executable, "-m", "azdistill"]


def run_environment() -> dict[str, str]:
    """The environment `make demo` gives a run: the model cache inside the checkout (unless one is set), offline."""
    env = dict(os.environ)
    env.setdefault("AZDISTILL_CACHE", str(ROOT / ".cache" / "azdistill"))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def run_task(task: str, workdir: Path, seeds: int, force: bool, overrides: tuple[str, ...] = ()) -> TaskRun:
    """Run one task to the end, its output kept in `<workdir>/<task>.log`; the last non-empty line of that output
    says why when it fails."""
    task_dir = workdir / task
    task_dir.mkdir(parents=True, exist_ok=True)
    command = azdistill_command() + ["run", str(config_of(task)), "--seeds", str(seeds),
                                     "--set", f"workdir={task_dir}", "--set", "tracking.enabled=false"]
    command += ["--force"] if force else []
    command += [item for override in overrides for item in ("--set", override)]
    print(f"[{task}] started: {config_of(task).relative_to(ROOT)}, {seeds} seed(s), log in {workdir / f'{task}.log'}",
          flush=True)
    started, last_line = time.monotonic(), ""
    # Line-buffered, so `tail -f` on the log follows a run that takes minutes.
    with open(workdir / f"{task}.log", "w", encoding="utf-8", buffering=1) as log, subprocess.Popen(
        command, cwd=ROOT, env=run_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ) as process:
        for line in process.stdout:
            log.write(line)
            last_line = line.strip() or last_line
    seconds = time.monotonic() - started
    ok = process.returncode == 0
    outcome = f"finished in {seconds:.0f} s" if ok else f"FAILED (exit {process.returncode}) after {seconds:.0f} s: {last_line}"
    print(f"[{task}] {outcome}", flush=True)
    return TaskRun(task, ok, seconds, last_line)


def read_result(task: str, workdir: Path) -> TaskResult:
    """Read back a finished task's report, spread over seeds and training-data counts; raises FileNotFoundError
    when the task has no report (it never ran, or failed before the evaluate stage)."""
    run_dir = run_dir_of(task, workdir)
    report_path = run_dir / "evaluate" / "report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"no report at {report_path}")
    report = report_from_dict(json.loads(report_path.read_text(encoding="utf-8")))
    seeds_path = run_dir / "evaluate" / "seeds.json"
    seeds = json.loads(seeds_path.read_text(encoding="utf-8")) if seeds_path.is_file() else None
    stats_path = run_dir / "synthesize" / "stats.json"
    train = json.loads(stats_path.read_text(encoding="utf-8"))["splits"].get("train", {}) if stats_path.is_file() else {}
    return TaskResult(task, report, seeds, train.get("records"), train.get("accepted"))


# The table


def _difference(value: float, fraction: bool, metric: str) -> str:
    """A difference of two figures: percentage points for a share, BLEU points, else the number itself."""
    if fraction:
        return f"{value * 100:+.1f} pts"
    return f"{value:+.1f} pts" if metric in RAW_SCALE_METRICS else f"{value:+.3g}"


def _p_value(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.2g}"


def _spread(summary: Optional[dict], metric: str) -> str:
    """The student's mean +- sd over the seeds of one metric, as seeds.md shows it: "91.2% +- 1.3"."""
    spread = next((s for s in (summary or {}).get("spreads", []) if s["role"] == "student" and s["metric"] == metric), None)
    if spread is None:
        return "-"
    scale, unit = (100.0, "%") if spread["fraction"] else (1.0, "")
    digits = ".1f" if spread["fraction"] or metric in RAW_SCALE_METRICS else ".3g"
    sd = "n/a" if spread["sd"] is None else format(spread["sd"] * scale, digits)
    return f"{format(spread['mean'] * scale, digits)}{unit} +- {sd} (n={spread['n']})"


def _paired_test(report: Report, other: str) -> Optional[PairedComparison]:
    """The paired test of the student against one baseline row on the primary metric, if the report has it."""
    return next((c for c in report.comparisons if c.other == other and c.metric == report.primary_metric), None)


def _paired_cells(report: Report) -> list[str]:
    """Difference, p and verdict of the student against the untrained baseline on the primary metric."""
    test = _paired_test(report, "baseline")
    if test is None:
        return ["-", "-", "no test"]
    fraction = is_fraction_metric(report, test.metric)
    return [_difference(test.difference, fraction, test.metric), _p_value(test.p_value), "yes" if test.significant else "no"]


def _reference_cell(report: Report) -> str:
    """The student against the reference-trained baseline in one cell: "-18.8 pts (p 0.012, significant)"."""
    test = _paired_test(report, "reference_sft")
    if test is None:
        return "-"
    difference = _difference(test.difference, is_fraction_metric(report, test.metric), test.metric)
    return f"{difference} (p {_p_value(test.p_value)}, {'significant' if test.significant else 'not significant'})"


def _judge_cell(report: Report) -> str:
    judge = report.judge
    return "-" if not judge else f"{judge.get('wins', 0)}/{judge.get('ties', 0)}/{judge.get('losses', 0)}"


def _ratio_cells(report: Report) -> list[str]:
    """The student's parameters as a share of the teacher's, and how many times faster it answers (p50 latency)."""
    ratios = comparison(report)
    size = f"{ratios['param_ratio'] * 100:.0f}%" if "param_ratio" in ratios else "n/a"
    speed = f"{ratios['speedup']:.1f}x" if "speedup" in ratios else "n/a"
    return [size, speed]


def _records_cell(result: TaskResult) -> str:
    """Training prompts (and the teacher answers kept of them) / held-out items: "240 (141 kept) / 80"."""
    student = model_of(result.report, "student")
    test = str(student.n) if student is not None else "?"
    if result.train_records is None:
        return f"? / {test}"
    kept = f" ({result.train_kept} kept)" if result.train_kept is not None else ""
    return f"{result.train_records}{kept} / {test}"


def table_row(result: TaskResult, with_seeds: bool) -> str:
    """One task as a table row; a model the report lacks (no reference-trained baseline, say) is shown as "-"."""
    report, metric = result.report, result.report.primary_metric
    fraction = is_fraction_metric(report, metric)

    def figure(role: str, with_interval: bool = False) -> str:
        model = model_of(report, role)
        if model is None:
            return "-"
        if with_interval:
            return quality_cell(model, metric, fraction)
        return format_metric(model.metrics.get(metric), fraction, metric)

    student = model_of(report, "student")
    agreement = quality_cell(student, "agreement", True) if student is not None and "agreement" in student.metrics else "-"
    cells = [f"{result.task} ({report.task})", _records_cell(result), *_ratio_cells(report), metric_label(metric),
             figure("teacher"), figure("student", with_interval=True), figure("baseline"), figure("reference_sft"),
             agreement, *_paired_cells(report), _reference_cell(report), _judge_cell(report)]
    if with_seeds:
        cells += [_spread(result.seeds, metric), _spread(result.seeds, "agreement")]
    return "| " + " | ".join(cells) + " |"


HEADER = ["task (type)", "train (kept) / test", "student size", "speed", "metric", "teacher", "student (95% CI)",
          "before distillation", "trained on references", "agreement (95% CI)", "student - before", "p", "significant",
          "student - references (p)", "judge W/T/L"]
SEED_HEADER = ["student metric over seeds (mean +- sd)", "agreement over seeds (mean +- sd)"]


def render_table(results: list[TaskResult]) -> str:
    """The Markdown table of every task that has a report; the seed columns only when some task ran several seeds."""
    with_seeds = any(result.seeds for result in results)
    header = HEADER + (SEED_HEADER if with_seeds else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [table_row(result, with_seeds) for result in results]
    return "\n".join(lines)


def verdict_line(results: list[TaskResult]) -> str:
    """Issue 15's bar in one line: on how many tasks the student beats the untrained baseline, significantly."""
    beaten = [r.task for r in results
              if any(c.other == "baseline" and c.metric == r.report.primary_metric and c.significant and c.difference > 0
                     for c in r.report.comparisons)]
    others = [r.task for r in results if r.task not in beaten]
    tail = f"; not on: {', '.join(others)}" if others else ""
    share = f"{len(beaten)} of {len(results)} tasks"
    return f"the student beats the untrained baseline with a significant paired test on {share}{tail}"


def machine_line(results: list[TaskResult]) -> str:
    """Which machine and when: what every benchmark figure is quoted with."""
    devices = sorted({result.report.device for result in results if result.report.device})
    where = f", models on {', '.join(devices)}" if devices else ""
    return (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, "
            f"Python {platform.python_version()}{where}; {datetime.date.today().isoformat()}")


def recorded_seconds(task: str, workdir: Path) -> Optional[float]:
    """The stage seconds a task's last run recorded (run.json), for a table regenerated without running."""
    path = run_dir_of(task, workdir) / "run.json"
    if not path.is_file():
        return None
    return sum(json.loads(path.read_text(encoding="utf-8")).get("stage_seconds", {}).values())


def parse_tasks(text: str) -> list[str]:
    tasks = [task.strip() for task in text.split(",") if task.strip()]
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(TASKS)}")
    return tasks


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=parse_tasks, default=list(TASKS), help=f"comma-separated, of {','.join(TASKS)}")
    parser.add_argument("--seeds", type=int, default=1, help="train and evaluate the student N times per task")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".azdistill" / "bench-quality",
                        help="one folder per task is made inside it")
    parser.add_argument("--markdown", type=Path, help="also write the table (and the machine line) to this file")
    parser.add_argument("--report-only", action="store_true", help="read the work folders of an earlier run, run nothing")
    parser.add_argument("--force", action="store_true", help="rerun every stage, even those whose inputs are unchanged")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every task, e.g. evaluation.reference_baseline=false (repeatable)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    started, failed = time.monotonic(), []
    if not args.report_only:
        runs = [run_task(task, workdir, args.seeds, args.force, tuple(args.overrides)) for task in args.tasks]
        failed += [f"{run.task}: run failed after {run.seconds:.0f} s: {run.last_line}" for run in runs if not run.ok]
    results = []
    for task in args.tasks:
        if any(line.startswith(f"{task}:") for line in failed):
            continue
        try:
            results.append(read_result(task, workdir))
        except (FileNotFoundError, ValueError, KeyError) as error:
            failed.append(f"{task}: {error}")
    return show(results, failed, workdir, args, time.monotonic() - started)


def show(results: list[TaskResult], failed: list[str], workdir: Path, args: argparse.Namespace, seconds: float) -> int:
    """Print the table, what failed, the machine and the time; write the Markdown file if asked. Exit status 1 when
    any task failed."""
    machine = machine_line(results)
    table = render_table(results) if results else "(no task has a report)"
    if args.report_only:
        recorded = [s for s in (recorded_seconds(r.task, workdir) for r in results) if s is not None]
        timing = (f"stage time recorded by the runs: {sum(recorded):.0f} s in all, "
                  f"median {statistics.median(recorded):.0f} s a task"
                  if recorded else "no stage time recorded by the runs")
    else:
        timing = f"total wall time: {seconds:.0f} s"
    print()
    print(table)
    notes = ([verdict_line(results)] if results else []) + [f"FAILED {line}" for line in failed] + [machine, timing]
    print()
    print("\n".join(notes))
    if args.markdown:
        args.markdown.write_text(table + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n", encoding="utf-8")
        print(f"table written to {args.markdown}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
