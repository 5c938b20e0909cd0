"""Score answers with a trained reward model, from Python or the command line.

    python -m alignlab.score --model outputs/rm/<run>/model --input rows.jsonl --output scored.jsonl

Input rows are `{"prompt": ..., "completion": ...}` or `{"messages": [..., assistant answer]}` (JSONL,
JSON, CSV or Parquet); each output row is its input row plus `"score"`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from alignlab.models.reward import RewardScorer

__all__ = ["RewardScorer", "main"]  # RewardScorer lives with the reward model; importable from here too


def main(argv: Sequence[str] | None = None) -> int:
    from alignlab.data.files import read_rows, write_jsonl
    from alignlab.data.rows import to_canonical
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
        rows = [to_canonical(r, "sft", args.input, i + 1) for i, r in enumerate(raw)]
        scorer = RewardScorer(args.model, device=args.device, batch_size=args.batch_size)
    except (AlignlabError, FileNotFoundError, OSError) as e:
        print(f"alignlab.score: error: {e}", file=sys.stderr)
        return 1
    scores = scorer.score([r["prompt"] for r in rows], [r["completion"] for r in rows])
    # the reader fills absent columns with null: leave them out
    kept = [{k: v for k, v in row.items() if v is not None} for row in raw]
    write_jsonl(args.output, [{**row, "score": score} for row, score in zip(kept, scores)])
    print(f"alignlab.score: wrote {len(scores)} scores to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
