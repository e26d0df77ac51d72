"""Judge backends and the caller that runs them: bounded concurrency, timeouts, retries with
backoff, a cache of identical calls, and JSON repair with re-asks.

Backends turn one `JudgeRequest` (model, messages, temperature, max tokens) into reply text:
- `OpenAIClient`: any OpenAI-compatible `POST {base_url}/chat/completions` (vLLM, OpenAI, hosted
  models); stdlib HTTP, so no SDK is needed. The API key is read from the environment variable
  the config names, kept out of reprs, and scrubbed from every error text.
- `HFClient`: a local transformers causal LM, prompted through its chat template.
- `LiteLLMClient`: `litellm.completion` when LiteLLM is installed.

`JudgeCaller` owns a thread pool of `max_parallel` workers: judge calls are network- or
model-bound, and threads keep the reward function a plain synchronous callable for any trainer.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from atlas_fast.rewards.rim.config import JudgeModelConfig
from atlas_fast.rewards.rim.parsing import Judgement, JudgementError, parse_judgement

__all__ = [
    "CallOutcome",
    "HFClient",
    "JudgeCallError",
    "JudgeCaller",
    "JudgeClient",
    "JudgeRequest",
    "LiteLLMClient",
    "OpenAIClient",
    "build_client",
]


@dataclass(frozen=True)
class JudgeRequest:
    model: str
    messages: tuple[tuple[str, str], ...]  # (role, content)
    temperature: float
    max_tokens: int

    def key(self) -> str:
        """Cache key: a digest of everything that determines the reply's distribution."""
        payload = json.dumps([self.model, self.messages, self.temperature, self.max_tokens])
        return hashlib.sha256(payload.encode()).hexdigest()


