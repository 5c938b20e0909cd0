"""Tiny random-initialised models of real model families, with tokenizers and chat templates written
here to reproduce each family's properties, built offline (no Hub) and saved with `save_pretrained`
so alignlab loads them through its ordinary path (`model.path=<folder> model.tiny=null`).

Every tokenizer is a byte-level BPE (any text encodes) with ~150 merges learnt from a small fixed
corpus, so text is cut into multi-byte pieces as real tokenizers cut it; the family's control tokens
are added as special tokens after the learnt vocabulary. Models: hidden 64, 2 layers, the family's
`transformers` config class. What each family reproduces:

- `llama3` (Llama-3-Instruct): the template writes BOS `<|begin_of_text|>` (the tokenizer also adds it
  with `add_special_tokens=True`, so encoding rendered text that way doubles it); headers
  `<|start_header_id|>role<|end_header_id|>\n\n`; contents trimmed; end of turn `<|eot_id|>` differs
  from eos `<|end_of_text|>`; no pad; `generation_config.eos_token_id` the list [eot, eos]; GPT-2 regex pieces.
- `qwen25` (Qwen2.5-Instruct): ChatML, end of turn `<|im_end|>` (= eos) then `\n`; a default system
  prompt when none is given; pad `<|endoftext|>`; no BOS; eos list [im_end, endoftext].
- `qwen3` (Qwen3): ChatML; the assistant turn after the last user message gets an empty
  `<think>\n\n</think>\n\n` block while the generation prompt (thinking on, the default) has none, so
  the generation prompt is not a prefix of prompt + answer; `<think>`/`</think>` are added tokens that
  are *not* special; reasoning before `</think>` in an answer is moved into the block as the real one does.
  A `tool` message is written inside a user turn as `<tool_response>\n…\n</tool_response>`, consecutive
  results sharing one turn, as the real template writes them.
- `mistral` (Mistral-7B-Instruct v0.1): BOS `<s>` written by the template (and added by the tokenizer);
  `[INST] … [/INST]` as plain text; the answer followed by eos `</s>`; no pad; roles must alternate and a
  system role raises; SentencePiece-style `▁` for spaces, one prepended only at the start of the text.
- `gemma2` (Gemma-2-it): `<bos><start_of_turn>user\n…<end_of_turn>\n<start_of_turn>model\n`; contents
  trimmed; end of turn `<end_of_turn>` differs from eos `<eos>`; pad `<pad>`; the template raises
  (`raise_exception`) on a system role and on roles that do not alternate; `final_logit_softcapping=30`;
  eos list [eos, end_of_turn]; `▁` for spaces, none prepended.
- `gemma3`: as `gemma2`, on `Gemma3TextConfig` (the real Gemma-3 template merges a system message into
  the first user turn; this one raises like Gemma-2's, as issue 15 asks).
- `phi3` (Phi-3-mini-instruct): `<|user|>\n…<|end|>\n<|assistant|>\n…<|end|>\n`, then eos
  `<|endoftext|>` when no generation prompt is asked for; the markers take the whitespace to their right
  (`rstrip=True`: the `\n` after `<|end|>` has no token of its own); pad `<|endoftext|>`; eos list
  [endoftext, assistant, end]; `▁` for spaces, one prepended at the start. Like the real template it writes
  system, user and assistant messages only (a `tool` message leaves no trace).
- `gpt2` (GPT-2): no chat template; bos = eos = unk = `<|endoftext|>`; no pad.
- `llama_base` (Llama-2 base): BOS `<s>` added by the tokenizer, eos `</s>`, unk `<unk>`, no pad, no chat
  template; `▁` for spaces, one prepended at the start.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Text the tokenizers learn their merges from: English, arithmetic and the literal spellings of the
# control tokens (so a control token written as text becomes a few ordinary pieces, as in real vocabularies).
CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is the answer? The answer is 42.",
    "You are a helpful assistant. Please answer the question below in one word.",
    "Repeat after me: done. Which marker ends a turn? There is none. Name the padding marker.",
    "12+30=42 7+8=15 19+23=42 3+3=6 2+2=4 49+49=98 hello world, user, assistant, system, model",
    "<|im_end|> <|endoftext|> <|eot_id|> <end_of_turn> </s> <s> [INST] [/INST] <|end|> <think> </think>",
]
MERGES = 150  # learnt merges on top of the 256 byte symbols

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_query_index=messages|length - 1) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}"
    "{%- set ns.last_query_index = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}"
    "{%- else %}{%- set content = '' %}{%- endif %}"
    "{%- if message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning_content = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n'"
    " + content.lstrip('\n') }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\n' + content }}"
    "{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- elif message.role == 'tool' %}"  # consecutive tool results share one user turn, as Qwen3's do
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' + content + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Per family: the text splitter ("regex": GPT-2 byte-level pieces; "first": `▁` for spaces, prepended at
# the start of the text; "never": `▁` for spaces, none prepended), the special tokens in id order (a
# token with a trailing "+" strips the whitespace to its right), the roles, whether the tokenizer adds
# bos with add_special_tokens, the template, the ids of generation_config.eos_token_id, the config.
SPEC = {
    "llama3": dict(
        split="regex",
        special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        roles=dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"),
        add_bos=True,
        template=LLAMA3_TEMPLATE,
        eos_list=["<|eot_id|>", "<|end_of_text|>"],
        arch="llama",
    ),
    "qwen25": dict(
        split="regex",
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        roles=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        template=QWEN25_TEMPLATE,
        eos_list=["<|im_end|>", "<|endoftext|>"],
        arch="qwen2",
    ),
    "qwen3": dict(
        split="regex",
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        added=["<think>", "</think>"],
        roles=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        template=QWEN3_TEMPLATE,
        eos_list=["<|im_end|>", "<|endoftext|>"],
        arch="qwen3",
    ),
    "mistral": dict(
        split="first",
        special=["<unk>", "<s>", "</s>"],
        roles=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
        add_bos=True,
        template=MISTRAL_TEMPLATE,
        eos_list=["</s>"],
        arch="mistral",
    ),
    "gemma2": dict(
        split="never",
        special=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        roles=dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"),
        add_bos=True,
        template=GEMMA_TEMPLATE,
        eos_list=["<eos>", "<end_of_turn>"],
        arch="gemma2",
    ),
    "phi3": dict(
        split="first",
        special=["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>+", "<|system|>+", "<|end|>+", "<|user|>+"],
        roles=dict(bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>"),
        template=PHI3_TEMPLATE,
        eos_list=["<|endoftext|>", "<|assistant|>", "<|end|>"],
        arch="phi3",
    ),
    "gpt2": dict(
        split="regex",
        special=["<|endoftext|>"],
        roles=dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"),
        template=None,
        eos_list=["<|endoftext|>"],
        arch="gpt2",
    ),
    "llama_base": dict(
        split="first",
        special=["<unk>", "<s>", "</s>"],
        roles=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
        add_bos=True,
        template=None,
        eos_list=["</s>"],
        arch="llama",
    ),
}
SPEC["gemma3"] = {**SPEC["gemma2"], "arch": "gemma3"}  # the same tokenizer and template, Gemma-3 text model
FAMILIES = tuple(SPEC)
CHAT_FAMILIES = tuple(name for name, spec in SPEC.items() if spec["template"])
SYSTEM_REFUSING = ("mistral", "gemma2", "gemma3")  # templates that raise on a system message


def control_tokens(name: str) -> list[str]:
    """The family's special-token strings (what item 4 of issue 15 must keep as text inside content)."""
    return [t.rstrip("+") for t in SPEC[name]["special"]]


