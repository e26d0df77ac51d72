"""The generation subcommands of `atlas-fast`.

    atlas-fast generate --model PATH --backend NAME --prompt TEXT [--max-tokens N] [--temperature T] [--n N]
    atlas-fast vllm-serve --model PATH [--port 8000] [...] [-- more vllm serve flags]

`generate` samples a checkpoint through any rollout backend, the quick way to look at what a model
writes (temperature 0 is greedy). `vllm-serve` is in atlas_fast.rollout.serve.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

EXIT_ERROR = 2
BACKEND_NAMES = ("auto", "hf", "engine", "vllm_server", "vllm")  # atlas_fast.rollout.BACKENDS, without importing torch


def add_commands(commands) -> None:
    """Register the subcommands on `atlas-fast`'s subparsers."""
    from .rollout.serve import add_arguments, serve_command  # light: no torch for `--help`

    serve = commands.add_parser(
        "vllm-serve", help="start a vLLM server for the vllm_server rollout backend",
        description="Start vLLM's OpenAI-compatible server (vllm serve) with the flags a trainer needs: "
                    "processed log-probs, weight transfer, development endpoints; loopback by default.",
        epilog="example:\n  atlas-fast vllm-serve --model Qwen/Qwen2.5-0.5B-Instruct --port 8000\n"
               "  atlas-fast vllm-serve --model ./ckpt -- --max-num-batched-tokens 8192",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(serve)
    serve.set_defaults(run=serve_command)

    gen = commands.add_parser(
        "generate", help="print completions of a prompt from any rollout backend",
        description="Sample completions of one prompt from a checkpoint through a rollout backend.",
        epilog="examples:\n  atlas-fast generate --model ./ckpt --backend hf --prompt '37+45=' --temperature 0\n"
               "  atlas-fast generate --model ./ckpt --backend vllm_server --server-url http://127.0.0.1:8000 "
               "--prompt hi --n 4",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("--model", required=True, help="model folder or hub id")
    gen.add_argument("--backend", default="auto", metavar="NAME", help=f"one of {', '.join(BACKEND_NAMES)}")
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--n", type=int, default=1, help="completions to print")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--server-url", default="http://127.0.0.1:8000", help="vllm_server: the server")
    gen.add_argument("--timeout", type=float, default=30.0, help="vllm_server: seconds to wait for the server")
    gen.add_argument("--device", default=None, help="where the model runs (default: cuda when available)")
    gen.add_argument("--trust-remote-code", action="store_true")
    gen.set_defaults(run=generate_command)


def generate_command(args: argparse.Namespace) -> int:
    from .rollout import BACKENDS, SamplingParams

    if args.backend not in BACKENDS:
        return fail(ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {args.backend!r}"))
    try:
        sampling = SamplingParams(max_tokens=args.max_tokens, n=args.n, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    except ValueError as err:
        return fail(err)
    try:
        check_model_and_device(args)
        tokenizer, model = load(args)
        prompt_ids = encode(tokenizer, args.prompt, args.chat)
        backend = make_backend(args, model, tokenizer)
    except (OSError, ValueError, ImportError, ConnectionError, NotImplementedError, RuntimeError) as err:
        return fail(err)
    prompts = [prompt_ids]
    if sampling.greedy and sampling.n > 1:  # n greedy completions are n copies of one
        prompts, sampling = [prompt_ids] * sampling.n, dataclasses.replace(sampling, n=1)
    try:
        out = backend.generate(prompts, sampling)
    except (ConnectionError, RuntimeError) as err:
        return fail(err)
    finally:
        backend.close()
    for i, (ids, reason) in enumerate(zip(out.completion_ids, out.finish_reasons)):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        print(f"--- completion {i + 1}/{len(out.completion_ids)} ({len(ids)} tokens, {reason})")
        print(text, flush=True)
    return 0


def check_model_and_device(args: argparse.Namespace) -> None:
    """Name a missing local model folder and an unusable device before transformers or torch
    answer with something about hub ids or CUDA builds."""
    import torch

    from .modeling import missing_local_source

    if missing_local_source(args.model):
        raise FileNotFoundError(f"--model: {args.model} does not exist (a local folder, or a hub id like org/name)")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device: {args.device!r} is not a device (cpu, cuda, cuda:N)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: this machine has no usable CUDA device")


def load(args: argparse.Namespace):
    """The tokenizer, and the model where the backend needs one in this process (a server
    already holds its own copy: only the generation config is read for the EOS ids)."""
    from .modeling import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    if args.backend == "vllm_server":
        return tokenizer, generation_config_holder(args.model)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = load_causal_lm(args.model, args.trust_remote_code, dtype=dtype).to(device)
    return tokenizer, model.eval()


def generation_config_holder(path: str):
    """An object with the checkpoint's `generation_config` (None when it has none)."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(path)
    except OSError:
        config = None
    return SimpleNamespace(generation_config=config)


def encode(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise ValueError("--prompt encodes to no tokens")
    return list(ids)


def make_backend(args: argparse.Namespace, model, tokenizer):
    from .rollout import build_backend

    options = {}
    if args.backend == "vllm_server":
        options = {"base_url": args.server_url, "timeout": args.timeout}
    return build_backend(args.backend, model, tokenizer, **options)


def fail(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return EXIT_ERROR
