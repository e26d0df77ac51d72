"""Padding-free micro-batches: every prompt+completion of a micro-batch in one row, no pad tokens.

A padded micro-batch of GRPO completions wastes the gap between each sequence and the longest one
(left of the prompts, right of the completions): with completions uniform in [0.5C, C] a quarter
of the tokens are padding, each paying the full layer cost. Packed, the row holds only real
tokens; position ids restart at 0 for each sequence and attention stays inside each sequence:
- `flash_attention_2/3` and `flex_attention` models: transformers reads the sequence boundaries
  from the restarting position ids (flash: varlen kernels; flex: a block mask).
- `sdpa` / `eager` on CUDA: we register one more attention implementation, `atlas_varlen`, that
  calls PyTorch's own varlen flash attention (`torch.nn.attention.varlen`, torch >= 2.10) with the
  cumulative sequence lengths, and is plain SDPA for every unpacked call (generation included).
  Where a setup probe finds them equal it calls the aten flash op under that wrapper directly
  (`_flash_direct`: the wrapper is a Python custom op, a quarter millisecond of host time a call).
- otherwise (`sdpa` / `eager` on the CPU, an older torch): transformers builds a dense
  block-diagonal causal mask, [N, N] booleans: exact, and fine for short rows.
- `attention="auto"` (`GRPOConfig.packed_attention`, the default) registers `atlas_packed` instead:
  `atlas_sequences` below for rows of long sequences, `atlas_varlen` for the rest
  (`AUTO_SEQUENCES_MIN_MEAN` has the measurements).
- `attention="sequences"`: `atlas_sequences` runs SDPA once per
  packed sequence, each a plain causal call, so PyTorch picks its kernel as for an unpadded batch:
  cuDNN's on Hopper, which in a profile of TRL's padded run (H200, 1.5B shape, 8 x 8448 tokens)
  took 532 ms of attention against 965 ms for the flash varlen kernels of the same batch. The cost
  is one launch per sequence and layer, and one host read of the lengths per forward.
Models whose attention cannot be restricted this way (remote code, unknown implementations) keep
padded batches: `supports_packing` says which.

The output is the padded path's: logits [B, C + 1, V] (or hidden states [B, C + 1, H]) at the
positions that score each completion token, so the loss code does not change. Pad positions of the
completion (and the last, which scores nothing) read row 0 of the packed output: they are masked
by `completion_mask` like before.
"""
from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from dataclasses import dataclass

import torch

from ..batch import MicroBatch

VARLEN_ATTENTION = "atlas_varlen"
SEQUENCES_ATTENTION = "atlas_sequences"
AUTO_ATTENTION = "atlas_packed"
PACKED_ATTENTION = ("auto", "varlen", "sequences")  # GRPOConfig.packed_attention
# "auto" runs a packed row as SDPA per sequence from this mean sequence length on, as varlen below it.
# Update phase on an H200, 8 sequences of a 256-token prompt + C completion tokens, s per step,
# varlen / sequences: 1.5B: C=1024 0.366 / 0.509, 2048 0.623 / 0.720, 4096 1.224 / 1.213, 8192 2.697 /
# 2.431; 0.5B: 4096 0.534 / 0.609, 8192 1.199 / 1.212. Short rows pay a launch per sequence and layer
# on the host; long ones gain cuDNN's kernels (head dim 128; level at 64).
AUTO_SEQUENCES_MIN_MEAN = 6144
# Implementations that transformers itself restricts to each packed sequence.
NATIVE_PACKED = ("flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")
DENSE_MASK = ("sdpa", "eager")


@dataclass
class PackedBatch:
    """One micro-batch as a single row. N packed tokens, S non-empty sequences, B rows, C completion."""

    input_ids: torch.Tensor  # [1, N]
    position_ids: torch.Tensor  # [1, N] restart at 0 per sequence
    cu_seqlens: torch.Tensor  # [S + 1] int32: where each sequence starts in the row, then N
    max_seqlen: int
    index: torch.Tensor  # [B, C + 1] packed position whose output scores completion token j of row b

    def model_kwargs(self) -> dict:
        """Keyword arguments for a transformers model (or its body) on this row."""
        return dict(input_ids=self.input_ids, position_ids=self.position_ids, attention_mask=None,
                    use_cache=False, cu_seq_lens_q=self.cu_seqlens, cu_seq_lens_k=self.cu_seqlens,
                    max_length_q=self.max_seqlen, max_length_k=self.max_seqlen)

    def gather(self, states: torch.Tensor) -> torch.Tensor:
        """[1, N, D] outputs of the packed row -> [B, C + 1, D] at the completion-scoring positions."""
        B, C1 = self.index.shape
        return states[0, self.index.reshape(-1)].view(B, C1, -1)


