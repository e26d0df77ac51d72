"""The `vllm_server` backend: a client of a running `vllm serve` (start one with `atlas-fast vllm-serve`).

It speaks what TRL 1.16's client speaks: GET /health and /server_info, POST /v1/completions with
token ids in and token ids + log-probs out (`return_token_ids`, `logprobs=0` under the server's
`--logprobs-mode processed_logprobs`), and vLLM's weight-transfer endpoints. Only the standard
library is used for HTTP, so the base install gains no dependency.

Weights travel in large pieces, never one request per parameter:
- `nccl` (GPU policy, GPU server, vLLM importable here): vLLM's own trainer-side NCCL engine,
  packed into buffers, one /update_weights request per sync.
- `file` (anywhere the server can read a folder of ours, CPU included): the whole state in one
  safetensors file (in /dev/shm when there is one: memory, not disk), kept mapped and rewritten
  in place at every push (`weight_file`), loaded by one /collective_rpc call into our worker
  extension (`vllm_worker_ext`).
Then the prefix cache is reset, so no KV block computed with the old weights is reused.
"""
from __future__ import annotations

import errno
import http.client
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch

from . import RolloutOutput, SamplingParams, stop_ids
from .vllm_common import VLLM_MISSING, check_prompts, expand_greedy, finish, parse_dtype, policy_weights, sampling_fields
from .weight_file import WeightFile

log = logging.getLogger(__name__)

EXTENSION_METHOD = "atlas_fast_load_safetensors"  # vllm_worker_ext.WeightReloadExtension
RETRY_STATUS = (502, 503, 504)  # a proxy or a server still starting: worth another try
WEIGHT_SYNC_MODES = ("auto", "nccl", "file")


class VLLMServerError(RuntimeError):
    """The server answered, but not with what was asked for."""


class VLLMServerUnavailable(VLLMServerError, ConnectionError):
    """The server could not be reached (refused, timed out, or kept answering 5xx)."""


