"""Benchmark: alignlab against TRL, the field's reference trainer, on the same model, data and settings.

For each algorithm (DPO, KTO, GRPO) and each configuration, one worker subprocess trains a fixed number of
steps and reports step times, real (non-padding) tokens, peak memory and its first losses; the parent
measures the machine's matmul rate in the same command and writes a markdown table and a JSON file.

    pip install -e ".[bench]"
    python experiments/bench_trl.py                       # DPO, KTO and GRPO, CPU, the 30M-parameter model
    python experiments/bench_trl.py --algorithms dpo --steps 30 --out experiments/out/bench_trl

Model: a Qwen2 of about 30M parameters (hidden 512 × 8 layers, alignlab's byte-level ChatML tokenizer),
written once and loaded by both trainers from the same folder; with a GPU also a larger one (hidden
1024 × 16 layers). Data: synthetic text with a realistic spread of lengths (log-normal prompts and
answers, a few hundred tokens per pair). Both trainers see the same rows in the same order (no
shuffling), the same batch size, learning rate, schedule (linear, no warm-up), AdamW and clipping.

Throughput counts real tokens (prompt + answer, chosen and rejected) per second of training, from
the start of training to the last step, so work done before the first step (reference log-probs
computed ahead) is included. "Matmul share" is the model FLOPs of those tokens (6 × parameters per
trained token, 2 × parameters per reference-scored token) per second over the rate of a large float32
(bf16 on GPU) matmul measured in the same command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
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
DATA_CONFIGS = {"dpo": "custom_pairs", "kto": "custom_kto", "grpo": "custom_prompts"}  # alignlab's data group
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
    and undesirable in turn) and prompts.jsonl (prompt), in alignlab's flat form."""
    rng = random.Random(seed)
    pairs, labelled, prompts = out / "pairs.jsonl", out / "labelled.jsonl", out / "prompts.jsonl"
    with open(pairs, "w") as f:
        for _ in range(rows):
            row = {
                "prompt": text(rng, 120, 16, 400),
                "chosen": text(rng, 80, 4, 300),
                "rejected": text(rng, 80, 4, 300),
            }
            f.write(json.dumps(row) + "\n")
    with open(labelled, "w") as f:
        for i in range(rows):
            row = {"prompt": text(rng, 120, 16, 400), "completion": text(rng, 80, 4, 300), "label": i % 2 == 0}
            f.write(json.dumps(row) + "\n")
    with open(prompts, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"prompt": text(rng, 120, 16, 400)}) + "\n")
    return {"dpo": pairs, "kto": labelled, "grpo": prompts}


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
    TRL appends eos to answers given as text, as alignlab does."""
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
    if cfg["algorithm"] in ("dpo", "kto"):  # offline: the same settings for both
        import trl

        name = cfg["algorithm"].upper()
        config, trainer_class = getattr(trl, f"{name}Config"), getattr(trl, f"{name}Trainer")
        args = config(**common, max_length=cfg["max_length"], beta=0.1, **cfg["trl"])
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
    else:  # every completion runs to the length limit (the untrained model rarely emits eos)
        per_row = [cfg["num_generations"] * (len(p) + cfg["completion_length"]) for p in prompts]
    b = cfg["batch_size"]
    return [sum(per_row[i * b : (i + 1) * b]) for i in range(cfg["steps"])]


def summarise(cfg: dict, result: dict, params: int, peak_flops: float, warmup: int) -> dict:
    tokens = real_tokens(cfg)
    steps = result["steps"]
    times = [b - a for a, b in zip([result["start"], *steps[:-1]], steps)]
    total = steps[-1] - result["start"]
    steady = sorted(times[warmup:])[len(times[warmup:]) // 2]
    # Model FLOPs: 6N per trained token (forward and backward) and 2N per reference-scored token (DPO).
    # KTO trains and scores its matched half (8N per token) but only runs the policy and the reference
    # forward on its mismatched half (4N): 6N per token on average.
    per_token = {"dpo": 8 * params, "kto": 6 * params}.get(cfg["algorithm"], 6 * params)
    if cfg["algorithm"] == "grpo":
        per_token = 6 * params  # generation is not counted; the update forward and backward are
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


def offline_runs(common: dict, args) -> list[dict]:
    """DPO or KTO: TRL at its defaults and with precomputed reference log-probs; alignlab at its defaults
    and with length-grouped micro-batches making up the same batch."""
    common = {**common, "batch_size": args.batch_size, "kto_pairing": args.kto_pairing}
    same_loss = ["algorithm.rpo_alpha=0.0"] if common["algorithm"] == "dpo" else []  # TRL's DPO has no NLL term
    micro = [
        f"batch_size={args.batch_size // args.micro_batches}",
        f"trainer.accumulate_grad_batches={args.micro_batches}",
        "data.group_by_length=true",
    ]
    trl, alignlab = {**common, "trainer": "trl", "alignlab": []}, {**common, "trainer": "alignlab", "trl": {}}
    return [
        {**trl, "label": "TRL defaults", "trl": {}},
        {**trl, "label": "TRL precompute_ref_log_probs", "trl": {"precompute_ref_log_probs": True}},
        {**alignlab, "label": "alignlab defaults", "alignlab": same_loss},
        {
            **alignlab,
            "label": f"alignlab, {args.micro_batches} length-grouped micro-batches",
            "alignlab": same_loss + micro,
        },
    ]


def configurations(args, model: Path, data: dict[str, Path], device: str) -> list[dict]:
    base = {"model": str(model), "device": device, "steps": args.steps, "lr": 1e-5, "max_length": 1024}
    runs = []
    for algorithm in ("dpo", "kto"):
        if algorithm in args.algorithms:
            runs += offline_runs({**base, "algorithm": algorithm, "data": str(data[algorithm])}, args)
    if "grpo" in args.algorithms:
        grpo = {
            **base,
            "algorithm": "grpo",
            "data": str(data["grpo"]),
            "batch_size": args.grpo_prompts,
            "num_generations": 8,
            "completion_length": 64,
            "target_length": 32,
            "lr": 1e-5,
        }
        same = [
            "algorithm.num_generations=8",
            "algorithm.max_completion_length=64",
            "algorithm.reward_funcs=[{_target_:alignlab.online.rewards.length_reward,target:32}]",
        ]
        runs += [
            {**grpo, "trainer": "trl", "label": "TRL defaults", "trl": {}, "alignlab": []},
            {**grpo, "trainer": "alignlab", "label": "alignlab defaults", "trl": {}, "alignlab": same},
            {
                **grpo,
                "trainer": "alignlab",
                "label": "alignlab, micro-batches of 8 completions",
                "trl": {},
                "alignlab": [*same, "algorithm.micro_batch_size=8"],
            },
        ]
    return runs


def table(results: list[dict]) -> str:
    lines = [
        "| algorithm | trainer, settings | tokens/s | completions/s | s/step | peak memory (MB) | matmul share "
        "| first losses |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        completions = f"{r['completions_per_s']:.1f}" if "completions_per_s" in r else ""
        lines.append(
            f"| {r['algorithm']} | {r['setting']} | {r['tokens_per_s']:.0f} | {completions} | "
            f"{r['seconds_per_step']:.3f} | {r['peak_memory_mb']:.0f} | {r['matmul_share']:.0%} | "
            f"{', '.join('—' if v is None else f'{v:.4f}' for v in r['first_losses'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/out/bench_trl"))
    parser.add_argument("--algorithms", nargs="+", default=["dpo", "kto", "grpo"], choices=["dpo", "kto", "grpo"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="DPO pairs (KTO rows) per step")
    parser.add_argument("--micro-batches", type=int, default=4, help="alignlab's length-grouped micro-batches per step")
    parser.add_argument(
        "--kto-pairing",
        choices=["alignlab", "trl"],
        default="alignlab",
        help="alignlab's KTO runs pair rows for z0 as alignlab does, or as TRL does (for comparing losses)",
    )
    parser.add_argument("--grpo-prompts", type=int, default=4, help="GRPO prompts per step (× 8 completions)")
    parser.add_argument("--trainers", nargs="+", default=["trl", "alignlab"], choices=["trl", "alignlab"])
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the steady-state step time")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker.read_text()))

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
    report = {"device": device, "matmul_flops": peak, "steps": args.steps, "results": results}
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    text_out = f"{device}, matmul {peak / 1e9:.0f} GFLOP/s, {args.steps} steps\n\n{table(results)}\n"
    (args.out / "results.md").write_text(text_out)
    print(text_out)


if __name__ == "__main__":
    main()
