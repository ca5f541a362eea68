"""Label scoring (synthesis.label_constraint scores): each prompt run once, its labels read from the attention cache,
against a sequence per label (prompt + label, the way scoring ran until 2026-12-02), same model, prompts and machine.

    .venv/bin/python bench/label_scoring.py --repeat 3

The teacher is the built-in SmolLM2-135M-Instruct; the prompts are the demo's 280 training and validation reviews
(what its synthesis scores), batches of 16 as in the demo config. The two ways alternate `--repeat` times so that
both see the same background load; the medians are printed, with the largest difference between their label
probabilities and whether every label chosen is the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from train_throughput import machine
    from transformers import AutoModelForCausalLM

    from azdistill.models import labels as scoring
    from azdistill.models.builtin import builtin_teacher_path
    from azdistill.models.loading import load_tokenizer

    path = builtin_teacher_path()
    tokenizer, model = load_tokenizer(path), AutoModelForCausalLM.from_pretrained(path).eval()
    conversations = [json.loads(line)["messages"][:-1] for split in ("train", "validation")
                     for line in (ROOT / "data" / "sentiment" / f"{split}.jsonl").read_text().splitlines() if line.strip()]
    labels = ["positive", "negative"]
    cached_logprobs = scoring._cached_logprobs
    ways = {"ours (prompt once, labels from the cache)": cached_logprobs, "a sequence per label": lambda *args: None}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    scores: dict[str, list] = {}
    print(f"{len(conversations)} prompts, {len(labels)} labels, batches of {args.batch_size}; {machine()}")
    for attempt in range(args.repeat):
        for name, way in ways.items():
            scoring._cached_logprobs = way
            started = time.perf_counter()
            scores[name] = scoring.score_labels(model, tokenizer, conversations, labels, args.batch_size)
            seconds[name].append(time.perf_counter() - started)
            print(f"  run {attempt + 1}: {name}: {seconds[name][-1]:.1f} s", flush=True)
    scoring._cached_logprobs = cached_logprobs
    ours, baseline = (statistics.median(values) for values in seconds.values())
    first, second = scores.values()
    difference = max(abs(a.probs[label] - b.probs[label]) for a, b in zip(first, second) for label in labels)
    same = all(a.label == b.label for a, b in zip(first, second))
    print(f"median: ours {ours:.1f} s ({len(conversations) / ours:.1f} prompts/s), a sequence per label {baseline:.1f} s "
          f"({len(conversations) / baseline:.1f} prompts/s): {baseline / ours:.2f}x; label probabilities within "
          f"{difference:.1e}, {'the same labels' if same else 'SOME LABELS DIFFER'}")


if __name__ == "__main__":
    main()
