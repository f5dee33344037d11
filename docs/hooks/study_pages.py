"""The site's study numbers, rendered from the JSON a study wrote when the site is built.

``precise-rl study`` writes ``study.json`` beside its Markdown report. The JSON of each study the site
shows is kept under ``docs/data/``; this hook renders from it, with the functions the command itself
uses (``precise_rl.rl.study_report``):

- each page of ``STUDY_PAGES``: the study's full report, as the command wrote it, under a line naming
  the command and the machine;
- a ``<!-- study-map: data/FILE.json -->`` line in any page: the one-row-per-cell summary
  (``map_lines``);
- a ``<!-- compare-table: data/FILE.json -->`` line: the table of a ``compare.json``, as
  ``precise-rl compare`` writes it in ``compare.md`` (``precise_rl.rl.compare_report``).

So no number of a study on the site is typed by hand: a new study's JSON replaces the old one and the
pages follow. MkDocs loads this file as a hook (``hooks:`` in ``mkdocs.yml``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

#: generated page -> the study's JSON (relative to docs/), the command that wrote it, and where it ran
STUDY_PAGES = {
    "study.md": {
        "data": "data/study_digits.json",
        "title": "Study results: the digits task",
        "command": "precise-rl study --output runs/study --workers 2",
        "machine": "the 2-core development machine",
    },
    "study-signs.md": {
        "data": "data/study_signs.json",
        "title": "Study results: the signs task",
        "command": "precise-rl study configs/signs_precise.yaml --seeds 2 --output runs/study-signs",
        "machine": "the 2-core development machine (32 runs, 4947 s of run time on 2 workers: about 41 min)",
    },
}

MAP_MARKER = re.compile(r"^<!-- study-map: (\S+) -->$", re.M)
COMPARE_MARKER = re.compile(r"^<!-- compare-table: (\S+) -->$", re.M)


def _load(docs_dir: Path, rel: str) -> dict[str, Any]:
    from mkdocs.exceptions import PluginError

    path = docs_dir / rel
    if not path.is_file():
        raise PluginError(f"the data {path} named in docs/hooks/study_pages.py or a page's marker line is missing")
    return json.loads(path.read_text())


def study_page(docs_dir: Path, page: dict[str, str]) -> str:
    """The full report of one study, as ``precise-rl study`` writes it, under a line saying where it came from."""
    from precise_rl.rl.study_report import format_markdown

    report = format_markdown(_load(docs_dir, page["data"]))
    body = report.split("\n", 2)[2]  # the command's own "# Sampler study" title gives way to the page's
    head = (
        f"# {page['title']}\n\nWritten by `{page['command']}` on {page['machine']}; rendered when the site is "
        f"built from the study's own `study.json` ([`{page['data']}`]({page['data']})) by the function the "
        "command uses for its `study.md`.\n\n"
    )
    return head + body


def render_maps(markdown: str, docs_dir: Path) -> str:
    """Each ``<!-- study-map: FILE -->`` line replaced by the summary table of that study."""
    from precise_rl.rl.study_report import map_lines

    def table(match: re.Match[str]) -> str:
        lines = map_lines(_load(docs_dir, match.group(1)))
        if not lines:
            from mkdocs.exceptions import PluginError

            raise PluginError(f"{match.group(1)}: the study ran no precise, cps and precise@cps to summarise")
        return "\n".join(lines)

    return MAP_MARKER.sub(table, markdown)


def render_compares(markdown: str, docs_dir: Path) -> str:
    """Each ``<!-- compare-table: FILE -->`` line replaced by the table ``precise-rl compare`` writes."""
    from precise_rl.rl.compare_report import markdown_table

    return COMPARE_MARKER.sub(lambda m: "\n".join(markdown_table(_load(docs_dir, m.group(1)))), markdown)


def on_files(files: Any, config: Any) -> Any:
    """MkDocs hook: add each study page."""
    from mkdocs.structure.files import File

    for name, page in STUDY_PAGES.items():
        files.append(File.generated(config, name, content=study_page(Path(config["docs_dir"]), page)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs hook: the study-map and compare-table lines of a page."""
    return render_compares(render_maps(markdown, Path(config["docs_dir"])), Path(config["docs_dir"]))
