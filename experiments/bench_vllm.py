"""GRPO rollout speed: completions per second sampled by vLLM against alignlab's in-process sampler.

    python experiments/bench_vllm.py                      # CPU: the 30M model, float32, 16 prompts × 8 completions
    python experiments/bench_vllm.py --gpu                # GPU: the 300M model, bfloat16, 64 prompts × 8, 256 tokens

Both sample the same GRPO rollout through alignlab.online.rollout.sample (the same prompts, keys, stop tokens
and temperature): the in-process sampler (each prompt encoded once, its KV cache shared by its G completions)
and vLLM colocated (alignlab.online.vllm_backend, the policy's weights pushed first, as before every rollout).
Runs alternate, `--repeats` each, after one warm-up each; medians of completions/s and of generated tokens/s,
and their ratio, measured in the same command. The engine's start-up is reported apart. The models are
randomly initialised (alignlab's byte-level tokenizer), so answers rarely stop early: both run to
`--max-tokens` alike. Needs vLLM (docs/vllm.md: the CPU virtualenv). On a CPU set OMP_NUM_THREADS, and on
one shared with other jobs VLLM_CPU_OMP_THREADS_BIND=nobind (docs/vllm.md has both measurements).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.bench_trl import MODELS, model_folder  # noqa: E402  (the same 30M and 300M models)

GPU = {"model": "300M", "dtype": "bfloat16", "device": "cuda", "prompts": 64, "max_tokens": 256}


def prompt_batch(tokenizer, prompts: int, device: str) -> dict:
    from alignlab.data import PromptDataModule
    from alignlab.data.arith import ArithTask

    dm = PromptDataModule(ArithTask(n_train=max(prompts, 8), n_eval=4), batch_size=prompts)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def timed(fn) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="30M", choices=sorted(MODELS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--gpu", action="store_true", help="the GPU configuration: " + json.dumps(GPU))
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench_vllm"))
    args = parser.parse_args(argv)
    if args.gpu:
        for key, value in GPU.items():
            setattr(args, key, value)

    from transformers import AutoModelForCausalLM

    from alignlab.models.loading import tokenizer_from_pretrained
    from alignlab.online.rollout import sample
    from alignlab.online.vllm_backend import ColocatedEngine, VLLMBackend, require_vllm

    require_vllm()
    torch.manual_seed(0)
    folder = model_folder(Path(args.out), args.model)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()
    tokenizer = tokenizer_from_pretrained(folder)
    batch = prompt_batch(tokenizer, args.prompts, args.device)
    n = args.prompts * args.generations

    start = time.perf_counter()
    engine = ColocatedEngine(str(folder), args.dtype, args.gpu_memory_utilization, enforce_eager=args.enforce_eager)
    startup = time.perf_counter() - start
    backend = VLLMBackend(engine=engine, sync_tolerance=1e-3 if args.dtype == "float32" else 0.1)
    sync_seconds, _ = timed(lambda: backend.sync(model))

    def rollout(which: str, step: int):
        chosen = backend if which == "vllm" else None
        return sample(model, tokenizer, batch, args.max_tokens, 1.0, 256, args.generations, step=step, backend=chosen)

    seconds, tokens = {"in-process": [], "vllm": []}, {"in-process": [], "vllm": []}
    for step in range(args.repeats + 1):  # step 0 warms both up
        for which in ("in-process", "vllm") if step % 2 == 0 else ("vllm", "in-process"):
            spent, samples = timed(lambda which=which, step=step: rollout(which, step))
            if step:
                seconds[which].append(spent)
                tokens[which].append(int(samples.mask.sum()))
    report = {
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "prompts": args.prompts,
        "generations": args.generations,
        "max_tokens": args.max_tokens,
        "enforce_eager": args.enforce_eager,
        "vllm_startup_s": round(startup, 1),
        "weight_push_and_probe_s": round(sync_seconds, 3),
    }
    for which in seconds:
        median = statistics.median(seconds[which])
        report[f"{which}_s"] = round(median, 3)
        report[f"{which}_completions_per_s"] = round(n / median, 2)
        report[f"{which}_tokens_per_s"] = round(statistics.median(tokens[which]) / median, 1)
    report["vllm_over_in_process"] = round(report["vllm_completions_per_s"] / report["in-process_completions_per_s"], 2)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    main()
