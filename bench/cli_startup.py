"""Start-up of the command line: `azdistill --help`, `azdistill validate` of a sample config and `azdistill runs --help`,
each in a fresh interpreter, against the baseline of importing transformers first (what every command paid before
the CLI stopped importing it in its group callback). Prints medians of N runs and the ratio.

    .venv/bin/python bench/cli_startup.py [--repeats 7]

The tests check the same property without a clock (tests/test_cli.py: no heavy module is imported); this measures
what it is worth.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

COMMANDS = {
    "azdistill --help": ["--help"],
    "azdistill validate data/nli/config.yaml": ["validate", "data/nli/config.yaml"],
    "azdistill runs --help": ["runs", "--help"],
}


def seconds(code: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"{'command':45} {'ours (s)':>9} {'+transformers (s)':>18} {'ratio':>6}")
    for label, argv in COMMANDS.items():
        call = f"from azdistill.cli import main; import sys; sys.argv=['azdistill']+{argv!r}\ntry:\n main({argv!r})\nexcept SystemExit:\n pass"
        ours = seconds(call, args.repeats)
        # The old group callback: import transformers to quiet its logger and progress bars.
        baseline = seconds("import transformers\ntransformers.logging.set_verbosity_error()\ntransformers.logging.disable_progress_bar()\n" + call, args.repeats)
        print(f"{label:45} {ours:9.2f} {baseline:18.2f} {baseline / ours:5.1f}x")


if __name__ == "__main__":
    main()
