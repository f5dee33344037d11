"""The documentation site describes what exists: it builds strictly, and what its pages name is real.

Every page of ``docs/`` (and the README) is read: each ``precise-rl`` command in a shell block parses
with the CLI's own parser (the commands that need a GPU or real weights cannot run here; the ones the
README's set-up names are run by the end-to-end tests), each ``./dev.sh`` command is one ``dev.sh``
has, each file and config named exists, and the configuration reference holds every key of the
schema with its documentation.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from precise_rl.cli import COMMANDS, build_parser
from precise_rl.config import ExperimentConfig, config_to_dict

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _hook():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "docs" / "hooks" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shell_commands(text: str) -> list[str]:
    """The commands of the page's shell blocks, continuation lines joined and comments dropped."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line.removeprefix("$ "))
    return commands


def _cli_calls() -> list[tuple[str, list[str]]]:
    """(page, argv) of every ``precise-rl`` command in a shell block of any page."""
    calls = []
    for page in PAGES:
        for command in _shell_commands(page.read_text()):
            command = re.sub(r"<[\w-]+>", "VALUE", command)  # a placeholder such as <commit> is one word
            lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            parts: list[list[str]] = [[]]
            for token in lexer:  # a list of commands: split at ;, &&, ||, | and $( )
                if set(token) <= set(";&|()"):
                    parts.append([])
                else:
                    parts[-1].append(token)
            for words in parts:
                if "precise-rl" in words:
                    argv = words[words.index("precise-rl") + 1 :]
                elif "precise_rl.cli" in words:  # accelerate launch ... -m precise_rl.cli train ...
                    argv = words[words.index("precise_rl.cli") + 1 :]
                else:
                    continue
                calls.append((page.relative_to(ROOT).as_posix(), argv))
    return calls


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()
    assert (tmp_path / "site" / "api" / "index.html").is_file()


