"""Log-probs and the GRPO loss straight from hidden states: the [N, V] logits never exist.

`logits = hidden @ weight.T (+ bias)` is computed in tiles of `chunk` tokens x `tile` vocabulary
columns with cuBLAS (bf16 in, fp32 accumulate); a Triton kernel folds each tile into a running
log-sum-exp (plus the target's logit and the entropy's sum), another turns a tile into
d(logits) in place. The three GEMMs (logits, d(hidden), d(weight)) cost 6*N*H*V FLOPs; the
element-wise sweeps over a tile are memory-bound and small next to them.

Each chunk takes two sweeps over its vocabulary tiles: the first folds them into every token's
log-sum-exp, the second turns each tile into d(logits) and feeds the two gradient GEMMs. A tile
the first sweep kept in the workspace is reused; any other is recomputed (2 * chunk * tile * H
FLOPs more). `make_plan` spends the workspace budget:
- default, 320 MiB or 5/8 of d(weight)'s bytes if more: one pass. Chunks of whole vocabulary
  rows (1024 tokens at V = 151936 up to H ~ 2200, 2048 at H = 3584) stay
  in memory between the sweeps: 6NHV, nothing recomputed. d(hidden) of a chunk is one GEMM
  (K = V); d(weight) adds up over chunks in the weight's own dtype (fp32 math inside each GEMM).
- a budget under MIN_ONE_PASS_TOKENS rows (e.g. 64 MiB): two sweeps over tiles of 8192 tokens x
  4096 columns, all tokens in one chunk: 8NHV, but the only buffers beyond the gradients are
  that tile and an fp32 [N, H] d(hidden) sum, and each d(weight) tile is a single GEMM (K = N)
  written straight into the gradient. A larger budget keeps tiles between the sweeps.
For the GRPO loss with token-level importance sampling a chunk's d(logp) is known as soon as its
log-sum-exp is, so its second sweep follows its first directly. Sequence-level importance
sampling (GSPO) needs every sequence's mean log-ratio first: the second sweep waits for all
chunks (kept tiles help only when there is one chunk).

`fused_linear_grpo_loss` computes its gradients during the forward (the loss's d(logp) is
known once a token's log-sum-exp is, for a unit upstream gradient) and stores d(hidden),
d(weight) and d(bias); the backward only scales them by the upstream gradient. Tokens outside
the mask are never projected. `fused_linear_logprobs` cannot know its d(logp) in the forward:
it keeps the log-sum-exp and recomputes the tiles in the backward, as any chunked log-prob does.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import TRITON_DTYPES, next_pow2, use_triton
from ._validation import check_linear_inputs, check_loss_inputs, loss_config
from .grpo import LOSS, N_OUT, NORM, ROW, _LossLaunch, _LossTensors, _mask_view, _row_scale, _stats, _token_dloss
from .logprobs import _online_lse
from .reference import masked_mean

# Default bytes of logits in flight. 320 MiB holds 1024 tokens x the whole Qwen vocabulary
# (151936) in bf16: one pass, 6NHV. Measured on an H200 at N = 8192 (RESULTS.md): one pass ran at
# 500-630 TFLOP/s (as 6NHV) against 410-470 for two sweeps over 64 MiB tiles, which recompute the
# logits (8NHV) but need 0.2-0.9 GiB less; `workspace_bytes=64 << 20` picks those.
WORKSPACE_BYTES = 320 * 2**20
# Fewer tokens per chunk than this and one pass loses to two sweeps: every chunk adds its
# d(weight) into the [V, H] gradient (a read and a write of it), which at 2 bytes x V x H per
# chunk costs more than recomputing the logits once chunks drop below ~330 tokens on an H200.
MIN_ONE_PASS_TOKENS = 512
# Bytes of one tile in the two-sweep schedule. 64 MiB is 8192 tokens x 4096 columns in bf16:
# cuBLAS runs such GEMMs at full rate (K = H >= 896).
TILE_BYTES = 64 * 2**20
# Fewer columns per tile than this and the GEMM launches (four per tile) start to show.
MIN_TILE = 1024
# Tokens per chunk in the two-pass schedule: one chunk keeps d(weight) exact without an fp32
# [V, H] buffer; past this many tokens the [N, H] fp32 d(hidden) buffer is the larger cost.
MAX_CHUNK_TOKENS = 65536
# Column block of the element-wise kernels, as swept for logprobs.py on an H200 (bf16 rows of
# V = 151936): reading, 8192 lanes x 4 warps reached 96% of copy bandwidth (4096 x 8: 78%);
# reading and writing, 8192 x 8 warps 92% of its floor. The fold walks a row (one program per
# token); d(logits) spreads a row over programs so a tile of few tokens still fills the GPU.
FOLD_BLOCK_V, FOLD_WARPS = 8192, 4
DLOGITS_BLOCK_V, DLOGITS_WARPS = 8192, 8
TOKEN_BLOCK = 256


@triton.jit
def _fold_kernel(tile_ptr, stride, n_cols, col0, index_ptr, m_ptr, s_ptr, sx_ptr, tgt_ptr, inv_temp,
                 FIRST: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    """Fold one token's tile of logits into its running max m, sum s = sum exp(x - m) and
    sx = sum exp(x - m) * (x - m); store the target's tempered logit if the tile holds it."""
    row = tl.program_id(0).to(tl.int64)
    base = tile_ptr + row * stride
    if FIRST:
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.full([], 0.0, tl.float32)
        sx = tl.full([], 0.0, tl.float32)
    else:
        m = tl.load(m_ptr + row)
        s = tl.load(s_ptr + row)
        sx = tl.load(sx_ptr + row)
    m, s, sx = _online_lse(base, n_cols, inv_temp, m, s, sx, BLOCK_V, WITH_ENTROPY)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    if WITH_ENTROPY:
        tl.store(sx_ptr + row, sx)
    local = tl.load(index_ptr + row) - col0
    if (local >= 0) & (local < n_cols):
        tl.store(tgt_ptr + row, tl.load(base + local).to(tl.float32) * inv_temp)


