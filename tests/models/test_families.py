"""The family matrix itself (tests/families.py): each folder loads through alignlab's ordinary path
and has the properties its builder promises."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tests.families import CHAT_FAMILIES, FAMILIES, SPEC, SYSTEM_REFUSING


@pytest.mark.parametrize("name", FAMILIES)
def test_family_loads_through_alignlab(family_dir, name):
    import torch
    from transformers import GenerationConfig

    from alignlab.models.loading import load_model

    folder = family_dir(name)
    cfg = OmegaConf.load("conf/model/tiny.yaml")
    cfg.path, cfg.tiny = str(folder), None
    model, tokenizer, _ = load_model(cfg, require_chat_template=False)
    spec = SPEC[name]
    assert tokenizer.eos_token == spec["roles"]["eos_token"]
    assert tokenizer.bos_token == spec["roles"].get("bos_token")
    assert (tokenizer.chat_template == spec["template"]) if spec["template"] else tokenizer.chat_template
    eos = GenerationConfig.from_pretrained(folder).eos_token_id
    listed = [tokenizer.convert_tokens_to_ids(t) for t in spec["eos_list"]]
    assert eos == (listed if len(listed) > 1 else listed[0])
    ids = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "hello world"
    assert len(ids) < len("hello world")  # learnt merges: not one token per byte
    assert model(torch.tensor([ids])).logits.shape == (1, len(ids), len(tokenizer))


@pytest.mark.parametrize("name", CHAT_FAMILIES)
def test_family_template_properties(family_dir, name):
    from jinja2.exceptions import TemplateError
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family_dir(name))
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    text = tokenizer.apply_chat_template(turn, tokenize=False)
    after = {"llama3": "ok<|eot_id|>", "qwen25": "ok<|im_end|>\n", "qwen3": "</think>\n\nok<|im_end|>\n"}
    after |= {"mistral": "[/INST]ok</s>", "gemma2": "model\nok<end_of_turn>\n", "phi3": "ok<|end|>\n<|endoftext|>"}
    after["gemma3"] = after["gemma2"]
    assert text.endswith(after[name])
    system = [{"role": "system", "content": "Be brief."}, *turn]
    if name in SYSTEM_REFUSING:
        with pytest.raises(TemplateError):
            tokenizer.apply_chat_template(system, tokenize=False)
    else:
        assert "Be brief." in tokenizer.apply_chat_template(system, tokenize=False)
