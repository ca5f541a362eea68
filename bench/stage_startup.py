"""Start-up of the stage commands: seconds from process start to the first request a hosted teacher receives, and to
exit, per command, median of N runs in fresh interpreters; with `--base`, the same against another checkout (the code
before a change) and the ratio. Also the peak memory of `validate` on a large data file.

    .venv/bin/python bench/stage_startup.py [--repeats 5] [--base /tmp/wt-startup-base] [--demo-workdir DIR]

The teacher is tests/fake_teacher_server.py on 127.0.0.1 in this process (answers at once, no rate limit); the time of
the first request is taken when its handler starts, on this process's monotonic clock, as is each command's start.
The commands, each with tracking on (the default local SQLite MLflow store):

- `synthesize`, fresh store: a new workdir, 30 records (24 train, 6 validation) for the hosted teacher;
- `synthesize`, existing store: the same in a workdir whose MLflow store exists (its synthesize folder removed);
- `synthesize`, nothing to do: the stage already done with the same inputs (no request: the time to exit);
- `run`, nothing to do: a finished demo workdir (`--demo-workdir`, the workdir of `make demo` or of
  `azdistill run --set workdir=DIR`, made with the same AZDISTILL_CACHE: another cache is another teacher folder,
  and every stage would run again). It is copied with hard links so that it is left as it is, and its MLflow store
  is copied too, pointed at the copy's own artifacts folder. The bench stops if a stage ran again. Without a demo
  workdir this command is skipped;
- `validate` of a config whose train split holds 200,000 distinct records (`--records`).

A checkout's code runs with its folder first on PYTHONPATH, in this interpreter's environment (the same packages);
the checkouts take turns run by run. Each command's peak RSS comes from `wait4`, and the 1-minute load average after
each command is summed up at the end: quote the figures with it (docs/benchmarks.md, "Command-line start-up").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fake_teacher_server import FakeTeacherServer  # noqa: E402

SAMPLE = ROOT / "data" / "sentiment"
LOADS: list[float] = []  # the 1-minute load average after each command: the machine's business while it was measured
TRAIN, VALIDATION, TEST = 24, 6, 8


class FirstRequestServer(FakeTeacherServer):
    """The fake teacher, noting when each request reaches its handler (this process's monotonic clock)."""

    def __init__(self) -> None:
        super().__init__(latency_s=0.0, keep_bodies=False)
        self.arrivals: list[float] = []

    def _handler(self):
        base, server = super()._handler(), self

        class Handler(base):  # type: ignore[misc, valid-type]
            def do_POST(self) -> None:
                server.arrivals.append(time.monotonic())
                super().do_POST()

        return Handler

    def first_after(self, started: float) -> Optional[float]:
        return next((arrival for arrival in self.arrivals if arrival >= started), None)


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line if line.endswith("\n") else line + "\n" for line in lines), encoding="utf-8")


def hosted_config(folder: Path, url: str) -> Path:
    """A small hosted-teacher config (the sentiment sample cut to 30 records) in `folder`, its workdir beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", TRAIN), ("validation", VALIDATION), ("test", TEST)):
        write_lines(folder / f"{split}.jsonl", (SAMPLE / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:count])
    config = folder / "config.yaml"
    config.write_text(
        f"""name: startup
task: {{type: nli, labels: [positive, negative]}}
data: {{train: train.jsonl, validation: validation.jsonl, test: test.jsonl, version: "1"}}
teacher:
  kind: openai-compatible
  endpoint: {url}/v1
  model: teacher
  auth: {{method: none}}
  local_copy: builtin
synthesis: {{temperature: 0.0, max_new_tokens: 8}}
workdir: {folder / "work"}
""",
        encoding="utf-8",
    )
    return config


def big_config(folder: Path, records: int) -> Path:
    """The NLI sample's config with a train split of `records` distinct records (its own, numbered)."""
    source = ROOT / "data" / "nli"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (source / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    with (folder / "train.jsonl").open("w", encoding="utf-8") as handle:
        for index in range(records):
            row = rows[index % len(rows)]
            user = {**row["messages"][1], "content": f"{row['messages'][1]['content']} ({index})"}  # every prompt its own
            handle.write(json.dumps({**row, "messages": [row["messages"][0], user, *row["messages"][2:]]}) + "\n")
    for split in ("validation", "test"):
        shutil.copyfile(source / f"{split}.jsonl", folder / f"{split}.jsonl")
    config = folder / "config.yaml"
    text = (source / "config.yaml").read_text(encoding="utf-8")
    config.write_text(text + f"\nworkdir: {folder / 'work'}\n", encoding="utf-8")
    return config


def launch(
    code: Path, argv: list[str], server: FirstRequestServer, timeout_s: float = 300
) -> tuple[Optional[float], float, float, int]:
    """Run `azdistill ARGV` from checkout `code` in a fresh interpreter: seconds to the first request (None without
    one), seconds to exit, peak RSS in MiB, exit status. A command still running after `timeout_s` is killed."""
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    call = f"from azdistill.cli import main\nmain({argv!r})"
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-c", call], cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = threading.Thread(target=lambda: setattr(process, "captured", process.stderr.read()), daemon=True)
    stderr.start()
    killer = threading.Timer(timeout_s, process.kill)
    killer.start()
    _, status, usage = os.wait4(process.pid, 0)
    ended = time.monotonic()
    killer.cancel()
    LOADS.append(os.getloadavg()[0])
    stderr.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"azdistill {' '.join(argv)} ({code}) failed:\n{process.captured.decode(errors='replace')[-3000:]}")
    first = server.first_after(started)
    return (first - started if first is not None else None), ended - started, usage.ru_maxrss / 1024, process.returncode


