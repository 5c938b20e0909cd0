"""How far the answer-only output layer (alignlab.models.logprobs.answer_logprobs) is from each architecture's
own forward in bf16 and float32 on a GPU, against the tolerance the first-batch check allows
(alignlab.models.logprobs.CHECK_TOLERANCE), and how far a *missing* logit transform would put it.

The start-up check must pass rounding (or every run on a GPU would fall back to the memory-heavy
full forward) and must catch a transform alignlab does not apply. This measures both sides on
random-initialised models of real architectures at a real vocabulary size, with output weights
scaled so logits reach about ±30 (the range of trained models). It also reports the peak memory of
one forward + backward through each path.

    python experiments/logprob_check_gpu.py --out results.json            # on a GPU
    python experiments/logprob_check_gpu.py --device cpu --small          # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from alignlab.models.logprobs import CHECK_TOLERANCE, LOGIT_TRANSFORMS, answer_logprobs, check_answer_logprobs


def configs(small: bool) -> dict:
    from transformers import (
        CohereConfig,
        Gemma2Config,
        Gemma3TextConfig,
        GraniteConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
    )

    dims = dict(
        vocab_size=4096 if small else 151936,
        hidden_size=64 if small else 1024,
        intermediate_size=128 if small else 2816,
        num_hidden_layers=2 if small else 4,
        num_attention_heads=4 if small else 16,
        num_key_value_heads=2 if small else 8,
        max_position_embeddings=4096,
    )
    gemma = dict(head_dim=16 if small else 64, final_logit_softcapping=30.0)
    return {
        "llama": LlamaConfig(**dims),
        "qwen2": Qwen2Config(**dims),
        "mistral": MistralConfig(**dims),
        "phi3": Phi3Config(**dims, pad_token_id=0),
        "gemma2": Gemma2Config(**dims, **gemma),
        "gemma3_text": Gemma3TextConfig(**dims, **gemma),
        "cohere": CohereConfig(**dims, logit_scale=0.0625),
        "granite": GraniteConfig(**dims, logits_scaling=8.0),
    }


def build(config, dtype, device, logit_std: float):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()
    head = model.get_output_embeddings()
    if config.tie_word_embeddings:  # scale a separate head so the input embeddings stay as they were
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    with torch.no_grad():  # the forward's logits (after any rescaling) with std `logit_std`
        batch = torch.randint(0, config.vocab_size, (1, 64), device=device)
        std = model(input_ids=batch).logits.float().std().item()
        head.weight.mul_(logit_std / max(std, 1e-6))
    return model


def batch_of(vocab: int, rows: int, length: int, answer: int, device) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, length), generator=g).to(device)
    attention = torch.ones_like(ids)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, length - answer :] = 1
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}


def peak_memory(fn, device) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def measure(name, config, dtype, device, rows, length, answer, logit_std) -> dict:
    model = build(config, dtype, device, logit_std)
    batch = batch_of(config.vocab_size, rows, length, answer, device)
    difference, tolerance = check_answer_logprobs(model, batch)
    # The same model with its logit transform forgotten: what the check must catch.
    rule = LOGIT_TRANSFORMS.pop(config.model_type, None)
    try:
        missing = check_answer_logprobs(model, batch)[0] if rule is not None else None
    finally:
        if rule is not None:
            LOGIT_TRANSFORMS[config.model_type] = rule
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits.float()
    out = {
        "architecture": name,
        "dtype": str(dtype).removeprefix("torch."),
        "max_token_difference": difference,
        "tolerance": tolerance,
        "passes": difference <= tolerance,
        "difference_without_transform": missing,
        "logit_absmax": round(logits.abs().max().item(), 2),
    }
    del logits
    model.train()

    def fast():
        answer_logprobs(model, batch).logps.sum().backward()

    def full():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        (logp * batch["loss_mask"][:, 1:]).sum().backward()

    for label, fn in (("answer_only", fast), ("full_forward", full)):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out[f"peak_mib_{label}"] = peak_memory(fn, device)
        out[f"seconds_{label}"] = round(time.perf_counter() - start, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny dimensions, for a smoke run")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--answer", type=int, default=512)
    parser.add_argument("--logit-std", type=float, default=8.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        for name, config in configs(args.small).items():
            row = measure(name, config, dtype, args.device, args.rows, args.length, args.answer, args.logit_std)
            print(json.dumps(row), flush=True)
            results.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"check_tolerance": {str(k): v for k, v in CHECK_TOLERANCE.items()}, "results": results}, f)


if __name__ == "__main__":
    main()
