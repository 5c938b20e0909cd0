"""Installing a chat template on a base model (issue 15, item 6), on GPT-2-style (bos = eos, no pad,
tied embeddings) and Llama-base-style (BOS `<s>` added by the tokenizer, untied) families: the markers
become single special tokens with mean-initialised embedding rows, BOS is kept where the model uses
one, answers end with the template's end of turn, and the export reloads encoding exactly what
training saw and stopping generation at the end of turn."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from alignlab.data.tokenize import encode_answers, encode_prompts, end_of_turn_ids
from alignlab.errors import ConfigError
from alignlab.models.loading import (
    grow_embeddings,
    install_chat_template,
    load_model,
    template_markers,
    tokenizer_from_pretrained,
)
from alignlab.models.tiny import CHATML_TEMPLATE
from tests.conftest import CONF, QUIET, compose

BASE_FAMILIES = ("gpt2", "llama_base")
CHATML_MARKERS = ["<|im_start|>", "<|im_end|>"]
PROMPTS = [
    [{"role": "user", "content": "2+2="}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "7+8="}],
]
ANSWERS = ["4", "15"]


def model_cfg(folder, *overrides: str):
    cfg = OmegaConf.load(CONF / "model" / "tiny.yaml")
    cfg.path, cfg.tiny = str(folder), None
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))


def conversation_ids(tokenizer) -> list[list[int]]:
    """prompt + answer ids as alignlab trains on them."""
    return [p + a for p, a in zip(encode_prompts(tokenizer, PROMPTS), encode_answers(tokenizer, ANSWERS))]


def test_markers_are_the_templates_control_tokens_plus_new_special_tokens():
    assert template_markers(CHATML_TEMPLATE) == CHATML_MARKERS
    phi3 = "{{'<|user|>\n' + m['content'] + '<|end|>\n'}}{{ '<|assistant|>\n' }}{{ '<|end|>' }}"
    assert template_markers(phi3) == ["<|user|>", "<|end|>", "<|assistant|>"]
    gemma = "{{ '<start_of_turn>user\n' + m['content'] + '<end_of_turn>\n' }}"
    assert template_markers(gemma, ["<start_of_turn>", "<end_of_turn>"]) == ["<start_of_turn>", "<end_of_turn>"]


def test_new_rows_are_the_mean_of_the_old_ones_input_and_output_tied_or_not():
    from transformers import LlamaConfig, LlamaForCausalLM

    def tiny_llama(tied: bool):
        config = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                             num_attention_heads=2, tie_word_embeddings=tied)  # fmt: skip
        torch.manual_seed(0)
        return LlamaForCausalLM(config).double()

    for tied in (True, False):
        model = tiny_llama(tied)
        inp, out = model.get_input_embeddings().weight.clone(), model.get_output_embeddings().weight.clone()
        grow_embeddings(model, [10, 11])
        grown_in, grown_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        assert grown_in.shape == grown_out.shape == (12, 8)
        torch.testing.assert_close(grown_in[:10], inp)
        torch.testing.assert_close(grown_out[:10], out)
        for row in (10, 11):
            torch.testing.assert_close(grown_in[row], inp.mean(0))
            torch.testing.assert_close(grown_out[row], out.mean(0))
        assert (grown_in.data_ptr() == grown_out.data_ptr()) == tied
    model = tiny_llama(False)  # ids 8, 9 added to an 8-token tokenizer: the padded rows are reset to the mean
    before = model.get_input_embeddings().weight[:8].clone()
    grow_embeddings(model, [8, 9])
    assert model.get_input_embeddings().weight.shape[0] == 10
    torch.testing.assert_close(model.get_input_embeddings().weight[9], before.mean(0))


@pytest.mark.parametrize("name", BASE_FAMILIES)
def test_sft_installs_chatml_with_single_token_markers_on_a_base_model(family_dir, name):
    from transformers import AutoModelForCausalLM

    folder = family_dir(name)
    base_tokenizer = tokenizer_from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder)
    model, tokenizer, _ = load_model(model_cfg(folder), require_chat_template=False)

    n = len(base_tokenizer)
    start, end = tokenizer.convert_tokens_to_ids(CHATML_MARKERS)
    assert (start, end) == (n, n + 1) and len(tokenizer) == n + 2
    for marker in CHATML_MARKERS:
        assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1
        assert marker in tokenizer.all_special_tokens
    for layer, base_layer in ((model.get_input_embeddings(), base.get_input_embeddings()),
                              (model.get_output_embeddings(), base.get_output_embeddings())):  # fmt: skip
        assert layer.weight.shape[0] == n + 2
        torch.testing.assert_close(layer.weight[:n], base_layer.weight[:n])
        torch.testing.assert_close(layer.weight[n:], base_layer.weight[:n].mean(0).expand(2, -1))

    ids = conversation_ids(tokenizer)
    uses_bos = name == "llama_base"  # Llama's tokenizer puts <s> first; GPT-2's puts nothing
    assert tokenizer.chat_template == ("{{ bos_token }}" if uses_bos else "") + CHATML_TEMPLATE
    for row in ids:
        assert (row[0] == tokenizer.bos_token_id) == uses_bos and row.count(tokenizer.bos_token_id) == uses_bos
        assert row[-1] == end  # the answer ends with the template's end of turn, not eos
    assert end_of_turn_ids(tokenizer)[-1] == end
    eos = model.generation_config.eos_token_id
    assert end in eos and tokenizer.eos_token_id in eos
    assert tokenizer.pad_token_id == base_tokenizer.eos_token_id < n  # no pad: eos, an id the model has


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", BASE_FAMILIES)
def test_sft_export_reloads_with_the_template_ids_and_end_of_turn_training_used(family_dir, tmp_path, name, lora):
    from transformers import AutoModelForCausalLM, GenerationConfig

    from alignlab.train import train

    folder = family_dir(name)
    _, trained_tokenizer, _ = load_model(model_cfg(folder), require_chat_template=False)
    overrides = ["algorithm=sft", f"model.path={folder}", "model.tiny=null", "trainer.max_steps=3", "batch_size=4"]
    overrides += ["evaluation.at_start=false", "evaluation.exact_match=false", "data.source.n_eval=8", *QUIET]
    overrides += ["model.lora.enabled=true", "model.lora.r=4"] if lora else []
    result = train(compose(overrides, tmp_path))
    export = result["model_dir"]
    # named after the folder it started from, then the overrides that differ from the defaults
    assert result["run_name"].startswith(f"sft-{folder.name}-max_steps=3,batch_size=4,")

    reloaded, tokenizer, _ = load_model(model_cfg(export), require_chat_template=True)  # as the next stage loads it
    assert tokenizer.chat_template == trained_tokenizer.chat_template
    assert len(tokenizer) == len(trained_tokenizer)  # nothing more to add
    assert conversation_ids(tokenizer) == conversation_ids(trained_tokenizer)
    assert conversation_ids(tokenizer_from_pretrained(export)) == conversation_ids(trained_tokenizer)
    end = trained_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in GenerationConfig.from_pretrained(export).eos_token_id
    plain = AutoModelForCausalLM.from_pretrained(export)
    assert plain.get_input_embeddings().weight.shape[0] == len(trained_tokenizer)
    if lora:  # the new tokens' rows trained (PEFT trainable tokens) and were merged into the export
        base = AutoModelForCausalLM.from_pretrained(folder)
        n = len(tokenizer_from_pretrained(folder))
        for layer, base_layer in ((plain.get_input_embeddings(), base.get_input_embeddings()),
                                  (plain.get_output_embeddings(), base.get_output_embeddings())):  # fmt: skip
            torch.testing.assert_close(layer.weight[:n], base_layer.weight[:n])  # LoRA leaves the old rows
            assert not torch.allclose(layer.weight[n:], base_layer.weight[:n].mean(0).expand(2, -1))


def test_an_adapter_alone_cannot_carry_new_tokens(family_dir):
    cfg = model_cfg(family_dir("gpt2"), "lora.enabled=true", "lora.merge=false")
    with pytest.raises(ConfigError, match=r"model\.lora\.merge=true"):
        load_model(cfg, require_chat_template=False)


def test_a_template_whose_tokens_the_tokenizer_has_adds_nothing(tiny_model_dir):
    tokenizer = tokenizer_from_pretrained(tiny_model_dir)
    n = len(tokenizer)
    assert install_chat_template(tokenizer, CHATML_TEMPLATE) == [] and len(tokenizer) == n


def test_a_custom_template_gets_its_named_markers_and_ends_answers_with_its_end_of_turn(family_dir):
    """model.chat_template of another shape (Gemma's markers) on a GPT-2 base, markers listed in
    model.new_special_tokens: single tokens, and answers end with `<end_of_turn>`, not eos."""
    from tests.families import GEMMA_TEMPLATE

    folder = family_dir("gpt2")
    n = len(tokenizer_from_pretrained(folder))
    markers = ["<start_of_turn>", "<end_of_turn>"]
    cfg = model_cfg(folder)
    cfg.chat_template, cfg.new_special_tokens = GEMMA_TEMPLATE, markers
    model, tokenizer, _ = load_model(cfg, require_chat_template=True)
    assert tokenizer.convert_tokens_to_ids(markers) == [n, n + 1]
    assert model.get_input_embeddings().weight.shape[0] == n + 2
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn_ids(tokenizer)[-1] == end
    assert [a[-1] for a in encode_answers(tokenizer, ANSWERS)] == [end, end]
    assert end in model.generation_config.eos_token_id


def test_lora_with_new_tokens_exports_the_same_model_from_live_or_gathered_weights(family_dir, tmp_path):
    """The merged export is the same whether saved from the live LoRA model or, as under FSDP or
    DeepSpeed, rebuilt from the base folder and the whole gathered weights (`state_dict`)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from alignlab.models.export import save_model

    model, tokenizer, _ = load_model(model_cfg(family_dir("llama_base"), "lora.enabled=true"), False)
    with torch.no_grad():  # move the adapter and the new rows away from their start
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    ids = torch.tensor(conversation_ids(tokenizer)[:1])
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    live, gathered = (
        save_model(model, tokenizer, tmp_path / "live"),
        save_model(model, tokenizer, tmp_path / "gathered", state_dict=model.state_dict()),
    )
    with torch.no_grad():
        expected = model(ids).logits
        for folder in (live, gathered):
            torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(folder)(ids).logits, expected)
            assert end in GenerationConfig.from_pretrained(folder).eos_token_id