def pack(mb: MicroBatch) -> PackedBatch:
    """Lay the real tokens of `mb` (those with attention_mask 1) end to end."""
    mask = mb.attention_mask.bool()  # [B, P + C]
    B, C = mb.completion_ids.shape
    P = mask.shape[1] - C
    lengths = mask.sum(1)  # [B]
    prompt_lengths = mask[:, :P].sum(1)
    completion_lengths = lengths - prompt_lengths
    starts = lengths.cumsum(0) - lengths
    input_ids = mb.input_ids[mask][None]  # one host sync: N is data dependent
    N = input_ids.shape[1]
    device = input_ids.device
    position_ids = torch.arange(N, device=device) - torch.repeat_interleave(starts, lengths, output_size=N)
    j = torch.arange(C + 1, device=device)
    # Token j of row b's completion is scored by the output at the token before it (its prompt's last
    # token for j = 0). Column C, like the padded path's last position, scores nothing: it reads 0.
    index = starts[:, None] + prompt_lengths[:, None] - 1 + j[None]
    index = torch.where(j[None] < completion_lengths[:, None], index, 0).clamp(min=0)
    nonempty = lengths[lengths > 0]
    cu_seqlens = torch.nn.functional.pad(nonempty.cumsum(0), (1, 0)).to(torch.int32)
    max_seqlen = int(nonempty.max()) if len(nonempty) else 0
    return PackedBatch(input_ids=input_ids, position_ids=position_ids[None], cu_seqlens=cu_seqlens,
                       max_seqlen=max_seqlen, index=index)


def packed_completion_logits(model: torch.nn.Module, mb: MicroBatch) -> torch.Tensor:
    """`batch.completion_logits` on a packed row: [B, C + 1, V], position t scoring completion token t.
    Only the gathered positions go through the head (`logits_to_keep` as an index tensor)."""
    packed = pack(mb)
    B, C1 = packed.index.shape
    out = model(**packed.model_kwargs(), logits_to_keep=packed.index.reshape(-1))
    return out.logits[0].view(B, C1, -1)


def packed_completion_hidden(head, mb: MicroBatch) -> torch.Tensor:
    """`batch.completion_hidden` on a packed row: final-norm hidden states [B, C + 1, H] from the
    model's body (`head.body`, a `batch.LMHead`), for the fused linear head."""
    packed = pack(mb)
    return packed.gather(head.body(**packed.model_kwargs()).last_hidden_state)


