"""Task files: a small YAML, in the spirit of lm-evaluation-harness, naming a JSONL file beside it.

A record's text comes from templates written as lm-evaluation-harness writes them: Jinja
(``{{field}}``, ``{{field.key}}``, ``{{choices[0]}}``, filters, ``{% if %}``), rendered with the
record's fields as variables. A task file is data from someone else, so templates run in Jinja's
immutable sandbox (no attribute access to internals, no mutation) with undefined names an error.
A bare field name gives the field's raw value (a list of choices, an answer index); a template
for ``doc_to_choice`` that renders a list literal (``"{{choices}}"``) is read back as that list,
as lm-eval does. Every error is one line that names the file and the line (YAML key or JSONL record).
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml
from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from evo.core.errors import EvoError
from evo.core.fs import read_records

_JINJA = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
_UNDEFINED = re.compile(r"'([^']+)' is undefined|has no attribute '([^']+)'")
LIST_KEYS = ("doc_to_choice", "choices")  # a rendered "[...]" is read back as a list

_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+|\[\d+\])*\Z")
_STEP = re.compile(r"\.?([A-Za-z0-9_]+)|\[(\d+)\]")

COMMON_KEYS = {"task", "type", "output_type", "dataset_file", "dataset_path", "dataset_kwargs", "test_split",
               "description", "metric", "metric_list", "metadata"}


@dataclass(frozen=True)
class Record:
    """One JSONL record and where it came from (``file:line``), for error messages."""

    doc: dict
    where: str


@dataclass
class TaskFile:
    """A parsed task YAML: its mapping, the line of each top-level key, and the keys read so far."""

    path: Path
    data: dict
    lines: dict[str, int]

    @classmethod
    def read(cls, path: str | Path) -> "TaskFile":
        path = Path(path)
        if not path.is_file():
            raise EvoError(f"{path}: no such task file")
        text = path.read_text(encoding="utf-8")
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise EvoError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(data, dict):
            raise EvoError(f"{path}:1: a task file must be a YAML mapping of keys to values")
        lines = {k.value: k.start_mark.line + 1 for k, _ in node.value} if isinstance(node, yaml.MappingNode) else {}
        return cls(path, data, lines)

    def where(self, key: str | None = None) -> str:
        return f"{self.path}:{self.lines.get(key, 1) if key else 1}"

    def check_keys(self, allowed: Iterable[str], kind: str) -> None:
        allowed = set(allowed) | COMMON_KEYS
        for key in self.data:
            if key not in allowed:
                raise EvoError(f"{self.where(key)}: unknown key {key!r} for a {kind} task; "
                               f"expected one of {', '.join(sorted(allowed))}")

    def get(self, key: str, default: Any = None, types: type | tuple = object) -> Any:
        value = self.data.get(key, default)
        if value is not None and not isinstance(value, types):
            names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
            raise EvoError(f"{self.where(key)}: {key} must be a {names}, got {value!r}")
        return value

    def require(self, key: str, types: type | tuple = object) -> Any:
        if key not in self.data:
            raise EvoError(f"{self.where()}: missing required key {key!r}")
        return self.get(key, types=types)

    @property
    def name(self) -> str:
        return str(self.get("task", self.path.stem, (str, int)))

    @property
    def kind(self) -> str:
        kind = self.data.get("type", self.data.get("output_type"))
        if kind is None:
            raise EvoError(f"{self.where()}: missing key 'type' (multiple_choice, exact_match or perplexity)")
        return str(kind)

    def dataset(self) -> Path:
        """The data file: ``dataset_file``, or lm-eval's ``dataset_kwargs: {data_files: ...}``;
        relative paths are relative to the YAML."""
        if "dataset_file" in self.data:
            key, name = "dataset_file", self.get("dataset_file", types=str)
        else:
            key = "dataset_kwargs"
            files = (self.get(key, {}, dict) or {}).get("data_files")
            split = self.get("test_split", "test", str)
            name = files.get(split) if isinstance(files, dict) else files
            if not isinstance(name, str):
                raise EvoError(f"{self.where(key)}: missing key 'dataset_file' (the JSONL file beside the YAML)")
        path = (self.path.parent / name).resolve()
        if not path.is_file():
            raise EvoError(f"{self.where(key)}: dataset file {name!r} not found ({path})")
        return path

    def metric(self, choices: tuple[str, ...]) -> str:
        key = "metric_list" if "metric_list" in self.data and "metric" not in self.data else "metric"
        value = self.data.get(key, choices[0])
        if key == "metric_list":
            try:
                value = value[0]["metric"]
            except (TypeError, IndexError, KeyError):
                raise EvoError(f"{self.where(key)}: metric_list must be a list of {{metric: NAME}} mappings") from None
        if value not in choices:
            raise EvoError(f"{self.where(key)}: unknown metric {value!r}; choose from {', '.join(choices)}")
        return str(value)


def read_jsonl(path: Path, limit: int | None = None) -> list[Record]:
    """Records of a JSONL file (blank lines skipped). Every line is parsed, even past ``limit``,
    so a broken file fails at load time however small the subset asked for."""
    records: list[Record] = []
    for number, doc in read_records(path):
        if limit is None or len(records) < limit:
            records.append(Record(doc, f"{path}:{number}"))
    if not records:
        raise EvoError(f"{path}:1: empty task: no records")
    return records


class Template:
    """A YAML value that turns a record into text: a ``{{field}}`` template, a bare field name
    (whose raw value is returned: a list of choices, an answer index), or a literal int."""

    def __init__(self, value: Any, key: str, task_file: TaskFile):
        self.key, self.value = key, value
        self.where = task_file.where(key)
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise EvoError(f"{self.where}: {key} must be a template string, a field name or an int, got {value!r}")
        self.is_template = isinstance(value, str) and ("{{" in value or "{%" in value)
        if self.is_template:
            try:
                self._compiled = _JINJA.from_string(value)
            except TemplateSyntaxError as exc:
                raise EvoError(f"{self.where}: {key}: invalid template ({exc.message})") from None
        elif isinstance(value, str) and not _PATH.match(value):
            raise EvoError(f"{self.where}: {key} names {value!r}, which is not a field name "
                           "(a field, a {{template}}, or an int)")

    def render(self, record: Record) -> Any:
        if isinstance(self.value, int):
            return self.value
        if not self.is_template:
            return self._lookup(self.value, record)
        doc = record.doc if isinstance(record.doc, dict) else {}
        try:
            text = self._compiled.render(**doc)
        except UndefinedError as exc:
            m = _UNDEFINED.search(str(exc))
            name = (m.group(1) or m.group(2)) if m else str(exc)
            raise EvoError(f"{record.where}: {self.key} ({self.value!r}) names field {name!r}, "
                           "missing from the record") from None
        except TemplateError as exc:  # the sandbox's SecurityError included
            raise EvoError(f"{record.where}: {self.key} ({self.value!r}): {exc}") from None
        if self.key in LIST_KEYS and text.strip().startswith("[") and text.strip().endswith("]"):
            try:
                value = ast.literal_eval(text.strip())  # literals only: never code
            except (ValueError, SyntaxError):
                return text
            return value if isinstance(value, list) else text
        return text

    def text(self, record: Record) -> str:
        value = self.render(record)
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise EvoError(f"{record.where}: {self.key} ({self.value!r}) gives {type(value).__name__}, expected text")
        return str(value)

    def _lookup(self, path: str, record: Record) -> Any:
        value: Any = record.doc
        for name, index in _STEP.findall(path):
            step = int(index) if index else name
            try:
                if isinstance(value, list):
                    value = value[int(step)]
                elif isinstance(value, dict):
                    value = value[step]
                else:
                    raise KeyError(step)
            except (KeyError, IndexError, ValueError):
                raise EvoError(f"{record.where}: {self.key} ({self.value!r}) names field {path!r}, "
                               "missing from the record") from None
        return value