class JudgeCallError(RuntimeError):
    """A judge call that failed; `retryable` when re-sending may help (timeouts, 429, 5xx)."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class JudgeClient(Protocol):
    def complete(self, request: JudgeRequest, timeout: float) -> str: ...


# ----------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP


class OpenAIClient:
    """`POST {base_url}/chat/completions`, e.g. base_url `http://127.0.0.1:8000/v1`."""

    def __init__(self, base_url: str, *, api_key_env: str | None = None, json_mode: bool = False):
        parts = urlsplit(base_url)
        if parts.username or parts.password:  # the URL is logged and shown in errors
            raise ValueError("base_url must not hold credentials; name the environment variable "
                             "that holds the key in api_key_env.")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}.")
        self.base_url = base_url.rstrip("/")
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port
        self._path = parts.path.rstrip("/") + "/chat/completions"
        self.api_key_env = api_key_env
        self.json_mode = json_mode
        self._local = threading.local()  # one kept-alive connection per worker thread
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(
                    f"The judge API key variable {api_key_env} is not set in the environment."
                )
            self.__key: str | None = key
        else:
            self.__key = None

    def __repr__(self) -> str:
        return f"OpenAIClient(base_url={self.base_url!r}, api_key_env={self.api_key_env!r})"

    def _scrub(self, text: str) -> str:
        return text.replace(self.__key, "***") if self.__key else text

    def complete(self, request: JudgeRequest, timeout: float) -> str:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [{"role": r, "content": c} for r, c in request.messages],
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
        }
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.__key:
            headers["Authorization"] = f"Bearer {self.__key}"
        try:
            status, payload = self._post(json.dumps(body).encode(), headers, timeout)
        except (TimeoutError, socket.timeout):
            raise JudgeCallError(
                f"{self.base_url}: no complete reply within {timeout:g} s", retryable=True
            ) from None
        except (OSError, http.client.HTTPException) as err:
            raise JudgeCallError(
                f"{self.base_url}: {type(err).__name__}: {self._scrub(str(err))}", retryable=True
            ) from None
        if status != 200:
            detail = self._scrub(payload.decode("utf-8", "replace"))[:300]
            raise JudgeCallError(
                f"{self.base_url}: HTTP {status}: {detail}", retryable=status in (408, 429) or status >= 500
            )
        try:
            reply = json.loads(payload)
            content = reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            detail = self._scrub(payload.decode("utf-8", "replace"))[:300]
            raise JudgeCallError(
                f"{self.base_url}: not a chat-completions reply: {detail}", retryable=False
            ) from None
        if not isinstance(content, str):
            raise JudgeCallError(f"{self.base_url}: the reply has no text content", retryable=False)
        return content

    def _post(self, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int, bytes]:
        """One request whose whole duration, not just each socket read, is bounded by `timeout`.

        Each worker thread keeps its connection open between calls (a TLS handshake to a hosted
        API costs a round trip or two per call otherwise). A kept connection the server has
        since closed fails before any reply byte; that request is sent once more on a new one.
        """
        deadline = time.monotonic() + timeout
        conn, reused = self._connection(timeout)
        try:
            try:
                conn.request("POST", self._path, body=body, headers=headers)
                _remaining(conn, deadline)
                response = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                if not reused:
                    raise
                self._drop(conn)
                conn, _ = self._connection(max(deadline - time.monotonic(), 1e-3))
                conn.request("POST", self._path, body=body, headers=headers)
                _remaining(conn, deadline)
                response = conn.getresponse()
            chunks = []
            while response.length != 0:  # None (chunked / until close) or bytes still due
                _remaining(conn, deadline)
                chunk = response.read1(65536)
                if not chunk:
                    break
                chunks.append(chunk)
            # read1 does not mark a fully read response done; the connection refuses the next
            # request until it is.
            response.close()
        except BaseException:
            self._drop(conn)  # a half-read connection cannot carry the next request
            raise
        if response.will_close:
            self._drop(conn)
        return response.status, b"".join(chunks)

    def _connection(self, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            if conn.sock is not None:  # still set to what the last call had left
                conn.sock.settimeout(timeout)
            return conn, True
        conn_type = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        conn = conn_type(self._host, self._port, timeout=timeout)
        self._local.conn = conn
        return conn, False

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None


def _remaining(conn: http.client.HTTPConnection, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    if conn.sock is not None:
        conn.sock.settimeout(left)


# ----------------------------------------------------------------------------------------------
# Local HF model


class HFClient:
    """A local causal LM in this process, prompted through its chat template.

    Requests are generated in left-padded batches of up to `batch_size`, one `generate` per
    temperature, under a lock (one model, one batch at a time). Sampling uses a private RNG seeded
    from the batch's requests and the attempt number, so judging neither disturbs the trainer's
    random state nor changes from run to run, and a re-ask draws a new sample. `timeout` does not
    apply: generation in this process cannot be interrupted; `max_tokens` bounds it instead.
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, device: str = "cpu", dtype: str = "auto",
                 batch_size: int = 8):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(model, (str, os.PathLike)):
            source = str(model)
            kwargs = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(source)
        if tokenizer is None:
            raise ValueError("HFClient needs a tokenizer when given a model object.")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("The local judge's tokenizer has no chat template.")
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError("The local judge's tokenizer has neither a pad nor an EOS token.")
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.batch_size = max(int(batch_size), 1)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"HFClient(model={type(self.model).__name__}, batch_size={self.batch_size})"

    def complete(self, request: JudgeRequest, timeout: float) -> str:
        [out] = self.complete_batch([request], timeout)
        if isinstance(out, JudgeCallError):
            raise out
        return out

    def complete_batch(self, requests: Sequence[JudgeRequest], timeout: float,
                       attempt: int = 0) -> list[str | JudgeCallError]:
        """Reply text per request, or the JudgeCallError that request met."""
        out: list[str | JudgeCallError] = [JudgeCallError("not run", retryable=False)] * len(requests)
        groups: dict[tuple[float, int], list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault((request.temperature, request.max_tokens), []).append(i)
        for (temperature, max_tokens), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                texts = self._generate([requests[i] for i in chunk], temperature, max_tokens, attempt)
                for i, text in zip(chunk, texts, strict=True):
                    out[i] = text
        return out

    def _generate(self, requests: list[JudgeRequest], temperature: float, max_tokens: int,
                  attempt: int) -> list[str | JudgeCallError]:
        import torch

        tok = self.tokenizer
        prompts = [tok.apply_chat_template([{"role": r, "content": c} for r, c in req.messages],
                                           tokenize=False, add_generation_prompt=True) for req in requests]
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        out: list[str | JudgeCallError] = [
            JudgeCallError("the local judge's tokenizer turned the prompt into no tokens", retryable=False)
        ] * len(requests)
        rows = [i for i, x in enumerate(ids) if x]
        if not rows:
            return out
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        width = max(len(ids[i]) for i in rows)
        input_ids = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in rows])  # [b, S]
        mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in rows])  # [b, S]
        kwargs: dict[str, Any] = dict(max_new_tokens=max_tokens, do_sample=temperature > 0, pad_token_id=pad)
        if temperature > 0:
            kwargs["temperature"] = temperature
        digest = hashlib.sha256("".join(requests[i].key() for i in rows).encode() + bytes([attempt % 256]))
        device = self.model.device
        try:
            with self._lock, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                    torch.no_grad():
                torch.manual_seed(int(digest.hexdigest()[:8], 16))
                generated = self.model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                                **kwargs)
        except Exception as err:
            failure = JudgeCallError(f"local judge generate failed: {err}", retryable=False)
            return [failure] * len(requests)
        texts = tok.batch_decode(generated[:, width:], skip_special_tokens=True)
        for i, text in zip(rows, texts, strict=True):
            out[i] = text
        return out