# ---------------------------------------------------------------------- which models can pack
def attention_implementation(model: torch.nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def supports_packing(model: torch.nn.Module) -> bool:
    """A transformers model whose attention transformers (or we) can restrict to packed sequences."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not type(base).__module__.startswith("transformers."):
        return False  # remote code: we cannot know how it reads position ids
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return False
    impl = attention_implementation(base)
    return impl in NATIVE_PACKED or impl in DENSE_MASK or impl in (VARLEN_ATTENTION, SEQUENCES_ATTENTION, AUTO_ATTENTION)


def prepare_packing(model: torch.nn.Module, *, varlen: bool | None = None, attention: str = "auto") -> bool:
    """Get `model` ready for packed rows; False when it must keep padded batches.

    `varlen=None` switches sdpa/eager models to `atlas_varlen` (`atlas_packed` with the default
    `attention="auto"`) when PyTorch's varlen attention can run (CUDA, torch >= 2.10) and the model
    has no sliding-window layers; True forces it (on the CPU it then builds its own block-diagonal
    mask, which the tests use to check the plumbing).
    `attention="sequences"` switches sdpa/eager models without sliding windows to `atlas_sequences`
    instead (SDPA per packed sequence, any device); `attention="auto"` does what varlen does, with
    `atlas_packed` (varlen or per sequence, by the row's mean sequence length) in place of `atlas_varlen`.
    """
    if attention not in PACKED_ATTENTION:
        raise ValueError(f"packed attention must be one of {PACKED_ATTENTION}, got {attention!r}")
    if not supports_packing(model):
        warnings.warn(f"padding_free: {type(model).__name__} (attention {attention_implementation(model)!r}) cannot "
                      "restrict attention to packed sequences; it keeps padded batches", stacklevel=2)
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    impl = attention_implementation(base)
    sliding = _has_sliding_window(base.config)
    if attention == "sequences":
        if impl == SEQUENCES_ATTENTION:  # prepared already (a copy of a prepared policy)
            return True
        if impl in DENSE_MASK and not sliding:
            _register_packed_attention(SEQUENCES_ATTENTION, sequences_attention_forward)
            base.set_attn_implementation(SEQUENCES_ATTENTION)
            return True
        warnings.warn(f"padding_free: packed_attention='sequences' needs an sdpa/eager model without sliding-window "
                      f"layers; {type(base).__name__} (attention {impl!r}) packs as packed_attention='varlen' would",
                      stacklevel=2)
    if impl in DENSE_MASK:
        if varlen and sliding:
            warnings.warn(f"padding_free: {type(base).__name__} has sliding-window layers, which varlen attention here "
                          "does not apply; it packs with transformers' own mask", stacklevel=2)
            varlen = False
        if varlen is None:
            varlen = torch.cuda.is_available() and not sliding and _varlen_runs(base)
        if varlen:
            shape = _head_shape(base.config)
            if torch.cuda.is_available() and "enable_gqa" not in _varlen_options() and shape not in _GQA_PROBE:
                _GQA_PROBE[shape] = _unflagged_gqa_works(*shape)
            if torch.cuda.is_available() and shape not in _DIRECT_PROBE:
                _DIRECT_PROBE[shape] = _direct_flash_works(*shape)
            name, function = ((AUTO_ATTENTION, auto_attention_forward) if attention == "auto"
                              else (VARLEN_ATTENTION, varlen_attention_forward))
            _register_packed_attention(name, function)
            base.set_attn_implementation(name)
            return True
        # Left on transformers' own mask, which finds packed sequences from the position ids only
        # where the model hands them to its mask builder (OPT does not: one causal mask spans the row).
        try:
            apart = _keeps_sequences_apart(model)
        except Exception as err:  # a model this probe cannot drive: nothing says its rows stay apart
            warnings.warn(f"padding_free: could not check that {type(base).__name__} keeps packed sequences apart "
                          f"({type(err).__name__}: {err}); it keeps padded batches", stacklevel=2)
            return False
        if not apart:
            if sliding:
                warnings.warn(f"padding_free: {type(base).__name__}'s own attention mask spans the sequences of a "
                              "packed row; it keeps padded batches", stacklevel=2)
                return False
            _register_packed_attention(SEQUENCES_ATTENTION, sequences_attention_forward)
            base.set_attn_implementation(SEQUENCES_ATTENTION)
            if not _keeps_sequences_apart(model):
                base.set_attn_implementation(impl)
                warnings.warn(f"padding_free: {type(base).__name__} mixes the sequences of a packed row; it keeps "
                              "padded batches", stacklevel=2)
                return False
    return True


def _keeps_sequences_apart(model: torch.nn.Module) -> bool:
    """Whether `model`, as it is set up now, keeps the sequences of a packed row apart: the outputs
    of the second of two 3-token sequences get no gradient from the first one's inputs (masked
    attention weights are exactly zero, so their gradient is too, in any dtype)."""
    embed = model.get_input_embeddings()
    device = embed.weight.device
    ids = torch.arange(1, 7, device=device)[None] % embed.num_embeddings
    row = PackedBatch(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]], device=device),
                      cu_seqlens=torch.tensor([0, 3, 6], device=device, dtype=torch.int32), max_seqlen=3,
                      index=torch.zeros(1, 1, dtype=torch.long, device=device))
    kwargs = row.model_kwargs()
    del kwargs["input_ids"]
    was_training = model.training
    model.eval()  # no dropout
    try:
        with torch.inference_mode(False), torch.enable_grad():
            embeds = embed(ids).detach().requires_grad_()
            out = model(inputs_embeds=embeds, **kwargs)
            states = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
            (grad,) = torch.autograd.grad(states[:, 3:].float().sum(), embeds)
    finally:
        model.train(was_training)
    return bool((grad[:, :3] == 0).all())


def _has_sliding_window(config) -> bool:
    """Whether any layer attends through a window; the packed functions here attend to the whole
    sequence. Any sliding layer kind ("sliding_attention", "hybrid_sliding", ...) counts; so does
    `sliding_window` itself in configs without a `use_sliding_window` switch (Mistral, Phi-3,
    Starcoder2 declare their window that way; Qwen2 sets one that applies only when switched on)."""
    types = getattr(config, "layer_types", None) or ()
    if any("sliding" in str(t) for t in types):
        return True
    if hasattr(config, "use_sliding_window"):
        return bool(config.use_sliding_window)
    return getattr(config, "sliding_window", None) is not None


# ---------------------------------------------------------------------- the varlen attention
def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=None)
def _varlen_options() -> frozenset[str]:
    """The keyword names of this torch's varlen_attn, read once (not at every layer's call)."""
    varlen_attn = _varlen_attn()
    return frozenset(inspect.signature(varlen_attn).parameters) if varlen_attn is not None else frozenset()


# (query heads, key/value heads, head dim) -> the probe's answer, set at setup by prepare_packing,
# once per shape.
# A layer never probes: a probe inside a checkpointed forward would add saved tensors that its
# recompute does not make. A shape not probed expands, as before.
_GQA_PROBE: dict[tuple[int, int, int], bool] = {}


def _head_shape(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, getattr(config, "num_key_value_heads", None) or heads, head_dim


def _unflagged_gqa_works(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether varlen_attn takes fewer key/value heads than query heads without an `enable_gqa`
    flag (torch 2.10-2.12, whose wrapper has none while the flash kernels under it share each key/
    value head among its query heads). One small probe, forward and backward, against expanded
    keys and values; without it every layer copies them out to all query heads (and its backward
    sums them back)."""
    varlen_attn = _varlen_attn()
    if varlen_attn is None or kv_heads == heads:
        return False
    causal = {"window_size": (-1, 0)} if "window_size" in _varlen_options() else {"is_causal": True}
    return _matches_expanded(lambda q, k, v, cu, n: varlen_attn(q, k, v, cu, cu, n, n, **causal), heads, kv_heads,
                             head_dim)


