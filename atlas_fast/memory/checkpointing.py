"""Per-decoder-layer activation checkpointing, with optional offload of the saved layer inputs.

Checkpointing keeps only each decoder layer's input and recomputes the layer in backward: for a
Qwen2.5-1.5B shape at 8 x 8k tokens that turns ~30 activations of [N, H] per layer into one.
What is left, one [N, H] hidden state per layer (28 x 0.2 GiB at N = 64k, H = 1536), can itself
go to pinned CPU memory: copied out on a side stream as the forward moves on, and copied back one
layer ahead of the backward, so the copies hide behind the recomputation.

At long completions the recompute is mostly attention, quadratic in the sequence where the rest
of the layer is linear. `keep_attention` keeps each layer's attention output as well (one more
[N, H] tensor per layer, on the GPU) so the recompute skips the attention kernel: the backward then
runs the attention forward once instead of twice. It is PyTorch's selective checkpointing with a
policy that saves the outputs of the fused attention ops; a model whose attention is not one of
them (eager attention, a masked math path) recomputes as before.

We wrap the layers ourselves instead of using transformers' `gradient_checkpointing_enable`:
the wrapper works on any module list of decoder layers (PEFT-wrapped too), checkpoints whenever
autograd is recording (train or eval mode), and leaves generation with a KV cache untouched.
"""
from __future__ import annotations