def build_tokenizer(name: str):
    """The family's fast tokenizer (PreTrainedTokenizerFast), chat template set; deterministic."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = SPEC[name]
    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=spec["split"] == "regex")
    if spec["split"] == "regex":
        backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
    else:  # SentencePiece style: spaces become ▁ before the byte-level alphabet
        metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=spec["split"], split=False)
        backend.pre_tokenizer = pre_tokenizers.Sequence([metaspace, byte_level])
        steps = [decoders.ByteLevel(), decoders.Replace("▁", " ")]
        if spec["split"] == "first":  # the ▁ prepended at the start is dropped again, as Llama's decoder does
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        backend.decoder = decoders.Sequence(steps)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + MERGES, initial_alphabet=alphabet, show_progress=False, min_frequency=1
    )
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    backend.add_special_tokens(
        [AddedToken(t.rstrip("+"), special=True, normalized=False, rstrip=t.endswith("+")) for t in spec["special"]]
    )
    if spec.get("added"):
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec["added"]])
    bos = spec["roles"].get("bos_token")
    if spec.get("add_bos"):
        bos_id = backend.token_to_id(bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **spec["roles"])
    if spec["template"]:
        tokenizer.chat_template = spec["template"]
    return tokenizer


def build_config(name: str, tokenizer):
    """The family's `transformers` config, tiny: hidden 64, 2 layers, 4 heads (2 key/value heads)."""
    import transformers as tf

    spec = SPEC[name]
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    size = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    common = dict(**size, intermediate_size=128, num_key_value_heads=2, max_position_embeddings=256, **ids)
    arch = spec["arch"]
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=name == "llama3")
    if arch == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "gemma2":
        return tf.Gemma2Config(
            **common,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=64,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
        )
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=64)
    if arch == "phi3":
        return tf.Phi3Config(**common, tie_word_embeddings=False)
    if arch == "gpt2":
        return tf.GPT2Config(
            vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256, **ids, tie_word_embeddings=True
        )
    raise ValueError(f"unknown architecture {arch!r}")


def build_family(name: str, folder: str | Path, seed: int = 0) -> Path:
    """Write family `name` (model, tokenizer, generation config) into `folder`; return the folder.

    Raises:
        KeyError: `name` is not one of FAMILIES.
    """
    from transformers import AutoModelForCausalLM

    spec = SPEC[name]
    folder = Path(folder)
    tokenizer = build_tokenizer(name)
    config = build_config(name, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    eos_list = [tokenizer.convert_tokens_to_ids(t) for t in spec["eos_list"]]
    model.generation_config.eos_token_id = eos_list if len(eos_list) > 1 else eos_list[0]
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "alignlab_family.json").write_text(json.dumps({"family": name}))
    return folder
