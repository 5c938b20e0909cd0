"""Benchmark: alignlab against TRL, the field's reference trainer, on the same model, data and settings.

For each algorithm (DPO, KTO, GRPO, SFT) and each configuration, one worker subprocess trains a fixed number
of steps and reports step times, real (non-padding) tokens, peak memory and its first losses; the parent
measures the machine's matmul rate in the same command and writes a markdown table and a JSON file, and
with --write-docs the tables of docs/speed.md and README.md (between their bench_trl marker comments).

    pip install -e ".[bench]"
    python experiments/bench_trl.py --write-docs          # all four, each trainer at its defaults, CPU, 30M model
    python experiments/bench_trl.py --algorithms sft --steps 4 --extra --out experiments/out/bench_sft

Configurations: each trainer at its defaults, only the shared settings below set; --extra adds
alignlab with hand-set length-grouped micro-batches (DPO, KTO, SFT; GRPO: micro-batches of 8
completions) and TRL's fastest switch (DPO, KTO: precompute_ref_log_probs; SFT: no gradient
checkpointing, which SFTConfig turns on by default).

Model: a Qwen2 of about 30M parameters (hidden 512 × 8 layers, alignlab's byte-level ChatML tokenizer),
written once and loaded by both trainers from the same folder; with a GPU also a larger one (hidden
1024 × 16 layers). Data: synthetic text with a realistic spread of lengths (log-normal prompts and
answers, a few hundred tokens per pair). Both trainers see the same rows in the same order (no
shuffling), the same batch size per optimizer step, learning rate, schedule (linear, no warm-up),
AdamW and clipping, in float32 on CPU and bf16 on GPU (SFTConfig's bf16 default is overridden on CPU).

Throughput counts real tokens (prompt + answer; chosen and rejected) per second of training, from
the start of training to the last step, so work done before the first step (reference log-probs
computed ahead) is included. "Matmul share" is the model FLOPs of those tokens (6 × parameters per
trained token, 2 × parameters per reference-scored token) per second over the rate of a large float32
(bf16 on GPU) matmul measured in the same command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

MODELS = {
    "30M": {
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "init_seed": 0,
    },
    "300M": {  # GPU only
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "init_seed": 0,
    },
}
ALGORITHMS = ("dpo", "kto", "grpo", "sft")
DATA_CONFIGS = {"dpo": "custom_pairs", "kto": "custom_kto", "grpo": "custom_prompts", "sft": "custom_sft"}  # alignlab's
ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "docs" / "speed.md", ROOT / "README.md")  # the pages whose bench_trl blocks --write-docs rewrites
BEGIN, END = "<!-- bench_trl:begin -->", "<!-- bench_trl:end -->"
TRL_DEFAULTS, ALIGNLAB_DEFAULTS = "TRL defaults", "alignlab defaults"  # the rows the ratios compare
WORDS = "the a of to and in is it that for on with as was at by an be this are from or have one had not but".split()


# -- shared inputs ------------------------------------------------------------------------------------
def model_folder(out: Path, size: str) -> Path:
    from alignlab.models.tiny import ensure_tiny_model

    return ensure_tiny_model(out / f"bench-qwen2-{size}", MODELS[size])


def text(rng: random.Random, median: int, low: int, high: int) -> str:
    """Words up to a log-normal number of characters (median `median`, clipped to [low, high])."""
    target = int(min(high, max(low, rng.lognormvariate(math.log(median), 0.6))))
    words = []
    while sum(len(w) + 1 for w in words) < target:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:target]


def write_data(out: Path, rows: int, seed: int = 0) -> dict[str, Path]:
    """pairs.jsonl (prompt, chosen, rejected), labelled.jsonl (prompt, completion, label: desirable
    and undesirable in turn), prompts.jsonl (prompt) and sft.jsonl (prompt, completion), in alignlab's
    flat form; returns the file of each algorithm."""
    rng = random.Random(seed)
    files = {a: out / f for a, f in zip(ALGORITHMS, ("pairs.jsonl", "labelled.jsonl", "prompts.jsonl", "sft.jsonl"))}
    make = {
        "dpo": lambda i: {"chosen": text(rng, 80, 4, 300), "rejected": text(rng, 80, 4, 300)},
        "kto": lambda i: {"completion": text(rng, 80, 4, 300), "label": i % 2 == 0},
        "grpo": lambda i: {},
        "sft": lambda i: {"completion": text(rng, 80, 4, 300)},
    }
    for algorithm, path in files.items():
        with open(path, "w") as f:
            for i in range(rows):
                f.write(json.dumps({"prompt": text(rng, 120, 16, 400), **make[algorithm](i)}) + "\n")
    return files


def held_out(path: str, rows: int = 8) -> Path:
    """alignlab needs a held-out split; a few rows of the data, so that scoring it costs little."""
    out = Path(path).with_suffix(".eval.jsonl")
    out.write_text("".join(open(path).readlines()[:rows]))
    return out


def matmul_rate(device: str, seconds: float = 3.0) -> float:
    """FLOP/s of a 2048² matmul, the best of repeated timings."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    b = torch.randn(2048, 2048, device=device, dtype=dtype)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * 2048**3 / (time.perf_counter() - t))
    return best


