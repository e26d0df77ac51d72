"""`atlas-fast generate` and `atlas-fast vllm-serve` (the command line it builds; the real server
runs in tests/rollout/test_vllm_server.py)."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from atlas_fast import cli
from atlas_fast.cli_rollout import BACKEND_NAMES
from atlas_fast.rollout import BACKENDS
from atlas_fast.rollout.serve import EXTENSION_CLASS, EXTENSION_MODULE, EXTENSION_SOURCE, build_command
from tiny import char_tokenizer, tiny_model

REPO = Path(__file__).resolve().parent.parent


def serve_args(*argv: str):
    return cli.build_parser().parse_args(["vllm-serve", *argv])


def test_backend_names_match_the_rollout_package():
    assert BACKEND_NAMES == BACKENDS


def test_vllm_serve_command_has_what_a_trainer_needs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    args = serve_args("--model", "/m", "--port", "8123", "--max-model-len", "512", "--python", sys.executable,
                      "--", "--max-num-batched-tokens", "4096")
    command = build_command(args)
    argv = command.argv
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]

    def value(flag):
        return argv[argv.index(flag) + 1]

    assert value("--model") == "/m" and value("--port") == "8123" and value("--max-model-len") == "512"
    assert value("--host") == "127.0.0.1"  # loopback unless asked
    assert value("--logprobs-mode") == "processed_logprobs" and value("--max-logprobs") == "-1"
    assert value("--weight-transfer-config") == '{"backend": "nccl"}'
    assert value("--worker-extension-cls") == EXTENSION_CLASS
    assert "--enable-prefix-caching" in argv
    assert argv[-2:] == ["--max-num-batched-tokens", "4096"]  # passed through after --
    assert command.env["VLLM_SERVER_DEV_MODE"] == "1"
    # the extension is importable from PYTHONPATH as a copy of our module
    ext_dir = Path(command.env["PYTHONPATH"].split(os.pathsep)[0])
    assert (ext_dir / f"{EXTENSION_MODULE}.py").read_bytes() == EXTENSION_SOURCE.read_bytes()

    quiet = build_command(serve_args("--model", "/m", "--python", sys.executable, "--weight-transfer", "none",
                                     "--no-enable-prefix-caching"))
    assert "--weight-transfer-config" not in quiet.argv and "--no-enable-prefix-caching" in quiet.argv


def test_vllm_serve_dry_run_prints_the_command(tmp_path):
    env = {**os.environ, "ATLAS_FAST_VLLM_PYTHON": sys.executable, "XDG_CACHE_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "atlas_fast", "vllm-serve", "--model", "/m", "--dry-run"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    words = shlex.split(out.stdout)
    assert "VLLM_SERVER_DEV_MODE=1" in words and "vllm.entrypoints.openai.api_server" in words


def test_vllm_serve_without_vllm_says_how_to_get_it(tmp_path):
    env = {**os.environ, "ATLAS_FAST_VLLM_PYTHON": str(tmp_path / "missing-python")}
    out = subprocess.run([sys.executable, "-m", "atlas_fast", "vllm-serve", "--model", "/m"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "ATLAS_FAST_VLLM_PYTHON" in out.stderr and "not an executable Python" in out.stderr


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tok = char_tokenizer()
    tiny_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_generate(*argv: str):
    return subprocess.run([sys.executable, "-m", "atlas_fast", "generate", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_generate_prints_completions_greedy_is_deterministic(model_dir):
    argv = ["--model", str(model_dir), "--backend", "hf", "--prompt", "12+3=", "--max-tokens", "6"]
    greedy = run_generate(*argv, "--temperature", "0", "--n", "2")
    assert greedy.returncode == 0, greedy.stderr
    blocks = greedy.stdout.split("--- completion ")[1:]
    assert len(blocks) == 2 and blocks[0].split("\n", 1)[1] == blocks[1].split("\n", 1)[1]
    sampled = run_generate(*argv, "--temperature", "1.0", "--n", "3", "--seed", "0")
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.count("--- completion ") == 3


def test_generate_errors_are_one_line(model_dir):
    bad = run_generate("--model", str(model_dir), "--backend", "nope", "--prompt", "1")
    assert bad.returncode == 2 and "--backend must be one of hf, engine, vllm_server, vllm" in bad.stderr
    neg = run_generate("--model", str(model_dir), "--prompt", "1", "--temperature", "-1")
    assert neg.returncode == 2 and "temperature must be >= 0" in neg.stderr
    dead = run_generate("--model", str(model_dir), "--backend", "vllm_server", "--prompt", "1",
                        "--server-url", "http://127.0.0.1:9", "--timeout", "1")
    assert dead.returncode == 2 and "http://127.0.0.1:9" in dead.stderr and "Traceback" not in dead.stderr
