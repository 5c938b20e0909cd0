"""Study: SFT, then DPO from the SFT model, on the bundled arithmetic task with the tiny model.

Writes `results.md` and `results.json` (held-out metrics before and after each stage, wall time)
to its output folder. The "Measured results" table in docs/results.md comes from this study.

    python experiments/sft_then_dpo.py [--out experiments/out/sft_then_dpo] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from alignlab.runner.config import compose
from alignlab.train import train

QUIET = ["logger=csv", "trainer.enable_progress_bar=false"]
STAGES = {
    "sft": ["algorithm=sft", "batch_size=32", "trainer.max_steps=800", "trainer.val_check_interval=400"],
    "dpo": ["algorithm=dpo", "trainer.max_steps=200", "trainer.val_check_interval=100", "optim.lr=2e-4"],
}
SHOWN = ["eval/exact_match", "eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"]


def first_and_last_eval(run_dir: Path) -> dict[str, tuple[float, float]]:
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/loss")]
    return {m: (float(rows[0][m]), float(rows[-1][m])) for m in SHOWN if rows[0].get(m)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/out/sft_then_dpo"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    results = {}
    sft = train(compose([*STAGES["sft"], f"seed={args.seed}", *QUIET], args.out / "sft"))
    results["sft"] = {"seconds": sft["seconds"], "eval": first_and_last_eval(Path(sft["run_dir"]))}
    dpo = train(
        compose(
            [*STAGES["dpo"], f"model.path={sft['model_dir']}", "model.tiny=null", f"seed={args.seed}", *QUIET],
            args.out / "dpo",
        )
    )
    results["dpo"] = {"seconds": dpo["seconds"], "eval": first_and_last_eval(Path(dpo["run_dir"]))}

    lines = ["| stage | seconds | " + " | ".join(SHOWN) + " |", "|---|---|" + "---|" * len(SHOWN)]
    for stage, r in results.items():
        cells = [f"{r['eval'][m][0]:.3g} → {r['eval'][m][1]:.3g}" if m in r["eval"] else "" for m in SHOWN]
        lines.append(f"| {stage} | {r['seconds']} | " + " | ".join(cells) + " |")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