# -- workers: one trainer, one configuration, one process ------------------------------------------------
class StepClock:
    """Wall-clock time at the start of training and at the end of every optimizer step."""

    def __init__(self):
        self.start, self.steps = None, []

    def begin(self) -> None:
        self.start = time.perf_counter()

    def tick(self) -> None:
        self.steps.append(time.perf_counter())


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


CLOCK, LOSSES = StepClock(), []


def alignlab_clock():
    """A Lightning callback (built by Hydra from `+callbacks.clock`) that feeds CLOCK and LOSSES."""
    import lightning as L

    class Clock(L.Callback):
        def on_train_start(self, trainer, module):
            CLOCK.begin()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:  # an optimizer step ended
                CLOCK.tick()
                # At a step's last micro-batch alignlab's train/loss is the whole step's loss.
                loss = trainer.callback_metrics.get("train/loss")
                LOSSES.append(float(loss) if loss is not None else float("nan"))

    return Clock()


def trl_partners(n: int, batch_size: int) -> list[int]:
    """TRL's KTO pairing: each row with its neighbour's answer within its batch, rotated by one."""
    return [i - 1 if i % batch_size else min(i + batch_size, n) - 1 for i in range(n)]


def run_alignlab(cfg: dict) -> dict:
    from alignlab.runner.config import compose
    from alignlab.train import train

    if cfg.get("kto_pairing") == "trl":  # --kto-pairing trl: only to compare the losses step for step
        import alignlab.data.datamodule

        alignlab.data.datamodule.mismatch_partners = lambda n, seed: trl_partners(n, cfg["batch_size"])
    algorithm = cfg["algorithm"]
    overrides = [
        f"algorithm={algorithm}",
        f"model.path={cfg['model']}",
        "model.tiny=null",
        f"data={DATA_CONFIGS[algorithm]}",
        f"data.source.path={cfg['data']}",
        f"data.source.eval_path={held_out(cfg['data'])}",
        "data.shuffle=false",
        f"batch_size={cfg['batch_size']}",
        f"max_length={cfg['max_length']}",
        f"trainer.max_steps={cfg['steps']}",
        "trainer.val_check_interval=100000",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "evaluation.at_start=false",
        "evaluation.exact_match=false",
        "logger=none",
        "save_model=false",
        "callbacks.checkpoint.every_n_train_steps=100000",
        f"optim.lr={cfg['lr']}",
        "optim.scheduler=linear",
        "optim.warmup_steps=0",
        "+callbacks.clock._target_=__main__.alignlab_clock",
        f"hardware={'gpu' if cfg['device'] == 'cuda' else 'cpu'}",
        *cfg["alignlab"],
    ]
    train(compose(overrides, Path(cfg["work"]) / "alignlab"))
    return {"start": CLOCK.start, "steps": CLOCK.steps, "losses": LOSSES}


def trl_rows(path: str, tokenizer, algorithm: str) -> list[dict]:
    """The same rows for TRL: prompts rendered with the chat template as alignlab renders them;
    TRL appends eos (`<|im_end|>`, the template's end of turn) to answers given as text, as alignlab
    ends them."""
    rows = [json.loads(line) for line in open(path)]
    for row in rows:
        messages = [{"role": "user", "content": row["prompt"]}]
        row["prompt"] = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return rows


