"""Model folders on disk: the cache, locks between processes, Hugging Face and MLflow layouts, sizes."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from azdistill.errors import UserError


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


def open_permissions(folder: Path) -> None:
    """mkdtemp makes owner-only folders; a model folder should get the usual permissions."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)


def _check_model_folder(path: Path, key: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{key}: {path} is not a folder; give 'builtin'/'pruned-teacher' or a local model folder")
    if not (path / "config.json").is_file():
        raise UserError(f"{key}: {path} has no config.json; expected a Hugging Face causal LM folder")
    return path


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


def weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def size_on_disk(path: Path) -> int:
    """Bytes of weight files in a model folder."""
    return sum(
        file.stat().st_size
        for file in Path(path).rglob("*")
        if file.is_file() and file.suffix in (".safetensors", ".bin", ".pt", ".gguf")
    )