# (query heads, key/value heads, head dim) -> whether packed rows call aten's flash kernel directly,
# probed at setup by prepare_packing, once per shape, as _GQA_PROBE is.
_DIRECT_PROBE: dict[tuple[int, int, int], bool] = {}


def _flash_direct(q, k, v, cu, max_len: int, scale: float | None) -> torch.Tensor:
    """Causal flash attention over packed rows q [N, Hq, D], k/v [N, Hkv, D] (shared key/value heads
    as the kernel takes them) through aten's `_flash_attention_forward`, whose backward autograd
    knows. varlen_attn wraps this op in a Python custom op: a profile of a Qwen2.5-0.5B update over
    8 x 1280 tokens (H200) spent ~0.25 ms of host time per call in that wrapper, for three calls per
    layer and step (reference, policy, recompute) and its backward's, while the GPU waited."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale)[0]


def _direct_flash_works(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether _flash_direct runs here and gives varlen_attn's outputs and gradients (the probe
    against the wrapper with expanded keys and values); where not, rows keep the wrapper."""
    return _varlen_attn() is not None and _matches_expanded(
        lambda q, k, v, cu, n: _flash_direct(q, k, v, cu, n, None), heads, kv_heads, head_dim)


def _matches_expanded(attend, heads: int, kv_heads: int, head_dim: int) -> bool:
    """One small probe on the GPU, forward and backward: `attend(q, k, v, cu_seqlens, max_len)`, given
    keys and values of `kv_heads` heads, against varlen_attn given them expanded to all query heads.
    False where either raises (no such op, no autograd for it, a kernel that refuses the shape)."""
    if not torch.cuda.is_available() or heads % kv_heads:
        return False
    varlen_attn = _varlen_attn()
    causal = {"window_size": (-1, 0)} if "window_size" in _varlen_options() else {"is_causal": True}
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.inference_mode(False), torch.enable_grad():
        q, k, v = (torch.randn(7, h, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
                   for h in (heads, kv_heads, kv_heads))
        cu = torch.tensor([0, 3, 7], device="cuda", dtype=torch.int32)
        try:
            out = attend(q, k, v, cu, 4)
            grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
            k2, v2 = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
            expanded = varlen_attn(q, k2, v2, cu, cu, 4, 4, **causal)
            reference = torch.autograd.grad(expanded.float().square().sum(), (q, k, v))
        except Exception:
            return False
    return all(a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2)
               for a, b in zip((out, *grads), (expanded, *reference)))


