"""Which distillation loss brings the student closest to the teacher? Each variant trains the same student on the
same synthetic set, then answers the held-out set; agreement with the teacher's own answers is scored.

    .venv/bin/python bench/compare_losses.py                       # the variants below, on the demo's run
    .venv/bin/python bench/compare_losses.py --variants sft kd     # a subset

Needs a finished demo run (`make demo` or `azdistill run`): it reads the synthetic set from
`<workdir>/runs/sentiment-demo/synthesize/` and the teacher's test answers from `.../evaluate/predictions/teacher.json`,
so every variant is judged against the same teacher answers that the demo's report used. Training settings are the
demo config's (learning rate, epochs, batch size, temperature); each variant changes only the loss weights.
Decoding is greedy and seeds are fixed, so a rerun on the same machine gives the same answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "sft": ("SFT alone", {"kd_weight": 0.0}),
    "kd": ("SFT + logit distillation (forward KL, demo)", {"kd_weight": 0.5}),
    "hidden": ("SFT + hidden-state matching", {"kd_weight": 0.0, "hidden_weight": 1.0}),
    "kd_hidden": ("SFT + logit distillation + hidden states", {"kd_weight": 0.5, "hidden_weight": 1.0}),
    "jsd": ("SFT + generalized JSD (beta 0.5)", {"kd_weight": 0.5, "kd_loss": "jsd"}),
    "reverse_kl": ("SFT + reverse KL", {"kd_weight": 0.5, "kd_loss": "reverse_kl"}),
}


def answer_test_set(model_path: Path, prompts: list[list[dict]], max_new_tokens: int, batch_size: int) -> list[str]:
    from azdistill.models.generation import GenerationSettings, generate_in_batches
    from azdistill.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path).eval()
    answers: list[str] = [""] * len(prompts)
    for batch in generate_in_batches(model, tokenizer, prompts, GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)):
        for index, completion in batch:
            answers[index] = completion.text
    return answers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["sft", "kd", "hidden", "kd_hidden"], choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42], help="training seeds (data order); 42 is the demo's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override, e.g. workdir=/tmp/w")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    from azdistill.config.loading import load_config
    from azdistill.data.files import iter_jsonl
    from azdistill.data.records import read_records
    from azdistill.evaluation.metrics import score_predictions
    from azdistill.stages.run import prepare_models
    from azdistill.training.loop import train_student

    config = load_config(None, args.overrides)
    synthetic = config.stage_dir("synthesize")
    teacher_file = config.stage_dir("evaluate") / "predictions" / "teacher.json"
    if not (synthetic / "train.jsonl").is_file() or not teacher_file.is_file():
        raise SystemExit(f"needs a finished demo run: {synthetic}/train.jsonl and {teacher_file} (run `make demo` first)")
    models = prepare_models(config)
    train = [row["messages"] for row in iter_jsonl(synthetic / "train.jsonl")]
    validation = [row["messages"] for row in iter_jsonl(synthetic / "validation.jsonl")]
    test = read_records(config.data.test, config.task.type, config.data.max_records)
    teacher_answers = json.loads(teacher_file.read_text())["answers"]
    prompts, references = [record.prompt for record in test], [record.reference for record in test]

    decided = sum(1 for answer in teacher_answers if _label(answer, config.task.labels) is not None)
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for key in args.variants:
            title, update = VARIANTS[key]
            settings = config.training.model_copy(update={**update, "seed": seed})
            settings = type(settings).model_validate(settings.model_dump())  # re-check the combination
            with tempfile.TemporaryDirectory(prefix=f"azdistill-compare-{key}-") as out:
                summary = train_student(train, validation, models.student_init, Path(out), settings, teacher_path=models.teacher)
                started = time.monotonic()
                answers = answer_test_set(Path(out) / "model", prompts, config.evaluation.max_new_tokens, config.evaluation.batch_size)
            metrics = score_predictions(config.task.type, answers, references, teacher_answers, config.task.labels)
            result = {
                "seed": seed, "agreement": metrics["agreement"], "accuracy": metrics.get("accuracy"), "parse_rate": metrics["parse_rate"],
                "agreeing_items": round(metrics["agreement"] * decided), "train_seconds": summary["seconds"],
                "answer_seconds": round(time.monotonic() - started, 1), "final_eval_loss": summary["final_eval_loss"], "steps": summary["steps"],
            }
            results.setdefault(key, []).append(result)
            print(f"seed {seed}, {title}: agreement {metrics['agreement']:.1%} ({result['agreeing_items']}/{decided}), "
                  f"accuracy {metrics.get('accuracy', float('nan')):.1%}, trained in {summary['seconds']:.0f} s", flush=True)

    print(f"\nagreement with the teacher on the {decided} held-out items it labelled; mean over seeds {args.seeds}")
    print("\n| loss | agreement (mean) | per seed | accuracy (mean) | label parsed | train time |")
    print("|---|---:|---|---:|---:|---:|")
    for key, runs in results.items():
        mean = lambda name: sum(run[name] for run in runs) / len(runs)  # noqa: E731
        per_seed = ", ".join(f"{run['agreeing_items']}/{decided}" for run in runs)
        print(f"| {VARIANTS[key][0]} | {mean('agreement'):.1%} | {per_seed} | {mean('accuracy'):.1%} | "
              f"{mean('parse_rate'):.0%} | {mean('train_seconds'):.0f} s |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _label(answer: str, labels) -> object:
    from azdistill.evaluation.metrics import answer_key

    return answer_key("nli", answer, labels)


if __name__ == "__main__":
    main()
