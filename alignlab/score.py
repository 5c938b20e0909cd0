"""Score answers with a trained reward model, from Python or the command line.

    python -m alignlab.score --model outputs/rm/<run>/model --input rows.jsonl --output scored.jsonl

Input rows are `{"prompt": ..., "completion": ...}` or `{"messages": [..., assistant answer]}` (JSONL,
JSON, CSV or Parquet); each output row is its input row plus `"score"`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from alignlab.data.collate import collate_answers
from alignlab.data.tokenize import encode_conversations, fit_answer
from alignlab.models.reward import RewardModel


class RewardScorer:
    """One float per (prompt, answer), batched, on any device; prompts are text or message lists.

    The answer is tokenised exactly as in training (chat-template prompt, answer + eos) and the
    reward is read at its last token.
    """

    def __init__(
        self,
        folder: str | Path,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        max_length: int | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        from alignlab.models.loading import tokenizer_from_pretrained

        self.device, self.batch_size, self.max_length = torch.device(device), batch_size, max_length
        self.tokenizer = tokenizer_from_pretrained(folder)
        self.model = RewardModel.from_pretrained(folder, dtype=dtype).to(self.device).eval()

    @torch.no_grad()
    def score(self, prompts: Sequence[str | list[dict]], answers: Sequence[str]) -> list[float]:
        if len(prompts) != len(answers):
            raise ValueError(f"got {len(prompts)} prompts and {len(answers)} answers")
        messages = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
        scores: list[float] = []
        for start in range(0, len(messages), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            encoded = encode_conversations(self.tokenizer, messages[chunk], [[a] for a in answers[chunk]])
            p_ids, a_ids = [p for p, _ in encoded], [a for _, (a,) in encoded]
            if self.max_length:
                a_ids = [fit_answer(len(p), a, self.max_length) or a[:1] for p, a in zip(p_ids, a_ids)]
            batch = collate_answers(p_ids, a_ids, self.tokenizer.pad_token_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            scores += self.model(batch["input_ids"], batch["attention_mask"], batch["loss_mask"]).float().tolist()
        return scores

    def score_messages(self, conversations: Sequence[list[dict]]) -> list[float]:
        """Conversations that end in the assistant answer to score."""
        return self.score([c[:-1] for c in conversations], [c[-1]["content"] for c in conversations])

    def __call__(self, prompts: Sequence[str | list[dict]], completions: Sequence[str], **columns) -> list[float]:
        """The reward-function signature: extra data columns are accepted and ignored."""
        return self.score(prompts, completions)


def main(argv: Sequence[str] | None = None) -> int:
    from alignlab.data.files import read_rows
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
    out = Path(args.output)
    tmp = out.with_name(out.name + ".partial")  # written whole, then renamed: never half a file
    with open(tmp, "w") as f:
        for row, score in zip(raw, scores):
            kept = {k: v for k, v in row.items() if v is not None}  # the reader fills absent columns with null
            f.write(json.dumps({**kept, "score": score}) + "\n")
    os.replace(tmp, out)
    print(f"alignlab.score: wrote {len(scores)} scores to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
