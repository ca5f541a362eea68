"""From YAML and `--set` overrides to a validated `DistillConfig`.

Every mistake is reported as a `UserError` naming the file, the line, the key, what was given and what is
allowed, so the CLI can print one line and exit with status 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ValidationError

from azdistill.config.schema import DistillConfig, impossible_combinations
from azdistill.config.sections import DEMO_CONFIG, PROJECT_ROOT
from azdistill.errors import UserError


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one mapping: `key` is its dotted path, `line` and `first_line` are 1-based."""

    def __init__(self, key: str, line: int, first_line: int, sections: bool):
        super().__init__(f"line {line}: duplicate key '{key}' (first at line {first_line})")
        self.key, self.line, self.first_line, self.sections = key, line, first_line, sections

    def describe(self, where: str) -> str:
        fix = "merge the two sections" if self.sections else "keep one of them"
        return f"{where}: duplicate key '{self.key}' (first at line {self.first_line}); {fix}"


class StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing a key given twice in one mapping, at any depth.

    SafeLoader keeps the last of two equal keys without a word, so a second `training:` section silently reset
    everything the first one set. Merge keys (`<<: *anchor`) still work: an explicit key may override a merged one.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        self._document = node  # to name the path of a duplicate key
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, tuple[yaml.Node, yaml.Node]] = {}
            for key_node, value_node in node.value:  # before SafeLoader flattens merge keys into node.value
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    continue  # dates and the like: left to SafeLoader
                if key in seen:
                    first_key, first_value = seen[key]
                    path = self._path_to(node) + (key_node.value,)
                    raise DuplicateKeyError(
                        ".".join(str(part) for part in path), key_node.start_mark.line + 1, first_key.start_mark.line + 1,
                        isinstance(value_node, yaml.MappingNode) and isinstance(first_value, yaml.MappingNode),
                    )
                seen[key] = (key_node, value_node)
        return super().construct_mapping(node, deep=deep)

    def _path_to(self, target: yaml.Node) -> tuple:
        def walk(node: yaml.Node, path: tuple) -> Optional[tuple]:
            if node is target:
                return path
            children: list = []
            if isinstance(node, yaml.MappingNode):
                children = [(value, path + (key.value,)) for key, value in node.value]
            elif isinstance(node, yaml.SequenceNode):
                children = [(item, path + (index,)) for index, item in enumerate(node.value)]
            for child, child_path in children:
                found = walk(child, child_path)
                if found is not None:
                    return found
            return None

        return walk(getattr(self, "_document", target), ()) or ()


def _syntax_error(error: yaml.YAMLError, text: str, source: str) -> str:
    """`file:line: not valid YAML: what` naming the line a person would fix.

    PyYAML's problem_mark is where the parser gave up, often after the mistake: an unclosed quote is noticed at the end
    of the file, an unclosed bracket on the next line, and a key without ':' where the next line's ':' is. Its
    context_mark says where the quote, bracket or key began, which is the line to fix for those; for a block mapping
    it is merely the start of the section, so problem_mark stays.
    """
    problem_mark = getattr(error, "problem_mark", None)
    context_mark = getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None) or ""
    mark, hint = problem_mark, ""
    if context_mark is not None and context.startswith("while scanning a quoted scalar"):
        mark, hint = context_mark, f"the quote opened at line {context_mark.line + 1}, column {context_mark.column + 1} is never closed"
    elif context_mark is not None and context.startswith("while scanning a simple key"):
        mark, hint = context_mark, "this line needs a ':' after its key"
    elif context_mark is not None and context.startswith(("while parsing a flow sequence", "while parsing a flow mapping")):
        bracket = "[" if "sequence" in context else "{"
        mark, hint = context_mark, f"the '{bracket}' at column {context_mark.column + 1} is never closed"
    elif problem == "mapping values are not allowed here" and problem_mark is not None:
        # "  type nli" followed by "  labels: [...]" reads as one key "type nli labels" whose ':' is on the next line.
        key_start = _plain_scalar_before(text)
        if key_start is not None and key_start.line < problem_mark.line:
            line_text = text.splitlines()[key_start.line]
            if line_text[: key_start.column].strip() in ("", "-"):
                mark, hint = key_start, "this line needs a ':' after its key"
    elif problem.startswith("expected <block end>"):
        hint = "the indentation of this line does not match the lines above it"
    if "'\\t'" in problem:
        hint = "indent with spaces, not tabs"
    line = f":{mark.line + 1}" if mark is not None else ""
    return f"{source}{line}: not valid YAML: {problem}" + (f"; {hint}" if hint else "")


