"""Reward models in the sequence-classification format (TRL, ms-swift, OpenRLHF, the Hub): read wherever
alignlab takes a reward model, and written by `algorithm=rm` with `export_format: seq_cls`. Both
directions are compared with transformers' own AutoModelForSequenceClassification forward, in float64."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from alignlab.models.reward import RewardModel, is_reward_model_folder, is_seq_cls_folder
from alignlab.score import RewardScorer, main
from tests.conftest import CONF, build_module, compose
from tests.models.test_model_math import pair_batch

PROMPTS = ["3+4=", "10+25=", [{"role": "system", "content": "Add."}, {"role": "user", "content": "1+1="}]]
ANSWERS = ["7", "35 and a longer answer", "2"]


def hf_scores(folder, batch) -> torch.Tensor:
    """transformers' own forward of the folder as a sequence classifier: [N] logits, float64."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float64).eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]


@pytest.fixture(scope="module")
def seq_cls_folder(tiny_model_dir, tiny, tmp_path_factory):
    """The tiny model saved as a one-label sequence classifier with a random `score` layer, as TRL's
    RewardTrainer saves one."""
    from transformers import AutoModelForSequenceClassification

    _, tokenizer = tiny
    folder = tmp_path_factory.mktemp("seq_cls")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=torch.Generator().manual_seed(0)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_one_label_classifier_is_a_reward_model_folder(seq_cls_folder, tmp_path):
    assert is_seq_cls_folder(seq_cls_folder) and is_reward_model_folder(seq_cls_folder)
    two = tmp_path / "two_labels"
    two.mkdir()
    config = json.loads((seq_cls_folder / "config.json").read_text())
    config["id2label"] = {"0": "bad", "1": "good"}
    (two / "config.json").write_text(json.dumps(config))
    assert not is_seq_cls_folder(two) and not is_reward_model_folder(two)  # a two-class classifier is not a reward


def test_seq_cls_folder_scores_as_transformers_forward(seq_cls_folder, tiny):
    """seq-cls folder → alignlab: RewardModel and RewardScorer give the classifier's logit at the last
    non-pad token, as transformers computes it."""
    _, tokenizer = tiny
    batch = pair_batch(tokenizer)  # right-padded rows of different lengths
    rm = RewardModel.from_pretrained(seq_cls_folder, dtype=torch.float64).eval()
    with torch.no_grad():
        ours = rm(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    torch.testing.assert_close(ours, hf_scores(seq_cls_folder, batch), rtol=0, atol=1e-6)
    assert ours.std() > 0  # the rows score differently: the test can tell positions apart

    scorer = RewardScorer(seq_cls_folder, dtype=torch.float64)
    prompts = [[{"role": "user", "content": "3+4="}], [{"role": "user", "content": "10+25="}]] * 2
    answers = ["7", "35", "9", "34 and more"]
    assert scorer.score(prompts, answers) == pytest.approx(ours.tolist(), abs=1e-6)


def test_seq_cls_folder_works_as_grpo_reward_and_with_the_score_command(seq_cls_folder, tmp_path):
    from alignlab.online.rewards import build_reward_function, call_reward_function

    name, fn = build_reward_function(str(seq_cls_folder))
    assert name == f"reward_model:{seq_cls_folder.name}"
    values = call_reward_function(name, fn, PROMPTS, ANSWERS, {})
    assert values == pytest.approx(RewardScorer(seq_cls_folder).score(PROMPTS, ANSWERS), abs=1e-6)

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "completion": a}) + "\n" for p, a in zip(["3+4=", "1+1="], "72")))
    assert main(["--model", str(seq_cls_folder), "--input", str(rows), "--output", str(tmp_path / "out.jsonl")]) == 0
    scored = [json.loads(line)["score"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert scored == pytest.approx(RewardScorer(seq_cls_folder).score(["3+4=", "1+1="], ["7", "2"]), abs=1e-6)


def test_ppo_takes_a_seq_cls_reward_and_value_model(seq_cls_folder, tiny, tmp_path):
    from alignlab.runner.config import check_config
    from tests.algorithms.test_ppo import prompt_batch

    model, tokenizer = tiny
    folders = [f"algorithm.reward_model={seq_cls_folder}", f"algorithm.value_model={seq_cls_folder}"]
    check_config(compose(["algorithm=ppo", *folders], tmp_path))  # accepted before any model loads
    module = build_module(
        "ppo",
        copy.deepcopy(model),
        tokenizer,
        reward_model=str(seq_cls_folder),
        value_model=str(seq_cls_folder),
        response_length=6,
    )
    torch.manual_seed(0)
    rollout = module.rollout(prompt_batch(tokenizer))
    assert torch.isfinite(rollout["stats"]["objective/scores"])
    assert module.value.value_head.weight.requires_grad  # the value model trains from the classifier


def test_rm_exports_seq_cls_that_transformers_scores_exactly_as_alignlab(tiny, tmp_path):
    """alignlab RM → seq_cls export → transformers' forward equals alignlab's scores."""
    model, tokenizer = tiny
    module = build_module("rm", copy.deepcopy(model), tokenizer, export_format="seq_cls")
    assert module.model.value_head.bias is None  # transformers' `score` layer has no bias either
    with torch.no_grad():  # a head that tells rows apart
        module.model.value_head.weight.normal_(generator=torch.Generator().manual_seed(1))
    folder = module.save_final(tmp_path)
    assert is_seq_cls_folder(folder) and not (folder / "value_head.safetensors").exists()
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification")
    assert config["pad_token_id"] == tokenizer.pad_token_id

    batch = pair_batch(tokenizer)
    ours = copy.deepcopy(module.model).double().eval()
    with torch.no_grad():
        expected = ours(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    torch.testing.assert_close(hf_scores(folder, batch), expected, rtol=0, atol=1e-6)
    assert expected.std() > 0
    # and alignlab reads its own export back to the same scores
    loaded = RewardModel.from_pretrained(folder, dtype=torch.float64).eval()
    with torch.no_grad():
        again = loaded(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    torch.testing.assert_close(again, expected, rtol=0, atol=1e-6)


def test_the_default_rm_keeps_its_value_head_format_and_bias(tiny, tmp_path):
    model, tokenizer = tiny
    module = build_module("rm", copy.deepcopy(model), tokenizer)
    assert module.model.value_head.bias is not None
    folder = module.save_final(tmp_path)
    assert (folder / "value_head.safetensors").exists() and not is_seq_cls_folder(folder)
    with torch.no_grad():
        module.model.value_head.bias.fill_(0.5)
    with pytest.raises(ValueError, match="bias"):  # a biased head cannot become a `score` layer exactly
        module.model.save_seq_cls(folder, tokenizer)


def test_export_format_is_checked_before_any_model_loads():
    from omegaconf import OmegaConf

    from alignlab.algorithms.rm import RM
    from alignlab.errors import ConfigError

    cfg = OmegaConf.load(CONF / "algorithm" / "rm.yaml")
    assert cfg.export_format == "value_head"
    cfg.export_format = "onnx"
    with pytest.raises(ConfigError, match="export_format"):
        RM.check_config(cfg)
