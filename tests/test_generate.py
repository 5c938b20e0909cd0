"""`python -m alignlab.generate`: one completion per input row, through the chat template, greedy
answers equal to the model's own greedy decode cut at the stop token, seeded sampling that repeats,
and errors that name the file, row and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignlab.generate import complete, load_policy, main

PROMPTS = [
    [{"role": "user", "content": "3+4="}],
    [{"role": "system", "content": "Add."}, {"role": "user", "content": "10+25="}],
    [{"role": "user", "content": "0+0="}],
    [{"role": "user", "content": "40+9="}],
    [{"role": "user", "content": "7+7="}],
]


def noisy_copy(source: Path, folder: Path, seed: int, std: float = 0.05) -> Path:
    """The model in `source` with seeded Gaussian noise on every weight, saved with its tokenizer to
    `folder`: the untrained tiny model answers every prompt alike, a noisy copy answers each its own way
    (some answers end at the end of turn, others run to the length limit)."""
    from transformers import AutoModelForCausalLM

    from alignlab.models.loading import tokenizer_from_pretrained

    model = AutoModelForCausalLM.from_pretrained(source)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)
    model.save_pretrained(folder)
    tokenizer_from_pretrained(source).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def policy(tiny_model_dir, tmp_path_factory):
    """(folder, model, tokenizer) of a noisy copy of the tiny model, loaded as the command loads it."""
    folder = noisy_copy(tiny_model_dir, tmp_path_factory.mktemp("policy"), seed=0)
    return (folder, *load_policy(folder))


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_writes_each_input_row_with_its_completion(policy, tmp_path):
    folder, model, tokenizer = policy
    rows = [
        {"prompt": "3+4=", "id": 1},
        {"messages": [*PROMPTS[1], {"role": "assistant", "content": "35"}], "id": 2},  # the answer is not prompted
        {"prompt": PROMPTS[2], "id": 3},
    ]
    args = ["--model", str(folder), "--input", str(write_rows(tmp_path / "in.jsonl", rows))]
    assert main([*args, "--output", str(tmp_path / "out.jsonl"), "--batch-size", "2"]) == 0
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [{k: v for k, v in r.items() if k != "completion"} for r in out] == rows
    assert [r["completion"] for r in out] == complete(model, tokenizer, PROMPTS[:3])
    # CSV in, the same answers out
    (tmp_path / "in.csv").write_text('prompt,id\n3+4=,1\n"0+0=",3\n')
    assert (
        main(["--model", str(folder), "--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "c.jsonl")]) == 0
    )
    assert [r["completion"] for r in read_jsonl(tmp_path / "c.jsonl")] == [out[0]["completion"], out[2]["completion"]]


def test_prompts_go_through_the_chat_template_as_in_training(policy, monkeypatch):
    from alignlab.data.tokenize import encode_conversations
    from alignlab.online import generation

    _, model, tokenizer = policy
    seen = []
    real = generation.generate

    def recording(model, tokenizer, ids, mask, *args, **kwargs):
        seen.extend(row[m.bool()].tolist() for row, m in zip(ids, mask))  # left padding removed
        return real(model, tokenizer, ids, mask, *args, **kwargs)

    monkeypatch.setattr(generation, "generate", recording)
    complete(model, tokenizer, PROMPTS, batch_size=2)
    trained = [p for p, _ in encode_conversations(tokenizer, PROMPTS, [["7"]] * len(PROMPTS))]
    assert sorted(seen) == sorted(trained)  # batched shortest first: compare as sets of rows
    # and they are what the template writes with its generation prompt (ChatML: "<|im_start|>assistant\n")
    rendered = tokenizer.apply_chat_template(PROMPTS[0], add_generation_prompt=True, tokenize=False)
    assert trained[0] == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_greedy_answers_are_the_models_own_greedy_decode_cut_at_the_stop_token(policy):
    from alignlab.data.tokenize import encode_prompts, end_of_turn_ids

    _, model, tokenizer = policy
    max_new = 12
    got = complete(model, tokenizer, PROMPTS, max_new_tokens=max_new, batch_size=3)
    assert got == complete(model, tokenizer, PROMPTS, max_new_tokens=max_new, batch_size=1)  # deterministic
    stop = end_of_turn_ids(tokenizer)[-1]  # <|im_end|>: ChatML's end of turn and the tiny model's eos
    expected, stopped = [], 0
    for ids in encode_prompts(tokenizer, PROMPTS):
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=stop)
        answer = out[0, len(ids) :].tolist()
        if stop in answer:
            answer, stopped = answer[: answer.index(stop)], stopped + 1
        expected.append(tokenizer.decode(answer, skip_special_tokens=True))
    assert got == expected
    assert 0 < stopped < len(PROMPTS)  # both kinds of answer are covered: ended, and cut at the limit


def test_sampling_with_a_seed_repeats_whatever_the_batch(policy, tmp_path):
    folder, model, tokenizer = policy
    sampled = complete(model, tokenizer, PROMPTS, temperature=1.0, seed=3, batch_size=2)
    assert sampled == complete(model, tokenizer, PROMPTS, temperature=1.0, seed=3, batch_size=5)
    assert sampled != complete(model, tokenizer, PROMPTS, temperature=1.0, seed=4, batch_size=2)
    assert sampled != complete(model, tokenizer, PROMPTS)
    rows = write_rows(tmp_path / "in.jsonl", [{"prompt": p} for p in PROMPTS])
    args = ["--model", str(folder), "--input", str(rows), "--temperature", "1", "--seed", "3"]
    assert main([*args, "--output", str(tmp_path / "out.jsonl")]) == 0
    assert [r["completion"] for r in read_jsonl(tmp_path / "out.jsonl")] == sampled


def test_a_lora_adapter_folder_answers_as_its_merged_model(tiny, tiny_model_dir, tmp_path):
    import copy

    from omegaconf import OmegaConf

    from alignlab.models.export import save_model
    from alignlab.models.loading import apply_lora

    model, tokenizer = tiny
    lora = apply_lora(
        copy.deepcopy(model), OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=generator)
    save_model(lora, tokenizer, tmp_path, merge_lora=True)
    merged = complete(*load_policy(tmp_path / "model"), PROMPTS)
    assert complete(*load_policy(tmp_path / "adapter"), PROMPTS) == merged
    assert merged != complete(*load_policy(tiny_model_dir), PROMPTS)  # the adapter changed the answers


def test_errors_name_the_file_row_and_field(policy, tmp_path, capsys):
    folder = str(policy[0])
    missing = tmp_path / "nope.jsonl"
    assert main(["--model", folder, "--input", str(missing), "--output", str(tmp_path / "o.jsonl")]) == 1
    assert f"{missing}: no such file" in capsys.readouterr().err
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": "1+1="}, {"question": "2+2="}])
    assert main(["--model", folder, "--input", str(bad), "--output", str(tmp_path / "o.jsonl")]) == 1
    assert f"{bad}, row 2, field 'messages': missing (give `messages` or `prompt`)" in capsys.readouterr().err
    good = write_rows(tmp_path / "good.jsonl", [{"prompt": "1+1="}])
    assert (
        main(["--model", str(tmp_path / "no_model"), "--input", str(good), "--output", str(tmp_path / "o.jsonl")]) == 1
    )
    assert "no_model: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.jl").exists()
    with pytest.raises(SystemExit):  # a folder that is not there is said before any model loads
        main(["--model", folder, "--input", str(good), "--output", str(tmp_path / "no_dir" / "o.jsonl")])
    assert f"--output {tmp_path / 'no_dir' / 'o.jsonl'}: no such folder to write it in" in capsys.readouterr().err
