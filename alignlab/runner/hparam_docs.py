"""The hyper-parameter tables of docs/algorithms.md, generated from conf/algorithm/*.yaml.

An algorithm's YAML (with the partials its `defaults:` list includes, conf/_partials/algorithm/) is the one
place its hyper-parameters are written down: each key, its default and the comment after it (continued on
the indented comment lines right below it), and the file's opening comment, which describes the algorithm.
A partial's keys are documented under every algorithm that includes it. This module rewrites what lies
between the markers

    <!-- generated: dpo description -->        ...  <!-- end generated -->
    <!-- generated: dpo hyper-parameters -->   ...  <!-- end generated -->

in docs/algorithms.md and leaves the hand-written prose around them as it is:

    python -m alignlab.runner.hparam_docs           # rewrite the blocks from conf/algorithm/
    python -m alignlab.runner.hparam_docs --check   # exit 1, naming what is stale, if the file is not current
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import yaml

from alignlab.runner.preflight import CONFIG_DIR, algorithm_hparams, option_files

DOCS = CONFIG_DIR.parent / "docs" / "algorithms.md"
BLOCK = re.compile(r"(<!-- generated: (\w+) (description|hyper-parameters) -->\n)(.*?)(<!-- end generated -->)", re.S)
KEY_LINE = re.compile(r"^(\w+):(.*)$")  # a top-level key; its value and comment are split at the first " #"


@dataclass
class HyperParameter:
    """One top-level key of conf/algorithm/<name>.yaml: a row of its table in docs/algorithms.md."""

    key: str
    default: str  # as the YAML writes it
    meaning: str  # the trailing comment, continuation lines joined


def read_algorithm(name: str) -> tuple[str, list[HyperParameter]]:
    """(description, hyper-parameters in composed order) of conf/algorithm/<name>.yaml and its partials.

    Raises ValueError when a hyper-parameter has no comment, or is not a key of the file's top level."""
    path = CONFIG_DIR / "algorithm" / f"{name}.yaml"
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    # the file's keys and those of the partials it includes (conf/_partials/, e.g. GRPO's and PPO's vllm_*)
    lines = [line for file in option_files("algorithm", name) for line in ["", *file.read_text().splitlines()]]
    keys, comments, defaults, current = set(algorithm_hparams(name)), {}, {}, None
    for line in lines:
        if (match := KEY_LINE.match(line)) is not None:
            value, _, comment = match.group(2).partition(" #")
            current = match.group(1) if match.group(1) in keys else None
            if current is not None:
                defaults[current], comments[current] = value.strip(), [comment.strip()]
        elif current is not None and line[:1].isspace() and line.lstrip().startswith("#"):
            comments[current].append(line.lstrip().lstrip("#").strip())  # the comment goes on below its key
        else:
            current = None
    params = []
    for key in algorithm_hparams(name):
        if key not in defaults:
            raise ValueError(f"{path}: `{key}` is not written as `{key}: value  # meaning` at the top level")
        meaning = " ".join(c for c in comments[key] if c)
        if not meaning:
            raise ValueError(f"{path}: `{key}` has no comment saying what it means")
        params.append(HyperParameter(key, defaults[key], meaning))
    return " ".join(header), params


def format_default(text: str) -> str:
    """A default as the tables show it: strings and lists as code, numbers, booleans and null plain."""
    if text == "???":
        return "required"
    value = yaml.safe_load(text)
    return f"`{text}`" if isinstance(value, (str, list, dict)) else text


def cell(text: str) -> str:
    return text.replace("|", r"\|")


def render(name: str, part: str) -> str:
    """The generated text of one block: the algorithm's description, or its table."""
    description, params = read_algorithm(name)
    if part == "description":
        return f"`algorithm={name}` ([conf/algorithm/{name}.yaml](../conf/algorithm/{name}.yaml)): {description}\n"
    if not params:
        return "No hyper-parameters of its own.\n"
    rows = [f"| `{p.key}` | {cell(format_default(p.default))} | {cell(p.meaning)} |" for p in params]
    return "\n".join(["| key | default | meaning |", "|---|---|---|", *rows]) + "\n"


def regenerate(text: str) -> str:
    """`text` (docs/algorithms.md) with every generated block rewritten from conf/algorithm/.

    Raises ValueError naming the algorithms that have no block of each kind, or blocks naming none."""
    names = sorted(p.stem for p in (CONFIG_DIR / "algorithm").glob("*.yaml"))
    found = {(m.group(2), m.group(3)) for m in BLOCK.finditer(text)}
    missing = [f"{n} {part}" for n in names for part in ("description", "hyper-parameters") if (n, part) not in found]
    unknown = [f"{n} {part}" for n, part in sorted(found) if n not in names]
    if missing or unknown:
        raise ValueError(f"{DOCS}: no block for {missing}; blocks for no algorithm {unknown}")
    return BLOCK.sub(lambda m: m.group(1) + render(m.group(2), m.group(3)) + m.group(5), text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignlab.runner.hparam_docs", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/algorithms.md is not current")
    args = parser.parse_args(argv)
    text = DOCS.read_text()
    current = regenerate(text)
    if args.check:
        if current != text:
            print(f"{DOCS} is stale: run python -m alignlab.runner.hparam_docs", file=sys.stderr)
            return 1
        return 0
    DOCS.write_text(current)
    return 0


if __name__ == "__main__":
    sys.exit(main())