def _varlen_runs(model: torch.nn.Module) -> bool:
    """Whether PyTorch's varlen flash attention runs here (torch >= 2.10, a GPU its kernels support):
    one tiny call at setup, so that a failure picks the mask path instead of failing mid-training."""
    if _varlen_attn() is None:
        return False
    heads, _, head_dim = _head_shape(model.config)
    q = torch.zeros(4, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 1, 4], device="cuda", dtype=torch.int32)
    try:
        varlen_attention_forward(torch.nn.Module(), q.transpose(0, 1)[None], q.transpose(0, 1)[None],
                                 q.transpose(0, 1)[None], None, cu_seq_lens_q=cu, max_length_q=3)
    except Exception as err:  # an unsupported card or build: the block-mask path is exact, only slower
        warnings.warn(f"padding_free: torch varlen attention cannot run here ({type(err).__name__}: {err}); "
                      "using a block-diagonal mask instead", stacklevel=3)
        return False
    return True


def _register_packed_attention(name: str, function) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, _varlen_mask)


def _varlen_mask(*args, **kwargs):
    from transformers.masking_utils import sdpa_mask

    # Without a padding mask the call is either one causal sequence or a packed row: the attention
    # function handles both from the position ids, so no [N, N] mask is ever built.
    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def _packed_row(query: torch.Tensor, attention_mask, kwargs: dict) -> tuple[torch.Tensor | None, int | None]:
    """Take the packed-row keywords out of an attention call's `kwargs`: (cu_seqlens, longest
    sequence) when the call is one row of two or more packed sequences, else (None, None), a call
    for plain SDPA (one sequence, a padded batch, generation)."""
    cu, max_len = kwargs.pop("cu_seq_lens_q", None), kwargs.pop("max_length_q", None)
    kwargs.pop("cu_seq_lens_k", None), kwargs.pop("max_length_k", None)
    position_ids = kwargs.get("position_ids")
    if cu is None and attention_mask is None and position_ids is not None and query.shape[0] == 1 and query.shape[2] > 1:
        cu, max_len = _cu_seqlens_from_positions(position_ids[0])  # a packed call that did not say so
    if cu is None or len(cu) <= 2:
        return None, None
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one row, got a batch of {query.shape[0]}")
    window = kwargs.get("sliding_window")
    if window is not None and (max_len is None or int(max_len) > window):
        # prepare_packing keeps windowed models on transformers' own mask; one it did not recognise
        # would attend past its window here
        raise ValueError(f"packed attention: this layer attends through a sliding window of {window} tokens, which "
                         "the atlas packed attention functions do not apply; padding_free=False trains it on padded "
                         "batches")
    return cu, max_len


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """HF attention function: varlen flash attention on packed rows, SDPA otherwise.
    query [1, Hq, N, D], key/value [1, Hkv, N, D]; returns ([1, N, Hq, D], None)."""
    cu, max_len = _packed_row(query, attention_mask, kwargs)
    if cu is None:
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return _varlen_packed(module, query, key, value, cu, max_len, dropout, scaling, kwargs)


