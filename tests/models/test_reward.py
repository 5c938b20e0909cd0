"""Reward modelling: the Bradley-Terry loss, reading the reward, save/load, the scorer and its CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignlab.data import PairwiseDataModule
from alignlab.losses.reward import bradley_terry_loss
from alignlab.models.reward import VALUE_HEAD_FILE, RewardModel, last_token_index
from alignlab.score import RewardScorer, main
from tests.conftest import ListSource, build_module
from tests.models.test_model_math import pair_batch


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def test_bradley_terry_hand_checked():
    assert bradley_terry_loss(t(1.0), t(0.0)).item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert bradley_terry_loss(t(0.0), t(0.0)).item() == pytest.approx(math.log(2))
    # margin 0.5: -log σ(1 - 0 - 0.5)
    assert bradley_terry_loss(t(1.0), t(0.0), margin=t(0.5)).item() == pytest.approx(-log_sigmoid(0.5))
    # centring: + 0.1 * (1 + 0)^2
    expected = math.log(1 + math.exp(-1)) + 0.1
    assert bradley_terry_loss(t(1.0), t(0.0), center_rewards_coefficient=0.1).item() == pytest.approx(expected)


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [0.0, 0.01, 1.0])
def test_bradley_terry_random_batches(with_margin, center):
    g = torch.Generator().manual_seed(int(with_margin) * 10 + int(center * 100))
    rc, rr, m = (torch.randn(32, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    m = m.abs() if with_margin else None
    rows = zip(rc.tolist(), rr.tolist(), (m.tolist() if with_margin else [0.0] * 32))
    expected = sum(-log_sigmoid(c - r - mm) for c, r, mm in rows) / 32
    expected += center * sum((c + r) ** 2 for c, r in zip(rc.tolist(), rr.tolist())) / 32
    assert bradley_terry_loss(rc, rr, m, center).item() == pytest.approx(expected, rel=1e-12)


def test_reward_is_read_at_the_last_answer_token_not_at_padding():
    loss_mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    assert last_token_index(loss_mask, attention).tolist() == [3, 5, 2]


def test_reward_model_uses_the_hidden_state_at_that_token(tiny):
    model, tokenizer = tiny
    rm = RewardModel(model)
    batch = pair_batch(tokenizer)
    with torch.no_grad():
        rewards = rm(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    for i in range(4):
        last = int(batch["loss_mask"][i].nonzero().max())
        assert batch["input_ids"][i, last] == tokenizer.eos_token_id  # the answer's closing eos
        assert rewards[i].item() == pytest.approx(rm.value_head(hidden[i, last]).item(), abs=1e-5)


def test_save_and_load_round_trip_gives_identical_rewards(tiny, tmp_path):
    model, tokenizer = tiny
    module = build_module("rm", model, tokenizer)
    folder = module.save_final(tmp_path)
    assert (folder / VALUE_HEAD_FILE).exists() and (folder / "config.json").exists()
    batch = pair_batch(tokenizer)
    loaded = RewardModel.from_pretrained(folder)
    with torch.no_grad():
        before = module.model(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        after = loaded(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    assert torch.equal(before, after)
    # a folder with the older value_head.bin (prefixed keys, as other tools write it) loads the same head
    head = module.model.value_head.state_dict()
    torch.save({f"v_head.summary.{k}": v for k, v in head.items()}, folder / "value_head.bin")
    (folder / VALUE_HEAD_FILE).unlink()
    legacy = RewardModel.from_pretrained(folder)
    assert torch.equal(legacy.value_head.weight, module.model.value_head.weight)


def test_scorer_batches_and_forms_agree(tiny, tmp_path):
    model, tokenizer = tiny
    build_module("rm", model, tokenizer).save_final(tmp_path)
    prompts = ["3+4=", "10+25=", [{"role": "system", "content": "Add."}, {"role": "user", "content": "1+1="}]]
    answers = ["7", "35 and a longer answer", "2"]
    one_by_one = RewardScorer(tmp_path / "model", batch_size=1).score(prompts, answers)
    batched = RewardScorer(tmp_path / "model", batch_size=8).score(prompts, answers)
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    as_messages = RewardScorer(tmp_path / "model").score_messages(
        [[{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "7"}]]
    )
    assert as_messages[0] == pytest.approx(one_by_one[0], abs=1e-5)


def test_score_command_writes_one_score_per_row(tiny, tmp_path):
    model, tokenizer = tiny
    build_module("rm", model, tokenizer).save_final(tmp_path)
    rows = [
        {"prompt": "3+4=", "completion": "7", "id": 1},
        {"messages": [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "8"}], "id": 2},
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert (
        main(
            [
                "--model",
                str(tmp_path / "model"),
                "--input",
                str(tmp_path / "in.jsonl"),
                "--output",
                str(tmp_path / "out.jsonl"),
            ]
        )
        == 0
    )
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == [1, 2] and all(isinstance(r["score"], float) for r in out)
    assert out[0]["score"] == pytest.approx(RewardScorer(tmp_path / "model").score(["3+4="], ["7"])[0], abs=1e-5)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "3+4="}))
    assert (
        main(
            [
                "--model",
                str(tmp_path / "model"),
                "--input",
                str(tmp_path / "bad.jsonl"),
                "--output",
                str(tmp_path / "bad_out.jsonl"),
            ]
        )
        == 1
    )
    assert not (tmp_path / "bad_out.jsonl").exists()


def test_score_command_scores_empty_answers_in_every_form(tiny, tmp_path, capsys):
    """An empty answer is scored as given (it is an answer, usually a bad one), in each form the rows
    come in, and counted; a row with another fault still stops the command before anything is written."""
    import pandas as pd

    model, tokenizer = tiny
    build_module("rm", model, tokenizer).save_final(tmp_path)
    scorer = RewardScorer(tmp_path / "model")
    user = {"role": "user", "content": "3+4="}
    rows = [
        {"prompt": "3+4=", "completion": "7"},
        {"prompt": "3+4=", "completion": ""},
        {"messages": [user, {"role": "assistant", "content": " "}]},
        {"instruction": "3+4=", "output": ""},  # Alpaca
        {"conversations": [{"from": "human", "value": "3+4="}, {"from": "gpt", "value": ""}]},  # ShareGPT
        {"prompt": [user], "completion": [{"role": "assistant", "content": ""}]},
    ]
    expected = scorer.score(["3+4="] * 6, ["7", "", " ", "", "", ""])
    for name, write in {
        "in.jsonl": lambda path: path.write_text("\n".join(json.dumps(r) for r in rows)),
        "in.csv": lambda path: pd.DataFrame(
            [{"messages": json.dumps([user, {"role": "assistant", "content": a}])} for a in ("7", "")]
        ).to_csv(path, index=False),
    }.items():
        write(tmp_path / name)
        out = tmp_path / f"{name}.scored.jsonl"
        assert main(["--model", str(tmp_path / "model"), "--input", str(tmp_path / name), "--output", str(out)]) == 0
        scores = [json.loads(line)["score"] for line in out.read_text().splitlines()]
        want = expected if name == "in.jsonl" else expected[:2]
        assert scores == pytest.approx(want, abs=1e-5)
        empty = len(want) - 1
        assert f"({empty} of them for empty answers, scored as given)" in capsys.readouterr().out
    assert expected[1] != pytest.approx(expected[0], abs=1e-6)  # the empty answer has a score of its own
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "3+4=", "completion": "7"}) + "\n" + json.dumps({"completion": ""}))
    argv = ["--model", str(tmp_path / "model"), "--input", str(bad), "--output", str(tmp_path / "bad_out.jsonl")]
    assert main(argv) == 1 and not (tmp_path / "bad_out.jsonl").exists()
    error = capsys.readouterr().err
    assert "row 2" in error and "prompt" in error  # the empty answer is not what stops it: the missing prompt


def test_margin_column_reaches_the_loss(tiny):
    from alignlab.data.rows import to_canonical

    model, tokenizer = tiny
    rows = [
        to_canonical({"prompt": "3+4=", "chosen": "7", "rejected": "8", "margin": m}, "pairwise", "f", i)
        for i, m in enumerate([0.5, "2"])
    ]  # CSV gives margins as text
    dm = PairwiseDataModule(ListSource(rows), batch_size=2)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    batch = dm.collate(dm.splits["train"], with_prompts=False)
    assert batch["margin"].tolist() == [0.5, 2.0]
    module = build_module("rm", model, tokenizer)
    with torch.no_grad():
        loss, _ = module.compute(batch)
        r = module.model(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    assert loss.item() == pytest.approx(bradley_terry_loss(r[:2], r[2:], torch.tensor([0.5, 2.0])).item(), rel=1e-5)
    with pytest.raises(Exception, match="field 'margin': expected a number"):
        to_canonical({"prompt": "3+4=", "chosen": "7", "rejected": "8", "margin": "big"}, "pairwise", "f", 1)


def test_lora_reward_model_loads_from_adapter_and_merged_folders(tiny, tmp_path):
    import copy

    from omegaconf import OmegaConf

    from alignlab.models.loading import apply_lora

    model, tokenizer = tiny
    lora = apply_lora(
        copy.deepcopy(model), OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
    )
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    module = build_module("rm", lora, tokenizer)
    module.save_final(tmp_path, merge_lora=True)
    batch = pair_batch(tokenizer)
    with torch.no_grad():
        expected = module.model(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        for folder in (tmp_path / "model", tmp_path / "adapter"):
            assert (folder / VALUE_HEAD_FILE).exists()
            loaded = RewardModel.from_pretrained(folder)
            got = loaded(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
            assert torch.allclose(got, expected, atol=1e-5), folder.name