def measure(codes: dict[str, Path], server: FirstRequestServer, scratch: Path, repeats: int, demo: Optional[Path],
            records: int) -> dict[str, dict[str, list]]:
    """Every command's runs for each checkout: {label: {command: [(first request s, exit s, peak RSS MiB), ...]}}. The
    checkouts take turns run by run, so that a change in the machine's load falls on both alike."""
    results: dict[str, dict[str, list]] = {label: {} for label in codes}

    def each(command: str, argv: Callable[[str, int], list[str]], before: Optional[Callable[[str], None]] = None,
             after: Optional[Callable[[str], None]] = None, timeout_s: float = 300) -> None:
        for index in range(repeats):
            for label, code in codes.items():
                if before is not None:
                    before(label)
                results[label].setdefault(command, []).append(launch(code, argv(label, index), server, timeout_s)[:3])
                if after is not None:
                    after(label)

    fresh = {(label, index): hosted_config(scratch / label / f"fresh-{index}", server.url)
             for label in codes for index in range(repeats)}
    each("synthesize, fresh store", lambda label, index: ["synthesize", str(fresh[label, index])])
    existing = {label: hosted_config(scratch / label / "existing", server.url) for label in codes}
    for label, code in codes.items():
        launch(code, ["synthesize", str(existing[label])], server)  # the store exists from here on
    each("synthesize, existing store", lambda label, index: ["synthesize", str(existing[label])],
         before=lambda label: shutil.rmtree(existing[label].parent / "work" / "runs" / "startup" / "synthesize"))
    each("synthesize, nothing to do", lambda label, index: ["synthesize", str(existing[label])])
    if demo is not None:
        copies = {label: scratch / label / "demo" for label in codes}
        records_of: dict[str, dict[Path, int]] = {}

        def copy(label: str) -> None:
            records_of[label] = _copy_finished_workdir(demo, copies[label])

        def reused(label: str) -> None:
            again = sorted(str(path.parent.relative_to(copies[label])) for path, inode in records_of[label].items()
                           if path.stat().st_ino != inode)
            if again:
                sys.exit(f"the demo workdir {demo} was not reused as it is: {', '.join(again)} ran again "
                         "(made with another AZDISTILL_CACHE?)")

        each("run, nothing to do (demo)", lambda label, index: ["run", "--set", f"workdir={copies[label]}"],
             before=copy, after=reused, timeout_s=60)
    big = big_config(scratch / "big", records)
    each(f"validate, {records:,} train records", lambda label, index: ["validate", str(big)])
    return results


def _copy_finished_workdir(source: Path, target: Path) -> dict[Path, int]:
    """A copy of a finished workdir that a rerun may change; returns the inode of each stage's record (`stage.json`),
    which a stage that runs again replaces. Files are hard-linked (stages replace theirs atomically); those written in
    place are copied: the MLflow store (its experiments then keep their artifacts in the copy), the lock, and the
    markers that name the workdir's store."""
    if target.exists():
        shutil.rmtree(target)
    subprocess.run(["cp", "-al", str(source), str(target)], check=True)
    for path in [target / "mlflow.db", target / ".azdistill.lock", *target.glob("runs/*/*.lock")]:
        if path.exists():
            path.unlink()
            shutil.copyfile(source / path.relative_to(target), path)
    moved = (source.resolve().as_uri() + "/", target.resolve().as_uri() + "/")
    with sqlite3.connect(target / "mlflow.db") as store:
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
            store.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)", moved)
    store.close()
    for marker in target.glob("runs/*/registered.json"):
        recorded = json.loads(marker.read_text())
        marker.unlink()
        # The student is registered in this copy's store (the store was copied), not again under another URI.
        marker.write_text(json.dumps({**recorded, "tracking_uri": f"sqlite:///{(target / 'mlflow.db').resolve()}"}))
    return {path: path.stat().st_ino for path in target.glob("runs/**/stage.json")}


def median(values: list[Optional[float]]) -> Optional[float]:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def show(value: Optional[float], unit: str = "s") -> str:
    return "-" if value is None else (f"{value:.2f} s" if unit == "s" else f"{value:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--base", type=Path, default=None, help="Another checkout to compare with (the code before).")
    parser.add_argument("--demo-workdir", type=Path, default=None, help="A finished demo workdir, for `run` with nothing to do.")
    parser.add_argument("--records", type=int, default=200_000, help="Records in the train split `validate` reads.")
    args = parser.parse_args()
    codes = {"after": ROOT} if args.base is None else {"before": args.base.resolve(), "after": ROOT}
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs; repeats {args.repeats}")
    with FirstRequestServer() as server, tempfile.TemporaryDirectory(prefix="stage-startup-") as scratch:
        figures = measure(codes, server, Path(scratch), args.repeats, args.demo_workdir, args.records)
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; 1-minute load after each command: "
          f"median {statistics.median(LOADS):.2f}, max {max(LOADS):.2f}")
    print()
    header = "| command | " + " | ".join(f"{label}: first request | {label}: exit | {label}: peak RSS" for label in codes)
    print(header + (" | ratio (first request) | ratio (exit) |" if len(codes) == 2 else " |"))
    print("|---" * (1 + 3 * len(codes) + (2 if len(codes) == 2 else 0)) + "|")
    for command in figures["after"]:
        cells, medians = [], {}
        for label in codes:
            runs = figures[label][command]
            medians[label] = (median([r[0] for r in runs]), median([r[1] for r in runs]), median([r[2] for r in runs]))
            cells += [show(medians[label][0]), show(medians[label][1]), show(medians[label][2], "MiB")]
        if len(codes) == 2:
            for position in (0, 1):
                before, after = medians["before"][position], medians["after"][position]
                cells.append(f"{before / after:.1f}x" if before and after else "-")
        print(f"| {command} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
