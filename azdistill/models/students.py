"""The student's starting point: a model folder, or a copy of the teacher with layers pruned away."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from azdistill.errors import UserError
from azdistill.models.files import _ensure, model_folder, open_permissions
from azdistill.models.loading import load_tokenizer

log = logging.getLogger(__name__)


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

    from azdistill.data.digests import folder_digest

    # What the pruned student is made of: the teacher's content and the share kept, never where the teacher lies, so
    # a moved model cache reuses the student (and every stage after it) instead of building it again.
    identity = {"teacher_digest": folder_digest(teacher_path), "keep_layers": keep_share}
    marker = target / "pruned-from.json"
    if (target / "config.json").is_file() and marker.is_file():
        built_from = json.loads(marker.read_text())
        if {key: built_from.get(key) for key in identity} == identity:
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
    # The teacher's folder at the time, for a person reading the file; not part of the identity.
    (staging / "pruned-from.json").write_text(json.dumps({**identity, "teacher": str(teacher_path)}))
    open_permissions(staging)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def resolve_student(model: str, teacher_path: Optional[Path], keep_share: float, target: Path) -> Path:
    """The student's starting point: the pruned teacher (saved into `target`), a local model folder, or an MLflow
    model folder (azdistill's registered student, or the Azure ML registry's layout), made loadable in `target`."""
    if model == "pruned-teacher":
        if teacher_path is None:
            raise UserError("student.model: pruned-teacher needs the teacher's weights (teacher.kind local, or teacher.local_copy)")
        return make_pruned_student(teacher_path, keep_share, target)
    return model_folder(Path(model), "student.model", target)
