"""Study: the offline preference algorithms compared on the bundled task, from one SFT start, with
one budget. For each algorithm and β it measures held-out exact match and the KL divergence from the
SFT model (the reference), and writes `results.csv`, `results.md` and `plot.png` (accuracy against
KL, one point per algorithm and β) to its output folder.

    python experiments/compare_algorithms.py [--out experiments/out/compare_algorithms] [--steps 200]
    python experiments/compare_algorithms.py --replot   # plot.png again from the results.csv there
    python experiments/compare_algorithms.py --dpo-loss-types [--out experiments/out/dpo_loss_types]

Each algorithm's β grid runs as one Hydra multirun (`python -m alignlab -m algorithm=<name>
algorithm.beta=…`) into `<out>/runs`, and is read back with `alignlab.results.load_sweep`.
`--dpo-loss-types` runs the shipped sweep `sweep=dpo_loss_types` instead (every DPO loss type at DPO's
default β, the same budget) as one multirun from the same SFT start: one point per loss type.
"""

from __future__ import annotations

import argparse
import shlex
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
    grid = [f"algorithm={algorithm}", "algorithm.beta=" + ",".join(map(str, betas)), *EXTRA.get(algorithm, [])]
    run_multirun(algorithm, grid, sft_model, runs, steps, seed)


def run_multirun(name: str, grid: list[str], sft_model: str, runs: Path, steps: int, seed: int) -> None:
    """`python -m alignlab -m <grid>` from the SFT model with the study's budget, each job in
    `<runs>/<name>-<job number>`."""
    args = [
        "-m",
        *grid,
        f"model.path={sft_model}",
        "model.tiny=null",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "optim.lr=2e-4",
        f"seed={seed}",
        *QUIET,
        f"hydra.sweep.dir={runs}",
        f"hydra.sweep.subdir={name}-" + "${hydra.job.num}",
    ]
    subprocess.run([sys.executable, "-m", "alignlab", *args], check=True)


NEAR_KL = 0.5  # nats: runs this close to the SFT model get a zoomed panel of their own, where they crowd