def _plain_scalar_before(text: str) -> Any:
    """Start mark of the plain (unquoted) scalar PyYAML read last before the error, or None."""
    last = None
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            last = token
    except yaml.YAMLError:
        pass
    return last.start_mark if isinstance(last, yaml.ScalarToken) and last.plain else None


def _key_lines(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line number, for error messages."""
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                child = path + (key_node.value,)
                lines[child] = key_node.start_mark.line + 1
                walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[path + (index,)] = item.start_mark.line + 1
                walk(item, path + (index,))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _set_path(data: dict, dotted: str, value: Any, source: str) -> None:
    from azdistill.secrets import holds_secret, looks_like_secret

    keys = dotted.split(".")
    # `source` is the whole `--set key.path=value` item: under a key that holds or names a secret (api_key_env,
    # token, ...), or when the value looks like a key, errors name only the key path.
    if any(holds_secret(key) for key in keys) or looks_like_secret(source.partition("=")[2]):
        source = source.split("=", 1)[0]
    if not all(keys):
        raise UserError(f"{source}: '{dotted}' is not a key path; use e.g. training.epochs=2")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(f"{source}: cannot set '{dotted}': '{key}' holds a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split `key.path=value`; the value is read as YAML, so `2`, `true`, `[a, b]` and `null` work."""
    if "=" not in text:
        from azdistill.secrets import looks_like_secret

        shown = "(not shown: it may be a key)" if looks_like_secret(text) else text
        raise UserError(f"--set {shown}: expected key.path=value, e.g. --set training.epochs=2")
    key, raw = text.split("=", 1)
    try:
        value = yaml.load(raw, Loader=StrictLoader) if raw.strip() else ""
    except DuplicateKeyError as error:
        # Named by its key path only: the value may hold a secret.
        raise UserError(f"--set {key.strip()}: duplicate key '{error.key}' in the value; keep one of them") from None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _describe_error(error: dict, source: str, lines: dict[tuple, int], overridden: set[str]) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(part) for part in loc) or "(top level)"
    where = source
    # Blame an override that set this key, a section above it or a value inside it.
    blamed = [item for item in overridden if item == key or key.startswith(item + ".") or item.startswith(key + ".")]
    if blamed:
        where = f"--set {blamed[0]}"
    else:
        for depth in range(len(loc), 0, -1):
            if loc[:depth] in lines:
                where = f"{source}:{lines[loc[:depth]]}"
                break
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = loc[:-1]
        allowed = _allowed_keys(parent)
        hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
        return f"{where}: unknown key '{key}'{hint}"
    if kind == "missing":
        return f"{where}: missing required key '{key}'"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    given = error.get("input")
    # Never repeated back: a value rejected for looking like a key, any value of a key that holds or names a secret
    # (api_key_env, key_vault_secret, token, password, ...: a short key typed there passes looks_like_secret), and
    # any value that looks like a key wherever it was put. The message would leak it into logs.
    from azdistill.secrets import holds_secret, looks_like_secret

    hidden = (
        isinstance(given, dict) or kind == "secret_literal" or any(holds_secret(str(part)) for part in loc)
        or (isinstance(given, str) and looks_like_secret(given))
    )
    given_text = "" if hidden else f" (given: {given!r})"
    return f"{where}: {key}: {message}{given_text}"


