"""The vllm_server client's transport and protocol handling, against real HTTP servers on loopback
that answer like vLLM's (no vLLM needed): dead servers, retries, errors, request bodies, ordering.
The real vLLM server is exercised in test_vllm_server.py."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from atlas_fast.rollout import FINISH_LENGTH, FINISH_STOP, SamplingParams, build_backend
from atlas_fast.rollout.vllm_common import policy_weights, sampling_fields
from atlas_fast.rollout.vllm_server import VLLMServerError, VLLMServerUnavailable
from tiny import char_tokenizer, tiny_model

EOS = char_tokenizer().eos_token_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scripted:
    """A loopback HTTP server answering like vLLM's: /health, /v1/models, /v1/completions (each
    completion is its prompt's first token, 20 + its sample index, EOS), with failures injected per path."""

    def __init__(self):
        self.requests: list[tuple[str, str, dict | None]] = []
        self.fail: dict[str, list[int]] = {}  # path -> statuses to answer before succeeding
        self.hang: set[str] = set()
        self.raw: dict[str, bytes] = {}  # path -> bytes written as the whole reply (malformed replies)
        self.answers: dict[str, object] = {}  # path -> a reply body, or a function of the request body
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except BrokenPipeError:
                    pass  # the client gave up (the timeout test)

            def _handle(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                path = self.path.split("?")[0]
                outer.requests.append((method, path, body))
                if path in outer.hang:
                    time.sleep(3)
                if path in outer.raw:
                    self.wfile.write(outer.raw[path])
                    self.close_connection = True
                    return
                if outer.fail.get(path):
                    status = outer.fail[path].pop(0)
                    return self._send(status, {"error": {"message": f"scripted {status}", "code": status}})
                if path in outer.answers:
                    answer = outer.answers[path]
                    return self._send(200, answer(body) if callable(answer) else answer)
                if path == "/health":
                    return self._send(200, {})
                if path == "/v1/models":
                    return self._send(200, {"data": [{"id": "tiny"}]})
                if path == "/server_info":
                    return self._send(404, {"detail": "Not Found"})
                if path == "/v1/completions":
                    return self._send(200, outer.complete(body))
                return self._send(404, {"detail": "Not Found"})

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def complete(body):
        choices = []
        for i, prompt in enumerate(body["prompt"]):
            for k in range(body["n"]):
                ids = [prompt[0], 20 + k, EOS][: body["max_tokens"]]
                choices.append({"index": i * body["n"] + k, "token_ids": ids, "prompt_token_ids": prompt,
                                "finish_reason": "stop" if ids[-1] == EOS else "length",
                                "logprobs": {"token_logprobs": [-0.5] * len(ids)}})
        return {"choices": choices[::-1]}  # out of order: the client must sort by index

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    server = Scripted()
    yield server
    server.close()


def client(url, tok, **kw):
    return build_backend("vllm_server", tiny_model(tok), tok, base_url=url, **{"timeout": 5, "backoff": 0.05, **kw})


def test_a_dead_server_is_a_clear_error_within_the_timeout(tok):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(VLLMServerUnavailable, match=rf"{url}.*not healthy after 2s.*vllm-serve"):
        build_backend("vllm_server", None, tok, base_url=url, timeout=2)
    assert time.monotonic() - start < 2 + 10  # the spec's bound, with slack for a loaded machine


def test_a_server_that_dies_after_start_is_a_clear_error(scripted, tok):
    backend = client(scripted.url, tok, timeout=2)
    scripted.close()
    with pytest.raises(VLLMServerUnavailable, match=rf"{scripted.url}.*POST /v1/completions.*attempt"):
        backend.generate([[5]], SamplingParams(max_tokens=3))


def test_transient_5xx_is_retried_and_4xx_is_not(scripted, tok):
    backend = client(scripted.url, tok, retries=3)
    scripted.fail["/v1/completions"] = [503, 502]
    out = backend.generate([[5]], SamplingParams(max_tokens=3))
    assert out.completion_ids == [[5, 20, EOS]]
    assert sum(p == "/v1/completions" for _, p, _ in scripted.requests) == 3

    scripted.fail["/v1/completions"] = [400]
    with pytest.raises(VLLMServerError, match="HTTP 400: scripted 400"):
        backend.generate([[5]], SamplingParams(max_tokens=3))
    scripted.fail["/v1/completions"] = [503] * 5
    with pytest.raises(VLLMServerUnavailable, match="4 attempt"):
        client(scripted.url, tok, retries=3).generate([[5]], SamplingParams(max_tokens=3))


def test_request_timeout_is_honoured(scripted, tok):
    backend = client(scripted.url, tok, request_timeout=0.5, retries=0)
    scripted.hang.add("/v1/completions")
    with pytest.raises(VLLMServerUnavailable, match="timed out"):
        backend.generate([[5]], SamplingParams(max_tokens=3))


def test_setup_waits_for_the_short_timeout_not_a_generation(scripted, tok):
    scripted.hang.add("/v1/models")  # healthy, but the model list never comes
    start = time.monotonic()
    with pytest.raises(VLLMServerUnavailable, match=rf"{scripted.url}.*GET /v1/models"):
        client(scripted.url, tok, timeout=1, retries=0)  # request_timeout stays at its 1800 s default
    assert time.monotonic() - start < 2.9  # the scripted hang is 3 s


@pytest.mark.parametrize("reply,error,match", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n<html>oops</html>", VLLMServerError, "other than JSON"),
    (b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"id": "x"}', VLLMServerError, "without indexed choices"),
    (b"SSH-2.0-OpenSSH\r\n", VLLMServerUnavailable, "cannot be reached"),
], ids=["html", "no-choices", "not-http"])
def test_malformed_replies_are_named(scripted, tok, reply, error, match):
    backend = client(scripted.url, tok, timeout=1, retries=1)
    scripted.raw["/v1/completions"] = reply
    with pytest.raises(error, match=match) as info:
        backend.generate([[5]], SamplingParams(max_tokens=3))
    assert scripted.url in str(info.value)


