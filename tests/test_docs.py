"""The docs hold: README.md and docs/*.md link only to what exists, name only modules and files that
exist, keep the generated hyper-parameter tables current with conf/algorithm/, list only metrics the
code logs, and give commands whose overrides compose."""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from alignlab.runner import hparam_docs
from alignlab.runner.preflight import algorithm_hparams, check_algorithm_overrides
from tests.conftest import CONF, ROOT, compose

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ALGORITHMS = sorted(p.stem for p in (CONF / "algorithm").glob("*.yaml"))
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# Repository paths as the docs name them: not inside another path (~/.cache/alignlab/…), not run outputs.
PATH = re.compile(r"(?<![\w./~-])((?:alignlab|tests|experiments|conf|notebooks)/[\w./-]*[\w/])")
OUTPUTS = ("experiments/out/",)
DOTTED = re.compile(r"(?<![\w./-])alignlab(?:\.[A-Za-z_]\w*)+")
NOT_MODULES = {"alignlab.log"}  # the run folder's log file


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code, where links and headings are not links."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors for a page: lower case, punctuation dropped, spaces to hyphens,
    a repeated heading numbered -1, -2, …"""
    seen: dict[str, int] = {}
    for line in FENCE.sub("", path.read_text()).splitlines():
        if match := re.match(r"#{1,6} +(.+?) *#*$", line):
            text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1))  # a link's text
            slug = re.sub(r"[^\w\- ]", "", text.replace("`", "").replace("*", "").lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {page_id(path)}")
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_path_and_module_named_exists(page):
    text = page.read_text()
    missing = [p for p in PATH.findall(text) if not p.startswith(OUTPUTS) and not (ROOT / p).exists()]
    for name in sorted(set(DOTTED.findall(text)) - NOT_MODULES):
        if not resolves(name):
            missing.append(name)
    for module, names in re.findall(r"^from (alignlab[\w.]*) import ([\w, ]+)$", text, re.M):
        missing += [f"{module}.{n}" for n in names.replace(" ", "").split(",") if not resolves(f"{module}.{n}")]
    assert missing == []


def resolves(dotted: str) -> bool:
    """Whether `a.b.c` is a module, or an attribute of the longest module prefix that imports."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_readme_starts_with_the_two_set_up_commands_ci_runs():
    """.ci/run takes the first `pip install … pytest` line of the README as the test command."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[2] == "```bash" and lines[3].startswith("pip install torch==2.13.0 -e . && python -m alignlab ")
    assert lines[4].startswith('pip install torch==2.13.0 -e ".[dev]" && python -m pytest -q -n auto ')
    assert next(line for line in lines if re.match(r"^pip install .*pytest", line)) == lines[4]


def test_readme_algorithm_table_lists_every_algorithm():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Algorithms") : readme.index("## The code at a glance")]
    listed = re.findall(r"^\| \[\w+\]\(docs/algorithms\.md#\w+\) \| `(\w+)` \|", table, re.M)
    assert listed and sorted(listed) == ALGORITHMS


# -- hyper-parameters: generated from conf/algorithm/*.yaml -----------------------------------------
def test_generated_hyper_parameter_blocks_are_current():
    text = hparam_docs.DOCS.read_text()
    assert hparam_docs.regenerate(text) == text, "run python -m alignlab.runner.hparam_docs"
    assert hparam_docs.main(["--check"]) == 0


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_key_is_documented(algorithm):
    blocks = {(m.group(2), m.group(3)): m.group(4) for m in hparam_docs.BLOCK.finditer(hparam_docs.DOCS.read_text())}
    table = blocks[(algorithm, "hyper-parameters")]
    assert re.findall(r"^\| `(\w+)` \|", table, re.M) == algorithm_hparams(algorithm)
    for key in algorithm_hparams(algorithm):
        meaning = re.search(rf"^\| `{key}` \| [^|]+ \| (.+) \|$", table, re.M).group(1)
        assert len(meaning) > 10, f"{algorithm}.{key}: say what it means in conf/algorithm/{algorithm}.yaml"
    assert blocks[(algorithm, "description")].strip()


def test_check_fails_on_a_stale_table(tmp_path, monkeypatch):
    stale = tmp_path / "algorithms.md"
    stale.write_text(hparam_docs.DOCS.read_text().replace("| `beta` | 0.1 |", "| `beta` | 0.2 |", 1))
    monkeypatch.setattr(hparam_docs, "DOCS", stale)
    assert hparam_docs.main(["--check"]) == 1
    assert hparam_docs.main([]) == 0 and hparam_docs.main(["--check"]) == 0


# -- metrics: each documented name is logged by the algorithms the table names ------------------------
LOGGED_BY_LIGHTNING = {"lr-AdamW": "LearningRateMonitor"}  # "lr-" + the optimizer's class name


def metric_rows() -> list[tuple[str, list[str]]]:
    """(metric name, [algorithm names]) for each name in docs/metrics.md's table."""
    rows, previous = [], []
    for names, who in re.findall(r"^\| (`[^|]+`) \| ([^|]+) \|", (ROOT / "docs" / "metrics.md").read_text(), re.M):
        who = re.sub(r"\([^)]*\)", "", who).strip()
        if who == "same":
            algorithms = previous
        elif who.endswith("all"):  # "all", "eval, all"
            algorithms = ALGORITHMS
        elif who.startswith("all but "):
            algorithms = [a for a in ALGORITHMS if a not in {w.strip().lower() for w in who[8:].split(",")}]
        else:
            algorithms = [w.strip().lower() for w in who.split(",")]
        previous = algorithms
        rows += [(name, algorithms) for name in re.findall(r"`([^`]+)`", names)]
    return rows


