"""Score answers with a trained reward model, from Python or the command line.

    python -m alignlab.score --model outputs/rm/<run>/model --input rows.jsonl --output scored.jsonl

Input rows are `{"prompt": ..., "completion": ...}` or `{"messages": [..., assistant answer]}` (JSONL,
JSON, CSV or Parquet; any SFT form `docs/data.md` lists); each output row is its input row plus `"score"`.
An empty answer (empty or blank text) is an answer like any other, usually a bad one: it is scored, and
the command says how many there were. Any other unreadable row stops the command, naming file, row and
field, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from alignlab.models.reward import RewardScorer

__all__ = ["RewardScorer", "main", "read_answer"]  # RewardScorer lives with the reward model; importable here too

# Stands in for an empty answer while the row is read (the readers refuse empty answers for training); a
# private-use character, which no row holds and which is not blank.
_EMPTY = "\ue000"


def read_answer(raw: dict, source: str, index: int) -> tuple[list[dict], str]:
    """(prompt messages, answer text) of one input row, in any SFT form alignlab reads, the answer as
    given even when it is empty or blank (which training refuses, but which is a legitimate answer to score).

    Raises:
        DataError: naming the file, row and field, for a row that cannot be read for another reason.
    """
    from alignlab.data.formats import normalise
    from alignlab.data.rows import to_canonical
    from alignlab.errors import DataError

    try:
        row = to_canonical(raw, "sft", source, index)
        return row["prompt"], row["completion"]
    except DataError:
        read = normalise(raw, "sft", source, index) if isinstance(raw, dict) else raw
        filled = _fill_empty_answer(read) if isinstance(read, dict) else None
        if filled is None:
            raise
        row, text = to_canonical(filled[0], "sft", source, index), filled[1]
        if row["completion"] != _EMPTY:  # the stand-in was not what the row's answer is read from
            raise
        return row["prompt"], text


def _fill_empty_answer(row: dict) -> tuple[dict, str] | None:
    """(the row with its empty answer replaced by the stand-in, the answer's text), where the answer is
    the last assistant message of `messages`, else `completion` (else `chosen`), as SFT rows are read;
    None when that answer is not empty."""
    from alignlab.data.formats import blank

    field = next((f for f in ("messages", "completion", "chosen") if row.get(f) is not None), None)
    value = row.get(field)
    if field == "messages" and isinstance(value, str):
        try:  # CSV cells carry message lists as JSON text
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, str) and field != "messages":
        return ({**row, field: _EMPTY}, value) if blank(value) else None
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        content = value[-1].get("content")
        if isinstance(content, str) and blank(content):
            return {**row, field: [*value[:-1], {**value[-1], "content": _EMPTY}]}, content
    return None


def main(argv: Sequence[str] | None = None) -> int:
    from alignlab.data.files import read_rows, write_jsonl
    from alignlab.data.formats import blank
    from alignlab.errors import AlignlabError

    parser = argparse.ArgumentParser(prog="python -m alignlab.score", description="Score answers with a reward model.")
    parser.add_argument("--model", required=True, help="a reward-model folder (config.json + value_head.safetensors)")
    parser.add_argument("--input", required=True, help="rows with prompt/completion or messages")
    parser.add_argument("--output", required=True, help="JSONL file to write: each input row plus `score`")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        raw = read_rows(args.input)
        rows = [read_answer(r, args.input, i + 1) for i, r in enumerate(raw)]
        scorer = RewardScorer(args.model, device=args.device, batch_size=args.batch_size)
    except (AlignlabError, FileNotFoundError, OSError) as e:
        print(f"alignlab.score: error: {e}", file=sys.stderr)
        return 1
    scores = scorer.score([prompt for prompt, _ in rows], [answer for _, answer in rows])
    # the reader fills absent columns with null: leave them out
    kept = [{k: v for k, v in row.items() if v is not None} for row in raw]
    write_jsonl(args.output, [{**row, "score": score} for row, score in zip(kept, scores)])
    empty = sum(blank(answer) for _, answer in rows)
    said = f" ({empty} of them for empty answers, scored as given)" if empty else ""
    print(f"alignlab.score: wrote {len(scores)} scores to {args.output}{said}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
