"""Load knowledge files (YAML) and validate them with cerberus.

Every error names the file, the line and the key path, so an informatics analyst editing a
mapping or trial file can find the mistake without reading Python.
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cerberus import Validator


@dataclass(frozen=True)
class DataFileProblem:
    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class DataFileError(ValueError):
    """One or more knowledge files are invalid."""

    def __init__(self, problems: list[DataFileProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _line_of(node: yaml.Node | None, path: tuple[Any, ...]) -> int | None:
    """Walk the composed YAML node tree along a key path; return the 1-based line of the deepest hit."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in path:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if getattr(k, "value", None) == str(key)), None)
            if match is None:
                match_key = next((k for k, _ in node.value if getattr(k, "value", None) == str(key)), None)
                return match_key.start_mark.line + 1 if match_key is not None else line
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            return line
        line = node.start_mark.line + 1
    return line


def flatten_errors(errors: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], str]]:
    """Cerberus's nested error tree → (key path, message) pairs, one per problem."""
    out: list[tuple[tuple[Any, ...], str]] = []
    if isinstance(errors, dict):
        for key, value in errors.items():
            out.extend(flatten_errors(value, (*path, key)))
    elif isinstance(errors, list):
        for item in errors:
            out.extend(flatten_errors(item, path))
    else:
        out.append((path, str(errors)))
    return out


class ValidatorPool:
    """Ready cerberus validators for one schema, each lent to one caller at a time.

    Building a validator costs more than validating (cerberus checks the schema: ~0.1 s for the hook
    request's), and a validator keeps per-call state, so it must not be used by two threads at once.
    A pool builds one now (before gunicorn forks its workers, which inherit it) and more only when
    that many threads validate at the same moment; a thread-local one would cost every new thread of
    a worker that 0.1 s on its first request.
    """

    def __init__(self, schema: dict[str, Any], **options: Any) -> None:
        self._schema = schema
        self._options = options
        self._idle: queue.SimpleQueue[Validator] = queue.SimpleQueue()
        self._idle.put(self._new())

    def _new(self) -> Validator:
        return Validator(self._schema, **self._options)

    @contextlib.contextmanager
    def lend(self) -> Iterator[Validator]:
        try:
            validator = self._idle.get_nowait()
        except queue.Empty:
            validator = self._new()
        try:
            yield validator
        finally:
            self._idle.put(validator)


def dotted_errors(errors: Any) -> list[tuple[str, str]]:
    """(``context.patientId``, message) pairs: the field paths an API error names."""
    return [(".".join(str(part) for part in path), message) for path, message in flatten_errors(errors)]


def _key_text(path: tuple[Any, ...]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


@dataclass(frozen=True)
class LoadedFile:
    path: Path
    data: Any
    root: yaml.Node | None

    def line(self, *path: Any) -> int | None:
        return _line_of(self.root, path)

    def problem(self, path: tuple[Any, ...], message: str) -> DataFileProblem:
        return DataFileProblem(str(self.path), self.line(*path), _key_text(path), message)


def load_yaml(path: Path) -> LoadedFile:
    """Parse a YAML file, keeping the node tree for line numbers. Raises DataFileError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataFileError([DataFileProblem(str(path), None, "", f"cannot read: {exc.strerror}")]) from exc
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise DataFileError([DataFileProblem(str(path), line, "", f"not valid YAML: {exc}")]) from exc
    return LoadedFile(path, data, root)


def validate(loaded: LoadedFile, schema: dict[str, Any], validator_class: type[Validator] = Validator) -> Any:
    """Validate with cerberus; return the normalised document or raise DataFileError naming lines."""
    if not isinstance(loaded.data, dict):
        raise DataFileError([DataFileProblem(str(loaded.path), 1, "", "the file must hold a mapping")])
    validator = validator_class(schema)
    if validator.validate(loaded.data):
        return validator.document
    problems = [loaded.problem(path, message) for path, message in flatten_errors(validator.errors)]
    raise DataFileError(problems)


def load_and_validate(path: Path, schema: dict[str, Any]) -> tuple[LoadedFile, Any]:
    loaded = load_yaml(path)
    return loaded, validate(loaded, schema)