def algorithm_sources(algorithm: str) -> str:
    """The source of an algorithm's module, its base classes' modules and the alignlab modules they
    import: where the names it logs are written."""
    target = OmegaConf.load(CONF / "algorithm" / f"{algorithm}.yaml")._target_
    module, _, name = target.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    modules = {c.__module__ for c in cls.__mro__ if c.__module__.startswith("alignlab.")}
    for mod in list(modules):
        for node in ast.walk(ast.parse(Path(importlib.import_module(mod).__file__).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("alignlab."):
                modules.add(node.module)
    return "\n".join(Path(importlib.import_module(m).__file__).read_text() for m in sorted(modules))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_documented_metric_is_in_its_algorithms_source(algorithm):
    rows = [name for name, algorithms in metric_rows() if algorithm in algorithms]
    assert rows, f"docs/metrics.md lists no metric for {algorithm}"
    source, missing = algorithm_sources(algorithm), []
    for name in rows:
        if name in LOGGED_BY_LIGHTNING:
            ok = LOGGED_BY_LIGHTNING[name] in (CONF / "callbacks" / "default.yaml").read_text()
        else:  # a string literal, a keyword argument, or an f-string with {…} where the docs write <…>
            pattern = re.sub(r"<\w+>", r"{[^}]+}", re.escape(name).replace(r"\<", "<").replace(r"\>", ">"))
            ok = re.search(rf"""(["']{pattern}["']|\b{pattern}=)""", source) is not None
        if not ok:
            missing.append(name)
    assert missing == [], f"docs/metrics.md lists {missing} for {algorithm}, which its source does not log"


# -- commands: every `python -m alignlab …` line in the docs composes -------------------------------
def commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(), re.S | re.M):
            for line in block.splitlines():
                if re.match(r"(pip install .*&& )?python -m alignlab ", line):
                    found.append((page_id(page), line.split("python -m alignlab ", 1)[1]))
    return found


@pytest.mark.parametrize(("page", "command"), commands(), ids=[f"{p}: {c[:60]}" for p, c in commands()])
def test_every_documented_command_composes(page, command, tmp_path):
    """The overrides of each command name groups, options and keys that exist (a sweep's first value
    stands for its others); the paths it names are the user's, so the run itself is not started."""
    command = re.sub(r"<[^>]+>", "placeholder", command)  # outputs/sft/<run>/model: the user's own folder
    args = [a for a in shlex.split(command, comments=True) if not a.startswith("-")]
    parsed = OverridesParser.create().parse_overrides(args)
    check_algorithm_overrides({o.key_or_group: o for o in parsed})
    overrides = []
    for override in parsed:
        value = next(override.sweep_string_iterator()) if override.is_sweep_override() else None
        overrides.append(f"{override.get_key_element()}={value}" if value is not None else override.input_line)
    compose(overrides, output_dir=tmp_path)


def test_every_documented_script_flag_exists():
    for page in PAGES:
        for script, flags in re.findall(r"^python (experiments/\w+\.py)((?: [^#\n]*)?)", page.read_text(), re.M):
            source = (ROOT / script).read_text()
            for flag in re.findall(r"(--[\w-]+)", flags):
                assert f'"{flag}"' in source, f"{page_id(page)}: {script} has no {flag}"
