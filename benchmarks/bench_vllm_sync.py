"""How long a `vllm_server` weight push takes: the policy's weights into a running `vllm serve`.

    python benchmarks/bench_vllm_sync.py [--quick] [--shape 0.5b] [--dtype float32] [--out benchmarks/RESULTS.md]

It starts `atlas-fast vllm-serve` on loopback ($ATLAS_FAST_VLLM_PYTHON names the server's Python:
`make vllm-env`) with a randomly initialised model of the given shape, then times
`VLLMServerBackend.update_weights` a few times: the file push on a CPU server (gather + cast +
write a safetensors file to /dev/shm, one RPC that loads it, prefix-cache reset). The NCCL push
needs vLLM on both sides of a GPU pair, which the GPU image lacks. `--quick` uses a tiny model.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_md sits beside this file, however it is loaded
import results_md  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "RESULTS.md"
SHAPES = {  # Qwen2.5 shapes (tied embeddings, as the real checkpoints)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=512),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936),
}


def build_model(shape: str, dtype: torch.dtype, path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    dims = SHAPES[shape]
    vocab = {f"t{i}": i for i in range(dims["vocab_size"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t2"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token="t1", unk_token="t2")
    torch.manual_seed(0)
    cfg = Qwen2Config(**dims, max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=0,
                      eos_token_id=1, bos_token_id=None)
    model = Qwen2ForCausalLM(cfg).to(dtype)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, dtype: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "atlas_fast", "vllm-serve", "--model", str(model_dir), "--port", str(port),
           "--dtype", dtype, "--max-model-len", "512", "--enforce-eager", "--gpu-memory-utilization", "0.05",
           "--kv-cache-memory-bytes", str(256 << 20), "--", "--distributed-executor-backend", "uni"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vllm-serve exited with {proc.returncode}; log: {log}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                return proc, url
        except OSError:
            time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(f"vllm-serve not healthy in 1200 s; log: {log}")


def measure(shape: str, dtype: str, repeats: int) -> dict:
    from atlas_fast.rollout import SamplingParams, build_backend

    torch_dtype = getattr(torch, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = build_model(shape, torch_dtype, Path(tmp) / "model")
        proc, url = start_server(Path(tmp) / "model", dtype, Path(tmp) / "server.log")
        try:
            backend = build_backend("vllm_server", model, tok, base_url=url, timeout=60)
            rows = []
            for i in range(repeats):
                with torch.no_grad():  # a stand-in optimizer step, so every push carries new values
                    for p in model.parameters():
                        p.mul_(1.0001)
                backend.update_weights(model)
                rows.append(dict(backend.last_sync, total_s=backend.last_sync_s))
            out = backend.generate([[3, 4, 5]], SamplingParams(max_tokens=4, temperature=0))
            assert len(out.completion_ids[0]) >= 1
            backend.close()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    return {"shape": shape, "dtype": dtype, "params": sum(p.numel() for p in model.parameters()), "rows": rows}


def table(result: dict) -> str:
    rows = result["rows"][1:] or result["rows"]  # the first push also pays one-off allocations
    keys = ("write_s", "load_s", "worker_load_s", "reset_s", "total_s")
    med = {k: statistics.median(r[k] for r in rows) if all(k in r for r in rows) else None for k in keys}
    gb = result["rows"][0]["bytes"] / 1e9
    worker = "-" if med["worker_load_s"] is None else f"{med['worker_load_s']:.2f} s"
    return "\n".join([
        f"## vllm_server weight push ({result['shape']} shape, {result['params'] / 1e6:.0f}M parameters, "
        f"{result['dtype']}, CPU server)",
        "",
        "| bytes | write the file (trainer) | load (server RPC) | of which in the worker | prefix-cache reset | total "
        "| first push |",
        "|---|---|---|---|---|---|---|",
        f"| {gb:.2f} GB | {med['write_s']:.2f} s | {med['load_s']:.2f} s | {worker} | {med['reset_s']:.3f} s | "
        f"{med['total_s']:.2f} s | {result['rows'][0]['total_s']:.2f} s |",
        "",
        f"Median of {len(rows)} pushes after the first, `python benchmarks/bench_vllm_sync.py --shape "
        f"{result['shape']} --dtype {result['dtype']}`, on this repository's CPU machine (2 cores, shared); "
        "the file push (one safetensors file in /dev/shm rewritten in place, one `collective_rpc`). "
        "Target: 0.5B in < 1 s.",
    ])


def write_section(path: Path, body: str) -> None:
    results_md.write_section(path, "bench_vllm_sync", body)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model (a smoke test of this script)")
    ap.add_argument("--shape", default="0.5b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None, help="markdown file to update (default: none with --quick)")
    args = ap.parse_args(argv)
    if not os.environ.get("ATLAS_FAST_VLLM_PYTHON"):
        print("ATLAS_FAST_VLLM_PYTHON is not set: build the server's virtualenv with `make vllm-env`", file=sys.stderr)
        return 2
    result = measure("tiny" if args.quick else args.shape, args.dtype, args.repeats)
    text = table(result)
    print(text)
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    if out is not None:
        write_section(out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
