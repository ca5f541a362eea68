"""Which process is the main one when training runs on several (accelerate / torchrun)."""

from __future__ import annotations

import functools
import os

# Several processes (torchrun, accelerate launch, Azure ML's PyTorch distribution)


def distributed() -> bool:
    """Whether this process is one of several started by a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@functools.lru_cache(maxsize=None)
def _process_state():
    import torch
    from accelerate import PartialState

    # Joins the process group the launcher set up: NCCL on GPUs, gloo on CPUs (without cpu=True, accelerate treats
    # CPU-only processes as unrelated single ones, and every one of them would think it is the main one).
    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    return not distributed() or _process_state().is_main_process


def wait_for_everyone() -> None:
    if distributed():
        _process_state().wait_for_everyone()

