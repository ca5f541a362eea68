"""Training throughput (tokens/s): our trainer against a plain transformers.Trainer, same model, data and machine.

    .venv/bin/python bench/train_throughput.py --repeat 3
    .venv/bin/python bench/train_throughput.py --examples 32 --repeat 1   # a quick look
    make bench-gpu   # on a GPU machine: the demo's student and a 0.5 B one, both batching modes

The 0.5 B student (`--student 0.5b`) is built offline from a config (SmolLM2's architecture and tokenizer, 32
layers of width 1152: 502 M parameters) with random weights: what is measured is the trainers' speed, not what the
model learns, so no download is needed.

The model is the demo's student (SmolLM2-135M-Instruct with 10 of its 30 layers, 63.7 M parameters); the data
is the bundled sentiment sample with its reference answers, loss on the answer tokens only. Both trainers run the
same objective (SFT, mean cross-entropy over answer tokens), the same batch size, learning rate and precision
(float32 on CPU, bf16 autocast on a GPU), for one epoch each, alternating ours and the baseline `--repeat` times
so that both see the same background load; the medians are printed. Tokens are the real (non-padding) tokens of
the training set; time is the wall time of `trainer.train()`. Tokens per CPU-second (the process's CPU time over
the same call) measures the work itself, which other programs on a shared machine disturb less than wall time.

The baseline is what a plain script does: `Trainer` with `DataCollatorForSeq2Seq` (pad to the longest in the
batch), random batches, the model's own loss over full logits. Ours is `azdistill.training.loop.train_student`
with the config's defaults (length-grouped batches, logits only where an answer token is predicted, the batch's
shared prompt prefix run once); `--batching` measures its other batching modes, `--without-shared-prefix` adds ours
with each row running the prefix itself, and `--with-kd` adds a run with token-level distillation from the teacher.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (GPU), torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def half_billion_student(teacher: Path, folder: Path) -> Path:
    """A 0.5 B student of the teacher's family built from a config, random weights (offline: nothing downloaded)."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from azdistill.models.loading import load_tokenizer

    config = AutoConfig.from_pretrained(teacher)
    config.update({"hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 32, "num_attention_heads": 16,
                   "num_key_value_heads": 4, "head_dim": 72})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    load_tokenizer(teacher).save_pretrained(folder)
    return folder


def parameters(path: Path) -> float:
    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("torch").device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return sum(parameter.numel() for parameter in model.parameters()) / 1e6


def load_conversations(path: Path, count: int) -> list[list[dict]]:
    from azdistill.data.files import iter_jsonl

    rows = [row["messages"] for row in iter_jsonl(path) if row["messages"][-1]["role"] == "assistant"]
    return rows[:count]


def plain_trainer(student: Path, conversations: list[list[dict]], batch_size: int, max_length: int, learning_rate: float, out: Path) -> dict:
    """The baseline: a plain transformers.Trainer on the same examples (assistant-only labels)."""
    import torch
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainingArguments, set_seed

    from azdistill.models.loading import load_tokenizer
    from azdistill.training.examples import build_example

    set_seed(0)
    tokenizer = load_tokenizer(student)
    examples = [build_example(tokenizer, messages, max_length) for messages in conversations]
    examples = [example for example in examples if example is not None]
    gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=batch_size, learning_rate=learning_rate, num_train_epochs=1,
        lr_scheduler_type="cosine", logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        bf16=gpu and torch.cuda.is_bf16_supported(), use_cpu=not gpu, dataloader_num_workers=0, seed=0,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collator, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # only its printing, as in ours
    started, cpu_started = time.monotonic(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.monotonic() - started, time.process_time() - cpu_started
    tokens = sum(len(example["input_ids"]) for example in examples)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu_seconds,
        "final_loss": losses[-1] if losses else None,
    }


def our_trainer(
    student: Path, teacher: Path, conversations: list[list[dict]], batch_size: int, max_length: int, learning_rate: float,
    out: Path, batching: str, kd_weight: float = 0.0, shared_prefix: bool = True,
) -> dict:
    from azdistill.config.sections import TrainingConfig
    from azdistill.training.loop import train_student

    settings = TrainingConfig(
        learning_rate=learning_rate, batch_size=batch_size, epochs=1, max_length=max_length, batching=batching,
        kd_weight=kd_weight, logging_steps=1, save_steps=10**6, seed=0, shared_prefix=shared_prefix,
    )
    summary = train_student(conversations, [], student, out, settings, teacher_path=teacher if kd_weight else None)
    tokens = round(summary["tokens_per_s"] * summary["seconds"])
    return {
        "seconds": summary["seconds"], "tokens": tokens, "tokens_per_s": summary["tokens_per_s"],
        "tokens_per_cpu_s": tokens / summary["cpu_seconds"], "final_loss": summary["final_loss"],
    }