def run_trl(cfg: dict) -> dict:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if CLOCK.start is None:
                CLOCK.begin()

        def on_step_end(self, args, state, control, **kwargs):
            CLOCK.tick()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                LOSSES.append(float(logs["loss"]))

    def in_order(trainer_class):
        class InOrder(trainer_class):  # the rows in file order, as alignlab's data.shuffle=false
            def _get_train_sampler(self, *args, **kwargs):
                return SequentialSampler(self.train_dataset)

        return InOrder

    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    rows = trl_rows(cfg["data"], tokenizer, cfg["algorithm"])
    if cfg["trl"].get("precompute_ref_log_probs"):
        CLOCK.begin()  # before the trainer is built: TRL computes reference log-probs ahead in its constructor
    common = {
        "output_dir": str(Path(cfg["work"]) / "trl"),
        "per_device_train_batch_size": cfg["batch_size"],
        "max_steps": cfg["steps"],
        "learning_rate": cfg["lr"],
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": cfg["device"] != "cuda",
        "bf16": cfg["device"] == "cuda",
        "seed": 0,
        "disable_tqdm": True,
    }
    if cfg["algorithm"] != "grpo":  # offline: the same settings for all three; otherwise each config's defaults
        import trl

        name = cfg["algorithm"].upper()
        config, trainer_class = getattr(trl, f"{name}Config"), getattr(trl, f"{name}Trainer")
        beta = {} if name == "SFT" else {"beta": 0.1}
        args = config(**common, max_length=cfg["max_length"], **beta, **cfg["trl"])
        trainer = in_order(trainer_class)(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[Clock()],
        )
    else:
        from trl import GRPOConfig, GRPOTrainer

        from alignlab.online.rewards import length_reward

        def reward(prompts, completions, **kwargs):
            return length_reward(prompts, completions, target=cfg["target_length"])

        common["per_device_train_batch_size"] = cfg["batch_size"] * cfg["num_generations"]  # completions
        args = GRPOConfig(
            **common,
            num_generations=cfg["num_generations"],
            max_completion_length=cfg["completion_length"],
            **cfg["trl"],
        )
        trainer = in_order(GRPOTrainer)(
            model=model,
            reward_funcs=reward,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[Clock()],
        )
    trainer.train()
    return {"start": CLOCK.start, "steps": CLOCK.steps, "losses": LOSSES}


def worker(cfg: dict) -> None:
    torch.manual_seed(0)
    result = (run_alignlab if cfg["trainer"] == "alignlab" else run_trl)(cfg)
    result["peak_memory_mb"] = peak_memory_mb(cfg["device"])
    Path(cfg["result"]).write_text(json.dumps(result))


# -- the parent: configurations, tokens, FLOPs, tables ----------------------------------------------------
def real_tokens(cfg: dict) -> list[int]:
    """Real (non-padding) tokens of each step's rows, as alignlab tokenizes them (TRL's are the same:
    the chat-templated prompt, then the answer and eos)."""
    from transformers import AutoTokenizer

    from alignlab.data.tokenize import encode_answers, encode_prompts

    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    rows = [json.loads(line) for line in open(cfg["data"])]
    prompts = encode_prompts(tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in rows])
    if cfg["algorithm"] == "dpo":
        chosen = encode_answers(tokenizer, [r["chosen"] for r in rows])
        rejected = encode_answers(tokenizer, [r["rejected"] for r in rows])
        per_row = [2 * len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected)]
    elif cfg["algorithm"] == "kto":  # each prompt twice: with its answer, and with its mismatched partner's
        answers = [len(a) for a in encode_answers(tokenizer, [r["completion"] for r in rows])]
        if cfg["trainer"] == "trl" or cfg.get("kto_pairing") == "trl":
            partner = trl_partners(len(rows), cfg["batch_size"])
        else:
            from alignlab.data.rows import mismatch_partners

            partner = mismatch_partners(len(rows), seed=0)
        per_row = [2 * len(p) + answers[i] + answers[partner[i]] for i, p in enumerate(prompts)]
    elif cfg["algorithm"] == "sft":
        per_row = [len(p) + len(a) for p, a in zip(prompts, encode_answers(tokenizer, [r["completion"] for r in rows]))]
    else:  # every completion runs to the length limit (the untrained model rarely emits eos)
        per_row = [cfg["num_generations"] * (len(p) + cfg["completion_length"]) for p in prompts]
    b = cfg["batch_size"]
    return [sum(per_row[i * b : (i + 1) * b]) for i in range(cfg["steps"])]