def _sdpa(*args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


def _varlen_packed(module, query, key, value, cu, max_len, dropout, scaling, kwargs):
    if query.is_cuda and query.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        low = torch.get_autocast_dtype("cuda")
        if low in (torch.float16, torch.bfloat16):
            # What SDPA's autocast does with float32 inputs (float32 weights under autocast give q and k
            # in float32: the rotary embedding promotes them), so that the flash kernels take them.
            query, key, value = (t.to(low) for t in (query, key, value))
    varlen_attn = _varlen_attn()
    usable = (varlen_attn is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
              and not (module.training and dropout > 0))
    if not usable:  # exact fallback: SDPA with the block-diagonal causal mask
        mask = _block_causal_mask(cu, query.shape[2])
        return _sdpa(module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=False, **kwargs)
    # [1, H, N, D] -> [N, H, D]; the copy (3 x N*H*D, ~0.1 ms a layer at 64k tokens; none where the
    # model's q, k, v are transposed views of [1, N, H, D]) gives the kernel the packed-rows layout it
    # is written for. squeeze, not [0]: a select's backward writes its gradient into a zero-filled
    # [1, H, N, D] buffer, squeeze's is a view.
    q, k, v = (t.squeeze(0).transpose(0, 1).contiguous() for t in (query, key, value))
    if _DIRECT_PROBE.get((q.shape[1], k.shape[1], q.shape[2]), False):
        return _flash_direct(q, k, v, cu, int(max_len), scaling)[None], None
    options = _varlen_options()
    extra = {}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in options:
            extra["enable_gqa"] = True
        elif not _GQA_PROBE.get((q.shape[1], k.shape[1], q.shape[2]), False):
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if "window_size" in options:  # torch >= 2.11 spells causal as a window
        extra["window_size"] = (-1, 0)
    else:
        extra["is_causal"] = True
    if scaling is not None and "scale" in options:
        extra["scale"] = scaling
    elif scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-12:
        raise ValueError(f"this torch's varlen attention takes no scale; the model uses {scaling}")
    max_len = int(max_len)
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, **extra)
    return out[None], None


# cu_seqlens tensor -> its sequence bounds on the host: every layer of a forward gets the same
# tensor, so the device-to-host read happens once per forward, not once per layer.
# Keyed by id (a tensor's == is elementwise), with a weak reference that drops the entry when the
# tensor goes.
_HOST_BOUNDS: dict[int, tuple[weakref.ref, list[int]]] = {}


def _host_bounds(cu: torch.Tensor) -> list[int]:
    entry = _HOST_BOUNDS.get(id(cu))
    if entry is not None and entry[0]() is cu:
        return entry[1]
    key = id(cu)
    bounds = cu.tolist()
    _HOST_BOUNDS[key] = (weakref.ref(cu, lambda _, key=key: _HOST_BOUNDS.pop(key, None)), bounds)
    return bounds


def sequences_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                scaling: float | None = None, **kwargs):
    """HF attention function: on a packed row, SDPA over each sequence on its own (a causal call
    each, so PyTorch chooses the kernel as for an unpadded batch); SDPA otherwise.
    query [1, Hq, N, D], key/value [1, Hkv, N, D]; returns ([1, N, Hq, D], None)."""
    cu, _ = _packed_row(query, attention_mask, kwargs)
    if cu is None:
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return _sequences_packed(module, query, key, value, cu, dropout, scaling, kwargs)


def _sequences_packed(module, query, key, value, cu, dropout, scaling, kwargs):
    if kwargs.get("position_bias") is not None:  # a [1, H, N, N] bias spans sequences: no per-sequence slice of it here
        raise ValueError("per-sequence packed attention (packed_attention='sequences', or 'auto' on rows of long "
                         "sequences) does not take a position_bias; use packed_attention='varlen'")
    kwargs.pop("position_ids", None)
    bounds = _host_bounds(cu)
    sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if 0 in sizes:  # empty entries (a caller's padding of cu_seqlens) hold no tokens and no SDPA call
        sizes = [n for n in sizes if n]
    # One split, not a slice per sequence: a slice's backward writes its gradient into a zero-filled
    # copy of the whole row, S fills and S-1 adds of [1, H, N, D] per tensor and layer (~1500 extra
    # kernels in a 1.5B step over 8 sequences in an H200 profile); split's backward is one concatenation.
    parts = zip(*(t.split(sizes, dim=2) for t in (query, key, value)))
    outs = [_sdpa(module, q, k, v, None, dropout=dropout, scaling=scaling, **kwargs)[0] for q, k, v in parts]
    return torch.cat(outs, dim=1), None