def padding_share(student: Path, conversations: list[list[dict]], batch_size: int, max_length: int) -> dict:
    """Share of padding tokens in random batches and in length-grouped ones (what the batching saves)."""
    import random

    from azdistill.models.loading import load_tokenizer
    from azdistill.training.examples import build_example

    tokenizer = load_tokenizer(student)
    lengths = [len(example["input_ids"]) for example in (build_example(tokenizer, m, max_length) for m in conversations) if example]
    shuffled = lengths[:]
    random.Random(0).shuffle(shuffled)

    def share(order: list[int]) -> float:
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        padded = sum(max(batch) * len(batch) for batch in batches)
        return 1 - sum(order) / padded

    return {"random": share(shuffled), "length_grouped": share(sorted(lengths))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=96, help="training examples (one epoch)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of each trainer; medians are printed")
    parser.add_argument("--batching", nargs="+", default=["length_grouped"], choices=["padded", "length_grouped", "packed"])
    parser.add_argument("--with-kd", action="store_true", help="also time ours with kd_weight 0.5 (teacher forward included)")
    parser.add_argument("--without-shared-prefix", action="store_true",
                        help="also time ours with training.shared_prefix false (each row runs the system prompt itself)")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "sentiment" / "train.jsonl")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--student", nargs="+", default=["demo"], choices=["demo", "0.5b"],
                        help="demo: the demo's 63.7 M student; 0.5b: a 502 M student built from a config (for GPUs)")
    args = parser.parse_args(argv)

    from azdistill.models.builtin import builtin_teacher_path
    from azdistill.models.files import cache_dir
    from azdistill.models.students import make_pruned_student

    teacher = builtin_teacher_path()
    conversations = load_conversations(args.data, args.examples)
    summaries = {}
    for name in args.student:
        if name == "demo":
            student = make_pruned_student(teacher, 0.34, cache_dir() / "bench" / "student-10-layers")
        else:
            student = half_billion_student(teacher, cache_dir() / "bench" / "student-0.5b")
        summaries[name] = measure(args, teacher, student, conversations)
    if args.json:
        args.json.write_text(json.dumps(summaries if len(summaries) > 1 else summaries[args.student[0]], indent=2))


def measure(args, teacher: Path, student: Path, conversations: list[list[dict]]) -> dict:
    """Every trainer on one student, alternating, `args.repeat` times; prints the table and returns the figures."""
    runs: dict[str, list[dict]] = {}
    contenders = {"plain transformers.Trainer": lambda out: plain_trainer(student, conversations, args.batch_size, args.max_length, args.learning_rate, out)}
    for batching in args.batching:
        contenders[f"azdistill ({batching})"] = lambda out, batching=batching: our_trainer(
            student, teacher, conversations, args.batch_size, args.max_length, args.learning_rate, out, batching
        )
    if args.without_shared_prefix:
        contenders["azdistill (length_grouped, prefix run per row)"] = lambda out: our_trainer(
            student, teacher, conversations, args.batch_size, args.max_length, args.learning_rate, out, "length_grouped",
            shared_prefix=False,
        )
    if args.with_kd:
        contenders["azdistill + KD to the teacher"] = lambda out: our_trainer(
            student, teacher, conversations, args.batch_size, args.max_length, args.learning_rate, out, "length_grouped", 0.5
        )
    for repetition in range(args.repeat):
        for name, run in contenders.items():
            with tempfile.TemporaryDirectory(prefix="azdistill-throughput-") as out:
                result = run(Path(out))
            runs.setdefault(name, []).append(result)
            print(
                f"[{repetition + 1}/{args.repeat}] {name}: {result['tokens_per_s']:.1f} tokens/s ({result['seconds']:.1f} s), "
                f"{result['tokens_per_cpu_s']:.1f} tokens per CPU-second, final loss {result['final_loss']:.3f}", flush=True,
            )

    baseline = statistics.median(run["tokens_per_s"] for run in runs["plain transformers.Trainer"])
    baseline_cpu = statistics.median(run["tokens_per_cpu_s"] for run in runs["plain transformers.Trainer"])
    padding = padding_share(student, conversations, args.batch_size, args.max_length)
    print(f"\nmachine: {machine()}")
    print(f"model: {student.name} ({parameters(student):.1f} M parameters); {len(conversations)} examples, batch {args.batch_size}, max length {args.max_length}")
    print(f"padding share: random batches {padding['random']:.0%}, length-grouped {padding['length_grouped']:.0%}")
    print(f"\n| trainer | tokens/s (median of {args.repeat}) | min | max | vs plain Trainer | tokens per CPU-second | vs plain Trainer |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    summary = {"machine": machine(), "examples": len(conversations), "batch_size": args.batch_size, "padding": padding, "trainers": {}}
    for name, results in runs.items():
        speeds = [result["tokens_per_s"] for result in results]
        median = statistics.median(speeds)
        cpu = statistics.median(result["tokens_per_cpu_s"] for result in results)
        summary["trainers"][name] = {
            "tokens_per_s": speeds, "median": median, "ratio": median / baseline,
            "tokens_per_cpu_s": [result["tokens_per_cpu_s"] for result in results], "cpu_ratio": cpu / baseline_cpu,
        }
        print(f"| {name} | {median:.1f} | {min(speeds):.1f} | {max(speeds):.1f} | {median / baseline:.2f}x | {cpu:.1f} | {cpu / baseline_cpu:.2f}x |")
    return summary


if __name__ == "__main__":
    main()