@triton.jit
def _dlogits_kernel(tile_ptr, stride, n_cols, col0, index_ptr, lse_ptr, ent_ptr, g_ptr, gh_ptr, inv_temp,
                    WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    """Overwrite a block of a tile with d(logits) = (g * (onehot - p) - g_h * p * (log p + H)) / T."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    valid = cols < n_cols
    ptrs = tile_ptr + row * stride + cols
    g = tl.load(g_ptr + row)
    lse = tl.load(lse_ptr + row)
    x = tl.load(ptrs, mask=valid, other=float("-inf")).to(tl.float32) * inv_temp
    p = tl.exp(x - lse)
    d = g * (tl.where(cols == tl.load(index_ptr + row) - col0, 1.0, 0.0) - p)
    if WITH_ENTROPY:
        d -= tl.load(gh_ptr + row) * p * tl.where(p > 0, x - lse + tl.load(ent_ptr + row), 0.0)
    tl.store(ptrs, (d * inv_temp).to(tile_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _token_dlogp_kernel(
    tok_ptr, M, T, lp_ptr, old_ptr, ref_ptr, adv_ptr, rows_ptr, out_ptr, g_ptr, dlp_ptr,
    B, s_old, s_ref, beta, eps_low, eps_high, delta,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_DELTA: tl.constexpr, CISPO: tl.constexpr,
    SEQ: tl.constexpr, KL_IS: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr,
):
    """d(loss)/d(logp) of unmasked tokens (flat ids b * T + t), from the loss's row weights in
    `rows`/`out`: the same per-token formula as the GRPO kernels' backward, for a gradient of 1."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < M
    tok = tl.load(tok_ptr + offs, mask=inb, other=0)
    b = tok // T
    t = tok % T
    w, seq_lr, seq_kl_term = _row_scale(rows_ptr, out_ptr, g_ptr, b, B, beta, HAS_REF, SEQ, KL_IS, KIND)
    dloss = _token_dloss(tl.load(lp_ptr + tok), b, t, old_ptr, ref_ptr, adv_ptr, s_old, s_ref, seq_lr, beta,
                         eps_low, eps_high, delta, HAS_OLD, HAS_REF, HAS_DELTA, CISPO, SEQ, KL_IS)
    tl.store(dlp_ptr + offs, w * (dloss + seq_kl_term), mask=inb)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block(n_cols: int, block: int) -> int:
    # The interpreter pays per program, not per lane: one block per row there.
    return next_pow2(n_cols) if _interpreted() else min(next_pow2(n_cols), block)


@dataclass(frozen=True)
class Plan:
    """How a call is cut: `chunk` tokens at a time, `tile` vocabulary columns per GEMM, and how
    many of a chunk's tiles the log-sum-exp sweep `keep`s for the gradient sweep (not recomputed)."""

    chunk: int
    tile: int
    vocab: int
    keep: int = 0

    @property
    def n_tiles(self) -> int:
        return -(-self.vocab // self.tile)

    @property
    def one_pass(self) -> bool:
        """Every tile of a chunk stays in memory: the gradient GEMMs reuse them all."""
        return self.keep >= self.n_tiles

    @property
    def slots(self) -> int:
        """Tile buffers: the kept ones plus one for the rest, or all of them."""
        return self.n_tiles if self.one_pass else self.keep + 1


def make_plan(n_tokens: int, vocab: int, elem_bytes: int, *, chunk_tokens: int | None = None,
              vocab_tile: int | None = None, workspace_bytes: int | None = None, hidden_size: int = 0) -> Plan:
    """Tokens per chunk, columns per tile and tiles kept, for `n_tokens` rows; explicit sizes win.

    A budget that holds MIN_ONE_PASS_TOKENS rows of the whole vocabulary gives one pass, chunks
    as large as it holds. A smaller one gives two sweeps over tiles of TILE_BYTES with every
    token in one chunk; there the budget buys kept tiles, each saving its recompute.
    """
    if workspace_bytes is None:
        # Each chunk reads and writes the [V, H] d(weight) once, so wider heads want longer chunks:
        # on an H200 at H = 3584, chunks of 2048 tokens ran 44.0 ms against 46.6 for 1024 (one pass
        # of all 8192: 41.4). Logits of 5/8 of d(weight)'s bytes give 2048 there, 1024 below H ~ 2200.
        workspace_bytes = max(WORKSPACE_BYTES, vocab * hidden_size * elem_bytes * 5 // 8)
    budget = workspace_bytes
    n = max(1, n_tokens)
    if chunk_tokens is None and vocab_tile is None:
        rows = budget // (vocab * elem_bytes)
        if rows >= min(n, MIN_ONE_PASS_TOKENS):
            rows = rows // 256 * 256 if rows >= 256 else rows  # GEMM-friendly chunk sizes
            return Plan(min(n, rows), vocab, vocab, keep=1)
    if chunk_tokens is None:
        chunk_tokens = min(n, MAX_CHUNK_TOKENS)
        if vocab_tile is not None and vocab_tile >= vocab:
            chunk_tokens = max(1, min(n, budget // (vocab * elem_bytes)))
    if vocab_tile is None:
        cols = TILE_BYTES // (chunk_tokens * elem_bytes)
        vocab_tile = max(MIN_TILE, cols // 256 * 256)
    if chunk_tokens < 1 or vocab_tile < 1:
        raise ValueError(f"chunk_tokens and vocab_tile must be positive, got {chunk_tokens} and {vocab_tile}")
    chunk, tile = min(chunk_tokens, n), min(vocab_tile, vocab)
    plan = Plan(chunk, tile, vocab)
    slots = max(1, budget // (chunk * tile * elem_bytes))
    return Plan(chunk, tile, vocab, keep=plan.n_tiles if slots >= plan.n_tiles else slots - 1)


class _Workspace:
    """The tile buffers of one call, in one allocation: tile i of a chunk lives in slot i while
    i < plan.keep, every other tile in the last slot."""

    def __init__(self, plan: Plan, dtype, device):
        self.plan = plan
        self.size = plan.chunk * plan.tile
        self.flat = torch.empty(plan.slots * self.size, device=device, dtype=dtype)

    def kept(self, i: int) -> bool:
        return i < self.plan.keep

    def tile(self, i: int, rows: int, cols: int) -> torch.Tensor:
        slot = i if self.kept(i) else self.plan.slots - 1
        # A contiguous [rows, cols] block at the slot's start, as cuBLAS wants for out=.
        return self.flat[slot * self.size: slot * self.size + rows * cols].view(rows, cols)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out (+)= a @ b with fp32 accumulation inside the GEMM, whatever out's dtype."""
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif out.is_cuda and out.dtype == torch.float32:
        # bf16 inputs, fp32 output in one cuBLAS call: the product is never rounded to bf16.
        torch.addmm(out, a, b, beta=1.0 if accumulate else 0.0, out_dtype=torch.float32, out=out)
    else:
        prod = a.to(out.dtype) @ b.to(out.dtype)
        if accumulate:
            out.add_(prod)
        else:
            out.copy_(prod)


class _Head:
    """The projection, tile by tile, in the compute dtype (the autocast dtype when autocast is on)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float, compute_dtype):
        self.weight, self.bias, self.dtype = weight, bias, compute_dtype
        self.inv_temp = 1.0 / temperature
        self.vocab = weight.shape[0]
        self._cast = None

    def w(self, v0: int, v1: int) -> torch.Tensor:
        if self.weight.dtype == self.dtype:
            return self.weight[v0:v1]
        # fp32 master weights under bf16 autocast: cast once per call, as autocast caches its cast
        # of a Linear's weight, rather than once per chunk and GEMM.
        if self._cast is None:
            self._cast = self.weight.detach().to(self.dtype)
        return self._cast[v0:v1]

    def logits(self, h: torch.Tensor, v0: int, v1: int, out: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            torch.mm(h, self.w(v0, v1).t(), out=out)
        else:
            torch.addmm(self.bias[v0:v1].to(self.dtype), h, self.w(v0, v1).t(), out=out)
        return out

    def tiles(self, plan: Plan):
        for v0 in range(0, self.vocab, plan.tile):
            yield v0, min(v0 + plan.tile, self.vocab)

    def fold(self, tile, v0, idx, state, first, with_entropy):
        n = tile.shape[0]
        m, s, sx, tgt = state
        _fold_kernel[(n,)](tile, tile.stride(0), tile.shape[1], v0, idx, m, s, sx, tgt, self.inv_temp,
                           FIRST=first, WITH_ENTROPY=with_entropy, BLOCK_V=_block(tile.shape[1], FOLD_BLOCK_V),
                           num_warps=FOLD_WARPS)

    def to_dlogits(self, tile, v0, idx, lse, ent, g, gh):
        n, w = tile.shape
        block = _block(w, DLOGITS_BLOCK_V)
        with_entropy = gh is not None
        _dlogits_kernel[(n, triton.cdiv(w, block))](
            tile, tile.stride(0), w, v0, idx, lse, ent if with_entropy else lse, g, gh if with_entropy else g,
            self.inv_temp, WITH_ENTROPY=with_entropy, BLOCK_V=block, num_warps=DLOGITS_WARPS,
        )


def _finish(state, with_entropy):
    """(logp, lse, entropy-or-None) from a chunk's folded state."""
    m, s, sx, tgt = state
    log_s = torch.log(s)
    lse = m + log_s
    # Rounding can put a near-certain token a hair above zero; a log-prob never is. clamp keeps NaN.
    logp = torch.clamp(tgt - lse, max=0.0)
    ent = (log_s - sx / s) if with_entropy else None
    return logp, lse, ent


class _Tokens:
    """Which rows of the hidden states the tokens of this call read, and where their gradient rows
    go in a contiguous [R, H] gradient shaped like hidden, chunk by chunk."""

    def __init__(self, hidden: torch.Tensor, index_shape: torch.Size, keep: torch.Tensor | None):
        H = self.H = hidden.shape[-1]
        T = index_shape[-1]
        S = hidden.shape[-2]
        self.grad_rows = hidden.numel() // H if H else 0  # R
        n_all = 1
        for d in index_shape:
            n_all *= d
        self.n = n_all if keep is None else keep.numel()
        step = S  # rows between consecutive sequences in `rows`
        if hidden.is_contiguous():
            self.rows = hidden.view(-1, H)
        elif (hidden.dim() == 3 and hidden.shape[0] > 0 and hidden.stride(2) == 1 and hidden.stride(1) == H
              and hidden.stride(0) % H == 0):
            # A slice of a longer sequence, such as last_hidden_state[:, -(C + 1):]: read it where it
            # lies instead of copying B * (C + 1) rows.
            step = hidden.stride(0) // H
            self.rows = hidden.as_strided(((hidden.shape[0] - 1) * step + S, H), (H, 1))
        else:
            self.rows = hidden.reshape(-1, H)
        same = keep is None and S == T
        ids = None if same and step == S else (keep if keep is not None else torch.arange(n_all, device=hidden.device))
        # Token (b, t) of [B, T] ids is row b * step + t of `rows` and row b * S + t of the gradient
        # (S = T + 1 for [B, T + 1, H] hidden states, whose last position scores nothing).
        self.read_ids = None if ids is None else (ids // T) * step + ids % T
        self.write_ids = None if same else (ids // T) * S + ids % T

    def chunks(self, plan: Plan):
        for a in range(0, self.n, plan.chunk):
            yield a, min(a + plan.chunk, self.n)

    def hidden(self, a, b, dtype):
        h = self.rows[a:b] if self.read_ids is None else self.rows.index_select(0, self.read_ids[a:b])
        return h.to(dtype)

    def put(self, grad_rows: torch.Tensor, a, b, value: torch.Tensor):
        if self.write_ids is None:
            grad_rows[a:b].copy_(value)
        else:
            grad_rows.index_copy_(0, self.write_ids[a:b], value.to(grad_rows.dtype))


class _Grads:
    """Gradient buffers for hidden, weight and bias, filled chunk by chunk."""

    def __init__(self, tokens: _Tokens, weight, bias, needs, hidden_dtype):
        need_h, need_w, need_b = needs
        dev = weight.device
        self.h = None
        if need_h:
            alloc = torch.empty if tokens.write_ids is None else torch.zeros  # rows never computed get 0
            self.h = alloc(tokens.grad_rows, tokens.H, device=dev, dtype=hidden_dtype)
        self.w = None
        if need_w:
            # Each chunk's GEMM accumulates in fp32 and adds into the gradient in the weight's own
            # dtype: fp32 master weights keep fp32 sums; bf16 weights round once per chunk (one
            # chunk: exactly once), which spares an fp32 [V, H] buffer (2.2 GB at H = 3584).
            # Zero-filled when no chunk will run (no tokens): the gradient is then 0, not whatever was there.
            self.w = (torch.empty if tokens.n else torch.zeros)(weight.shape, device=dev, dtype=weight.dtype)
        self.b = torch.zeros(bias.shape, device=dev, dtype=torch.float32) if need_b else None

    def add_tile(self, head: _Head, h, tile, v0, v1, first_chunk, h_acc):
        if self.b is not None:
            self.b[v0:v1] += tile.sum(0, dtype=torch.float32)
        if self.w is not None:
            _mm_into(self.w[v0:v1], tile.t(), h, accumulate=not first_chunk)
        if self.h is not None:
            _mm_into(h_acc, tile, head.w(v0, v1), accumulate=v0 > 0)

    def result(self, weight, bias, hidden_shape, scale: torch.Tensor | None):
        out = []
        for buf, like in ((self.h, None), (self.w, weight), (self.b, bias)):
            if buf is None:
                out.append(None)
                continue
            if scale is not None:
                buf.mul_(scale.to(buf.dtype))
            out.append(buf if like is None else buf.to(like.dtype))
        if out[0] is not None:
            out[0] = out[0].view(hidden_shape)
        return out


def _fold_chunk(head: _Head, h, idx, plan: Plan, ws: _Workspace, with_entropy):
    """First sweep over one chunk's tiles: (log-probs, log-sum-exp, entropy-or-None), flat fp32."""
    n = h.shape[0]
    state = tuple(torch.empty(n, device=h.device, dtype=torch.float32) for _ in range(4))
    for i, (v0, v1) in enumerate(head.tiles(plan)):
        tile = head.logits(h, v0, v1, ws.tile(i, n, v1 - v0))
        head.fold(tile, v0, idx, state, i == 0, with_entropy)
    return _finish(state, with_entropy)


def _lse_sweep(head, tokens: _Tokens, index_flat, plan, ws, with_entropy, after_chunk=None):
    """Log-probs, log-sum-exp and entropy of every token (flat [n] fp32); `after_chunk` runs while
    the chunk's kept tiles are still in the workspace."""
    dev = index_flat.device
    logp = torch.empty(tokens.n, device=dev, dtype=torch.float32)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if with_entropy else None
    for a, b in tokens.chunks(plan):
        h = tokens.hidden(a, b, head.dtype)
        idx = index_flat[a:b]
        lp_c, lse_c, ent_c = _fold_chunk(head, h, idx, plan, ws, with_entropy)
        logp[a:b], lse[a:b] = lp_c, lse_c
        if with_entropy:
            ent[a:b] = ent_c
        if after_chunk is not None:
            after_chunk(a, b, h, idx, lp_c, lse_c)
    return logp, lse, ent


def _grad_sweep(head, tokens, index_flat, plan, ws, lse, ent, g, gh, grads: _Grads, reuse: bool):
    """Second sweep: each tile (kept, or recomputed) becomes d(logits) and feeds the gradient GEMMs."""
    for a, b in tokens.chunks(plan):
        h = tokens.hidden(a, b, head.dtype)
        _grad_chunk(head, tokens, grads, plan, ws, a, b, h, index_flat[a:b], lse[a:b],
                    None if ent is None else ent[a:b], g[a:b], None if gh is None else gh[a:b], reuse)


def _grad_chunk(head, tokens, grads, plan, ws, a, b, h, idx, lse, ent, g, gh, reuse: bool):
    """`reuse`: the workspace still holds this chunk's kept tiles from its log-sum-exp sweep."""
    n = b - a
    h_acc = None
    direct = False
    if grads.h is not None:
        # One tile: d(hidden) is a single GEMM (K = V), written in place when the rows line up.
        # Several: a sum over tiles, kept in fp32.
        direct = plan.n_tiles == 1 and tokens.write_ids is None and grads.h.dtype == head.dtype
        if direct:
            h_acc = grads.h[a:b]
        else:
            h_acc = torch.empty(n, tokens.H, device=h.device,
                                dtype=head.dtype if plan.n_tiles == 1 else torch.float32)
    for i, (v0, v1) in enumerate(head.tiles(plan)):
        tile = ws.tile(i, n, v1 - v0)
        if not (reuse and ws.kept(i)):
            head.logits(h, v0, v1, tile)
        head.to_dlogits(tile, v0, idx, lse, ent, g, gh)
        grads.add_tile(head, h, tile, v0, v1, a == 0, h_acc)
    if h_acc is not None and not direct:
        tokens.put(grads.h, a, b, h_acc)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return hidden.dtype


# ------------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------------

class FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, index, temperature, with_entropy, plan_opts, cdtype):
        ctx.set_materialize_grads(False)
        tokens = _Tokens(hidden, index.shape, None)
        index_flat = index.reshape(-1)
        head = _Head(weight, bias, temperature, cdtype)
        # The backward recomputes every tile anyway: keeping some between the sweeps buys nothing.
        plan = dataclasses.replace(make_plan(tokens.n, head.vocab, torch.finfo(cdtype).bits // 8,
                                             hidden_size=tokens.H, **plan_opts), keep=0)
        logp, lse, ent = _lse_sweep(head, tokens, index_flat, plan, _Workspace(plan, cdtype, hidden.device),
                                    with_entropy)
        ctx.save_for_backward(hidden, weight, bias, index_flat, lse, ent if with_entropy else lse)
        ctx.meta = (temperature, with_entropy, plan, cdtype, index.shape)
        shape = index.shape
        if not with_entropy:
            ctx.mark_non_differentiable(lse)
            return logp.view(shape), lse.view(shape)  # a placeholder second output
        return logp.view(shape), ent.view(shape)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, index_flat, lse, ent = ctx.saved_tensors
        temperature, with_entropy, plan, cdtype, shape = ctx.meta
        tokens = _Tokens(hidden, shape, None)
        head = _Head(weight, bias, temperature, cdtype)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        grads = _Grads(tokens, weight, bias, needs, hidden.dtype)
        g = (g_logp.reshape(-1).float().contiguous() if g_logp is not None
             else torch.zeros_like(lse))
        gh = g_ent.reshape(-1).float().contiguous() if (with_entropy and g_ent is not None) else None
        _grad_sweep(head, tokens, index_flat, plan, _Workspace(plan, cdtype, hidden.device), lse,
                    ent if gh is not None else None, g, gh, grads, reuse=False)
        gh_, gw, gb = grads.result(weight, bias, hidden.shape, None)
        return gh_, gw, gb, None, None, None, None, None


class FusedLinearGRPOLoss(torch.autograd.Function):
    """The GRPO loss from hidden states; its gradients are computed in the forward, scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, index, old_logps, ref_logps, advantages, mask, temperature, cfg,
                max_completion_length, num_items, with_entropy, plan_opts, cdtype, needs):
        B, T = index.shape
        dev = hidden.device
        mask_v = _mask_view(mask)
        # One host sync: the number of unmasked tokens sizes every buffer below, and padding
        # (often a quarter of a GRPO batch) is never projected.
        keep = mask_v.reshape(-1).nonzero().squeeze(1)
        tok_ids = keep
        if keep.numel() == B * T:
            keep = None
        tokens = _Tokens(hidden, index.shape, keep)
        index_flat = index.reshape(-1)
        idx_c = index_flat if keep is None else index_flat.index_select(0, keep)
        head = _Head(weight, bias, temperature, cdtype)
        plan = make_plan(tokens.n, head.vocab, torch.finfo(cdtype).bits // 8, hidden_size=tokens.H, **plan_opts)
        t = _LossTensors.of(torch.zeros(B, T, device=dev, dtype=torch.float32), old_logps, ref_logps,
                            advantages, mask_v)
        launch = _LossLaunch(t, cfg, max_completion_length, num_items)
        lp_full = t.lp.view(-1)  # the loss reads the log-probs from here; padding stays 0
        one = torch.ones((), device=dev, dtype=torch.float32)
        grads = None
        if any(needs) and tokens.n:
            grads = _Grads(tokens, weight, bias, needs, hidden.dtype)
        ws = _Workspace(plan, cdtype, dev)
        immediate = None
        if grads is not None and not cfg.sequence_level:
            # Token-level importance sampling: a token's d(logp) needs only its own log-prob and
            # its row's normaliser (from the mask), so each chunk turns into gradients as soon as
            # its log-sum-exp is known, reusing the tiles its sweep kept.
            rows, out = _row_weights(launch, t.mask)

            def immediate(a, b, h, idx, logp_c, lse_c):
                ids = tok_ids[a:b]
                lp_full[ids] = logp_c
                g = _token_dlogp(launch, t, rows, out, ids, one)
                _grad_chunk(head, tokens, grads, plan, ws, a, b, h, idx, lse_c, None, g, None, reuse=True)

        logp, lse, ent = _lse_sweep(head, tokens, idx_c, plan, ws, with_entropy, after_chunk=immediate)
        lp_full[tok_ids] = logp
        rows, out = launch.forward(t)
        if grads is not None and immediate is None:
            # GSPO: a token's gradient needs its sequence's mean log-ratio, known after every
            # chunk's sweep. With one chunk its kept tiles are still in the workspace.
            g = _token_dlogp(launch, t, rows, out, tok_ids, one)
            _grad_sweep(head, tokens, idx_c, plan, ws, lse, None, g, None, grads, reuse=tokens.n <= plan.chunk)
        del ws
        ctx.grads, ctx.params = grads, (weight, bias, hidden.shape)
        ctx.spent = False
        ent_full = None
        if with_entropy:
            ent_full = torch.zeros(B * T, device=dev, dtype=torch.float32)
            ent_full[tok_ids] = ent
            ent_full = ent_full.view(B, T)
        else:
            ent_full = lse.new_zeros(())  # a placeholder output
        ctx.mark_non_differentiable(out, ent_full)
        return out[LOSS].clone(), out, ent_full

    @staticmethod
    def backward(ctx, g_loss, _g_out, _g_ent):
        if ctx.spent:
            raise RuntimeError("fused_linear_grpo_loss computes its gradients once, in the forward: "
                               "a second backward through the same call is not supported")
        ctx.spent = True
        grads, (weight, bias, shape) = ctx.grads, ctx.params
        ctx.grads = None
        if grads is None:  # nothing in the mask: no token contributes
            return (None,) * 16
        gh, gw, gb = grads.result(weight, bias, shape, g_loss.detach().float())
        return (gh, gw, gb) + (None,) * 13


def _row_weights(launch: _LossLaunch, mask_v: torch.Tensor):
    """The [B, ROW] row buffer and [N_OUT] result vector as far as the gradient reads them
    (token counts and the loss normaliser), before any log-prob exists."""
    dev = mask_v.device
    rows = torch.zeros(launch.B, ROW, device=dev, dtype=torch.float32)
    rows[:, 5] = (mask_v != 0).sum(1)
    out = torch.zeros(N_OUT, device=dev, dtype=torch.float32)
    if launch.norm is not None:  # dr_grpo, or a given num_items
        out[NORM] = max(launch.norm, 1.0)
    elif launch.kind == 1:
        out[NORM] = rows[:, 5].sum().clamp(min=1.0)
    else:
        out[NORM] = float(launch.B)
    return rows, out


def _token_dlogp(launch: _LossLaunch, t: _LossTensors, rows, out, ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """d(loss)/d(logp) for the tokens `ids` at a unit upstream gradient, from the row buffers."""
    M = ids.numel()
    dlp = torch.empty(M, device=ids.device, dtype=torch.float32)
    if M:
        lp, old, ref, adv, _ = t.pointers()
        block = min(next_pow2(M), TOKEN_BLOCK if not _interpreted() else 4096)
        _token_dlogp_kernel[(triton.cdiv(M, block),)](
            ids, M, launch.T, lp, old, ref, adv, rows, out, g, dlp,
            launch.B, old.stride(0), ref.stride(0), *launch._scalars(), **launch._flags(), BLOCK=block,
        )
    return dlp


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------

def _plan_opts(chunk_tokens, vocab_tile, workspace_bytes) -> dict:
    return dict(chunk_tokens=chunk_tokens, vocab_tile=vocab_tile, workspace_bytes=workspace_bytes)


def _triton_ok(*tensors) -> bool:
    return use_triton(*tensors) and all(t is None or t.dtype in TRITON_DTYPES for t in tensors)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    validate: bool = True,
    chunk_tokens: int | None = None,
    vocab_tile: int | None = None,
    workspace_bytes: int | None = None,
):
    """log_softmax((hidden @ weight.T + bias) / temperature) at `index`, without the logits.

    Args:
        hidden: [..., H] hidden states after the final norm; [B, C+1, H] with index [B, C] reads
            the first C positions (the last one predicts past the completion).
        weight: [V, H] output embedding (tied to the input embedding or not); bias: [V] or None.
        index: [...] int64 token ids in [0, V).
        return_entropy: also return the entropy of the tempered distribution (differentiable).
        validate: check shapes and the id range (one host sync).
        chunk_tokens / vocab_tile / workspace_bytes: tuning; by default tiles hold 64 MiB of logits.
    Returns:
        float32 log-probs shaped like `index` (<= 0), plus the float32 entropy when asked.
        Gradients flow to hidden, weight and bias; the backward recomputes the logits tile by tile.
    """
    if validate:
        check_linear_inputs(hidden, weight, index, bias, temperature)
    if not _triton_ok(hidden, weight, bias):
        return reference.fused_linear_logprobs(hidden, weight, index, bias=bias, temperature=temperature,
                                               return_entropy=return_entropy, validate=False)
    cdtype = _compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        logp, ent = FusedLinearLogprobs.apply(hidden, weight, bias, index, float(temperature), return_entropy,
                                              _plan_opts(chunk_tokens, vocab_tile, workspace_bytes), cdtype)
    return (logp, ent) if return_entropy else logp


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items: float | torch.Tensor | None = None,
    use_bias_correction_kl: bool = False,
    return_entropy: bool = False,
    validate: bool = True,
    chunk_tokens: int | None = None,
    vocab_tile: int | None = None,
    workspace_bytes: int | None = None,
):
    """The GRPO loss of `grpo_loss`, straight from hidden states [B, C, H] (or [B, C+1, H]).

    Same options, return value and statistics as `grpo_loss_from_logits`, with the LM head
    (`weight` [V, H], `bias`) applied tile by tile so the [B, C, V] logits never exist. The
    gradients for hidden, weight and bias are computed during the forward and handed over, scaled
    by the upstream gradient, in the backward (which can therefore run only once per call).
    """
    if validate:
        check_linear_inputs(hidden, weight, index, bias, temperature)
    if index.dim() != 2:
        raise ValueError(f"index must be [B, C] completion ids, got shape {tuple(index.shape)}")
    options = dict(beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta, loss_type=loss_type,
                   importance_sampling_level=importance_sampling_level,
                   max_completion_length=max_completion_length, num_items=num_items,
                   use_bias_correction_kl=use_bias_correction_kl)
    # The token tensors are checked against a shape-only stand-in for the log-probs.
    check_loss_inputs(torch.empty(index.shape, device="meta"), old_logps, ref_logps, advantages, mask, beta,
                      check_values=validate)
    if not _triton_ok(hidden, weight, bias, old_logps, ref_logps, advantages):
        return reference.fused_linear_grpo_loss(hidden, weight, index, old_logps, ref_logps, advantages, mask,
                                                bias=bias, temperature=temperature, return_entropy=return_entropy,
                                                validate=False, **options)
    cfg = loss_config(beta, epsilon_low, epsilon_high, delta, loss_type, importance_sampling_level,
                      use_bias_correction_kl, max_completion_length)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    cdtype = _compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        loss, out, entropy = FusedLinearGRPOLoss.apply(
            hidden, weight, bias, index, old_logps, ref_logps, advantages, mask, float(temperature), cfg,
            max_completion_length, num_items, return_entropy, _plan_opts(chunk_tokens, vocab_tile, workspace_bytes),
            cdtype, needs)
    stats = _stats(out, ref_logps is not None)
    if return_entropy:
        stats["entropy"] = masked_mean(entropy, mask)
    return loss, stats
