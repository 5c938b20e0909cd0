"""Study: the offline preference algorithms compared on the bundled task, from one SFT start, with
one budget. For each algorithm and β it measures held-out exact match and the KL divergence from the
SFT model (the reference), and writes `results.csv`, `results.md` and `plot.png` (accuracy against
KL, one point per algorithm and β) to its output folder.

    python experiments/compare_algorithms.py [--out experiments/out/compare_algorithms] [--steps 200]

Each algorithm's β grid runs as one Hydra multirun (`python -m alignlab -m algorithm=<name>
algorithm.beta=…`) into `<out>/runs`, and is read back with `alignlab.results.load_sweep`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch

from alignlab.online.rollout import sample, token_logprobs
from alignlab.results import load_sweep
from alignlab.runner.config import compose
from alignlab.train import train

QUIET = ["logger=csv", "trainer.enable_progress_bar=false"]
SFT = ["algorithm=sft", "batch_size=32", "trainer.max_steps=800", "trainer.val_check_interval=400"]
# β grids on each loss's own scale (SimPO's β multiplies average log-probs, so it sits near 2).
GRID = {
    "dpo": [0.05, 0.1, 0.5],
    "cpo": [0.05, 0.1, 0.5],
    "orpo": [0.05, 0.1, 0.5],
    "simpo": [1.0, 2.0, 2.5],
    "kto": [0.05, 0.1, 0.5],
}
EXTRA = {"kto": ["data.unpair=true"]}  # KTO reads the same pairs, each split into two labelled rows


@torch.no_grad()
def kl_to_reference(policy_dir: str, reference_dir: str, samples_per_prompt: int = 8, seed: int = 0) -> float:
    """Monte-Carlo KL(π ‖ π_ref) per answer on the held-out prompts: answers sampled from π at
    temperature 1, averaged Σ_t log π(y_t) − log π_ref(y_t)."""
    from hydra.utils import instantiate
    from transformers import AutoModelForCausalLM

    from alignlab.models.loading import load_model

    cfg = compose(["algorithm=grpo", f"model.path={policy_dir}", "model.tiny=null", *QUIET])
    policy, tokenizer, _ = load_model(cfg.model)
    policy.eval()
    reference = AutoModelForCausalLM.from_pretrained(reference_dir).eval()
    data = instantiate(cfg.data)
    data.set_tokenizer(tokenizer)
    data.setup("validate")
    torch.manual_seed(seed)
    total, count = 0.0, 0
    for batch in data.val_dataloader():
        drawn = sample(policy, tokenizer, batch, 8, 1.0, 1024, num_per_prompt=samples_per_prompt)
        length = drawn.mask.shape[1]
        logp = token_logprobs(policy, drawn.seqs, drawn.starts, length)
        ref = token_logprobs(reference, drawn.seqs, drawn.starts, length)
        total += float(((logp - ref) * drawn.mask).sum())
        count += drawn.mask.shape[0]
    return total / count


def run_grid(algorithm: str, betas: list[float], sft_model: str, runs: Path, steps: int, seed: int) -> None:
    args = [
        "-m",
        f"algorithm={algorithm}",
        "algorithm.beta=" + ",".join(map(str, betas)),
        f"model.path={sft_model}",
        "model.tiny=null",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "optim.lr=2e-4",
        f"seed={seed}",
        *EXTRA.get(algorithm, []),
        *QUIET,
        f"hydra.sweep.dir={runs}",
        f"hydra.sweep.subdir={algorithm}-" + "${hydra.job.num}",
    ]
    subprocess.run([sys.executable, "-m", "alignlab", *args], check=True)


def plot(table: pd.DataFrame, sft_accuracy: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for algorithm, group in table.groupby("algorithm"):
        group = group.sort_values("kl_to_sft")
        (line,) = ax.plot(group["kl_to_sft"], group["eval/exact_match"], marker="o", label=algorithm)
        for _, row in group.iterrows():
            ax.annotate(
                f"β={row['algorithm.beta']:g}",
                (row["kl_to_sft"], row["eval/exact_match"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=line.get_color(),
            )
    ax.axhline(sft_accuracy, color="grey", linestyle="--", linewidth=1, label="SFT start")
    if (table["kl_to_sft"] > 0).all():  # KL spans decades across algorithms
        ax.set_xscale("log")
    ax.set_xlabel("KL(π ‖ π_SFT) per held-out answer (nats)")
    ax.set_ylabel("held-out exact match")
    ax.set_title("Offline preference algorithms from one SFT start, same budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/out/compare_algorithms"))
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per algorithm run")
    parser.add_argument("--sft-steps", type=int, default=800)
    parser.add_argument("--algorithms", nargs="+", default=list(GRID), choices=list(GRID))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out.resolve()

    sft_overrides = [*SFT, f"trainer.max_steps={args.sft_steps}", f"seed={args.seed}", *QUIET]
    sft = train(compose(sft_overrides, out / "sft"))
    for algorithm in args.algorithms:
        run_grid(algorithm, GRID[algorithm], sft["model_dir"], out / "runs", args.steps, args.seed)

    runs = load_sweep(out / "runs")
    runs["kl_to_sft"] = [
        kl_to_reference(str(Path(d) / "model"), sft["model_dir"], seed=args.seed) for d in runs["run_dir"]
    ]
    columns = ["algorithm", "algorithm.beta", "eval/exact_match", "kl_to_sft", "eval/rewards/margins", "seconds"]
    table = runs[[c for c in columns if c in runs]].sort_values(["algorithm", "algorithm.beta"])
    table.to_csv(out / "results.csv", index=False)
    sft_accuracy = sft["metrics"]["eval/exact_match"]
    lines = [
        f"SFT start ({args.sft_steps} steps): held-out exact match {sft_accuracy:.3f}; each run {args.steps} "
        "steps, lr 2e-4, batch 16 pairs.",
        "",
        "| algorithm | β | held-out exact match | KL to SFT (nats/answer) | held-out margin |",
        "|---|---|---|---|---|",
    ]
    for _, row in table.iterrows():
        margin = row.get("eval/rewards/margins", float("nan"))
        lines.append(
            f"| {row['algorithm']} | {row['algorithm.beta']:g} | {row['eval/exact_match']:.3f} | "
            f"{row['kl_to_sft']:.3f} | {margin:.3g} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(table, sft_accuracy, out / "plot.png")
    print("\n".join(lines))
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'plot.png'}")


if __name__ == "__main__":
    main()
