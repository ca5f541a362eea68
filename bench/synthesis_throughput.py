"""Synthesis throughput and memory against a loopback OpenAI-compatible endpoint (not a timed test).

1. Throughput: 1,000 records (950 train + 50 validation) against an endpoint with 50 ms latency and a limit
   of 40 requests/s, answered beyond it with 429 + Retry-After + retry-after-ms (tests/fake_teacher_server.py,
   in its own process). Our synthesize stage runs first with no faults, then with 10% transient faults
   (500, 503, dropped connections, answers slower than the 2 s client timeout, in turn). In the same run, a
   client shaped like Azure ML's distillation step (records in chunks of 10 on a thread pool, 3 retries after
   a fixed 5 s, a record dropped on any failure) answers the same 1,000 records against the same faulty
   endpoint. Printed: records/s as a fraction of the endpoint's limit, the ratio between the two clients,
   and records lost and duplicated.
2. Memory: peak RSS of the synthesize stage (a fresh process each) for 1,000 and 100,000 records against a
   fast endpoint (no latency, no limit).

Run: .venv/bin/python bench/synthesis_throughput.py [--records 1000] [--azure-records 1000] [--memory 1000,100000]
The Azure-shaped client spends most of its time sleeping 5 s between retries: with faults it takes minutes.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LIMIT_PER_S = 40
LATENCY_S = 0.05
CLIENT_TIMEOUT_S = 2.0
HANG_S = 3.0
SYSTEM = "Classify the sentiment of the review. Answer positive or negative."


def start_server(*options: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fake_teacher_server.py"), *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = process.stdout.readline()
    if not line.startswith("PORT "):
        raise RuntimeError(f"the fake server did not start: {line} {process.stderr.read()}")
    return process, f"http://127.0.0.1:{int(line.split()[1])}"


def stop_server(process: subprocess.Popen) -> dict:
    process.send_signal(2)  # SIGINT: the server prints what it did
    try:
        _, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # never hide the run's own error behind the server's
        process.kill()
        _, err = process.communicate()
    # Its counts are the last JSON line (a thread still shutting down may print after it).
    for line in reversed(err.strip().splitlines()):
        try:
            counts = json.loads(line)
        except ValueError:
            continue
        if isinstance(counts, dict):
            return counts
    return {}


def review(index: int) -> str:
    return f"Review: #{index} {'a good' if index % 3 else 'a bad'} film, scene {index * 7919 % 10007}."


def expected_answer(index: int) -> str:
    return "positive" if index % 3 else "negative"


def write_data(folder: Path, records: int) -> dict[str, Path]:
    """`records` distinct reviews: 95% train, 5% validation (at least one); the test split is the validation."""
    folder.mkdir(parents=True, exist_ok=True)
    validation = max(1, records // 20)
    paths = {split: folder / f"{split}.jsonl" for split in ("train", "validation", "test")}
    with paths["train"].open("w") as train, paths["validation"].open("w") as val:
        for index in range(records):
            row = json.dumps({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": review(index)}]}) + "\n"
            (val if index >= records - validation else train).write(row)
    paths["test"].write_text(paths["validation"].read_text())
    return paths


def our_config(url: str, data: dict[str, Path], workdir: Path, **teacher):
    from azdistill.config.schema import DistillConfig

    return DistillConfig.model_validate(
        {
            "name": "bench",
            "workdir": str(workdir),
            "task": {"type": "nli", "labels": ["positive", "negative"]},
            "data": {split: str(path) for split, path in data.items()},
            "teacher": {
                "kind": "openai-compatible", "endpoint": f"{url}/v1", "model": "teacher", "auth": {"method": "none"},
                "timeout_s": CLIENT_TIMEOUT_S, **teacher,
            },
            "synthesis": {"temperature": 0.0, "max_new_tokens": 16, "min_success_ratio": 0.0},
            "tracking": {"enabled": False},
        }
    )


def check_outputs(out_dir: Path, records: int) -> dict:
    """Every input record exactly once, in input order, with the right answer; returns lost/duplicated counts."""
    seen: list[int] = []
    wrong = 0
    for split in ("train", "validation"):
        for line in (out_dir / f"{split}.jsonl").read_text().splitlines():
            messages = json.loads(line)["messages"]
            index = int(messages[1]["content"].split("#")[1].split()[0])
            seen.append(index)
            wrong += messages[-1]["content"] != expected_answer(index)
    rejected = [json.loads(line) for line in (out_dir / "rejected.jsonl").read_text().splitlines()]
    for row in rejected:
        seen.append(int(row["messages"][1]["content"].split("#")[1].split()[0]))
    return {
        "answered": len(seen) - len(rejected),
        "rejected": len(rejected),
        "lost": len(set(range(records)) - set(seen)),
        "duplicated": len(seen) - len(set(seen)),
        "wrong_answers": wrong,
        "in_input_order": sorted(seen[: len(seen) - len(rejected)]) == seen[: len(seen) - len(rejected)],
    }


def run_ours(url: str, records: int, folder: Path, requests_per_minute: Optional[int] = None) -> dict:
    """Our synthesize stage on `records` records; with `requests_per_minute`, paced at that configured quota."""
    from azdistill.stages.synthesize import synthesize
    from azdistill.teachers.factory import hosted_teacher_factory

    data = write_data(folder / "data", records)
    quota = {"requests_per_minute": requests_per_minute} if requests_per_minute else {}
    config = our_config(url, data, folder / "work", **quota)
    started = time.monotonic()
    out = synthesize(config, hosted_teacher_factory(config))
    ended = time.monotonic()
    seconds = ended - started
    result = check_outputs(out, records)
    stats = json.loads((out / "stats.json").read_text())
    result.update(seconds=round(seconds, 2), records_per_s=round(result["answered"] / seconds, 2), endpoint=stats["endpoint"],
                  started=started, ended=ended)
    result["fraction_of_limit"] = round(result["records_per_s"] / LIMIT_PER_S, 3)
    return result


def shard_child(url: str, records: int, folder: Path, requests_per_minute: Optional[int]) -> None:
    """Runs in a fresh process: one shard's synthesize stage; prints its figures (with its monotonic start and end,
    which all processes of the machine share) as the last line."""
    print(json.dumps(run_ours(url, records, folder, requests_per_minute)))


def run_shards(url: str, shards: int, records: int, folder: Path, requests_per_minute: Optional[int] = None) -> dict:
    """`shards` synthesize processes at once against one endpoint, `records` split between them, each with its own
    limiter (as the shards of an Azure ML parallel job): the share of the limit they reach together. With
    `requests_per_minute` (the deployment's quota, configured), each shard is paced at its share of it, as
    `azdistill azure` gives each shard (azure/build.py: shard_shares)."""
    quota = ["--shard-rpm", str(requests_per_minute // shards)] if requests_per_minute else []
    children = [
        subprocess.Popen([sys.executable, __file__, "--shard-child", str(records // shards), "--url", url, "--folder",
                          str(folder / f"shard-{n}"), *quota], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in range(shards)
    ]
    results = []
    for child in children:
        out, err = child.communicate(timeout=1800)
        if child.returncode:
            raise RuntimeError(f"a shard failed: {err[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    seconds = max(r["ended"] for r in results) - min(r["started"] for r in results)
    answered = sum(r["answered"] for r in results)
    return {
        "shards": shards, "seconds": round(seconds, 2), "answered": answered, "records_per_s": round(answered / seconds, 2),
        "fraction_of_limit": round(answered / seconds / LIMIT_PER_S, 3),
        "lost": sum(r["lost"] for r in results), "duplicated": sum(r["duplicated"] for r in results),
        "wrong_answers": sum(r["wrong_answers"] for r in results),
        "endpoint": {key: sum(r["endpoint"][key] for r in results) for key in ("requests", "retries", "throttled", "hedged")},
        "per_shard_records_per_s": [r["records_per_s"] for r in results],
    }


def run_azure_shaped(url: str, records: int, folder: Path) -> dict:
    """Azure ML's step as the mission describes it: chunks of 10 records on a 10-thread pool, each record retried
    3 times after a fixed 5 s, dropped on a non-200, an exception, bad JSON or finish_reason != stop; no pacing."""
    import requests

    data = write_data(folder / "data-azure", records)
    rows = [json.loads(line) for split in ("train", "validation") for line in data[split].read_text().splitlines()]
    session_local = __import__("threading").local()

    statuses: collections.Counter = collections.Counter()

    def call(row: dict):
        session = getattr(session_local, "session", None) or requests.Session()
        session_local.session = session
        for attempt in range(4):  # the first try and 3 retries
            statuses["retries"] += attempt > 0
            try:
                response = session.post(
                    f"{url}/v1/chat/completions", timeout=CLIENT_TIMEOUT_S,
                    json={"model": "teacher", "messages": row["messages"], "temperature": 0.0, "max_tokens": 16},
                )
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    choice = response.json()["choices"][0]
                    return choice["message"]["content"] if choice["finish_reason"] == "stop" else None
            except (requests.RequestException, ValueError, KeyError):
                pass
            if attempt < 3:
                time.sleep(5.0)
        return None

    started = time.monotonic()
    answers: list = []
    with ThreadPoolExecutor(max_workers=10) as pool:
        for start in range(0, len(rows), 10):
            answers.extend(pool.map(call, rows[start : start + 10]))
    seconds = time.monotonic() - started
    kept = [index for index, answer in enumerate(answers) if answer is not None]
    wrong = sum(answers[index] != expected_answer(index) for index in kept)
    return {
        "seconds": round(seconds, 2), "answered": len(kept), "lost": records - len(kept), "duplicated": 0,
        "wrong_answers": wrong, "records_per_s": round(len(kept) / seconds, 2),
        "fraction_of_limit": round(len(kept) / seconds / LIMIT_PER_S, 3),
        "throttled": statuses[429], "retries": statuses["retries"],
    }


def memory_child(url: str, records: int, folder: Path) -> None:
    """Runs in a fresh process: the stage on `records` records; prints its peak RSS (MiB) and the checks."""
    from azdistill.stages.synthesize import synthesize
    from azdistill.teachers.factory import hosted_teacher_factory

    data = write_data(folder / "data", records)
    config = our_config(url, data, folder / "work", max_concurrency=16)
    config.synthesis.preflight = False
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.monotonic()
    out = synthesize(config, hosted_teacher_factory(config))
    seconds = time.monotonic() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"records": records, "peak_rss_mib": round(peak, 1), "rss_before_stage_mib": round(baseline, 1),
                      "seconds": round(seconds, 1), **check_outputs(out, records)}))


def measure_memory(sizes: list[int], folder: Path) -> list[dict]:
    server, url = start_server()
    try:
        results = []
        for size in sizes:
            child = subprocess.run(
                [sys.executable, __file__, "--memory-child", str(size), "--url", url, "--folder", str(folder / f"memory-{size}")],
                capture_output=True, text=True, check=True,
            )
            results.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(f"  memory, {size:,} records: peak RSS {results[-1]['peak_rss_mib']} MiB "
                  f"({results[-1]['seconds']} s, lost {results[-1]['lost']}, duplicated {results[-1]['duplicated']})", flush=True)
        return results
    finally:
        stop_server(server)


def machine() -> str:
    import psutil

    return f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--azure-records", type=int, default=1000, help="0 skips the Azure-shaped client.")
    parser.add_argument("--repeat", type=int, default=3, help="Runs of each of our scenarios; the median is reported.")
    parser.add_argument("--scenarios", default=None, help="Only these of our scenarios, comma-separated ('' for none).")
    parser.add_argument("--shard-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shard-rpm", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory", default="1000,100000", help="Record counts for the memory runs ('' to skip).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--url", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    if args.memory_child:
        memory_child(args.url, args.memory_child, args.folder)
        return
    if args.shard_child:
        shard_child(args.url, args.shard_child, args.folder, args.shard_rpm)
        return

    figures: dict = {"machine": machine(), "limit_per_s": LIMIT_PER_S, "latency_s": LATENCY_S, "repeats": args.repeat}
    print(f"machine: {figures['machine']}", flush=True)
    half = args.records // 2
    # name -> (server options, the ideal seconds at the endpoint's limit(s), shards[, the quota configured: requests
    # per minute, split between the shards])
    quota = LIMIT_PER_S * 60
    scenarios = {
        "ours_no_faults": ([], args.records / LIMIT_PER_S, 1),
        "ours_10pct_faults": (["--fault-rate", "0.1"], args.records / LIMIT_PER_S, 1),
        # The limit halves once half the records were admitted: the ideal is half at 40/s and half at 20/s.
        "ours_limit_halved": (["--limit-change", f"{half}:{LIMIT_PER_S // 2}"],
                              half / LIMIT_PER_S + (args.records - half) / (LIMIT_PER_S // 2), 1),
        "ours_4_shards": ([], args.records / LIMIT_PER_S, 4),
        "ours_4_shards_10pct_faults": (["--fault-rate", "0.1"], args.records / LIMIT_PER_S, 4),
        "ours_4_shards_quota": ([], args.records / LIMIT_PER_S, 4, quota),
        "ours_4_shards_quota_10pct_faults": (["--fault-rate", "0.1"], args.records / LIMIT_PER_S, 4, quota),
    }
    with tempfile.TemporaryDirectory(prefix="azdistill-bench-") as tmp:
        folder = Path(tmp)
        limited = ["--latency", str(LATENCY_S), "--rate-limit", str(LIMIT_PER_S), "--hang", str(HANG_S)]
        chosen = None if args.scenarios is None else {name for name in args.scenarios.split(",") if name}
        for name, (options, ideal_s, shards, *configured) in scenarios.items():
            if chosen is not None and name not in chosen:
                continue
            runs = []
            for repeat in range(args.repeat):
                server, url = start_server(*limited, *options)
                try:
                    where = folder / f"{name}-{repeat}"
                    result = run_ours(url, args.records, where) if shards == 1 else \
                        run_shards(url, shards, args.records, where, *configured)
                finally:
                    counts = stop_server(server)
                result["server"] = counts
                # The share of what the endpoint allowed: the ideal time at its limit over the time taken.
                result["fraction_of_limit"] = round(ideal_s / result["seconds"], 3)
                runs.append(result)
                print(f"  {name} #{repeat + 1}: {result['records_per_s']} records/s = {result['fraction_of_limit']:.1%} of the limit "
                      f"({result['seconds']} s; lost {result['lost']}, duplicated {result['duplicated']}, wrong {result['wrong_answers']}, "
                      f"{result['endpoint']['throttled']} throttled, {result['endpoint']['retries']} retries, "
                      f"{result['endpoint'].get('hedged', 0)} hedged)", flush=True)
            median = sorted(runs, key=lambda run: run["fraction_of_limit"])[len(runs) // 2]
            figures[name] = dict(median, runs=[run["fraction_of_limit"] for run in runs])
            print(f"  {name}: median {median['fraction_of_limit']:.1%} of the limit over {len(runs)} runs "
                  f"({', '.join(f'{run:.1%}' for run in figures[name]['runs'])})", flush=True)
        if args.azure_records:
            server, url = start_server(*limited, "--fault-rate", "0.1")
            try:
                figures["azure_shaped_10pct_faults"] = azure = run_azure_shaped(url, args.azure_records, folder)
            finally:
                counts = stop_server(server)
            azure["server"] = counts
            print(f"  azure_shaped_10pct_faults: {azure['records_per_s']} records/s = {azure['fraction_of_limit']:.0%} of the limit "
                  f"({azure['seconds']} s; lost {azure['lost']} of {args.azure_records}, {azure['throttled']} throttled, "
                  f"{azure['retries']} retries)", flush=True)
            if "ours_10pct_faults" in figures:
                figures["ratio_ours_to_azure_shaped_with_faults"] = round(figures["ours_10pct_faults"]["records_per_s"] / max(azure["records_per_s"], 1e-9), 2)
                print(f"  ours / azure-shaped, 10% faults: {figures['ratio_ours_to_azure_shaped_with_faults']}x", flush=True)
        sizes = [int(size) for size in args.memory.split(",") if size.strip()]
        if sizes:
            figures["memory"] = measure_memory(sizes, folder)
            peaks = [row["peak_rss_mib"] for row in figures["memory"]]
            figures["memory_growth"] = round(max(peaks) / min(peaks) - 1, 3)
            print(f"  peak memory growth from {sizes[0]:,} to {sizes[-1]:,} records: {figures['memory_growth']:+.1%}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