def _study_hook():
    spec = importlib.util.spec_from_file_location("study_pages", ROOT / "docs" / "hooks" / "study_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_numbers_on_the_site_are_rendered_from_the_studys_json(tmp_path: Path) -> None:
    """Each study page is the command's own report of the JSON kept under docs/data, and each study-map line
    of a page becomes that study's summary table: no study number on the site is typed by hand."""
    from precise_rl.rl.study_report import format_markdown, map_lines

    hook = _study_hook()
    for page in hook.STUDY_PAGES.values():
        result = json.loads((ROOT / "docs" / page["data"]).read_text())
        text = hook.study_page(ROOT / "docs", page)
        assert text.startswith(f"# {page['title']}") and f"`{page['command']}`" in text
        assert format_markdown(result).split("\n", 2)[2] in text
    marked = [p for p in (ROOT / "docs").glob("*.md") if hook.MAP_MARKER.search(p.read_text())]
    assert marked, "no page shows a study's summary"
    for p in marked:
        rendered = hook.render_maps(p.read_text(), ROOT / "docs")
        assert "<!-- study-map" not in rendered
        for rel in hook.MAP_MARKER.findall(p.read_text()):
            lines = map_lines(json.loads((ROOT / "docs" / rel).read_text()))
            assert lines and "\n".join(lines) in rendered
    from precise_rl.rl.compare_report import markdown_table

    compared = [p for p in (ROOT / "docs").glob("*.md") if hook.COMPARE_MARKER.search(p.read_text())]
    assert compared, "no page shows a comparison's table"
    for p in compared:
        rendered = hook.render_compares(p.read_text(), ROOT / "docs")
        assert "<!-- compare-table" not in rendered
        for rel in hook.COMPARE_MARKER.findall(p.read_text()):
            assert "\n".join(markdown_table(json.loads((ROOT / "docs" / rel).read_text()))) in rendered
    bad = "intro\n<!-- study-map: data/no_such_study.json -->\n"
    from mkdocs.exceptions import PluginError

    with pytest.raises(PluginError, match="no_such_study.json"):
        hook.render_maps(bad, ROOT / "docs")


def test_the_signs_studys_reading_quotes_its_json() -> None:
    """The prose under "On the signs task" reads the study's tables in words; the numbers it quotes are
    recomputed here from the JSON the tables come from, so a new study cannot leave the reading behind."""
    section = (ROOT / "docs" / "sampler-study.md").read_text().split("## On the signs task", 1)[1]
    section = " ".join(section.split("\n## ", 1)[0].split())  # one line: a quoted range may wrap
    cells = {c["steps"]: c["protocols"] for c in json.loads((ROOT / "docs/data/study_signs.json").read_text())["cells"]}

    def rewards(protocol: str, names: tuple[str, ...], at: int) -> list[float]:
        return [cells[n][protocol]["samplers"][s]["reward_mean"][at] for n in cells for s in names]

    def span(values: list[float]) -> str:
        return f"{min(values):.2f}-{max(values):.2f}"

    for at, word in ((0, "Before any training"), (-1, "after 10 epochs")):
        quoted = f"{span(rewards('own', ('flow_grpo',), at))} against {span(rewards('own', ('precise', 'cps'), at))}"
        assert quoted in section, f"{word}: the tables give {quoted}"
    lead = [
        cells[n]["own"]["samplers"]["cps"]["reward_mean"][-1]
        - cells[n]["own"]["samplers"]["precise"]["reward_mean"][-1]
        for n in cells
    ]
    assert min(lead) > 0, "the reading says cps ends ahead under own in every cell"
    assert f"by {min(lead):.3f} to {max(lead):.3f}" in section
    for n in (10, 30):
        ode = cells[n]["ode"]["samplers"]
        assert f"{ode['precise']['reward_mean'][-1] - ode['cps']['reward_mean'][-1]:+.3f}" in section
    assert all(cells[n]["ode"]["best_prior"] == "flow_grpo" for n in cells), "flow_grpo sets the ode target everywhere"


def test_the_compare_reading_quotes_its_json() -> None:
    """The reading under the built-in default's comparison quotes what its compare.json holds."""
    text = " ".join((ROOT / "docs" / "sampler-study.md").read_text().split("**The map**", 1)[0].split())
    protocols = json.loads((ROOT / "docs/data/compare_digits.json").read_text())["protocols"]

    def final(protocol: str, run: str) -> str:
        c = protocols[protocol]["samplers"][run]
        return f"{c['final_reward_mean']:.4f} ± {c['final_reward_std']:.4f}"

    assert f"{final('own', 'cps')} against precise's {final('own', 'precise')}" in text
    assert f"{final('ode', 'cps')} against {final('ode', 'precise')}" in text
    reached = [e for e in protocols["ode"]["samplers"]["precise"]["epochs_to_target_per_seed"] if e is not None]
    assert len(reached) == 1 and f"(at {reached[0]:.1f} epochs)" in text
    own = protocols["own"]["samplers"]
    start = (
        f"start at {own['flow_grpo']['initial_reward_mean']:.2f} against {own['precise']['initial_reward_mean']:.2f}"
    )
    assert start in text and f"ends at {own['flow_grpo']['final_reward_mean']:.2f}" in text
    rooms = sorted(p["headroom"] for p in protocols.values())
    assert f"leave {rooms[0]:.0%}-{rooms[-1]:.0%} of the way".replace("%-", "-") in text


def test_the_digits_studys_reading_quotes_its_json() -> None:
    """The split and the broad-data fidelity numbers the digits study's reading quotes are the JSON's."""
    text = " ".join((ROOT / "docs" / "sampler-study.md").read_text().split("## On the signs task", 1)[0].split())
    cells = {c["name"]: c for c in json.loads((ROOT / "docs/data/study_digits.json").read_text())["cells"]}

    def paired(cell: str, a: str, b: str) -> tuple[float, float]:
        runs = cells[cell]["protocols"]["own"]["samplers"]
        diff = [x - y for x, y in zip(runs[a]["final_reward_per_seed"], runs[b]["final_reward_per_seed"], strict=True)]
        mean = sum(diff) / len(diff)
        return mean, (sum((d - mean) ** 2 for d in diff) / len(diff)) ** 0.5

    total, explore, consist = (
        paired("N6-shift3", *pair) for pair in (("precise", "cps"), ("precise", "precise@cps"), ("precise@cps", "cps"))
    )
    assert f"({consist[0]:+.3f} of the {total[0]:+.3f}; exploration {explore[0]:+.3f})" in text
    for cell, pair in (
        ("N30-shift3", ("precise@cps", "cps")),
        ("N20-uniform", ("precise@cps", "cps")),
        ("N10-uniform", ("precise", "precise@cps")),
        ("N10-shift3", ("precise", "precise@cps")),
    ):
        mean, std = paired(cell, *pair)
        assert f"{mean:+.3f} ± {std:.3f}" in text, cell
    broad = {n: cells[n]["fidelity_broad_std_ratio"] for n in ("N20-uniform", "N30-uniform", "N30-shift3")}
    quoted = (
        f"{broad['N20-uniform']['precise']:.3f} for precise against {broad['N20-uniform']['cps']:.3f} for cps "
        "at 20 steps",
        f"{broad['N30-uniform']['precise']:.3f} against {broad['N30-uniform']['cps']:.3f} at 30 "
        f"(ODE {broad['N20-uniform']['ode']:.3f}, {broad['N30-uniform']['ode']:.3f})",
        f"{broad['N30-shift3']['precise']:.3f} against {broad['N30-shift3']['cps']:.3f} at 30 on the shifted grid",
    )
    for q in quoted:
        assert q in text, q


def test_every_page_is_in_the_nav() -> None:
    import yaml

    nav_text = yaml.safe_load((ROOT / "mkdocs.yml").read_text().split("\nnav:", 1)[0] + "\n")
    listed = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M))
    hidden = set((nav_text.get("not_in_nav") or "").split())
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert sorted(pages - listed - hidden) == []
    generated = {"configuration.md", *_study_hook().STUDY_PAGES}
    assert sorted(listed - pages - generated) == [], "the nav lists pages that do not exist"