class VLLMServerBackend:
    """Generation through a vLLM server; `update_weights` pushes the policy's weights to it.

    base_url        the server, e.g. http://127.0.0.1:8000
    timeout         seconds to wait for the server to answer /health at construction (it may
                    still be loading), and the bound on retrying a request that cannot connect
    request_timeout seconds one request may take (a long generation batch)
    retries         extra attempts for a request that could not connect or got 502/503/504,
                    with exponential backoff from `backoff` seconds
    weight_sync     "auto" (nccl when possible, else file), "nccl" or "file"
    weight_dir      where the file sync makes its own folder (default: /dev/shm when it has room,
                    else $TMPDIR); the server must be able to read it. The file stays there, a
                    model's worth of memory in /dev/shm, until `close()` or exit
    group_port      TCP port of the NCCL rendezvous (the trainer listens)
    """

    def __init__(self, model: torch.nn.Module | None, tokenizer: Any, *, base_url: str = "http://127.0.0.1:8000",
                 timeout: float = 240.0, request_timeout: float = 1800.0, retries: int = 3, backoff: float = 0.5,
                 weight_sync: str = "auto", weight_dir: str | os.PathLike | None = None, group_port: int = 51216,
                 max_concurrency: int = 16):
        if weight_sync not in WEIGHT_SYNC_MODES:
            raise ValueError(f"weight_sync must be one of {WEIGHT_SYNC_MODES}, got {weight_sync!r}")
        if not (timeout > 0 and request_timeout > 0 and retries >= 0 and backoff >= 0):
            raise ValueError("timeout and request_timeout must be > 0, retries and backoff >= 0")
        parsed = urllib.parse.urlparse(base_url if "://" in base_url else f"http://{base_url}")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"base_url must look like http://HOST:PORT, got {base_url!r}")
        self.base_url = f"{parsed.scheme}://{parsed.netloc}{parsed.path.rstrip('/')}"
        self.host = parsed.hostname
        self.model = model
        self.tokenizer = tokenizer
        self.timeout = float(timeout)
        self.request_timeout = float(request_timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.weight_sync = weight_sync
        self.group_port = int(group_port)
        self.max_concurrency = max(1, int(max_concurrency))
        self.eos_ids = stop_ids(tokenizer, model)
        self._weight_root = Path(weight_dir) if weight_dir is not None else None
        self._weight_dir: Path | None = None  # our own folder inside the root, made on first push
        self._weight_dir_cleanup: weakref.finalize | None = None
        self._shm_full = False  # /dev/shm had no room for the weights: the default root is disk
        self._nccl = None  # vLLM's trainer-side engine, once the NCCL group is up
        self._extension = True  # False once the server is found to lack our worker extension
        self.last_sync_s: float | None = None
        self.last_sync: dict = {}  # the last push's timings (and bytes, for the file push)
        self._file_times: dict = {}
        self._weight_file: WeightFile | None = None  # the file push's mapped file, kept between pushes

        self.wait_until_healthy(self.timeout)
        # Setup answers at once on a healthy server: the short timeout, not a generation's.
        self.server_info = self._server_info()  # None without VLLM_SERVER_DEV_MODE=1
        models = self._request("GET", "/v1/models", timeout=self.timeout)
        try:
            self.model_name = models["data"][0]["id"]
        except (KeyError, IndexError, TypeError):
            raise VLLMServerError(f"GET {self._url('/v1/models')} answered without a model id: "
                                  f"{str(models)[:200]}") from None

    # ------------------------------------------------------------------ HTTP
    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def _request(self, method: str, path: str, body: Any = None, *, timeout: float | None = None,
                 retries: int | None = None, raw_status: bool = False) -> Any:
        """JSON in, JSON out. Connection failures and 502/503/504 are retried with backoff, never
        past `self.timeout` in total; other HTTP errors raise at once with the server's message."""
        url = self._url(path)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        attempts = 1 + (self.retries if retries is None else retries)
        start = time.monotonic()
        last: Exception | None = None
        tried = 0
        for attempt in range(attempts):
            if attempt:
                pause = self.backoff * 2 ** (attempt - 1)
                if time.monotonic() - start + pause > self.timeout:
                    break
                time.sleep(pause)
            tried += 1
            req = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=timeout or self.request_timeout) as resp:
                    payload = resp.read()
                    status = resp.status
            except urllib.error.HTTPError as err:
                text = err.read().decode(errors="replace")
                if raw_status:
                    return err.code, text
                if err.code in RETRY_STATUS:
                    last = err
                    continue
                raise VLLMServerError(f"{method} {url} failed with HTTP {err.code}: {server_message(text)}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout,
                    http.client.HTTPException) as err:  # the last: a reply cut short, or not HTTP at all
                last = err
                continue
            if raw_status:
                return status, payload.decode(errors="replace")
            try:
                return json.loads(payload) if payload else None
            except ValueError:
                raise VLLMServerError(f"{method} {url} answered with something other than JSON: "
                                      f"{payload[:200].decode(errors='replace')!r}") from None
        reason = getattr(last, "reason", None) or last
        raise VLLMServerUnavailable(
            f"vLLM server at {self.base_url} cannot be reached ({method} {path}: {reason}; "
            f"{tried} attempt(s) in {time.monotonic() - start:.1f}s). Is it running? "
            "Start one with: atlas-fast vllm-serve --model PATH") from None

    def wait_until_healthy(self, timeout: float) -> None:
        """Poll GET /health until it answers 200, for at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            left = deadline - time.monotonic()
            try:
                with urllib.request.urlopen(self._url("/health"), timeout=max(0.1, min(5.0, left))) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout) as err:
                last = getattr(err, "reason", None) or err
            if time.monotonic() + 0.5 > deadline:
                raise VLLMServerUnavailable(
                    f"vLLM server at {self.base_url} is not healthy after {timeout:g}s (GET /health: {last}). "
                    "Is it running? Start one with: atlas-fast vllm-serve --model PATH")
            time.sleep(0.5)

    def _server_info(self) -> dict | None:
        status, text = self._request("GET", "/server_info?config_format=json", raw_status=True, timeout=self.timeout)
        if status != 200:
            return None
        try:
            return json.loads(text).get("vllm_config")
        except (ValueError, AttributeError):
            return None

    @property
    def server_dtype(self) -> torch.dtype | None:
        return parse_dtype(((self.server_info or {}).get("model_config") or {}).get("dtype"))

    @property
    def server_device(self) -> str | None:
        return ((self.server_info or {}).get("device_config") or {}).get("device")

    # ------------------------------------------------------------------ generation
    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> RolloutOutput:
        check_prompts(prompt_ids)
        start = time.perf_counter()
        prompts, n = expand_greedy(prompt_ids, sampling)
        fields = {**sampling_fields(sampling, self.eos_ids), "n": n}
        base = {"model": self.model_name, "return_token_ids": True, "return_tokens_as_token_ids": True, **fields}
        if sampling.seed is None:
            choices = self._complete({**base, "prompt": prompts}, len(prompts) * n)
        else:
            # One seed for a whole batch request gives every prompt the same random stream; a
            # request per prompt, seeded seed + i, keeps prompts independent and reproducible.
            bodies = [{**base, "prompt": [p], "seed": sampling.seed + i} for i, p in enumerate(prompts)]
            with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(bodies))) as pool:
                choices = [c for part in pool.map(lambda b: self._complete(b, n), bodies) for c in part]
        stops = set(fields["stop_token_ids"])
        ids, reasons, logps = [], [], [] if sampling.logprobs else None
        for choice in choices:
            out, why = finish(choice["token_ids"], choice.get("finish_reason"), stops)
            ids.append(out)
            reasons.append(why)
            if logps is not None:
                values = (choice.get("logprobs") or {}).get("token_logprobs")
                if values is None or len(values) < len(out):
                    raise VLLMServerError(f"vLLM server at {self.base_url} returned no log-probs; "
                                          "start it with --max-logprobs -1 (atlas-fast vllm-serve does)")
                logps.append([float("-inf") if v is None else float(v) for v in values[: len(out)]])
        return RolloutOutput(ids, reasons, logps, metrics={"rollout/server_s": time.perf_counter() - start})

    def _complete(self, body: dict, expected: int) -> list[dict]:
        reply = self._request("POST", "/v1/completions", body)
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or any(not isinstance(c, dict) or "index" not in c for c in choices):
            raise VLLMServerError(f"POST {self._url('/v1/completions')} answered without indexed choices: "
                                  f"{str(reply)[:200]}")
        if len(choices) != expected:
            raise VLLMServerError(f"vLLM server at {self.base_url} returned {len(choices)} completions, "
                                  f"expected {expected}")
        choices = sorted(choices, key=lambda c: c["index"])  # index = prompt * n + sample
        if any(c.get("token_ids") is None for c in choices):
            raise VLLMServerError(f"vLLM server at {self.base_url} returned no token ids "
                                  "(vLLM >= 0.10 answers return_token_ids)")
        return choices

    # ------------------------------------------------------------------ weights
    def update_weights(self, model: torch.nn.Module) -> None:
        """Push `model`'s weights to the server, then reset its prefix cache."""
        if model is None:
            raise ValueError("update_weights needs the policy model")
        self.model = model
        start = time.perf_counter()
        self._file_times = {}
        mode = self._sync_mode(model)
        if mode == "nccl":
            self._push_nccl(model)
        else:
            self._push_file(model)
        pushed = time.perf_counter()
        self.reset_prefix_cache()
        done = time.perf_counter()
        self.last_sync_s = done - start
        self.last_sync = {"mode": mode, "push_s": pushed - start, "reset_s": done - pushed, **self._file_times}

    def _sync_mode(self, model: torch.nn.Module) -> str:
        on_cuda = next(model.parameters()).is_cuda
        transfer = (self.server_info or {}).get("weight_transfer_config") or {}
        nccl_ok = on_cuda and self.server_device not in (None, "cpu") and transfer.get("backend") == "nccl"
        if self.weight_sync == "nccl" or (self.weight_sync == "auto" and nccl_ok and vllm_importable()):
            if self.server_info is None:
                raise VLLMServerError(f"vLLM server at {self.base_url} hides /server_info: start it with "
                                      "VLLM_SERVER_DEV_MODE=1 (atlas-fast vllm-serve does)")
            if not nccl_ok:
                raise VLLMServerError(
                    f"weight_sync='nccl' needs the policy on a CUDA device and a GPU server started with "
                    f"--weight-transfer-config '{{\"backend\": \"nccl\"}}' (server at {self.base_url}: device "
                    f"{self.server_device}, weight transfer {transfer or None}); use weight_sync='file'")
            if not vllm_importable():
                raise ImportError(f"weight_sync='nccl' runs vLLM's NCCL engine in the trainer. {VLLM_MISSING}")
            return "nccl"
        return "file"

    def _dev_post(self, path: str, body: Any, what: str, **kwargs: Any) -> str:
        """POST to one of vLLM's development endpoints -> the response text; a 404 means the server
        runs without them, any other failure names `what` and the server's message."""
        status, text = self._request("POST", path, body, raw_status=True, **kwargs)
        if status == 404:
            raise VLLMServerError(f"vLLM server at {self.base_url} has no {path}: start it with "
                                  "VLLM_SERVER_DEV_MODE=1 (atlas-fast vllm-serve does)")
        if status != 200:
            raise VLLMServerError(f"{what} on the vLLM server at {self.base_url} failed (HTTP {status}): "
                                  f"{server_message(text)}")
        return text

    def _rpc(self, method: str, **kwargs: str) -> Any:
        text = self._dev_post("/collective_rpc", {"method": method, "kwargs": kwargs}, method, retries=0)
        return json.loads(text) if text else None

    def _push_file(self, model: torch.nn.Module) -> None:
        if self._weight_file is None:
            self._weight_file = WeightFile(self.weight_dir / "weights.safetensors")
        start = time.perf_counter()
        try:
            with policy_weights(model) as pairs:
                nbytes = self._weight_file.write(pairs, self.server_dtype)
        except OSError as err:
            in_shm = self._weight_root is None and self.weight_dir.parent == Path("/dev/shm")
            self._drop_weight_dir()
            if err.errno != errno.ENOSPC or not in_shm:
                raise
            # The default folder was in a /dev/shm too small for the weights (Docker's is 64 MB): disk then.
            self._shm_full = True
            log.warning("/dev/shm has no room for the weight file; pushing weights through a file in %s instead",
                        tempfile.gettempdir())
            return self._push_file(model)
        self._file_times = {"bytes": nbytes, "write_s": time.perf_counter() - start}
        path = self._weight_file.path
        try:
            if self._extension:
                try:
                    start = time.perf_counter()
                    reply = self._rpc(EXTENSION_METHOD, path=str(path))
                    self._file_times["load_s"] = time.perf_counter() - start
                    worker = [r.get("seconds") for r in (reply or {}).get("results", []) if isinstance(r, dict)]
                    if worker and all(isinstance(t, (int, float)) for t in worker):
                        self._file_times["worker_load_s"] = max(worker)  # inside the workers, no HTTP or RPC hop
                    return
                except VLLMServerError as err:
                    if "not implemented" not in str(err):
                        raise
                    self._extension = False
                    log.warning("vLLM server at %s lacks atlas-fast's worker extension (start it with "
                                "atlas-fast vllm-serve); falling back to its reload_weights, which leaves a "
                                "tied LM head stale on CPU servers", self.base_url)
            self._rpc("reload_weights", weights_path=str(path.parent))
        except BaseException:
            # The server may still be reading it: the next push writes a new file, not these pages.
            self._weight_file.discard()
            self._weight_file = None
            raise

    @property
    def weight_dir(self) -> Path:
        """This backend's own folder for the file push, made on first use inside `weight_dir` (or
        /dev/shm, else the temp folder) and removed by `close()`, or at exit at the latest."""
        if self._weight_dir is None:
            root = self._weight_root
            if root is None:
                shm = Path("/dev/shm")
                root = shm if shm.is_dir() and os.access(shm, os.W_OK) and not self._shm_full else None
            else:
                root.mkdir(parents=True, exist_ok=True)
            self._weight_dir = Path(tempfile.mkdtemp(prefix="atlas-fast-weights-", dir=root))
            os.chmod(self._weight_dir, 0o755)  # a server running as another user still reads it
            # A run that never calls close() must not leave a model's worth of shared memory behind.
            self._weight_dir_cleanup = weakref.finalize(self, shutil.rmtree, str(self._weight_dir), True)
        return self._weight_dir

    def _drop_weight_dir(self) -> None:
        if self._weight_file is not None:
            self._weight_file.discard()
            self._weight_file = None
        if self._weight_dir_cleanup is not None:
            self._weight_dir_cleanup()  # removes the folder, once
            self._weight_dir_cleanup = None
        self._weight_dir = None

    def _push_nccl(self, model: torch.nn.Module) -> None:
        if self._nccl is None:
            self._nccl = self._init_nccl()
        source = self._nccl.source
        source.dtype = self.server_dtype
        with policy_weights(model) as pairs:
            source.pairs = pairs
            try:
                self._nccl.send_weights()  # start_weight_update, packed broadcast + update_weights, finish
            finally:
                source.pairs = []

    def _init_nccl(self):
        from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        class PolicySource(WeightSource):
            """The pairs of the sync in progress (set by _push_nccl while the policy is merged),
            cast one at a time to the server's dtype as the broadcast reaches them."""

            pairs: list = []
            dtype: torch.dtype | None = None

            def metadata(self):
                return [ParamMeta(name, self.dtype or t.dtype, tuple(t.shape)) for name, t in self.pairs]

            def __iter__(self):
                return ((name, t if self.dtype is None else t.to(self.dtype)) for name, t in self.pairs)

        world = int(self._request("GET", "/get_world_size")["world_size"]) + 1  # the trainer is rank 0
        info = NCCLTrainerInitInfo(master_address=self._local_address(), master_port=self.group_port,
                                   world_size=world, rank=0)
        return NCCLTrainerWeightTransferEngine.trainer_init(info, client=_SyncClient(self), source=PolicySource())

    def _local_address(self) -> str:
        """The address of this machine that the server reaches us at (for the NCCL rendezvous)."""
        if self.host in ("localhost", "127.0.0.1", "::1", "0.0.0.0"):
            return "127.0.0.1"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((self.host, 9))  # UDP connect sends nothing; it only picks the route
            return s.getsockname()[0]

    def reset_prefix_cache(self, attempts: int = 5) -> None:
        """Drop cached KV blocks computed with old weights. vLLM refuses while requests still hold
        blocks, so a refusal is retried briefly."""
        for attempt in range(attempts):
            text = self._dev_post("/reset_prefix_cache", {}, "reset_prefix_cache")
            if not text or json.loads(text).get("success", True):
                return
            time.sleep(0.2 * 2 ** attempt)
        raise VLLMServerError(f"vLLM server at {self.base_url} kept refusing to reset its prefix cache "
                              "(requests still running?)")

    def close(self) -> None:
        if self._nccl is not None:
            try:
                self._request("POST", "/shutdown_weight_transfer_engine", {}, retries=0, timeout=10)
            except VLLMServerError:
                pass  # the server may be gone already
            self._nccl.shutdown()
            self._nccl = None
        if self._weight_file is not None and self._extension:
            try:  # the server's mapping would keep the file's memory after we delete it
                self._dev_post("/collective_rpc", {"method": "atlas_fast_forget",
                                                   "kwargs": {"path": str(self._weight_file.path)}},
                               "atlas_fast_forget", retries=0, timeout=10)
            except (VLLMServerError, OSError):
                pass  # gone, or an older extension: its next load drops mappings of deleted files
        self._drop_weight_dir()  # a model's worth of memory when in /dev/shm


class _SyncClient:
    """vLLM's `VLLMWeightSyncClient` protocol over our HTTP client. No retries: a weight update
    sent twice would wait for a broadcast that never comes."""

    def __init__(self, backend: VLLMServerBackend):
        self.backend = backend

    def _post(self, path: str, body: dict) -> None:
        self.backend._request("POST", path, body, retries=0)

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._post("/init_weight_transfer_engine", {"init_info": init_info})

    def start_weight_update(self) -> None:
        self._post("/start_weight_update", {})

    def update_weights(self, update_info) -> None:
        self._post("/update_weights", {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._post("/finish_weight_update", {} if weight_version is None else {"weight_version": weight_version})


def server_message(text: str) -> str:
    """The human part of a vLLM / FastAPI error body."""
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body))
        if isinstance(err, dict):
            err = err.get("message", err)
        return str(err)[:500]
    return str(body)[:500]


def vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None
