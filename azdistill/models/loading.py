"""Loading a tokenizer and a causal LM from a model folder, on the best device there is."""

from __future__ import annotations

from pathlib import Path

from azdistill.errors import UserError


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise UserError(f"{path}: the tokenizer has no chat template; azdistill needs a chat (instruct) model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: Path, device: str = "cpu"):
    """Load a causal LM for inference or training, in float32 on CPU and bfloat16 on a GPU."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device)


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def count_parameters(model) -> int:
    """Unique parameters (tied input and output embeddings count once)."""
    return sum(parameter.numel() for parameter in {id(p): p for p in model.parameters()}.values())