def test_the_config_reference_has_every_key_with_its_documentation() -> None:
    hook = _hook()
    assert hook.undocumented() == []
    page = hook.reference_markdown()

    mappings = {"model.options", "reward.weights", "reward.options"}  # keys whose value is a mapping

    def keys(d: dict, prefix: str = "") -> list[str]:
        out = []
        for k, v in d.items():
            key = prefix + k
            out += keys(v, key + ".") if isinstance(v, dict) and key not in mappings else [key]
        return out

    for key in keys(config_to_dict(ExperimentConfig())):
        assert f"`{key}`" in page, key


def test_the_config_reference_reads_a_fields_documentation_from_its_source() -> None:
    hook = _hook()

    @dataclasses.dataclass
    class Example:
        #: the first
        #: and its second line
        a: int = 1
        b: str = "x"  #: trailing wins
        c: float = 0.5

    docs = hook.field_docs(Example)
    assert docs == {"a": "the first and its second line", "b": "trailing wins"}
    rows = hook.section_rows(Example, "ex.")
    assert rows == [
        ("ex.a", "an integer", "`1`", "the first and its second line"),
        ("ex.b", "a string", '`"x"`', "trailing wins"),
        ("ex.c", "a number", "`0.5`", ""),
    ]


def test_pages_show_shell_commands() -> None:
    assert len(_cli_calls()) >= 10


@pytest.mark.parametrize("page,argv", _cli_calls(), ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60])
def test_every_command_shown_parses(page: str, argv: list[str]) -> None:
    assert argv, f"{page}: a bare precise-rl"
    if argv[0].startswith("-"):
        build_parser().parse_args(argv)
        return
    assert argv[0] in COMMANDS, f"{page}: no command {argv[0]!r}"
    try:
        build_parser(argv[0]).parse_args(argv)
    except SystemExit as exit_:  # only --help and --version exit 0
        assert exit_.code == 0, f"{page}: precise-rl {' '.join(argv)} does not parse"


def test_every_dev_sh_command_shown_exists() -> None:
    script = (ROOT / "dev.sh").read_text()
    known = set(re.findall(r"^  (\w[\w-]*)\)", script, flags=re.M))
    for page in PAGES:
        for command in _shell_commands(page.read_text()):
            for name in re.findall(r"\./dev\.sh (\w[\w-]*)", command):
                assert name in known, f"{page.name}: ./dev.sh {name}"


def test_every_file_named_on_a_page_exists() -> None:
    missing = []
    for page in PAGES:
        text = page.read_text()
        paths = set(re.findall(r"`((?:configs|benchmarks|src/precise_rl|tests|docs)/[\w./-]+)`", text))
        paths |= set(re.findall(r"(?<![\w/])((?:configs|benchmarks)/[\w./-]+\.(?:ya?ml|py))", text))
        missing += [f"{page.name}: {p}" for p in sorted(paths) if not (ROOT / p).exists()]
    assert missing == []