def test_request_body_and_reply_mapping(scripted, tok):
    backend = client(scripted.url, tok)
    sampling = SamplingParams(max_tokens=3, n=2, temperature=0.7, top_p=0.9, top_k=5, min_p=0.05,
                              repetition_penalty=1.1, min_tokens=1, stop_token_ids=(9,), logprobs=True)
    out = backend.generate([[5, 6], [7]], sampling)
    body = [b for _, p, b in scripted.requests if p == "/v1/completions"][-1]
    assert body["prompt"] == [[5, 6], [7]] and body["model"] == "tiny" and body["return_token_ids"]
    assert {k: body[k] for k in ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens",
                                 "min_tokens", "ignore_eos", "logprobs")} == dict(
        n=2, temperature=0.7, top_p=0.9, top_k=5, min_p=0.05, repetition_penalty=1.1, max_tokens=3, min_tokens=1,
        ignore_eos=False, logprobs=0)
    assert body["stop_token_ids"] == sorted({EOS, 9})
    assert out.completion_ids == [[5, 20, EOS], [5, 21, EOS], [7, 20, EOS], [7, 21, EOS]]  # sorted by index
    assert out.finish_reasons == [FINISH_STOP] * 4
    assert out.logprobs == [[-0.5] * 3] * 4

    short = backend.generate([[5]], SamplingParams(max_tokens=2))
    assert short.completion_ids == [[5, 20]] and short.finish_reasons == [FINISH_LENGTH] and short.logprobs is None


def test_greedy_n_and_seeds_are_sent_as_vllm_accepts_them(scripted, tok):
    backend = client(scripted.url, tok)
    out = backend.generate([[5], [7]], SamplingParams(max_tokens=3, n=3, temperature=0.0))
    body = [b for _, p, b in scripted.requests if p == "/v1/completions"][-1]
    assert body["n"] == 1 and body["prompt"] == [[5]] * 3 + [[7]] * 3  # vLLM: greedy needs n == 1
    assert [ids[0] for ids in out.completion_ids] == [5, 5, 5, 7, 7, 7]

    scripted.requests.clear()
    backend.generate([[5], [7], [8]], SamplingParams(max_tokens=3, n=2, seed=10))
    bodies = sorted((b for _, p, b in scripted.requests if p == "/v1/completions"), key=lambda b: b["seed"])
    assert [(b["prompt"], b["seed"]) for b in bodies] == [([[5]], 10), ([[7]], 11), ([[8]], 12)]


def test_bad_arguments_are_named(scripted, tok):
    with pytest.raises(ValueError, match="weight_sync"):
        client(scripted.url, tok, weight_sync="carrier-pigeon")
    with pytest.raises(ValueError, match="base_url"):
        client("ftp://x", tok)
    backend = client(scripted.url, tok)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        backend.generate([[5], []], SamplingParams(max_tokens=3))


def test_ignore_eos_sends_only_the_explicit_stop_ids(tok):
    fields = sampling_fields(SamplingParams(max_tokens=4, ignore_eos=True, stop_token_ids=(3,)), {EOS})
    assert fields["stop_token_ids"] == [3] and fields["ignore_eos"]
    assert sampling_fields(SamplingParams(max_tokens=4, ignore_eos=True), {EOS})["stop_token_ids"] == []
    assert sampling_fields(SamplingParams(max_tokens=4, top_k=0), {EOS})["top_k"] == -1