# ----------------------------------------------------------------------------------------------
# LiteLLM


class LiteLLMClient:
    def __init__(self, *, base_url: str | None = None, api_key_env: str | None = None,
                 json_mode: bool = False):
        try:
            import litellm
        except ImportError as err:
            raise ValueError(
                "backend 'litellm' needs LiteLLM: pip install litellm (or use backend 'openai' "
                "with an OpenAI-compatible base_url)."
            ) from err
        self._litellm = litellm
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.json_mode = json_mode
        self.__key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not self.__key:
            raise ValueError(f"The judge API key variable {api_key_env} is not set in the environment.")

    def __repr__(self) -> str:
        return f"LiteLLMClient(base_url={self.base_url!r}, api_key_env={self.api_key_env!r})"

    def complete(self, request: JudgeRequest, timeout: float) -> str:
        kwargs: dict[str, Any] = dict(
            model=request.model,
            messages=[{"role": r, "content": c} for r, c in request.messages],
            temperature=request.temperature,
            max_tokens=request.max_tokens,
            timeout=timeout,
            num_retries=0,  # JudgeCaller retries
        )
        if self.base_url:
            kwargs["api_base"] = self.base_url
        if self.__key:
            kwargs["api_key"] = self.__key
        if self.json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        try:
            reply = self._litellm.completion(**kwargs)
            return reply.choices[0].message.content or ""
        except Exception as err:
            text = str(err).replace(self.__key, "***") if self.__key else str(err)
            status = getattr(err, "status_code", None)
            retryable = status is None or status == 429 or status >= 500
            raise JudgeCallError(f"litellm: {type(err).__name__}: {text[:300]}", retryable=retryable) from None


def build_client(config: JudgeModelConfig, *, batch_size: int = 8) -> JudgeClient:
    if config.backend == "openai":
        return OpenAIClient(config.base_url or "", api_key_env=config.api_key_env,
                            json_mode=config.json_mode)
    if config.backend == "hf":
        return HFClient(config.model, device=config.device, dtype=config.dtype, batch_size=batch_size)
    if config.backend == "litellm":
        return LiteLLMClient(base_url=config.base_url, api_key_env=config.api_key_env,
                             json_mode=config.json_mode)
    raise ValueError(f"Unknown judge backend {config.backend!r}.")


# ----------------------------------------------------------------------------------------------
# Running calls


@dataclass(frozen=True)
class CallOutcome:
    """A judge sample: a judgement, or why there is none."""

    judgement: Judgement | None
    error: str | None = None
    attempts: int = 1  # requests sent (0: served from the cache)
    cached: bool = False


