"""Benchmark: padded against padding-free (packed) answer log-probs, one forward + backward per micro-batch.

    OMP_NUM_THREADS=2 python experiments/bench_padding_free.py --out experiments/out/bench_padding_free

The 30M-parameter Qwen2 of experiments/bench_trl.py (MODELS["30M"], float32, CPU) scores micro-batches
of that benchmark's DPO pairs (chat-templated prompt + answer, log-normal lengths: a median of about 220
tokens per sequence, up to about 700; 463 in the batches measured) through answer_logprobs
(alignlab.models.logprobs): padded (padding_free=False), packed into rows as long as the longest
sequence (padding_free=True, the rule answer_logprobs uses) and packed into one row (PACKED_ROW_TOKENS
set past the batch's tokens). Micro-batches: the first 2 and the first 8 pairs of the data (B chosen then
B rejected rows, as a pairwise batch is laid out), and 8 pairs of similar length (the middle 8 of 64
pairs sorted by their longest sequence, as length-grouped or token-budget micro-batches are).

Each (micro-batch, variant) runs in its own process, so its peak memory (RSS, a process's high-water
mark) is its own: one warm-up forward + backward, then `--steps` timed ones (their median). Each is
repeated `--repeats` times, the variants' order reversed every other time, since the machine is shared; the table
shows the medians over repeats. "max Δ logp" is the largest difference of a sequence's log-prob from the
padded one's (float32 rounding). Results: experiments/results/bench_padding_free_cpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trl import model_folder, peak_memory_mb, write_data  # noqa: E402

# name → (padding_free, alignlab.models.logprobs.PACKED_ROW_TOKENS): packed rows as long as the longest
# sequence (the default rule), or every sequence in one row.
VARIANTS = {"padded": (False, 0), "packed": (True, 0), "packed, one row": (True, 10**9)}


def micro_batches(pairs_file: Path) -> dict[str, list[dict]]:
    """The measured micro-batches' rows (prompt, chosen, rejected), by name."""
    rows = [json.loads(line) for line in open(pairs_file)]
    grouped = sorted(rows, key=lambda r: len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"])))
    middle = len(grouped) // 2
    return {"2 pairs": rows[:2], "8 pairs": rows[:8], "8 pairs, length-grouped": grouped[middle - 4 : middle + 4]}


def pair_batch(tokenizer, rows: list[dict]) -> dict:
    """A pairwise answer batch (collate_answers): the B chosen sequences, then the B rejected ones."""
    from alignlab.data.collate import collate_answers
    from alignlab.data.tokenize import encode_answers, encode_prompts

    prompts = encode_prompts(tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in rows])
    answers = encode_answers(tokenizer, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    return collate_answers(prompts + prompts, answers, tokenizer.pad_token_id)


def rss_mb() -> float:
    """This process's resident memory now (Linux)."""
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(job: dict) -> dict:
    """Time `job["steps"]` forward + backward passes of one micro-batch in one variant; peak memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlab.models import logprobs

    torch.set_num_threads(job["threads"])
    padding_free, logprobs.PACKED_ROW_TOKENS = job["variant"]
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).train()
    batch = pair_batch(tokenizer, job["rows"])
    loaded = rss_mb()
    times = []
    for step in range(job["steps"] + 1):  # the first is a warm-up
        start = time.perf_counter()
        out = logprobs.answer_logprobs(model, batch, padding_free=padding_free)
        (-out.logps.sum()).backward()
        model.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
    lengths = batch["attention_mask"].sum(-1)
    computed = logprobs._packed(batch["input_ids"], batch["attention_mask"])[0] if padding_free else batch["input_ids"]
    return {
        "seconds": statistics.median(times),
        "peak_mb": peak_memory_mb("cpu"),
        "loaded_mb": loaded,
        "logps": out.logps.tolist(),
        "real_tokens": int(lengths.sum()),
        "rows": list(computed.shape),  # [rows, width] the decoder ran on
        "longest": int(lengths.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/out/bench_padding_free"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1, help="timed forward + backward passes per process")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker.read_text())
        Path(job["result"]).write_text(json.dumps(worker(job)))
        return

    args.out.mkdir(parents=True, exist_ok=True)
    model = model_folder(args.out, "30M")
    batches = micro_batches(write_data(args.out, 64)["dpo"])
    results = {name: {v: [] for v in VARIANTS} for name in batches}
    for repeat in range(args.repeats):
        for name, rows in batches.items():
            order = list(VARIANTS) if repeat % 2 == 0 else list(reversed(VARIANTS))  # alternate who runs first
            for variant in order:
                job = {"model": str(model), "rows": rows, "variant": VARIANTS[variant]}
                job.update(threads=args.threads, steps=args.steps, result=str(args.out / "result.json"))
                (args.out / "job.json").write_text(json.dumps(job))
                subprocess.run([sys.executable, __file__, "--worker", str(args.out / "job.json")], check=True)
                results[name][variant].append(json.loads((args.out / "result.json").read_text()))
                print(f"[{repeat + 1}/{args.repeats}] {name}, {variant}: {results[name][variant][-1]['seconds']:.2f} s")

    lines = [
        f"CPU, {args.threads} threads, medians of {args.repeats} processes × {args.steps} timed steps",
        "",
        "| micro-batch (real tokens, longest) | variant | rows × width | s | time / padded "
        "| peak MB | peak − loaded MB | max Δ logp |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        padded = runs["padded"]
        for variant, runs_v in runs.items():
            first, s = runs_v[0], statistics.median(r["seconds"] for r in runs_v)
            ratio = s / statistics.median(r["seconds"] for r in padded)
            gap = max(abs(a - b) for a, b in zip(first["logps"], padded[0]["logps"]))
            lines.append(
                f"| {name} ({first['real_tokens']}, {first['longest']}) | {variant} "
                f"| {first['rows'][0]} × {first['rows'][1]} | {s:.2f} | {ratio:.2f} "
                f"| {statistics.median(r['peak_mb'] for r in runs_v):.0f} "
                f"| {statistics.median(r['peak_mb'] - r['loaded_mb'] for r in runs_v):.0f} | {gap:.1e} |"
            )
    report = "\n".join(lines) + "\n"
    (args.out / "results.md").write_text(report)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(report)


if __name__ == "__main__":
    main()
