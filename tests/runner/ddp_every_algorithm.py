"""Run by tests/runner/test_distributed.py under `torchrun --nproc_per_node 2`: every algorithm trains a few
steps with hardware=ddp_cpu; each process writes a fingerprint of the weights it trained (which DDP
must keep identical on every process) and the run's final metrics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

from alignlab.runner.config import compose
from alignlab.train import train

QUICK = [
    "hardware=ddp_cpu",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.max_steps=3",
    "trainer.log_every_n_steps=1",
    "evaluation.at_start=false",
    "evaluation.max_new_tokens=4",
    "batch_size=4",
    "eval_batch_size=32",
]
ALGORITHMS = {
    "sft": [],
    "dpo": [],
    "cpo": [],
    "orpo": [],
    "simpo": [],
    "kto": ["data.unpair=true", "data=arith_kto"],
    "rm": [],
    "grpo": [  # a reward that varies for the untrained model's answers (accuracy is 0 for all of them)
        "algorithm.num_generations=4",
        "algorithm.max_completion_length=6",
        "algorithm.reward_funcs=[{_target_:alignlab.online.rewards.length_reward,target:4}]",
    ],
    "ppo": ["algorithm.response_length=6", "algorithm.num_mini_batches=2"],  # reward_model: the rm run
    "gkd": ["algorithm.max_new_tokens=4"],  # teacher: the sft run; steps 0 and 2 on-policy, 1 the data's answers
}


def fingerprint(module) -> dict[str, list[float]]:
    """The sum and a fixed random projection of every trained parameter."""
    generator = torch.Generator().manual_seed(0)
    prints = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            weights = p.detach().double().flatten()
            projection = torch.randn(weights.shape, generator=generator, dtype=torch.float64)
            prints[name] = [weights.sum().item(), (weights @ projection).item()]
    return prints


class Fingerprint(L.Callback):
    """Writes, per process, the trained weights' fingerprint at the start and at the end of training."""

    def __init__(self, path: str):
        self.path, self.start = path, None

    def on_train_start(self, trainer, module) -> None:
        self.start = fingerprint(module)

    def on_train_end(self, trainer, module) -> None:
        prints = {"start": self.start, "end": fingerprint(module)}
        Path(f"{self.path}.rank{trainer.global_rank}.json").write_text(json.dumps(prints))


def main(out: Path) -> None:
    for name, extra in ALGORITHMS.items():
        if name == "ppo":
            extra = [*extra, f"algorithm.reward_model={out / 'rm' / 'model'}"]
        if name == "gkd":
            extra = [*extra, f"algorithm.teacher_model_name_or_path={out / 'sft' / 'model'}"]
        callback = [
            f"+callbacks.fingerprint._target_={__name__}.Fingerprint",
            f"+callbacks.fingerprint.path={out / name}",
        ]
        result = train(compose([f"algorithm={name}", *QUICK, *extra, *callback], out / name))
        rank = torch.distributed.get_rank()
        (out / f"{name}.result.rank{rank}.json").write_text(json.dumps(result["metrics"]))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
