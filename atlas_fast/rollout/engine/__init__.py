"""The `engine` rollout backend: our own decoder over the policy's own parameters.

    generate(prompts [P], n) = prefill each prompt once -> fan its KV out to its n cache rows
                               -> sample token 0 -> decode steps (CUDA graphs) until done

The forward calls the model's modules (LoRA wrappers included), so an optimizer step is visible at
the next `generate`; the one copy is of plain q/k/v and gate/up weights packed for one GEMM each
(packed.py), re-copied by `update_weights`. Sampling runs on the device; the host looks at which
sequences finished only every `check_every` steps, and then moves the live ones into a smaller
batch bucket when they fit one.

Modules: model.py (the forward over HF modules; eager and fused decode steps), attention.py (rope,
SDPA prefill/decode), cache.py (the KV cache), batch.py (per-sequence decode state), sampling.py
(the PyTorch sampler, the reference), graphs.py (CUDA graphs), packed.py, and the Triton kernels of
the CUDA step: kernels.py (norm, rope + KV write, SiLU-mul), skinny.py (the batch-64 GEMMs with
their epilogues), decode_kernel.py (attention), sample_kernel.py (one-pass temperature sampling;
its last kernel also records the step's draws), and pdl.py (programmatic dependent launch).
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Sequence

import torch

from .. import FINISH_LENGTH, FINISH_STOP, RolloutOutput, SamplingParams, check_stop_ids, right_pad, stop_ids
from .batch import DecodeBatch, compact, new_batch
from .cache import KVCache
from .graphs import DecodeGraphs, GraphPost, batch_bucket, round_up
from .model import Decoder, decode_logits, decode_logits_fused, fusable, prefill_logits, resolve_decoder, rope_table
from .packed import PackedWeights
from .sampling import sample, temperature_only

__all__ = ["EngineBackend"]

# The default of EngineBackend(graph_sampler=None): off until timed against the launched sampler
# on a GPU (benchmarks/engine_variants.py, "sampler in the graph").
GRAPH_SAMPLER = False


class DecodeStep:
    """The decode forward the engine uses: (dec, cache, rope, tokens [B], positions [B], span) -> logits [B, V]."""

    def __init__(self, fn, **options):
        self.fn, self.options = fn, options
        self.span_free = bool(options.get("triton_attention"))
        self.__name__ = fn.__name__ + ("+triton_attention" if self.span_free else "")

    def __call__(self, dec, cache, rope, tokens, positions, span):
        return self.fn(dec, cache, rope, tokens, positions, span, **self.options)


class EngineBackend:
    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, dtype: torch.dtype | str | None = None,
                 cuda_graphs: bool = True, check_every: int = 8, span_step: int = 256,
                 prefill_tokens: int = 16384, max_rows: int = 0, max_length: int = 0,
                 fused_kernels: bool | None = None, attention: str = "auto", fused_sampler: bool | None = None,
                 pack_projections: bool = True, fused_bookkeeping: bool = True, graph_sampler: bool | None = None):
        """dtype: compute dtype (default bf16 on CUDA, the parameters' dtype elsewhere); float32
        parameters then run under autocast. check_every: decode steps between looks at which
        sequences finished (each look is a host sync). span_step: the attention span's rounding
        under CUDA graphs (one graph per span; 256 wastes at most 255 positions of KV reads).
        prefill_tokens: padded prompt tokens per prefill forward. max_rows / max_length: size the
        KV cache up front (it grows on demand otherwise). fused_kernels: the Triton norm/rotary
        kernels in the decode step (default: on CUDA when the model's norms are stock RMSNorms).
        attention: decode attention with the fused step, "triton" (reads each row's own KV length;
        one CUDA graph per batch bucket) or "sdpa" (over the span); "auto" is "triton".
        fused_sampler: temperature-only steps sample in one Triton pass (default: on CUDA).
        pack_projections: with the fused step, q/k/v and gate/up of plain nn.Linear layers run as
        one GEMM each over packed copies (packed.py: refreshed when the weights change; costs
        their size in memory, ~0.47 GB for Qwen2.5-0.5B in bf16). fused_bookkeeping: with the
        one-pass sampler, its last kernel also records each draw and feeds it to the next step
        (one launch instead of ~7 small PyTorch ops per step); off, the PyTorch ops run.
        graph_sampler: with CUDA graphs and fused bookkeeping, temperature-only steps capture the
        sampler into the decode graph (it reads the step and seed from the device), so a step is
        one graph launch; the draws are the same as without it (None: GRAPH_SAMPLER)."""
        if check_every < 1 or span_step < 1 or prefill_tokens < 1:
            raise ValueError("EngineBackend: check_every, span_step and prefill_tokens must be >= 1")
        if attention not in ("auto", "triton", "sdpa"):
            raise ValueError(f"EngineBackend: attention must be 'auto', 'triton' or 'sdpa', got {attention!r}")
        self.tokenizer = tokenizer
        self.dtype_option = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.cuda_graphs = cuda_graphs
        self.check_every = check_every
        self.span_step = span_step
        self.prefill_tokens = prefill_tokens
        self.reserve = (max_rows, max_length)
        self.fused_kernels = fused_kernels
        self.attention = attention
        self.fused_sampler = fused_sampler
        self.pack_projections = pack_projections
        self.fused_bookkeeping = fused_bookkeeping
        self.graph_sampler = GRAPH_SAMPLER if graph_sampler is None else graph_sampler
        # Buffers an in-graph sampler writes (made with the graphs, which bake their addresses in):
        # output tokens / log-probs [rows + 1, length], the stop mask [V], and (t, base seed).
        self._graph_out: dict[str, torch.Tensor] = {}
        self.packed: PackedWeights | None = None
        self.cache: KVCache | None = None
        self.graphs: DecodeGraphs | None = None
        self.rope = None
        self._bind(model)

    # ------------------------------------------------------------------ weights and resources
    def _bind(self, model: torch.nn.Module) -> None:
        self.model = model
        self.dec: Decoder = resolve_decoder(model)  # clear error for unsupported architectures
        self.eos_ids = stop_ids(self.tokenizer, model)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else min(self.eos_ids, default=0)
        self._param_ptrs = self._pointers()
        self.graphs = self.packed = None

    def _pointers(self) -> tuple[int, ...]:
        return tuple(p.data_ptr() for p in self.model.parameters())

    def update_weights(self, model: torch.nn.Module) -> None:
        """The engine reads the parameters in place; what remains is re-copying the packed q/k/v
        and gate/up projections (~0.5 GB read and written for Qwen2.5-0.5B: ~0.25 ms), done here
        unconditionally because writes through `.data` (an offloaded optimizer's upload) move no
        version counter. A new model object, or parameters moved to new storage, drops the graphs."""
        if model is not self.model:
            self._bind(model)
        elif not self._same_storage():
            self.graphs = self.packed = None
        elif self.packed is not None:
            self.packed.refresh()

    def _same_storage(self) -> bool:
        pointers = self._pointers()
        same = pointers == self._param_ptrs
        self._param_ptrs = pointers
        return same

    def close(self) -> None:
        self.cache = self.graphs = self.rope = self.packed = None

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> RolloutOutput:
        prompts = [list(map(int, p)) for p in prompt_ids]
        self._check_prompts(prompts)
        if not prompts:
            return RolloutOutput([], [], [] if sampling.logprobs else None)
        model = self.model
        was_training = model.training
        model.eval()  # no dropout (LoRA's included) while sampling
        start = time.perf_counter()
        try:
            with self._precision():
                tokens, logps, steps, compactions = self._generate(prompts, sampling)
        finally:
            model.train(was_training)
        out = self._collect(tokens, logps, sampling)
        out.metrics.update({"engine/seconds": time.perf_counter() - start, "engine/decode_steps": float(steps),
                            "engine/compactions": float(compactions)})
        return out

    def _generate(self, prompts: list[list[int]], sampling: SamplingParams):
        dec, n, T = self.dec, sampling.n, sampling.max_tokens
        P, N = len(prompts), len(prompts) * sampling.n
        device = self._device()
        lens = [len(p) for p in prompts]
        size = batch_bucket(N)
        if not self._same_storage():  # parameters re-allocated (`.to()`, `p.data = ...`): graphs point at freed memory
            self.graphs = self.packed = None
        self._ensure_cache(size, max(lens) + T, device)
        if self.packed is not None:
            self.packed.refresh_if_stale()  # in-place updates without update_weights: re-copy
        check_stop_ids(sampling, dec.vocab_size)
        # A tokenizer's EOS id past the model's rows can never be sampled (random-weight test models).
        stops = {t for t in self._stops(sampling) if t < dec.vocab_size}
        stop_mask = None
        if stops:
            stop_mask = torch.zeros(dec.vocab_size, dtype=torch.bool, device=device)
            stop_mask[torch.tensor(sorted(stops), device=device)] = True
        generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None
        seeds = self._kernel_seeds(sampling, device)
        in_graph = (self.graph_sampler and self.graphs is not None and seeds is not None and self.fused_bookkeeping
                    and sampling.repetition_penalty == 1.0)
        if in_graph:  # the graphs' own output buffers, whose addresses the captured sampler holds
            out = self._graph_out
            out_tokens = out["tokens"][: N + 1, :T].fill_(self.pad_id)  # row N: padding slots
            out_logps = out["logps"][: N + 1, :T].zero_() if sampling.logprobs else None
            if stop_mask is not None:
                stop_mask = out["stop"].copy_(stop_mask)
            out["step"].copy_(torch.tensor([0, seeds]))
        else:
            out_tokens = torch.full((N + 1, T), self.pad_id, dtype=torch.long, device=device)  # row N: padding slots
            out_logps = torch.zeros((N + 1, T), dtype=torch.float32, device=device) if sampling.logprobs else None

        first_logits = self._prefill(prompts, n, device)  # [N, V]
        seen = self._seen(prompts, n, size, device) if sampling.repetition_penalty != 1.0 else None
        batch = self._graph_inputs(new_batch(lens, n, torch.zeros(N, dtype=torch.long, device=device), size, seen,
                                             self.pad_id))
        pad_rows = size - N
        logits = torch.cat([first_logits, first_logits[:1].expand(pad_rows, -1)]) if pad_rows else first_logits
        self._sample_into(batch, logits, 0, sampling, stop_mask, generator, out_tokens, out_logps, seeds, advance=0)

        can_stop = stop_mask is not None
        steps, compactions = 1, 0
        step_on_device = False  # whether out["step"][0] holds this t (it does after a graph-sampled step)
        for t in range(1, T):
            if can_stop and t % self.check_every == 0:
                finished = batch.finished.tolist()  # host sync, once every check_every steps
                keep = [i for i, f in enumerate(finished) if not f]
                if not keep:
                    break
                batch.live = [not f for f in finished]
                if batch_bucket(len(keep)) < batch.size:
                    batch = self._graph_inputs(compact(batch, keep, batch_bucket(len(keep)), self.cache,
                                                       batch.span_needed(t), self.pad_id, N))
                    compactions += 1
            if in_graph and temperature_only(sampling, t, stop_mask, dec.vocab_size):
                if not step_on_device:
                    self._graph_out["step"][0].fill_(t)
                    step_on_device = True
                self._decode(batch, batch.span_needed(t), self._graph_post(sampling, stop_mask, out_logps))
            else:
                step_on_device = False
                logits = self._decode(batch, batch.span_needed(t))  # [B, V]
                self._sample_into(batch, logits, t, sampling, stop_mask, generator, out_tokens, out_logps, seeds,
                                  advance=1)
            steps += 1
        return out_tokens[:N], (out_logps[:N] if out_logps is not None else None), steps, compactions

    def _prefill(self, prompts: list[list[int]], n: int, device: torch.device) -> torch.Tensor:
        """Each prompt's forward once, in chunks of about `prefill_tokens` padded tokens -> [P*n, V]."""
        out = []
        start = 0
        while start < len(prompts):
            stop = start + 1
            while stop < len(prompts) and (stop + 1 - start) * max(map(len, prompts[start : stop + 1])) <= self.prefill_tokens:
                stop += 1
            chunk = prompts[start:stop]
            ids, mask = right_pad(chunk, self.pad_id, device)  # [c, Tc]
            lengths = mask.sum(1)  # [c]
            src = torch.arange(len(chunk), device=device).repeat_interleave(n)  # [c*n]: prompt of each row
            dest = torch.arange(start * n, stop * n, device=device)  # [c*n]: their cache rows
            logits = prefill_logits(self.dec, self.cache, self.rope, ids, lengths, dest, src)  # [c, V]
            out.append(logits[src])
            start = stop
        return torch.cat(out)

    def _decode(self, batch: DecodeBatch, needed: int, post: GraphPost | None = None) -> torch.Tensor:
        step = self._step_fn()
        if self.graphs is not None:
            # Span-free steps read each row's own length: one graph per batch bucket.
            span = self.cache.length if step.span_free else min(round_up(needed, self.span_step), self.cache.length)
            return self.graphs(batch.tokens, batch.positions, span, post)
        return step(self.dec, self.cache, self.rope, batch.tokens, batch.positions, needed)

    def _graph_post(self, sampling: SamplingParams, stop_mask: torch.Tensor | None,
                    out_logps: torch.Tensor | None) -> GraphPost:
        """The one-pass sampler and its bookkeeping as part of the decode graph: it reads t and the
        seed from out["step"] and advances t, writes the graphs' output buffers, and feeds the draw
        to the next replay through the graphs' own tokens/positions/finished buffers."""
        from .sample_kernel import sample_tokens_into  # Triton loads only when a kernel runs

        out, temperature, pad_id = self._graph_out, sampling.temperature, self.pad_id
        has_stop, has_logps = stop_mask is not None, out_logps is not None

        def run(logits, tokens, positions, finished, rows, scratch: bool) -> None:
            buffers = {k: (v.clone() if scratch else v) for k, v in out.items()}
            sample_tokens_into(logits, temperature, 0, t=0, finished=finished, rows=rows, out_tokens=buffers["tokens"],
                               out_logps=buffers["logps"] if has_logps else None,
                               stop_mask=buffers["stop"] if has_stop else None, tokens=tokens, positions=positions,
                               advance=1, pad_id=pad_id, step=buffers["step"])
            buffers["step"][:1].add_(1)

        # What the graph bakes in: the temperature (the kernels' scale) and which outputs it writes.
        return GraphPost(("sampler", temperature, has_stop, has_logps), run)

    def _step_fn(self) -> "DecodeStep":
        use = self.fused_kernels
        if use is None:
            use = self.cache.buf.device.type == "cuda"
        if use and fusable(self.dec, self.rope):
            if self.packed is None and self.pack_projections:
                self.packed = PackedWeights(self.dec, self.cache.buf.dtype)
            return DecodeStep(decode_logits_fused, triton_attention=self.attention != "sdpa", packed=self.packed)
        return DecodeStep(decode_logits)

    def _sample_into(self, batch: DecodeBatch, logits: torch.Tensor, t: int, sampling: SamplingParams,
                     stop_mask, generator, out_tokens: torch.Tensor, out_logps: torch.Tensor | None,
                     seeds: int | None = None, advance: int = 0) -> None:
        """Draw token t of every slot, record it, and make it the slots' next input (its position
        is the fed token's plus `advance`), all on the device."""
        seed = None if seeds is None else (seeds + t) % 2**31  # a fresh random stream per step
        if (seed is not None and self.fused_bookkeeping and batch.seen is None
                and temperature_only(sampling, t, stop_mask, logits.shape[-1])):
            from .sample_kernel import sample_tokens_into  # Triton loads only when a kernel runs

            # One launch after the sweep; batch.tokens/positions are the graph's inputs when graphs run.
            sample_tokens_into(logits, sampling.temperature, seed, t=t, finished=batch.finished, rows=batch.rows,
                               out_tokens=out_tokens, out_logps=out_logps, stop_mask=stop_mask,
                               tokens=batch.tokens, positions=batch.positions, advance=advance, pad_id=self.pad_id)
            return
        seen = batch.seen[:, :-1] if batch.seen is not None else None
        tokens, logps = sample(logits, sampling, t, seen, stop_mask, generator, out_logps is not None, seed)  # [B]
        tokens = torch.where(batch.finished, self.pad_id, tokens)
        out_tokens[batch.rows, t] = tokens
        if out_logps is not None:
            out_logps[batch.rows, t] = torch.where(batch.finished, 0.0, logps)
        if batch.seen is not None:
            batch.seen.scatter_(1, tokens[:, None], True)
        if stop_mask is not None:
            batch.finished |= stop_mask[tokens]
        batch.tokens.copy_(tokens)  # in place: under CUDA graphs it is the next replay's input buffer
        if advance:
            batch.positions += advance

    def _graph_inputs(self, batch: DecodeBatch) -> DecodeBatch:
        """With CUDA graphs, the batch's tokens/positions become views of the graphs' input buffers
        (one copy here, at the start and after each compaction), so the fused sampler's writes are
        the next replay's inputs and each step skips two copies."""
        if self.graphs is not None:
            batch.tokens, batch.positions, batch.finished, batch.rows = self.graphs.adopt(
                batch.tokens, batch.positions, batch.finished, batch.rows)
        return batch

    # ------------------------------------------------------------------ helpers
    def _collect(self, tokens: torch.Tensor, logps: torch.Tensor | None, sampling: SamplingParams) -> RolloutOutput:
        stops = self._stops(sampling)
        ends = [None] * tokens.shape[0]  # per row: the length up to and with its first stop token
        if stops:  # found on the device: a Python scan of every token costs ~3 ms per 32k tokens
            hit = torch.isin(tokens, torch.tensor(sorted(stops), device=tokens.device))
            first = torch.where(hit.any(1), hit.int().argmax(1) + 1, 0)
            ends = [e or None for e in first.tolist()]
        rows = tokens.tolist()  # host sync: the ids are needed on the host next
        lp_rows = logps.tolist() if logps is not None else None
        ids, reasons, lps = [], [], []
        for r, (row, end) in enumerate(zip(rows, ends)):
            ids.append(row[:end] if end else row)
            reasons.append(FINISH_STOP if end else FINISH_LENGTH)
            if lp_rows is not None:
                lps.append(lp_rows[r][: len(ids[-1])])
        # Completions of prompt i are rows i*n .. i*n+n-1, as the interface asks.
        return RolloutOutput(ids, reasons, lps if lp_rows is not None else None)

    def _kernel_seeds(self, sampling: SamplingParams, device: torch.device) -> int | None:
        """Base seed of the one-pass sampler's random streams (host-side: no device sync), or None
        when the PyTorch sampler runs. Seeded calls derive it from the seed, so they repeat."""
        use = self.fused_sampler if self.fused_sampler is not None else device.type == "cuda"
        if not use or sampling.greedy:
            return None
        source = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        return int(torch.randint(0, 2**31 - 1, (1,), generator=source).item())

    def _stops(self, sampling: SamplingParams) -> set[int]:
        # vLLM's meaning: ignore_eos drops the model's EOS ids, explicit stop ids still stop.
        return (set() if sampling.ignore_eos else set(self.eos_ids)) | set(sampling.stop_token_ids)

    def _seen(self, prompts: list[list[int]], n: int, size: int, device: torch.device) -> torch.Tensor:
        V = self.dec.vocab_size
        ids, mask = right_pad([p for p in prompts for _ in range(n)], V, device)  # padding -> column V
        seen = torch.zeros((size, V + 1), dtype=torch.bool, device=device)
        seen[: ids.shape[0]].scatter_(1, ids, True)
        return seen

    def _check_prompts(self, prompts: list[list[int]]) -> None:
        V = self.dec.vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"engine: prompt {i} is empty; every prompt needs at least one token")
            bad = [t for t in p if not 0 <= t < V]
            if bad:
                raise ValueError(f"engine: prompt {i} has token ids outside the vocabulary of {V}: {bad[:5]}")

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _compute_dtype(self) -> torch.dtype:
        """Lower precision than the weights runs under autocast; never higher (that would need a copy)."""
        param_dtype = next(self.model.parameters()).dtype
        want = self.dtype_option
        if want is None:
            want = torch.bfloat16 if self._device().type == "cuda" else param_dtype
        return want if param_dtype == torch.float32 and want in (torch.bfloat16, torch.float16) else param_dtype

    def _precision(self):
        device, dtype = self._device(), self._compute_dtype()
        param_dtype = next(self.model.parameters()).dtype
        if dtype == param_dtype:
            return contextlib.nullcontext()
        # cache_enabled=False: a captured graph must re-cast the live float32 weights every replay.
        return torch.autocast(device.type, dtype=dtype, cache_enabled=False)

    def _ensure_cache(self, rows: int, length: int, device: torch.device) -> None:
        dtype = self._compute_dtype()
        if self.cache is not None and self.cache.fits(rows, length, dtype, device):
            if self.graphs is None:
                self._make_graphs(device)
            return
        dec = self.dec
        rows = max(rows, self.reserve[0], self.cache.rows if self.cache is not None else 0)
        length = round_up(max(length, self.reserve[1], self.cache.length if self.cache is not None else 0), 64)
        self.cache = self.graphs = self.packed = None  # release the old buffers before new ones are allocated
        self.cache = KVCache.allocate(dec.num_layers, rows, dec.num_kv_heads, length, dec.head_dim, dtype, device)
        self.rope = rope_table(dec, length, dtype, device)
        self._make_graphs(device)

    def _make_graphs(self, device: torch.device) -> None:
        if device.type != "cuda" or not self.cuda_graphs:
            self.graphs = None
            return
        dec, cache, rope, step = self.dec, self.cache, self.rope, self._step_fn()
        self.graphs = DecodeGraphs(lambda tok, pos, span: step(dec, cache, rope, tok, pos, span), cache.rows, device)
        if self.graph_sampler:
            rows, length = cache.rows + 1, cache.length
            self._graph_out = {
                "tokens": torch.empty((rows, length), dtype=torch.long, device=device),
                "logps": torch.empty((rows, length), dtype=torch.float32, device=device),
                "stop": torch.zeros(dec.vocab_size, dtype=torch.bool, device=device),
                "step": torch.zeros(2, dtype=torch.long, device=device),
            }
