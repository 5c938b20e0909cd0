"""A vLLM engine as a server for GRPO and PPO rollouts (`algorithm.use_vllm=true algorithm.vllm_mode=server`).

    python -m alignlab.vllm_serve model.path=<model folder or Hub id> model.tiny=null --host 0.0.0.0 --port 8000

`model.*` overrides compose the `model` group as training does (`model=tiny` by default: the embedded
model); the server needs the policy's architecture, and the trainer pushes its weights before every
rollout. It answers, over HTTP with JSON (alignlab.online.vllm_backend.ServerEngine is the client):
GET /health; POST /generate (token-id prompts, one seed per request: token ids and their sampling
log-probs), /load_weights (a safetensors body: every weight by name, then the prefix cache is reset),
/prompt_logprobs (the probe check). One request at a time. docs/vllm.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

from alignlab.online.vllm_backend import serve_request


def make_server(engine, host: str, port: int) -> HTTPServer:
    """An HTTPServer (not yet serving) whose requests `engine` answers (alignlab.online.vllm_backend.serve_request)."""

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802  (http.server's name)
            self._send(200, {"ok": True}) if self.path == "/health" else self._send(404, {"error": self.path})

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                self._send(200, serve_request(engine, self.path, body))
            except KeyError:
                self._send(404, {"error": f"no such endpoint {self.path}"})
            except Exception as e:  # the client reports it with the server's host:port
                self._send(500, {"error": f"{type(e).__name__}: {e}"})

        def log_message(self, format: str, *args) -> None:  # quiet: one line per rollout is noise
            pass

    return HTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m alignlab.vllm_serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="model.* overrides, e.g. model=qwen model.path=Qwen/Qwen3-0.6B")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile: a faster start")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if not o.lstrip("+~").startswith("model")]
    if bad:
        parser.error(f"only model.* overrides are read, got {bad}")

    from alignlab.errors import AlignlabError
    from alignlab.models.loading import resolve_model_path
    from alignlab.online.vllm_backend import ColocatedEngine, require_vllm
    from alignlab.runner.config import compose

    try:
        require_vllm()
        model_cfg = compose(args.overrides).model
        folder = resolve_model_path(model_cfg)  # the embedded tiny model is written first
    except AlignlabError as e:  # the user's to fix: said without a traceback
        sys.exit(f"alignlab.vllm_serve: {e}")
    engine = ColocatedEngine(folder, model_cfg.dtype, args.gpu_memory_utilization, enforce_eager=args.enforce_eager)
    server = make_server(engine, args.host, args.port)
    print(f"alignlab.vllm_serve: {folder} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