import functools
import types
import weakref

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..fused_decoder import _fused_forward, decoder_call, stock_forward


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's list of layers: the largest `ModuleList` whose members share one class.

    Found by shape rather than by attribute path, so it covers `model.model.layers` (Llama, Qwen,
    Mistral), `transformer.h` (GPT-2), `gpt_neox.layers` and PEFT's `base_model.model...` alike.
    """
    best, best_size = None, 0
    for _, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = module, size
    if best is None:
        raise ValueError(
            f"cannot find the decoder layers of {type(model).__name__}: no torch.nn.ModuleList of "
            "identical layers holds parameters (activation checkpointing and layer-wise offload need one)"
        )
    return best


class ActivationOffload:
    """saved_tensors hooks that stash a checkpointed layer's inputs in (pinned) CPU memory.

    Each packed tensor becomes a `_Stash` that remembers the one packed before it. Backward visits
    layers in reverse, so unpacking layer i starts the host-to-device copy of layer i-1's inputs on
    the side stream, to run while layer i is recomputed and differentiated.
    Without CUDA the stash is a plain CPU copy: the same bookkeeping, testable anywhere.
    """

    def __init__(self) -> None:
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._last: weakref.ref | None = None
        self._live: weakref.WeakSet = weakref.WeakSet()  # stashes not yet consumed by backward

    def __deepcopy__(self, memo) -> "ActivationOffload":
        return ActivationOffload()  # a copied model gets its own stream and stash chain

    def stashed(self) -> list[torch.Tensor]:
        """The host copies currently held (for tests and memory accounting)."""
        return [s.host for s in self._live if s.host is not None]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> "_Stash":
        stash = _Stash(t, self.stream, self._last)
        self._last = weakref.ref(stash)
        self._live.add(stash)
        return stash

    def _unpack(self, stash: "_Stash") -> torch.Tensor:
        t = stash.take()
        prev = stash.prev() if stash.prev is not None else None
        if prev is not None:
            prev.prefetch()
        self._live.discard(stash)
        return t


class _Stash:
    __slots__ = ("host", "device", "stream", "prev", "_copy_in", "_ready", "__weakref__")

    def __init__(self, t: torch.Tensor, stream, prev: weakref.ref | None) -> None:
        self.device = t.device
        self.stream = stream
        self.prev = prev
        self._copy_in: torch.Tensor | None = None
        self._ready = None
        if t.device.type != "cuda":
            self.host = t.detach().clone()  # no device to offload from: a separate CPU copy
            return
        self.host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))  # t is fully computed
        with torch.cuda.stream(self.stream):
            self.host.copy_(t.detach(), non_blocking=True)
        t.record_stream(self.stream)  # the allocator must not reuse t's memory before the copy ends

    def prefetch(self) -> None:
        if self.host is None or self._copy_in is not None or self.device.type != "cuda":
            return
        with torch.cuda.stream(self.stream):  # queued behind this stream's device-to-host copies
            self._copy_in = self.host.to(self.device, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(self.stream)

    def take(self) -> torch.Tensor:
        if self.host is None:
            raise RuntimeError("activation offload: a layer input was unpacked twice; backward through the same "
                               "graph twice (retain_graph=True) is not supported with activation_offload")
        if self.device.type != "cuda":
            t, self.host = self.host, None
            return t
        self.prefetch()
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self._ready)
        t = self._copy_in
        t.record_stream(current)  # allocated on the side stream, consumed on the compute stream
        self.host = self._copy_in = self._ready = None
        return t


@functools.cache
def attention_ops() -> frozenset:
    """The fused attention forward ops whose outputs `keep_attention` saves: SDPA's kernels (CUDA
    and CPU), PyTorch's varlen attention (padding-free batches) and flash-attn's, where present."""
    names = [("aten", n) for n in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                                   "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
                                   "_flash_attention_forward", "_efficient_attention_forward")]
    names += [("torch_attn", "_varlen_attn"), ("flash_attn", "_flash_attn_forward"),
              ("flash_attn", "_flash_attn_varlen_forward")]
    try:
        import torch.nn.attention.varlen  # noqa: F401  (registers torch_attn ops where this torch has them)
    except ImportError:
        pass
    ops = set()
    for namespace, name in names:
        try:
            packet = getattr(getattr(torch.ops, namespace), name)
        except (AttributeError, RuntimeError):
            continue
        ops.update(getattr(packet, overload) for overload in packet.overloads())
    return frozenset(ops)


def _keep_attention_policy(ctx, op, *args, **kwargs):
    if op not in attention_ops() or _dropout(op, args, kwargs) > 0:
        # With dropout the kernel advances the RNG: skipping it in the recompute would shift every
        # later random op of the layer (residual or LoRA dropout) off the forward's masks.
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE


def _dropout(op, args, kwargs) -> float:
    if "dropout_p" in kwargs:
        return float(kwargs["dropout_p"] or 0.0)
    for i, arg in enumerate(op._schema.arguments):
        if arg.name == "dropout_p":
            return float(args[i] or 0.0) if i < len(args) else 0.0
    return 0.0


def _keep_attention_context():
    return create_selective_checkpoint_contexts(_keep_attention_policy)


_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _checkpointed_call(layer: torch.nn.Module, *args, **kwargs):
    # Bound to each layer as a method, with the real forward and the offloader kept on the layer,
    # so that copy.deepcopy of the model (a reference model) rebinds them to the copy.
    forward, offload = layer._atlas_inner_forward, layer._atlas_offload
    # Nothing to save without autograd; and a KV cache must not be updated twice by the recompute
    # (transformers names it `cache` from 5.2x on, `past_key_values` before, `layer_past` in some
    # older architectures).
    if not torch.is_grad_enabled() or any(kwargs.get(k) is not None for k in _CACHE_KWARGS):
        return forward(*args, **kwargs)
    keep_attention = getattr(layer, "_atlas_keep_attention", False)
    if getattr(forward, "__func__", None) is _fused_forward:
        # A fused decoder layer (fused_decoder.py) recomputes itself from its saved input; where it
        # does not apply (keep_attention included) the stock forward is checkpointed below.
        if args and not keep_attention:
            out = decoder_call(layer, args[0], args[1:], kwargs, recompute=True, offload=offload)
            if out is not None:
                return out
        forward = stock_forward(layer)
    if keep_attention:
        kwargs = {**kwargs, "context_fn": _keep_attention_context}
    if offload is None:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    # Only the positional tensors (the hidden states) pass through these hooks: checkpoint keeps
    # keyword tensors (mask, rotary cos/sin, shared by every layer) by reference. Attention outputs
    # that keep_attention saves stay on the device: they bypass these hooks.
    with offload.hooks():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def enable_activation_checkpointing(model: torch.nn.Module, offload: bool = False,
                                    keep_attention: bool = False) -> ActivationOffload | None:
    """Checkpoint every decoder layer of `model` (non-reentrant); with `offload`, keep the saved
    layer inputs in CPU memory between forward and backward; with `keep_attention`, keep each
    layer's attention output too, so the recompute skips attention. Returns the offloader, if any."""
    layers = decoder_layers(model)
    _disable_transformers_checkpointing(model)  # ours replaces transformers' switch: never both
    offloader = ActivationOffload() if offload else None
    for layer in layers:
        if "_atlas_inner_forward" not in layer.__dict__:
            layer._atlas_inner_forward = layer.forward
        layer._atlas_offload = offloader
        layer._atlas_keep_attention = keep_attention
        layer.forward = types.MethodType(_checkpointed_call, layer)
    return offloader


def _disable_transformers_checkpointing(model: torch.nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_disable"):  # the name since transformers 5.2x
        if model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
    elif getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()


def disable_activation_checkpointing(model: torch.nn.Module) -> None:
    for layer in decoder_layers(model):
        if "_atlas_inner_forward" in layer.__dict__:
            layer.forward = layer.__dict__.pop("_atlas_inner_forward")
            del layer._atlas_offload
            layer.__dict__.pop("_atlas_keep_attention", None)
