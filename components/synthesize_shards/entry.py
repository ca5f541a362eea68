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
    # The parallel engine passes its own arguments (mini-batch size, logging, ...) beside ours.
    ARGS, _ = parser.parse_known_args()


def run(mini_batch: list) -> list:
    """Answer every shard of the mini-batch; a failure raises, so the engine retries it or fails the job."""
    from pathlib import Path

    from azdistill.azure.injob import synthesize_shard

    return [synthesize_shard(Path(manifest), ARGS.config, ARGS.data, ARGS.output) for manifest in mini_batch]
