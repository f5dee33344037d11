"""The site's configuration reference, generated from the config dataclasses when the site is built.

Every key of ``precise_rl.config.ExperimentConfig`` (nested sections included) and every knob of each
algorithm of ``precise_rl.algorithm_table`` becomes one row: key, type, default and the one-line doc
that stands beside the field in the source (a ``#:`` comment on the field's line or on the lines just
above it). Nothing here is typed by hand, so the page cannot drift from the schema; a field without a
doc fails the build (``mkdocs build --strict``) and ``tests/test_docs_site.py``.

MkDocs loads this file as a hook (``hooks:`` in ``mkdocs.yml``) and adds the page as a generated file.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
import typing
from typing import Any

PAGE = "configuration.md"

INTRO = """# Configuration reference

Generated from the config dataclasses (`precise_rl.config`) and the algorithm table
(`precise_rl.algorithm_table`) each time the site is built: every key, its type, its default and the
line of documentation beside it in the source.

A config is a YAML file of these sections; any key can also be set on the command line as a dotted
override after the config (`precise-rl train configs/digits_precise.yaml train.epochs=20 sampler.eta=1.0`).
An unknown key, a wrong type or a value out of range is refused with one sentence naming the key.
`precise-rl train` with no config runs the defaults below (written out in `configs/digits_precise.yaml`).
"""


def field_docs(cls: type) -> dict[str, str]:
    """The ``#:`` documentation of each field of dataclass ``cls``, read from its source.

    A trailing ``#:`` comment on the field's line wins; otherwise the ``#:`` comment lines right above
    it, joined with spaces.
    """
    source = textwrap.dedent(inspect.getsource(cls))
    docs: dict[str, str] = {}
    pending: list[str] = []
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string for tok in tokens if tok.type == tokenize.COMMENT}
    names = {f.name for f in dataclasses.fields(cls)}
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        head = stripped.split(":", 1)[0].strip()
        if head in names and line.startswith("    ") and not line.startswith("     "):
            comment = comments.get(number, "")
            if comment.startswith("#:"):
                docs[head] = comment[2:].strip()
            elif pending:
                docs[head] = " ".join(pending)
        if stripped and not stripped.startswith("#"):
            pending = []
    return docs


def _type_text(tp: Any) -> str:
    from precise_rl.config import _type_name  # the words the config's own error messages use

    return _type_name(tp)


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "(section)"
    return "`" + json.dumps(value) + "`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def section_rows(cls: type, prefix: str) -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for each field of dataclass ``cls``; nested sections are expanded."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    rows: list[tuple[str, str, str, str]] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(section_rows(tp, key + "."))
            continue
        rows.append((key, _type_text(tp), _default_text(f), docs.get(f.name, "")))
    return rows


def undocumented() -> list[str]:
    """Keys without a line of documentation (the build refuses them)."""
    return [key for key, _, _, doc in all_rows() if not doc]


def all_rows() -> list[tuple[str, str, str, str]]:
    from precise_rl.algorithm_table import ALGORITHM_TABLE
    from precise_rl.config import ExperimentConfig

    hints = typing.get_type_hints(ExperimentConfig)
    docs = field_docs(ExperimentConfig)
    rows: list[tuple[str, str, str, str]] = []
    for f in dataclasses.fields(ExperimentConfig):
        if f.name == "algorithm":  # its knobs depend on algorithm.name: one group of rows per algorithm
            rows.append(("algorithm.name", "a string", '`"grpo"`', "the algorithm: " + ", ".join(ALGORITHM_TABLE)))
            for name, entry in ALGORITHM_TABLE.items():
                rows.extend(section_rows(entry.knobs, f"algorithm.{{{name}}}."))
        elif dataclasses.is_dataclass(hints[f.name]):
            rows.extend(section_rows(hints[f.name], f.name + "."))
        else:
            rows.append((f.name, _type_text(hints[f.name]), _default_text(f), docs.get(f.name, "")))
    return rows


def reference_markdown() -> str:
    """The whole page: one table per top-level section, one per algorithm's knobs."""
    from precise_rl.algorithm_table import ALGORITHM_TABLE

    out = [INTRO]
    groups: dict[str, list[tuple[str, str, str, str]]] = {}
    for row in all_rows():
        key = row[0]
        if key.startswith("algorithm.{"):
            group = "algorithm: " + key.split("{", 1)[1].split("}", 1)[0]
            key = "algorithm." + key.split("}.", 1)[1]
        else:
            group = key.split(".", 1)[0] if "." in key else "top level"
        groups.setdefault(group, []).append((key, *row[1:]))
    for group, rows in groups.items():
        if group.startswith("algorithm: "):
            name = group.split(": ", 1)[1]
            entry = ALGORITHM_TABLE[name]
            out.append(f"## `algorithm.name: {name}`\n")
            out.append(f"{entry.summary} Samplers: `{entry.samplers}`; default sampler `{entry.default_sampler}`.")
            if entry.reference:
                out.append(f"Reference: {entry.reference}.")
            out.append("")
        else:
            out.append(f"## `{group}`\n" if group != "top level" else "## Top level\n")
        out.append("| key | type | default | what it does |")
        out.append("| --- | --- | --- | --- |")
        for key, type_text, default, doc in rows:
            out.append(f"| `{key}` | {_cell(type_text)} | {_cell(default)} | {_cell(doc)} |")
        out.append("")
    return "\n".join(out)


def on_files(files: Any, config: Any) -> Any:
    """MkDocs hook: add the generated page (refusing the build when a key has no documentation)."""
    from mkdocs.exceptions import PluginError
    from mkdocs.structure.files import File

    missing = undocumented()
    if missing:
        raise PluginError("config keys without a '#:' line of documentation: " + ", ".join(missing))
    files.append(File.generated(config, PAGE, content=reference_markdown()))
    return files