def test_policy_weights_names_and_peft_merge(tok):
    model = tiny_model(tok)
    with policy_weights(model) as pairs:
        names = [n for n, _ in pairs]
    assert names == [n for n, _ in model.named_parameters()]  # a tied head comes once
    assert "lm_head.weight" not in names

    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(tiny_model(tok), peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    base_q = lora.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    with policy_weights(lora, torch.float64) as pairs:
        got = dict(pairs)
        assert sorted(got) == sorted(names)  # checkpoint names, adapter tensors left out
        merged = got["model.layers.0.self_attn.q_proj.weight"]
        assert merged.dtype == torch.float64 and not torch.allclose(merged.float(), base_q)
    after = lora.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.allclose(after, base_q, atol=1e-6)  # unmerged again (W + BA - BA, up to rounding)


def test_missing_vllm_is_a_clear_error(tok):
    """In the trainer's own virtualenv vLLM is absent: choosing the backend says how to get it."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed in this environment")
    with pytest.raises(ImportError, match=r"pip install atlas-fast\[vllm\]"):
        build_backend("vllm", tiny_model(tok), tok)


def test_file_push_rewrites_one_file_and_drops_it_after_a_failure(scripted, tok, tmp_path):
    from safetensors import safe_open

    seen, forgotten = [], []

    def load(body):  # what the worker would read at the moment of the load request
        if body["method"] == "atlas_fast_forget":
            forgotten.append(body["kwargs"]["path"])
            return {"results": [True]}
        assert body["method"] == "atlas_fast_load_safetensors"
        path = body["kwargs"]["path"]
        with safe_open(path, framework="pt") as f:
            seen.append((os.stat(path).st_ino, {name: f.get_tensor(name) for name in f.keys()}))
        return {"results": [{"tensors": len(seen[-1][1]), "seconds": 0.25}]}

    scripted.answers["/collective_rpc"] = load
    scripted.answers["/reset_prefix_cache"] = {}
    backend = client(scripted.url, tok, weight_sync="file", weight_dir=tmp_path)
    model = backend.model
    backend.update_weights(model)
    assert backend.last_sync["mode"] == "file" and backend.last_sync["worker_load_s"] == 0.25
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    backend.update_weights(model)
    assert seen[0][0] == seen[1][0]  # the same file, rewritten in place
    with policy_weights(model) as pairs:
        for name, t in pairs:
            assert torch.equal(seen[1][1][name], t), name  # the server read the new values
    (path,) = list(tmp_path.rglob("*.safetensors"))  # in the backend's own folder inside weight_dir

    scripted.fail["/collective_rpc"] = [500]
    with pytest.raises(VLLMServerError, match="scripted 500"):
        backend.update_weights(model)
    assert not path.exists()  # a server that may still be reading keeps its pages; we start over
    backend.update_weights(model)
    assert path.exists() and len(seen) == 3
    backend.close()
    assert not path.exists() and not path.parent.exists() and tmp_path.exists()
    assert forgotten == [str(path)]  # the server lets go of its mapping, and so of the file's memory


def test_a_backend_never_closed_removes_its_weight_folder_when_collected(scripted, tok):
    import gc

    scripted.answers["/collective_rpc"] = {"results": [{"tensors": 1, "seconds": 0.0}]}
    scripted.answers["/reset_prefix_cache"] = {}
    backend = client(scripted.url, tok, weight_sync="file")
    backend.update_weights(backend.model)
    folder = backend.weight_dir
    assert any(folder.iterdir())
    del backend
    gc.collect()
    assert not folder.exists()  # a model's worth of /dev/shm would otherwise outlive the run


def test_a_full_shm_falls_back_to_disk_and_a_full_weight_dir_is_named(scripted, tok, tmp_path, monkeypatch, caplog):
    import errno

    from atlas_fast.rollout import weight_file

    scripted.answers["/collective_rpc"] = {"results": [{"tensors": 1, "seconds": 0.0}]}
    scripted.answers["/reset_prefix_cache"] = {}
    full = set()

    def reserve(fd, size):  # the first folder that is asked has no room
        folder = os.path.dirname(os.readlink(f"/proc/self/fd/{fd}"))
        if not full or folder in full:
            full.add(folder)
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(weight_file, "reserve", reserve)
    backend = client(scripted.url, tok, weight_sync="file")
    backend.update_weights(backend.model)
    (first,) = full
    assert not os.path.exists(first)  # the folder that had no room is gone
    assert str(backend.weight_dir) not in full and any(backend.weight_dir.iterdir())
    assert "pushing weights through a file in" in caplog.text
    backend.close()

    full.clear()
    mine = client(scripted.url, tok, weight_sync="file", weight_dir=tmp_path)
    with pytest.raises(OSError, match=r"needs 0\.\d+ GiB in .*give the backend a weight_dir with room"):
        mine.update_weights(mine.model)
    assert not list(tmp_path.rglob("*.safetensors*"))  # nothing half-made left behind
    mine.close()