class JudgeCaller:
    """Runs judge requests through one client with bounded concurrency, a per-call timeout,
    retries with exponential backoff (with jitter) for transient failures, re-asks after
    unparsable replies, and an LRU cache of valid judgements keyed by the whole request.

    Only valid judgements are cached: a failure is never replayed from the cache.
    """

    def __init__(self, client: JudgeClient, *, max_parallel: int, timeout_s: float,
                 max_retries: int, backoff_s: float, parse_retries: int, cache_size: int):
        self.client = client
        self.max_parallel = max_parallel
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.parse_retries = parse_retries
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Judgement] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        # A private generator: jitter must not consume the trainer's global random state.
        self._jitter = random.Random(0)
        self.stats = {"requests": 0, "cache_hits": 0, "retries": 0, "parse_failures": 0}
        self._stats_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"JudgeCaller({self.client!r}, max_parallel={self.max_parallel})"

    def run(self, requests: Sequence[JudgeRequest]) -> list[CallOutcome]:
        """One outcome per request, in order. Identical requests in one batch are sent once."""
        unique: dict[str, JudgeRequest] = {}
        for request in requests:
            unique.setdefault(request.key(), request)
        if hasattr(self.client, "complete_batch"):
            results = self._run_batched(unique)
        else:
            pool = self._executor()
            futures = {key: pool.submit(self._call, request) for key, request in unique.items()}
            results = {key: future.result() for key, future in futures.items()}
        outcomes = []
        seen: set[str] = set()
        for request in requests:
            key = request.key()
            outcome = results[key]
            if key in seen and outcome.judgement is not None:  # a duplicate: served by the first
                outcome = CallOutcome(outcome.judgement, attempts=0, cached=True)
            seen.add(key)
            outcomes.append(outcome)
        return outcomes

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_parallel, thread_name_prefix="rim-judge")
            return self._pool

    def _bump(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    def _call(self, request: JudgeRequest) -> CallOutcome:
        key = request.key()
        cached = self._cached(key)
        if cached is not None:
            return CallOutcome(cached, attempts=0, cached=True)
        attempts, error = 0, "no attempt"
        for _ in range(self.parse_retries + 1):
            try:
                text, sent = self._send(request)
            except JudgeCallError as err:
                return CallOutcome(None, error=str(err), attempts=attempts + getattr(err, "sent", 1))
            attempts += sent
            try:
                judgement = parse_judgement(text)
            except JudgementError as err:
                self._bump("parse_failures")
                error = f"invalid judgement: {err}"
                continue
            self._store(key, judgement)
            return CallOutcome(judgement, attempts=attempts)
        return CallOutcome(None, error=error, attempts=attempts)

    def _run_batched(self, unique: dict[str, JudgeRequest]) -> dict[str, CallOutcome]:
        """For backends that generate many requests at once (a local model): every pending
        request in one `complete_batch`, then the unparsable ones again, `parse_retries` times.
        Their failures are not transient, so there are no transport retries."""
        results: dict[str, CallOutcome] = {}
        pending: dict[str, JudgeRequest] = {}
        for key, request in unique.items():
            cached = self._cached(key)
            if cached is not None:
                results[key] = CallOutcome(cached, attempts=0, cached=True)
            else:
                pending[key] = request
        errors: dict[str, str] = {}
        for attempt in range(self.parse_retries + 1):
            if not pending:
                break
            keys = list(pending)
            self._bump("requests", len(keys))
            texts = self.client.complete_batch([pending[k] for k in keys], self.timeout_s, attempt=attempt)
            retry: dict[str, JudgeRequest] = {}
            for key, text in zip(keys, texts, strict=True):
                if isinstance(text, JudgeCallError):
                    results[key] = CallOutcome(None, error=str(text), attempts=attempt + 1)
                    continue
                try:
                    judgement = parse_judgement(text)
                except JudgementError as err:
                    self._bump("parse_failures")
                    errors[key] = f"invalid judgement: {err}"
                    retry[key] = pending[key]
                    continue
                self._store(key, judgement)
                results[key] = CallOutcome(judgement, attempts=attempt + 1)
            pending = retry
        for key in pending:
            results[key] = CallOutcome(None, error=errors[key], attempts=self.parse_retries + 1)
        return results

    def _cached(self, key: str) -> Judgement | None:
        with self._cache_lock:
            judgement = self._cache.get(key)
            if judgement is None:
                return None
            self._cache.move_to_end(key)
        self._bump("cache_hits")
        return judgement

    def _store(self, key: str, judgement: Judgement) -> None:
        if not self.cache_size:
            return
        with self._cache_lock:
            self._cache[key] = judgement
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _send(self, request: JudgeRequest) -> tuple[str, int]:
        """Reply text and the number of requests it took; transient failures are retried."""
        for attempt in range(self.max_retries + 1):
            self._bump("requests")
            try:
                return self.client.complete(request, self.timeout_s), attempt + 1
            except JudgeCallError as err:
                if not err.retryable or attempt == self.max_retries:
                    err.sent = attempt + 1  # type: ignore[attr-defined]
                    raise
            self._bump("retries")
            # Exponential backoff with jitter, so parallel callers hitting a rate limit spread out.
            time.sleep(self.backoff_s * (2**attempt) * (0.5 + self._jitter.random() / 2))
        raise AssertionError("unreachable")
