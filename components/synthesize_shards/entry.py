"""Entry script of the sharded synthesis (an Azure ML parallel job): each mini-batch is one shard manifest,
answered by the same `azdistill synthesize` command as local mode (see azdistill.azure.injob.synthesize_shard)."""

from __future__ import annotations

import argparse

ARGS = None


def init() -> None:
    """Called once per worker process by the parallel engine."""
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="The job config.")
    parser.add_argument("--data", required=True, help="The validate step's data folder.")
    parser.add_argument("--output", required=True, help="Folder for the shard-NNNNN/ results.")
    # Each shard's share of the teacher's limits and budget (left out: the config's value).
    parser.add_argument("--shard-requests-per-minute", type=int, default=None, help="teacher.requests_per_minute of one shard.")
    parser.add_argument("--shard-tokens-per-minute", type=int, default=None, help="teacher.tokens_per_minute of one shard.")
    parser.add_argument("--shard-max-concurrency", type=int, default=None, help="teacher.max_concurrency of one shard.")
    parser.add_argument("--shard-max-cost", type=float, default=None, help="synthesis.max_cost of one shard.")
    # The pipeline's synthesis settings (build.SYNTHESIS_SETTINGS), always given by the pipelines.
    parser.add_argument("--synthesis-temperature", type=float, default=None, help="synthesis.temperature of every shard.")
    parser.add_argument("--synthesis-max-new-tokens", type=int, default=None, help="synthesis.max_new_tokens of every shard.")
    # The parallel engine passes its own arguments (mini-batch size, logging, ...) beside ours.
    ARGS, others = parser.parse_known_args()
    # An input reference the service left unresolved would otherwise be skipped as one of the engine's arguments,
    # and the shard would run without its share of the teacher's limits.
    unresolved = [argument for argument in others if "${{" in argument or "$[[" in argument or argument.endswith("]]")]
    if unresolved:
        raise RuntimeError(f"program arguments left unresolved by Azure ML: {' '.join(unresolved)}")


def run(mini_batch: list) -> list:
    """Answer every shard of the mini-batch; a failure raises, so the engine retries it or fails the job."""
    from pathlib import Path

    from azdistill.azure.build import SHARD_LIMITS, SYNTHESIS_SETTINGS
    from azdistill.azure.injob import synthesize_shard

    shares = {name: getattr(ARGS, name) for name in (*SHARD_LIMITS, *SYNTHESIS_SETTINGS)}
    return [synthesize_shard(Path(manifest), ARGS.config, ARGS.data, ARGS.output, shares) for manifest in mini_batch]