def plot(
    table: pd.DataFrame,
    sft_accuracy: float,
    path: Path,
    series: str = "algorithm",
    point_label=lambda row: f"β={row['algorithm.beta']:g}",
    title: str = "Offline preference algorithms from one SFT start, same budget",
) -> None:
    """Held-out exact match against KL to the SFT model, one line per value of the `series` column
    (the algorithm; left out of the legend when each has one point), each point labelled with
    `point_label(row)` (its β). When some runs sit within
    NEAR_KL of the SFT model and others far away, a second panel zooms onto the near ones (the first
    marks that region), so their labels have room."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    near = table["kl_to_sft"] < NEAR_KL
    zoom = 1 < near.sum() < len(table)
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(11, 4.4) if zoom else (6.4, 4.4), squeeze=False)
    colours = {a: f"C{i}" for i, a in enumerate(sorted(table[series].unique()))}  # the same in both panels
    labels = {ax: [] for ax in axes[0]}
    named = table[series].duplicated().any()  # with one point each, the point labels name the series already
    for i, ax in enumerate(axes[0]):
        for name, group in table[near if i else slice(None)].groupby(series):
            group, colour = group.sort_values("kl_to_sft"), colours[name]
            ax.plot(
                group["kl_to_sft"], group["eval/exact_match"], marker="o", color=colour, label=name if named else None
            )
            for _, row in group.iterrows():
                if i or not zoom or not near[row.name]:  # the zoomed panel labels the near runs
                    point = (row["kl_to_sft"], row["eval/exact_match"])
                    labels[ax].append((point, point_label(row), colour))
        if not i:  # the zoomed panel leaves it out, to give its crowd the height
            ax.axhline(sft_accuracy, color="grey", linestyle="--", linewidth=1, label="SFT start")
        ax.set_ylabel("held-out exact match")
        ax.set_xlabel("KL(π ‖ π_SFT) per held-out answer (nats)")
    first = axes[0][0]
    if (table["kl_to_sft"] > 0).all():  # KL spans decades across algorithms
        first.set_xscale("log")
    first.legend(fontsize=8)
    if zoom:
        box = table[near]
        (x0, x1), (y0, y1) = box["kl_to_sft"].agg(["min", "max"]), box["eval/exact_match"].agg(["min", "max"])
        first.add_patch(plt.Rectangle((x0 * 0.9, y0 - 0.01), x1 * 1.1 - x0 * 0.9, y1 - y0 + 0.02, fill=False, ls=":"))
        axes[0][1].set_title(f"zoom: the runs within {NEAR_KL:g} nats of the SFT model", fontsize=9)
        axes[0][1].margins(0.15)
    fig.suptitle(title)
    fig.tight_layout()
    for ax, points in labels.items():
        label_points(ax, points)
    fig.savefig(path, dpi=120)


def label_points(ax, points: list[tuple[tuple[float, float], str, str]]) -> None:
    """Write each (point, text, colour) beside its point, at the first offset (8 directions, growing
    distance; a thin leader line beyond the nearest ring) where the label overlaps no marker, no label
    already placed and stays inside the axes. Call after the figure's layout is final."""
    from matplotlib.text import Text

    renderer = ax.figure.canvas.get_renderer()
    taken = []
    for (x, y), _, _ in points:  # every marker, as a small box in display coordinates
        px, py = ax.transData.transform((x, y))
        taken.append(matplotlib_bbox(px - 4, py - 4, px + 4, py + 4))
    frame = ax.get_window_extent(renderer)
    directions = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
    for point, text, colour in points:
        for distance in (4, 10, 18, 28, 40):
            for dx, dy in directions:
                label = ax.annotate(
                    text,
                    point,
                    xytext=(dx * distance, dy * distance),
                    textcoords="offset points",
                    ha={1: "left", -1: "right", 0: "center"}[dx],
                    va={1: "bottom", -1: "top", 0: "center"}[dy],
                    fontsize=7,
                    color=colour,
                    arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.5} if distance > 4 else None,
                )
                label.update_positions(renderer)
                box = Text.get_window_extent(label, renderer).padded(2)  # the text alone, not its leader line
                if frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1):
                    if not any(box.overlaps(other) for other in taken):
                        taken.append(box)
                        break
                label.remove()
            else:
                continue
            break


def matplotlib_bbox(x0: float, y0: float, x1: float, y1: float):
    from matplotlib.transforms import Bbox

    return Bbox([[x0, y0], [x1, y1]])


def replot(out: Path, loss_types: bool = False, run_first: str = "") -> None:
    """plot.png again from a finished study's results.csv and the SFT accuracy in its results.md.

    Raises:
        SystemExit: the study has not written those files in `out` yet (its message names the files and
            `run_first`, the command that writes them); or results.md has no SFT accuracy line.
    """
    import re

    missing = [name for name in ("results.csv", "results.md") if not (out / name).is_file()]
    if missing:
        raise SystemExit(
            f"--replot redraws plot.png from a finished study's results.csv and results.md, and {out} has no "
            f"{' or '.join(missing)}: run the study first ({run_first}, which writes them there), or pass --out "
            "the folder a finished study wrote"
        )
    found = re.search(r"held-out exact match ([\d.]+)", (out / "results.md").read_text())
    if found is None:
        raise SystemExit(
            f"{out / 'results.md'} has no 'SFT start … held-out exact match <number>' line, which --replot draws as "
            f"the SFT start: rerun the study ({run_first})"
        )
    draw(pd.read_csv(out / "results.csv"), float(found.group(1)), out / "plot.png", loss_types)
    print(f"wrote {out / 'plot.png'}")


def measure(runs_dir: Path, sft_model: str, seed: int) -> pd.DataFrame:
    """Every run of the sweep in `runs_dir` (`load_sweep`'s rows) with its `kl_to_sft` measured."""
    runs = load_sweep(runs_dir)
    runs["kl_to_sft"] = [kl_to_reference(str(Path(d) / "model"), sft_model, seed=seed) for d in runs["run_dir"]]
    return runs


