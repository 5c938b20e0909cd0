"""Data sets the data tests write: rows, JSONL files, and folders laid out as Hub data set repositories."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def uf_row(a: int, b: int) -> dict:
    """A row shaped as HuggingFaceH4/ultrafeedback_binarized's: the prompt as text, both answers as
    whole conversations, and score columns."""
    prompt = f"{a}+{b}="
    return {
        "prompt": prompt,
        "prompt_id": f"id-{a}-{b}",
        "chosen": [user(prompt), assistant(str(a + b))],
        "rejected": [user(prompt), assistant(str(a + b + 1))],
        "score_chosen": 8.0,
        "score_rejected": 3.5,
    }


def write_uf_folder(root: Path, n_train: int = 30, n_test: int = 6, shards: int = 2) -> Path:
    """data/train_prefs-0000k-of-0000n.parquet (n shards) and data/test_prefs-00000-of-00001.parquet."""
    (root / "data").mkdir(parents=True)
    rows = [uf_row(i, i + 1) for i in range(n_train)]
    per = -(-n_train // shards)
    for k in range(shards):
        part = pd.DataFrame(rows[k * per : (k + 1) * per])
        part.to_parquet(root / "data" / f"train_prefs-{k:05d}-of-{shards:05d}.parquet")
    test = pd.DataFrame([uf_row(100 + i, 1) for i in range(n_test)])
    test.to_parquet(root / "data" / "test_prefs-00000-of-00001.parquet")
    (root / "README.md").write_text("---\nconfigs: []\n---\n")  # a card beside the data is not data
    return root


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs(tag: str, n: int) -> list[dict]:
    return [{"prompt": f"{tag}{i}", "chosen": "yes", "rejected": "no"} for i in range(n)]


def prompts_of(rows: list[dict]) -> list[str]:
    return [r["prompt"][0]["content"] for r in rows]
