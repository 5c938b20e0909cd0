"""End to end on the embedded tiny model: SFT and DPO learn, outputs reload, runs resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from alignlab.train import train
from tests.conftest import QUIET, compose, eval_curve, from_sft, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dpo_run(sft_run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dpo")
    cfg = compose(from_sft(sft_run), run_dir)
    return train(cfg)


def test_sft_raises_held_out_exact_match(sft_run):
    curve = eval_curve(Path(sft_run["run_dir"]), "eval/exact_match")
    # step 0 is before training; Lightning logs the 0-based index of the last step (799 = the 800th)
    assert curve[0][0] == 0 and curve[-1][0] == 799
    assert curve[0][1] < 0.05  # the untrained model cannot add
    assert curve[-1][1] > 0.5
    loss = eval_curve(Path(sft_run["run_dir"]), "eval/loss")
    assert loss[-1][1] < 0.5 * loss[0][1]


def test_dpo_after_sft_raises_held_out_preference_accuracy_and_margin(dpo_run):
    run_dir = Path(dpo_run["run_dir"])
    acc, margin = eval_curve(run_dir, "eval/rewards/accuracies"), eval_curve(run_dir, "eval/rewards/margins")
    assert acc[0] == (0, 0.0) and margin[0] == (0, 0.0)  # policy == reference at the start
    assert acc[-1][1] > 0.8
    assert margin[-1][1] > 0.05
    chosen, rejected = eval_curve(run_dir, "eval/rewards/chosen"), eval_curve(run_dir, "eval/rewards/rejected")
    assert chosen[-1][1] > rejected[-1][1]
    assert dpo_run["metrics"]["eval/exact_match"] >= 0.9 * eval_curve(run_dir, "eval/exact_match")[0][1]


def test_run_folder_holds_config_metrics_checkpoints_and_hf_model(dpo_run):
    run_dir = Path(dpo_run["run_dir"])
    config = (run_dir / "config.yaml").read_text()
    assert "${" not in config and "beta: 0.1" in config
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    with open(run_dir / "metrics.csv") as f:
        header = next(csv.reader(f))
    for name in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
        "nll_loss",
    ):
        assert f"train/{name}" in header and f"eval/{name}" in header, name
    model_dir = Path(dpo_run["model_dir"])
    assert model_dir == run_dir / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 200


def held_out_accuracy(model_dir: Path, n: int = 32) -> float:
    """Reload a saved model with plain transformers and greedy-decode held-out problems."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlab.data.arith import ArithTask
    from alignlab.data.collate import collate_prompts
    from alignlab.data.tokenize import encode_prompts
    from alignlab.online.generation import answer_texts, cut_at_stop, exact_match, generate, stop_token_ids

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    rows = ArithTask().load("prompt")["eval"][:n]
    batch = collate_prompts(encode_prompts(tokenizer, [r["prompt"] for r in rows]), tokenizer.pad_token_id)
    tokens = generate(model, tokenizer, batch["prompt_input_ids"], batch["prompt_attention_mask"], max_new_tokens=8)
    texts = answer_texts(tokenizer, *cut_at_stop(tokens, stop_token_ids(model, tokenizer)))
    return exact_match(texts, [r["solution"] for r in rows]).mean().item()


def test_saved_models_reload_and_generate_right_answers(sft_run, dpo_run):
    assert held_out_accuracy(Path(sft_run["model_dir"])) > 0.5
    assert held_out_accuracy(Path(dpo_run["model_dir"])) > 0.5


def test_lora_dpo_saves_adapter_and_merged_model_that_agree(sft_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = compose(
        [
            f"model.path={sft_run['model_dir']}",
            "model.tiny=null",
            "model.lora.enabled=true",
            "trainer.max_steps=60",
            "trainer.val_check_interval=60",
            "optim.lr=2e-3",
            *QUIET,
        ],
        tmp_path,
    )
    result = train(cfg)
    assert result["metrics"]["eval/rewards/accuracies"] > 0.5
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    base = AutoModelForCausalLM.from_pretrained(sft_run["model_dir"])
    ids = torch.tensor([[258, 117, 115, 101, 114, 10, 51, 43, 52, 61, 256, 10, 258]])
    with torch.no_grad():
        base_logits = base(ids).logits  # before PEFT injects the adapter into `base` in place
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter")
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)
        assert not torch.allclose(merged(ids).logits, base_logits, atol=1e-4)


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    first = compose(
        [
            "trainer.max_steps=20",
            "trainer.val_check_interval=10",
            "callbacks.checkpoint.every_n_train_steps=10",
            *QUIET,
        ],
        tmp_path / "a",
    )
    train(first)
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 20
    resumed = compose(
        ["trainer.max_steps=30", "trainer.val_check_interval=10", f"resume={ckpt}", *QUIET], tmp_path / "b"
    )
    assert train(resumed)["steps"] == 30


def test_default_command_trains_dpo_and_prints_a_summary(tmp_path):
    """`python -m alignlab` exactly as the README gives it (run folder redirected into tmp)."""
    out = run_cli([f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "alignlab: dpo finished 1000 steps" in out.stdout
    assert f"run folder:  {tmp_path}" in out.stdout and "eval:" in out.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metrics"]["eval/rewards/accuracies"] > 0.8
    assert summary["metrics"]["eval/rewards/margins"] > 0.1
    assert (tmp_path / "wandb").is_dir()  # W&B logged offline by itself


def test_the_final_model_is_always_validated(tmp_path):
    """15 steps validated every 10: the runner adds a validation of the final model, so the summary's
    eval metrics describe the model that was saved."""
    result = train(compose(["trainer.max_steps=15", "trainer.val_check_interval=10", *QUIET], tmp_path))
    steps = [step for step, _ in eval_curve(tmp_path, "eval/loss")]
    assert steps == [0, 9, 15]  # before training, after 10 steps (Lightning's 0-based 9), the final model
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 15  # checkpointing every 250 steps would have written none
    assert result["metrics"]["eval/loss"] == pytest.approx(eval_curve(tmp_path, "eval/loss")[-1][1])


def test_logger_none_trains_with_the_default_callbacks(tmp_path):
    """logger=none: console only. The learning-rate monitor (a default callback) has nowhere to log and
    is left out rather than stopping the run; no metrics file is written, the summary still is."""
    result = train(
        compose(
            ["logger=none", "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.enable_progress_bar=false"],
            tmp_path,
        )
    )
    assert result["steps"] == 4 and "eval/loss" in result["metrics"]
    assert not (tmp_path / "metrics.csv").exists() and (tmp_path / "summary.json").exists()
