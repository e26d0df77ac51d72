"""`atlas-fast generate` and `atlas-fast vllm-serve` (the command line it builds; the real server
runs in tests/rollout/test_vllm_server.py)."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest
import torch

from atlas_fast import cli
from atlas_fast.cli_rollout import BACKEND_NAMES
from atlas_fast.rollout import BACKENDS
from atlas_fast.rollout.serve import EXTENSION_CLASS, EXTENSION_MODULE, EXTENSION_SOURCE, build_command
from tiny import char_tokenizer, tiny_model

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


def test_vllm_serve_dry_run_prints_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATLAS_FAST_VLLM_PYTHON", sys.executable)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cli.main(["vllm-serve", "--model", "/m", "--dry-run"]) == 0
    words = shlex.split(capsys.readouterr().out)
    assert "VLLM_SERVER_DEV_MODE=1" in words and "vllm.entrypoints.openai.api_server" in words


def test_vllm_serve_without_vllm_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATLAS_FAST_VLLM_PYTHON", str(tmp_path / "missing-python"))
    assert cli.main(["vllm-serve", "--model", "/m"]) == 2
    err = capsys.readouterr().err
    assert "ATLAS_FAST_VLLM_PYTHON" in err and "not an executable Python" in err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tok = char_tokenizer()
    tiny_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_generate(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["generate", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_prints_completions_greedy_is_deterministic(model_dir, capsys):
    argv = ["--model", str(model_dir), "--backend", "hf", "--prompt", "12+3=", "--max-tokens", "6"]
    code, out, err = run_generate(capsys, *argv, "--temperature", "0", "--n", "2")
    assert code == 0, err
    blocks = out.split("--- completion ")[1:]
    assert len(blocks) == 2 and blocks[0].split("\n", 1)[1] == blocks[1].split("\n", 1)[1]
    code, out, err = run_generate(capsys, *argv, "--temperature", "1.0", "--n", "3", "--seed", "0")
    assert code == 0, err
    assert out.count("--- completion ") == 3


def test_generate_errors_are_one_line(model_dir, capsys):
    code, _, err = run_generate(capsys, "--model", str(model_dir), "--backend", "nope", "--prompt", "1")
    assert code == 2 and "--backend must be one of auto, hf, engine, vllm_server, vllm" in err
    code, _, err = run_generate(capsys, "--model", str(model_dir), "--prompt", "1", "--temperature", "-1")
    assert code == 2 and "temperature must be >= 0" in err
    code, _, err = run_generate(capsys, "--model", str(model_dir), "--backend", "vllm_server", "--prompt", "1",
                                "--server-url", "http://127.0.0.1:9", "--timeout", "1")
    assert code == 2 and "http://127.0.0.1:9" in err and err.count("\n") == 1
    for missing in ("/no/such/model", "./no-such-model"):
        code, _, err = run_generate(capsys, "--model", missing, "--backend", "hf", "--prompt", "1")
        assert code == 2 and f"--model: {missing} does not exist" in err and err.count("\n") == 1
    code, _, err = run_generate(capsys, "--model", str(model_dir), "--backend", "hf", "--prompt", "1", "--device", "gpu")
    assert code == 2 and "--device: 'gpu' is not a device" in err
    if not torch.cuda.is_available():
        code, _, err = run_generate(capsys, "--model", str(model_dir), "--backend", "hf", "--prompt", "1",
                                    "--device", "cuda")
        assert code == 2 and "no usable CUDA device" in err


def test_generate_with_an_engine_it_cannot_run_is_one_line(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = char_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=32, n_head=2, n_positions=64)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    capsys.readouterr()  # the save's progress bar
    code, _, err = run_generate(capsys, "--model", str(tmp_path), "--backend", "engine", "--prompt", "1")
    assert code == 2 and "not 'gpt2'; use rollout_backend='hf'" in err.splitlines()[-1], err


def test_loaders_name_a_missing_local_folder(tmp_path):
    from atlas_fast.modeling import load_causal_lm, load_tokenizer, missing_local_source

    for loader in (load_causal_lm, load_tokenizer):
        with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'} does not exist"):
            loader(tmp_path / "nope")
    assert not missing_local_source("Qwen/Qwen2.5-0.5B")  # a hub id, whatever is on disk
    assert missing_local_source("./no-such-model") and missing_local_source("a/b/c")
    assert not missing_local_source(tmp_path)