def _allowed_keys(path: tuple) -> list[str]:
    model: type[BaseModel] = DistillConfig
    for part in path:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None) if field else None
        # Optional[Section] (e.g. azure) names its section's keys too.
        annotation = next((arg for arg in getattr(annotation, "__args__", ()) if arg is not type(None)), annotation)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def load_config(path: Optional[Path] = None, overrides: tuple[str, ...] | list[str] = ()) -> DistillConfig:
    """Read, override and validate a config. `path=None` loads the embedded demo default.

    Relative data paths are resolved against the config file's folder (the project root for the
    embedded default), so a config can live beside its data.
    """
    if path is None:
        source_path, base = DEMO_CONFIG, PROJECT_ROOT
    else:
        source_path = Path(path)
        if source_path.is_dir():
            raise UserError(f"{source_path}: is a directory, not a config file; give the path of a YAML file")
        if source_path.exists() and not source_path.is_file():
            raise UserError(f"{source_path}: is not a regular file; give the path of a YAML file")
        if not source_path.is_file():
            raise UserError(f"{source_path}: config file not found")
        base = source_path.resolve().parent
    source = str(path) if path is not None else "embedded demo config"
    try:
        text = source_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{source}: not UTF-8 text (bad byte at offset {error.start}); save the file as UTF-8") from None
    try:
        data = yaml.load(text, Loader=StrictLoader)
    except DuplicateKeyError as error:
        raise UserError(error.describe(f"{source}:{error.line}")) from None
    except yaml.YAMLError as error:
        raise UserError(_syntax_error(error, text, source)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of sections (task, data, teacher, ...), got {type(data).__name__}")

    overridden: set[str] = set()
    for item in overrides:
        key, value = parse_override(item)
        _set_path(data, key, value, f"--set {item}")
        overridden.add(key)

    try:
        config = DistillConfig.model_validate(data)
    except ValidationError as error:
        lines = _key_lines(text)
        first = error.errors()[0]
        message = _describe_error(first, source, lines, overridden)
        more = len(error.errors()) - 1
        if more:
            message += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise UserError(message) from None

    for split in ("train", "validation", "test"):
        value: Path = getattr(config.data, split).expanduser()
        setattr(config.data, split, value)
        if not value.is_absolute():
            # A path typed on the command line is relative to where the user is, not to the config file.
            split_base = Path.cwd() if f"data.{split}" in overridden else base
            setattr(config.data, split, (split_base / value).resolve())
    # A local model folder may be given relative to the config file. A hosted teacher's model is a name the endpoint
    # serves, never a path.
    local_models = [(config.student, "model"), (config.teacher, "local_copy")]
    if not config.teacher.hosted:
        local_models.append((config.teacher, "model"))
    for section, key in local_models:
        value = getattr(section, key)
        if value is not None and value not in ("builtin", "pruned-teacher") and not Path(value).expanduser().is_absolute():
            candidate = (base / value).resolve()
            if candidate.exists():
                setattr(section, key, str(candidate))

    problems = impossible_combinations(config)
    if problems:
        key, message = problems[0]
        lines = _key_lines(text)
        where = f"--set {key}" if key in overridden else next(
            (f"{source}:{lines[path]}" for path in [tuple(key.split(".")[:depth]) for depth in range(key.count(".") + 1, 0, -1)] if path in lines),
            source,
        )
        raise UserError(f"{where}: {key}: {message}")
    return config


def config_to_params(config: DistillConfig) -> dict[str, str]:
    """Flatten the resolved config to `section.key -> str` for MLflow params."""
    flat: dict[str, str] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(child, f"{prefix}.{key}" if prefix else key)
        else:
            flat[prefix] = str(value)

    # The tracking and azure sections say where runs go, not how the model was made; a URI may carry credentials.
    walk(config.model_dump(mode="json", exclude={"tracking", "azure"}), "")
    return flat