def auto_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """HF attention function: a packed row of long sequences (a mean of AUTO_SEQUENCES_MIN_MEAN
    tokens or more) as `sequences_attention_forward`, a shorter one as `varlen_attention_forward`;
    SDPA otherwise. Deciding takes no host read: the row's length and sequence count are shapes."""
    cu, max_len = _packed_row(query, attention_mask, kwargs)
    if cu is None:
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[2] >= AUTO_SEQUENCES_MIN_MEAN * (len(cu) - 1):
        return _sequences_packed(module, query, key, value, cu, dropout, scaling, kwargs)
    return _varlen_packed(module, query, key, value, cu, max_len, dropout, scaling, kwargs)


def _cu_seqlens_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    starts = torch.nonzero(position_ids == 0).flatten()  # host sync: only for callers without cu_seq_lens
    cu = torch.cat([starts, starts.new_tensor([position_ids.shape[0]])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _block_causal_mask(cu: torch.Tensor, n: int) -> torch.Tensor:
    seq = torch.repeat_interleave(torch.arange(len(cu) - 1, device=cu.device), (cu[1:] - cu[:-1]).long(), output_size=n)
    pos = torch.arange(n, device=cu.device)
    return ((seq[:, None] == seq[None, :]) & (pos[:, None] >= pos[None, :]))[None, None]  # [1, 1, N, N]


# ---------------------------------------------------------------------- balancing micro-batches
def balance_rows(lengths: list[int], num_micro_batches: int) -> list[list[int]]:
    """Split rows into equal-count micro-batches with near-equal token totals.

    Longest first, each to the lightest micro-batch that still has room (LPT with a capacity):
    every micro-batch keeps the same number of rows, so per-sequence normalisers (grpo, dr_grpo)
    and the dapo token count give the same objective as any other equal-count split.
    """
    n = len(lengths)
    if num_micro_batches < 1 or n % num_micro_batches:
        raise ValueError(f"cannot split {n} rows into {num_micro_batches} micro-batches of equal size")
    size = n // num_micro_batches
    bins: list[list[int]] = [[] for _ in range(num_micro_batches)]
    totals = [0] * num_micro_batches
    for row in sorted(range(n), key=lambda r: (-lengths[r], r)):
        k = min((k for k in range(num_micro_batches) if len(bins[k]) < size), key=lambda k: (totals[k], k))
        bins[k].append(row)
        totals[k] += lengths[row]
    return [sorted(b) for b in bins]


def token_chunks(prompt_lens: list[int], completion_lens: list[int], budget: int, *, packed: bool) -> list[range]:
    """Consecutive row ranges whose forward pass costs at most `budget` tokens: the sum of the rows'
    lengths when packed; padded, rows x (longest prompt + longest completion), the width a chunk
    has once trimmed (prompts are left-padded and completions right-padded, so the two longest may
    be different rows). A row over the budget goes alone (a sequence is never cut)."""
    if budget < 1:
        raise ValueError(f"token budget must be >= 1, got {budget}")
    chunks, start, total, prompt_max, completion_max = [], 0, 0, 0, 0
    for i, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
        if packed:
            cost = total + p + c
        else:
            cost = (i - start + 1) * (max(prompt_max, p) + max(completion_max, c))
        if i > start and cost > budget:
            chunks.append(range(start, i))
            start, total, prompt_max, completion_max = i, 0, 0, 0
        total += p + c
        prompt_max, completion_max = max(prompt_max, p), max(completion_max, c)
    if prompt_lens:
        chunks.append(range(start, len(prompt_lens)))
    return chunks


def split_micro_batches(batch: MicroBatch, size: int, *, balance: bool) -> list[MicroBatch]:
    """Consecutive slices of `size` rows, or with `balance` rows regrouped by token count."""
    n = len(batch.advantages)
    if not balance or n <= size:
        return [batch.slice(slice(i, i + size)) for i in range(0, n, size)]
    if n % size:
        raise ValueError(f"cannot balance {n} rows into micro-batches of {size}")
    lengths = batch.attention_mask.sum(1).tolist()  # host sync, once per generation batch
    groups = balance_rows(lengths, n // size)
    return [_rows(batch, torch.tensor(g, device=batch.advantages.device)) for g in groups]


def _rows(batch: MicroBatch, rows: torch.Tensor) -> MicroBatch:
    parts = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in batch.to_state().items()}
    return MicroBatch(**parts)
