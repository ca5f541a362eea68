"""The package's shape, checked so it cannot drift: layering and no import cycles (import-linter, contracts in
pyproject.toml), modules and functions of a readable size, one documented job per module, and
`azdistill/README.md` (one line per module) generated from the tree.

Regenerate the README after adding, removing or re-documenting a module: `python tests/test_layout.py`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "azdistill"
PACKAGE_README = PACKAGE / "README.md"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80

# A function over the limit is named here with the reason it stays whole. The list must stay true: an entry whose
# function is gone or back under the limit fails the test, so it cannot outlive its reason.
LONG_FUNCTIONS: dict[str, str] = {
    # Moved whole from the flat package; each is split into named steps next.
}

# The order of the package README: the layers of pyproject.toml's first contract, top to bottom.
FOLDER_ORDER = [
    "cli", "azure", "stages", "synthesis", "training", "serving", "tracking", "evaluation", "teachers", "models", "data", "config",
]
FOLDER_TITLES = {
    "cli": "the command line: parse, dispatch, print",
    "azure": "Azure ML: build and submit pipelines and schedules, the steps that run inside Azure jobs, deploy the champion",
    "stages": "the stages: fingerprints, reuse and resume, then calls into the parts below",
    "synthesis": "the teacher answers the training prompts",
    "training": "the student learns from the answers",
    "serving": "a trained student behind an OpenAI-compatible server on this machine",
    "tracking": "MLflow runs, the model registry and its champion",
    "evaluation": "teacher, student and baselines measured and compared",
    "teachers": "every kind of teacher behind one interface",
    "models": "model folders, loading, the built-in teacher's weights, the student's starting point",
    "data": "datasets: records, splits, safe files, import and export",
    "config": "the typed configuration",
}


def modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def summary(path: Path) -> str:
    """The first sentence of a module's docstring, on one line."""
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    first = " ".join(docstring.split("\n\n")[0].split())
    return first.split(". ")[0].rstrip(".")


def cell(text: str) -> str:
    return text.replace("|", "\\|")  # a table cell


def render_package_readme() -> str:
    lines = [
        "# The azdistill package",
        "",
        "Generated from the modules' docstrings by `python tests/test_layout.py`; `make test` checks it is current.",
        "Dependencies point down this page: each folder imports only from folders below it (the layers contract in",
        "`pyproject.toml`, checked by import-linter), and modules inside a folder import one another without cycles.",
        "",
    ]
    by_folder: dict[str, list[Path]] = {}
    top: list[Path] = []
    for path in modules():
        relative = path.relative_to(PACKAGE)
        if len(relative.parts) == 1:
            top.append(path)
        elif relative.name != "__init__.py":
            by_folder.setdefault(relative.parts[0], []).append(path)
    assert sorted(by_folder) == sorted(FOLDER_ORDER), f"a folder is missing from FOLDER_ORDER: {sorted(by_folder)}"
    for folder in FOLDER_ORDER:
        lines += [f"## `{folder}/`: {FOLDER_TITLES[folder]}", "", "| module | its job |", "|---|---|"]
        lines += [f"| `{path.name}` | {cell(summary(path))} |" for path in by_folder[folder]]
        lines.append("")
    lines += ["## At the bottom, used by every folder", "", "| module | its job |", "|---|---|"]
    lines += [f"| `{path.name}` | {cell(summary(path))} |" for path in top if path.name not in ("__init__.py", "__main__.py")]
    return "\n".join(lines) + "\n"


def test_layers_and_no_import_cycles():
    """Every contract of [tool.importlinter] in pyproject.toml holds (imports inside functions count too)."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.fail("import-linter is not installed: it is a dev dependency in requirements.lock")
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_no_module_is_too_long():
    long = {str(path.relative_to(ROOT)): n for path in modules() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}, f"split these modules (over {MAX_MODULE_LINES} lines): {long}"


def test_no_function_is_too_long_or_the_list_says_why():
    long = {}
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    long[f"{module_name(path)}.{node.name}"] = node.end_lineno - start + 1
    unexplained = {name: lines for name, lines in long.items() if name not in LONG_FUNCTIONS}
    assert unexplained == {}, f"split these functions into named steps (over {MAX_FUNCTION_LINES} lines): {unexplained}"
    stale = sorted(set(LONG_FUNCTIONS) - set(long))
    assert stale == [], f"LONG_FUNCTIONS names functions that are gone or short now: {stale}"


def test_every_module_says_what_its_job_is():
    undocumented = [str(path.relative_to(ROOT)) for path in modules() if not summary(path)]
    assert undocumented == []


def test_the_package_readme_is_generated_from_the_tree():
    assert PACKAGE_README.read_text() == render_package_readme(), "run `python tests/test_layout.py` and commit azdistill/README.md"


if __name__ == "__main__":
    PACKAGE_README.write_text(render_package_readme())
    print(f"wrote {PACKAGE_README.relative_to(ROOT)}")