def write_results(out: Path, table: pd.DataFrame, lines: list[str], row_cells) -> None:
    """results.csv from `table`, results.md from the header `lines` and one Markdown row per run
    (`row_cells(row)`: its leading cells) followed by held-out exact match, KL to SFT and margin."""
    table.to_csv(out / "results.csv", index=False)
    lines = list(lines)
    for _, row in table.iterrows():
        margin = row.get("eval/rewards/margins", float("nan"))
        cells = [*row_cells(row), f"{row['eval/exact_match']:.3f}", f"{row['kl_to_sft']:.3f}", f"{margin:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="default: experiments/out/<study>")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per algorithm run")
    parser.add_argument("--sft-steps", type=int, default=800)
    parser.add_argument("--algorithms", nargs="+", default=list(GRID), choices=list(GRID))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replot", action="store_true", help="only redraw plot.png from <out>/results.csv")
    parser.add_argument(
        "--dpo-loss-types", action="store_true", help="run sweep=dpo_loss_types (one run per DPO loss type)"
    )
    args = parser.parse_args(argv)
    study = "dpo_loss_types" if args.dpo_loss_types else "compare_algorithms"
    out = (args.out or Path("experiments/out") / study).resolve()
    if args.replot:
        given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--replot"]
        return replot(out, args.dpo_loss_types, shlex.join(["python", "experiments/compare_algorithms.py", *given]))

    sft_overrides = [*SFT, f"trainer.max_steps={args.sft_steps}", f"seed={args.seed}", *QUIET]
    sft = train(compose(sft_overrides, out / "sft"))
    sft_accuracy = sft["metrics"]["eval/exact_match"]
    header = (
        f"SFT start ({args.sft_steps} steps): held-out exact match {sft_accuracy:.3f}; each run {args.steps} "
        "steps, lr 2e-4, batch 16 pairs."
    )
    if args.dpo_loss_types:
        run_multirun("dpo", ["sweep=dpo_loss_types"], sft["model_dir"], out / "runs", args.steps, args.seed)
        runs = measure(out / "runs", sft["model_dir"], args.seed)
        columns = ["algorithm.loss_type", "eval/exact_match", "kl_to_sft", "eval/rewards/margins", "seconds"]
        table = runs[[c for c in columns if c in runs]]
        head = ["| loss type | held-out exact match | KL to SFT (nats/answer) | held-out margin |", "|---|---|---|---|"]
        write_results(
            out,
            table,
            [header + " DPO's default β, one run each.", "", *head],
            lambda row: [row["algorithm.loss_type"]],
        )
    else:
        for algorithm in args.algorithms:
            run_grid(algorithm, GRID[algorithm], sft["model_dir"], out / "runs", args.steps, args.seed)
        runs = measure(out / "runs", sft["model_dir"], args.seed)
        columns = ["algorithm", "algorithm.beta", "eval/exact_match", "kl_to_sft", "eval/rewards/margins", "seconds"]
        table = runs[[c for c in columns if c in runs]].sort_values(["algorithm", "algorithm.beta"])
        head = [
            "| algorithm | β | held-out exact match | KL to SFT (nats/answer) | held-out margin |",
            "|---|---|---|---|---|",
        ]
        write_results(out, table, [header, "", *head], lambda row: [row["algorithm"], f"{row['algorithm.beta']:g}"])
    draw(table, sft_accuracy, out / "plot.png", args.dpo_loss_types)
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'plot.png'}")


def draw(table: pd.DataFrame, sft_accuracy: float, path: Path, loss_types: bool = False) -> None:
    """The study's plot; with `loss_types`, one point per DPO loss type, labelled with its name."""
    if not loss_types:
        return plot(table, sft_accuracy, path)
    title = "DPO loss types from one SFT start, default β, same budget"
    plot(table, sft_accuracy, path, "algorithm.loss_type", lambda row: str(row["algorithm.loss_type"]), title)


if __name__ == "__main__":
    main()