def summarise(cfg: dict, result: dict, params: int, peak_flops: float, warmup: int) -> dict:
    tokens = real_tokens(cfg)
    steps = result["steps"]
    times = [b - a for a, b in zip([result["start"], *steps[:-1]], steps)]
    total = steps[-1] - result["start"]
    kept = sorted(times[min(warmup, len(times) - 1) :])  # a run shorter than the warm-up keeps its last step
    steady = kept[len(kept) // 2]
    # Model FLOPs: 6N per trained token (forward and backward) and 2N per reference-scored token (DPO).
    # KTO trains and scores its matched half (8N per token) but only runs the policy and the reference
    # forward on its mismatched half (4N): 6N per token on average. SFT trains every token of the
    # sequence (prompt tokens too run forward and backward; only the loss skips them). GRPO: generation
    # is not counted; the update's forward and backward are.
    per_token = 8 * params if cfg["algorithm"] == "dpo" else 6 * params
    out = {
        "trainer": cfg["trainer"],
        "setting": cfg["label"],
        "tokens_per_s": sum(tokens) / total,
        "seconds_per_step": steady,
        "seconds_total": total,
        "peak_memory_mb": result["peak_memory_mb"],
        "first_losses": [round(v, 5) if v is not None else None for v in result["losses"][:5]],
        "matmul_share": per_token * sum(tokens) / total / peak_flops,
    }
    if cfg["algorithm"] == "grpo":
        out["completions_per_s"] = cfg["steps"] * cfg["batch_size"] * cfg["num_generations"] / total
    return out


def hand_set_micro_batches(args) -> list[str]:
    """--extra: the same rows per step as `micro_batches` length-grouped micro-batches of rows (no token budget)."""
    return [
        f"batch_size={args.batch_size // args.micro_batches}",
        f"trainer.accumulate_grad_batches={args.micro_batches}",
        "data.group_by_length=true",
        "max_tokens_per_micro_batch=null",
    ]


def offline_runs(common: dict, args) -> list[dict]:
    """DPO, KTO or SFT: each trainer at its defaults; with --extra also TRL's fastest switch (precomputed
    reference log-probs; SFT: no gradient checkpointing) and alignlab with hand-set micro-batches."""
    algorithm = common["algorithm"]
    common = {**common, "batch_size": args.batch_size, "kto_pairing": args.kto_pairing}
    same_loss = ["algorithm.rpo_alpha=0.0"] if algorithm == "dpo" else []  # TRL's DPO has no NLL term
    trl, alignlab = {**common, "trainer": "trl", "alignlab": []}, {**common, "trainer": "alignlab", "trl": {}}
    runs = [{**trl, "label": TRL_DEFAULTS, "trl": {}}, {**alignlab, "label": ALIGNLAB_DEFAULTS, "alignlab": same_loss}]
    if args.extra:
        switch = {"gradient_checkpointing": False} if algorithm == "sft" else {"precompute_ref_log_probs": True}
        (key, value), micro = next(iter(switch.items())), hand_set_micro_batches(args)
        runs.insert(1, {**trl, "label": f"TRL `{key}={value}`", "trl": switch})
        label = f"alignlab, {args.micro_batches} length-grouped micro-batches"
        runs.append({**alignlab, "label": label, "alignlab": same_loss + micro})
    for variant in args.alignlab_variant:  # e.g. "max_tokens_per_micro_batch=4096": a row of its own
        runs.append({**alignlab, "label": f"alignlab `{variant}`", "alignlab": same_loss + variant.split()})
    return runs


def configurations(args, model: Path, data: dict[str, Path], device: str) -> list[dict]:
    base = {"model": str(model), "device": device, "steps": args.steps, "lr": 1e-5, "max_length": 1024}
    runs = []
    for algorithm in args.algorithms:
        if algorithm != "grpo":
            runs += offline_runs({**base, "algorithm": algorithm, "data": str(data[algorithm])}, args)
            continue
        grpo = {
            **base,
            "algorithm": "grpo",
            "data": str(data["grpo"]),
            "batch_size": args.grpo_prompts,
            "num_generations": 8,
            "completion_length": 64,
            "target_length": 32,
        }
        same = [
            "algorithm.num_generations=8",
            "algorithm.max_completion_length=64",
            "algorithm.reward_funcs=[{_target_:alignlab.online.rewards.length_reward,target:32}]",
        ]
        runs += [
            {**grpo, "trainer": "trl", "label": TRL_DEFAULTS, "trl": {}, "alignlab": []},
            {**grpo, "trainer": "alignlab", "label": ALIGNLAB_DEFAULTS, "trl": {}, "alignlab": same},
        ]
        if args.extra:
            micro = [*same, "algorithm.micro_batch_size=8"]
            label = "alignlab, micro-batches of 8 completions"
            runs.append({**grpo, "trainer": "alignlab", "label": label, "trl": {}, "alignlab": micro})
    return runs


# -- the tables: pure functions of a results.json report ----------------------------------------------
def algorithm_cell(r: dict, models: set[str]) -> str:
    """DPO, or DPO (300M) when the report holds more than one model."""
    return r["algorithm"].upper() + (f" ({r['model']})" if len(models) > 1 else "")


def table(results: list[dict]) -> str:
    """Every run: one markdown row each."""
    models = {r["model"] for r in results}
    lines = [
        "| algorithm | trainer, settings | tokens/s | completions/s | s/step | peak memory (MB) | matmul share "
        "| first losses |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        completions = f"{r['completions_per_s']:.2f}" if "completions_per_s" in r else ""
        lines.append(
            f"| {algorithm_cell(r, models)} | {r['setting']} | {r['tokens_per_s']:.0f} | {completions} | "
            f"{r['seconds_per_step']:.2f} | {r['peak_memory_mb']:.0f} | {r['matmul_share']:.0%} | "
            f"{', '.join('—' if v is None else f'{v:.4f}' for v in r['first_losses'])} |"
        )
    return "\n".join(lines)


def ratios(results: list[dict]) -> list[dict]:
    """alignlab's defaults over TRL's defaults, per model and algorithm that has both rows: throughput
    (completions/s for GRPO, tokens/s otherwise) and peak memory."""
    rows = {(r["model"], r["algorithm"], r["setting"]): r for r in results}
    out = []
    for model, algorithm, setting in rows:
        if setting != ALIGNLAB_DEFAULTS or (model, algorithm, TRL_DEFAULTS) not in rows:
            continue
        ours, theirs = rows[model, algorithm, ALIGNLAB_DEFAULTS], rows[model, algorithm, TRL_DEFAULTS]
        unit = "completions_per_s" if algorithm == "grpo" else "tokens_per_s"
        out.append(
            {
                "model": model,
                "algorithm": algorithm,
                "unit": unit.replace("_per_s", "/s"),
                "speed": ours[unit] / theirs[unit],
                "memory": ours["peak_memory_mb"] / theirs["peak_memory_mb"],
            }
        )
    return out


def ratio_table(results: list[dict]) -> str:
    models = {r["model"] for r in results}
    lines = ["| algorithm | alignlab ÷ TRL, throughput | alignlab ÷ TRL, peak memory |", "|---|---|---|"]
    for r in ratios(results):
        lines.append(f"| {algorithm_cell(r, models)} | {r['speed']:.2f}× ({r['unit']}) | {r['memory']:.2f}× |")
    return "\n".join(lines)


def measured_line(report: dict) -> str:
    """Where the numbers come from: the command, the date, the machine and the TRL version."""
    precision = "bf16" if report["device"] == "cuda" else "float32"
    return (
        f"Measured by `{report['command']}` on {report['date']}: {report['machine']}, {precision} matmul "
        f"{report['matmul_flops'] / 1e9:.0f} GFLOP/s, TRL {report['trl_version']}, {report['steps']} steps per run."
    )


def docs_blocks(report: dict) -> dict[str, str]:
    """The text between the markers of each page --write-docs rewrites: docs/speed.md gets the ratios
    and every run; README.md the ratios."""
    line, ratio = measured_line(report), ratio_table(report["results"])
    return {
        "speed.md": f"{line}\n\nEach trainer at its defaults:\n\n{ratio}\n\n{table(report['results'])}",
        "README.md": f"{ratio}\n\n{line} Method and every run: [Speed](docs/speed.md#against-trl).",
    }


def rewrite(text: str, block: str, page: str = "page") -> str:
    """`text` with what lies between its BEGIN and END markers replaced by `block`.

    Raises:
        ValueError: `text` lacks the markers, or has them out of order or more than once.
    """
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{page}: needs one {BEGIN} line and one {END} line after it")
    head, rest = text.split(BEGIN)
    return f"{head}{BEGIN}\n{block}\n{END}{rest.split(END, 1)[1]}"


def write_docs(report: dict, pages: tuple[Path, ...] = DOCS) -> None:
    blocks = docs_blocks(report)
    for page in pages:
        page.write_text(rewrite(page.read_text(), blocks[page.name], str(page)))
        print(f"[bench] rewrote the table in {page}", flush=True)


def machine(device: str) -> str:
    """The GPU's name, or the CPU's model and the cores this process may use."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:  # Linux: the model name
        name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name}, {len(os.sched_getaffinity(0))} cores"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/out/bench_trl"))
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="DPO pairs (KTO, SFT rows) per optimizer step")
    parser.add_argument(
        "--extra",
        action="store_true",
        help="also TRL's fastest switch and alignlab's hand-set micro-batches, beside each trainer's defaults",
    )
    parser.add_argument("--micro-batches", type=int, default=4, help="--extra: alignlab's length-grouped micro-batches")
    parser.add_argument(
        "--kto-pairing",
        choices=["alignlab", "trl"],
        default="alignlab",
        help="alignlab's KTO runs pair rows for z0 as alignlab does, or as TRL does (for comparing losses)",
    )
    parser.add_argument("--grpo-prompts", type=int, default=4, help="GRPO prompts per step (× 8 completions)")
    parser.add_argument(
        "--alignlab-variant",
        action="append",
        default=[],
        help="DPO/KTO/SFT: one more alignlab row with these space-separated overrides (repeatable)",
    )
    parser.add_argument("--trainers", nargs="+", default=["trl", "alignlab"], choices=["trl", "alignlab"])
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the steady-state step time")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the tables in docs/speed.md and README.md")
    parser.add_argument(
        "--docs-from", type=Path, help="rewrite the docs' tables from this results.json, without running anything"
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker.read_text()))
    if args.docs_from:
        if not args.docs_from.is_file():  # a documented redraw before any benchmark has run
            raise SystemExit(
                f"--docs-from {args.docs_from}: no such file. It is the results.json a benchmark run writes: run "
                "`python experiments/bench_trl.py [--out DIR]` first (it writes DIR/results.json, by default "
                "experiments/out/bench_trl/results.json), or use --write-docs to run and rewrite the tables at once"
            )
        return write_docs(json.loads(args.docs_from.read_text()))

    import trl

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    rows = args.steps * max(args.batch_size, args.grpo_prompts)
    data = write_data(args.out, rows)
    sizes = ["30M", "300M"] if device == "cuda" else ["30M"]
    peak = matmul_rate(device)
    results = []
    for size in sizes:
        model = model_folder(args.out, size)
        from transformers import AutoModelForCausalLM

        params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())
        for i, cfg in enumerate(configurations(args, model, data, device)):
            if cfg["trainer"] not in args.trainers:
                continue
            cfg.update(work=str(args.out / f"run{i}-{size}"), result=str(args.out / f"run{i}-{size}.json"))
            shutil.rmtree(cfg["work"], ignore_errors=True)  # a fresh run folder each time
            job = args.out / f"run{i}-{size}.config.json"
            job.write_text(json.dumps(cfg))
            print(f"[bench] {size} {cfg['algorithm']}: {cfg['label']}", flush=True)
            subprocess.run(
                [sys.executable, __file__, "--worker", str(job)],
                check=True,
                env={**os.environ, "WANDB_MODE": "disabled"},
            )
            result = json.loads(Path(cfg["result"]).read_text())
            summary = summarise(cfg, result, params, peak, args.warmup)
            results.append({"model": size, "parameters": params, "algorithm": cfg["algorithm"], **summary})
    report = {
        "command": shlex.join(["python", "experiments/bench_trl.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "machine": machine(device),
        "device": device,
        "matmul_flops": peak,
        "trl_version": trl.__version__,
        "steps": args.steps,
        "results": results,
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    text_out = f"{measured_line(report)}\n\n{ratio_table(results)}\n\n{table(results)}\n"
    (args.out / "results.md").write_text(text_out)
    print(text_out)
    if args.write_docs:
        write_docs(report)


if __name__ == "__main__":
    main()
