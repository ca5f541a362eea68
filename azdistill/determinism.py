"""Repeatable numbers from torch: one seed, one thread count and deterministic kernels for every stage that runs a
model in this process (the local teacher, training, each evaluated model), so a rerun on the same lock and
hardware gives the same student and the same figures.

What each part does: the seed fixes data order, initialisation and sampling; deterministic algorithms rule out
the kernels that accumulate with atomics (on GPUs), whose sums round differently from run to run. The thread count
is left to torch unless `runtime.threads` pins it: on the 2-core x86_64 machines of docs/demo.md, 1 to 4 threads
gave bitwise-identical logits, but a CPU library may split its sums by core count elsewhere, and pinning it is
how figures are compared across machines. Two demo runs on one lock gave bitwise-identical synthetic data,
weights and answers (docs/demo.md).
"""

from __future__ import annotations

import os
from typing import Optional


def make_repeatable(seed: int, threads: Optional[int] = None, deterministic: bool = True) -> None:
    """Seed every generator and, as configured, fix torch's CPU threads and pick deterministic algorithms."""
    import torch
    from transformers import set_seed

    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        # cuBLAS needs a fixed workspace for repeatable matrix products (PyTorch's reproducibility notes); it is
        # read when CUDA starts, so it is set before any model is placed on a GPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: an operation with no deterministic kernel warns instead of failing a paid-for GPU run.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    set_seed(seed)
