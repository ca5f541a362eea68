"""Measure the demo: wall time per stage and the student/teacher ratios, repeated, medians printed.

    .venv/bin/python bench/demo_timings.py --repeat 3

Each repetition runs the embedded demo config from scratch (`--force`) in its own work folder, so no stage
is skipped, and reads the stage timings and the report it wrote. The comparison in one run is the distilled
student against the teacher and the un-distilled baseline, on the same held-out set and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(workdir: Path) -> dict:
    command = [sys.executable, "-m", "azdistill", "run", "--force", "--set", f"workdir={workdir}"]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    run_dir = workdir / "runs" / "sentiment-demo"
    stages = json.loads((run_dir / "run.json").read_text())["stage_seconds"]
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    models = {model["role"]: model for model in report["models"]}
    teacher, student, baseline = models["teacher"], models["student"], models["baseline"]
    return {
        **{f"seconds_{stage}": seconds for stage, seconds in stages.items()},
        "seconds_total": sum(stages.values()),
        "param_ratio": student["parameters"] / teacher["parameters"],
        "speedup_p50": teacher["latency_p50_s"] / student["latency_p50_s"],
        "peak_memory_ratio": student["peak_memory_mb"] / teacher["peak_memory_mb"],
        "agreement_student": student["metrics"]["agreement"],
        "agreement_baseline": baseline["metrics"]["agreement"],
        "accuracy_teacher": teacher["metrics"].get("accuracy", float("nan")),
        "accuracy_student": student["metrics"].get("accuracy", float("nan")),
        "promote": float(report["promote"]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs to take the median over")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep each run's work folder under this folder (run-1, run-2, ...) to read its report later")
    args = parser.parse_args(argv)
    runs = []
    for index in range(args.repeat):
        if args.keep is not None:
            runs.append(one_run(args.keep / f"run-{index + 1}"))
        else:
            with tempfile.TemporaryDirectory(prefix="azdistill-bench-") as workdir:
                runs.append(one_run(Path(workdir)))
        print(f"run {index + 1}/{args.repeat}: " + ", ".join(f"{k}={v:.3g}" for k, v in runs[-1].items()), flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{'measure':<28}{'median':>10}{'min':>10}{'max':>10}")
    for key in runs[0]:
        values = [run[key] for run in runs]
        print(f"{key:<28}{statistics.median(values):>10.3f}{min(values):>10.3f}{max(values):>10.3f}")


if __name__ == "__main__":
    main()
