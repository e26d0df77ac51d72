"""A whole Llama/Qwen2/Qwen3 decoder layer as one autograd node with a hand-written backward
(`fused_decoder`, with `fused_layers`).

At short completions the update waits on the host, not the GPU: a profile of a Qwen2.5-0.5B update
over 8 x 1280 tokens on an H200 kept the GPU busy 116 ms of 260, and each checkpointed layer's
recompute and backward dispatched ~580 PyTorch ops (views, transposes, autocast casts, the
checkpoint's saved-tensor hooks, zero-filled gradient buffers, one autograd node per op). Here the
layer's forward is ~20 launches (fused RMSNorm, SwiGLU and rotary kernels, the projections as
GEMMs) with autograd recording nothing but the node itself, and its backward ~35: each weight's
gradient is one GEMM, each input's one more, the elementwise kernels' backward one launch each.
Attention is the one piece left to autograd, over a graph of a few ops (whatever attention function
the model is configured with: SDPA, varlen flash attention on packed rows, flash-attn).
Profiled on the same update: ~280 host ops per layer's recompute and backward (the views,
transposes and allocations of those launches included) where there were ~580, and 0.206 -> 0.149 s
per step; from ~16k tokens per micro-batch at 1.5B the GPU sets the pace and the two paths tie.

With gradient checkpointing the node keeps only the layer's input (through the activation
offload's hooks when those are on) and recomputes the layer in its backward, as the checkpointed
stock layer would, without the checkpoint machinery's per-tensor hooks. Like PyTorch's checkpoint
(which stops once the last tensor it needs is saved) the recompute ends before the down
projection, whose output no gradient needs.

Which layers: those whose code is transformers' Llama or Qwen2 decoder layer (Mistral's, Qwen3's
and the other copies compile to the same code), with a Llama, Qwen2 or Qwen3 attention (Qwen3's
normalises each query and key head before the rotation) calling the stock rotary embedding, stock
RMSNorms, a SiLU-gated MLP, plain `nn.Linear` projections (LoRA-wrapped ones are not) and no hooks
on the layer's parts. Each call falls back to the stock forward when it cannot
compute what the stock layer would: a KV cache (generation), attention dropout in training, weights
in mixed dtypes, tensors the Triton kernels cannot take (the CPU without the interpreter), or
positional arguments it does not know.

Dtypes follow the stock layer's. Weights in the compute dtype (bf16 weights, or any weights without
autocast) compute in it throughout. Float32 weights under bf16/fp16 autocast (the trainer's default)
compute as autocast would have them: each projection's input and weight cast to the autocast dtype
(the casts made once per call and pass, not once per projection), the residual stream and the
norms in float32, the rotary embedding promoting q and k to float32 as PyTorch's ops do, attention
called under the caller's autocast, and each weight's gradient cast back to float32.
"""
from __future__ import annotations

import functools
import types

import torch
from torch import nn

from .fused_layers import _code as code_of, _fused_attention_forward, own_swap, plain_rms_norm, swiglu_mlp, unwrapped

_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _code(fn) -> tuple | None:
    """The code of `fn` under its wrappers, for comparing with transformers' own; None for what
    is not a plain function."""
    inner = unwrapped(fn)
    return code_of(inner) if isinstance(inner, types.FunctionType) else None


@functools.cache
def _stock() -> dict:
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.qwen2 import modeling_qwen2 as qwen2
    from transformers.models.qwen3 import modeling_qwen3 as qwen3

    return {"decoder": {_code(llama.LlamaDecoderLayer.forward), _code(qwen2.Qwen2DecoderLayer.forward),
                        _code(qwen3.Qwen3DecoderLayer.forward)},
            "llama": _code(llama.LlamaAttention.forward), "qwen2": _code(qwen2.Qwen2Attention.forward),
            "qwen3": _code(qwen3.Qwen3Attention.forward)}


_FORMS = ("llama", "qwen2", "qwen3")  # qwen3: an RMSNorm over each query and key head before the rotation


def _form(attn) -> str | None:
    code = _code(type(attn).forward)
    return next((f for f in _FORMS if code == _stock()[f]), None)


def _linear(m) -> bool:
    return type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks


def decoder_problem(layer: nn.Module) -> str | None:
    """Why `layer` cannot run as one fused node (None if it can): the structural checks, made once."""
    stock = _stock()
    if _code(type(layer).forward) not in stock["decoder"]:
        return f"{type(layer).__name__}.forward is not transformers' Llama/Qwen2 decoder layer"
    if not _layer_forward_ours(layer):
        return f"{type(layer).__name__}'s forward is bound on the instance (a hook or a patch): fusing would replace it"
    if any(_rebound(m) for m in layer.modules() if m is not layer):
        return "a part's forward is bound on the instance (a hook or a patch)"
    if {name for name, _ in layer.named_children()} != set(_PARTS):
        return f"{type(layer).__name__} has parts {sorted(n for n, _ in layer.named_children())}, not {sorted(_PARTS)}"
    attn, mlp = layer.self_attn, layer.mlp
    form = _form(attn)
    if form is None:
        return f"{type(attn).__name__}.forward is not transformers' Llama/Qwen2/Qwen3 attention"
    if _fused_attention_forward(type(attn).forward) is None:
        return f"{type(attn).__name__}'s modeling file has its own rotary embedding"
    if not all(_linear(getattr(attn, n, None)) for n in _PROJECTIONS) or not all(
            _linear(getattr(mlp, n, None)) for n in _MLP):
        return "a projection is not a plain nn.Linear (LoRA adapters, quantised layers) or has hooks"
    norms = [getattr(layer, n) for n in _PARTS[2:]] + ([attn.q_norm, attn.k_norm] if form == "qwen3" else [])
    if not swiglu_mlp(mlp) or not all(plain_rms_norm(n) for n in norms):
        return "the norms or the MLP are not the stock RMSNorm / SiLU-gated MLP"
    if getattr(attn, "sliding_window", None) is not None:
        return "sliding-window attention"
    return None


def fuse_decoder_layers(model: nn.Module) -> int:
    """Run every decoder layer of `model` that qualifies (see the module's docstring) as one fused
    node; returns how many. Our gradient checkpointing (memory/checkpointing.py), enabled before or
    after, hands these layers the recompute instead of wrapping them."""
    count = 0
    for module in model.modules():
        if "_atlas_fused_decoder" in module.__dict__ or decoder_problem(module) is not None:
            continue
        module._atlas_fused_decoder = _form(module.self_attn)
        # under our checkpointing the wrapper stays the forward and calls this one
        slot = "_atlas_inner_forward" if "_atlas_inner_forward" in module.__dict__ else "forward"
        setattr(module, slot, types.MethodType(_fused_forward, module))
        count += 1
    return count


def unfuse_decoder_layers(model: nn.Module) -> None:
    for module in model.modules():
        if module.__dict__.pop("_atlas_fused_decoder", None) is None:
            continue
        slot = "_atlas_inner_forward" if "_atlas_inner_forward" in module.__dict__ else "forward"
        if getattr(module.__dict__.get(slot), "__func__", None) is not _fused_forward:
            continue  # someone's patch replaced ours: it stays
        if slot == "forward":
            del module.forward
        else:  # checkpointed: the wrapper now calls the class's forward
            module._atlas_inner_forward = stock_forward(module)


def stock_forward(layer: nn.Module):
    """The class's forward of `layer`, bound: what checkpointing wraps where the fused node does not
    apply (a fused node inside PyTorch's checkpoint would keep its attention graph outside the
    checkpoint's hooks, and selective checkpointing refuses it)."""
    return types.MethodType(type(layer).forward, layer)


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _rebound(m: nn.Module) -> bool:
    """A forward bound on the instance by someone else (accelerate's hooks, a patch): what the module
    computes is no longer its class's code. fused_layers' own swaps compute the stock result."""
    return "forward" in m.__dict__ and not own_swap(m)


def _layer_forward_ours(layer: nn.Module) -> bool:
    """Nothing but ours bound as the layer's forward: the fused one, or our checkpointing's wrapper
    around it or around the class's forward. Told by the functions, not by our marker attributes,
    which a patch laid on top keeps."""
    from .memory.checkpointing import _checkpointed_call

    if "forward" not in layer.__dict__:
        return True
    fn = getattr(layer.__dict__["forward"], "__func__", None)
    if fn is _fused_forward:
        return True
    inner = getattr(layer.__dict__.get("_atlas_inner_forward"), "__func__", None)
    return fn is _checkpointed_call and (inner is _fused_forward or inner is type(layer).forward)


def _hooked(layer: nn.Module) -> bool:
    """Whether the layer's parts would run anything the fused node skips: module hooks on a part
    (forward, backward, either kind), global module hooks, or a part's forward rebound on the
    instance."""
    import torch.nn.modules.module as nn_module

    if any(getattr(nn_module, name, None) for name in _GLOBAL_HOOKS):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks or _rebound(m)
               for m in layer.modules() if m is not layer)


def _fused_forward(self, hidden_states, *args, **kwargs):
    out = decoder_call(self, hidden_states, args, kwargs)
    return out if out is not None else type(self).forward(self, hidden_states, *args, **kwargs)


class _Call:
    """One call's inputs besides the hidden states and weights."""
    __slots__ = ("layer", "form", "mask", "cos", "sin", "attention_kwargs", "recompute", "shape", "compute", "autocast")

    def __init__(self, layer, form, mask, cos, sin, attention_kwargs, recompute, shape, compute, autocast):
        self.layer, self.form, self.mask, self.cos, self.sin = layer, form, mask, cos, sin
        self.attention_kwargs, self.recompute, self.shape = attention_kwargs, recompute, shape
        # the projections' dtype (the autocast dtype under autocast), and whether the caller ran
        # under autocast (attention runs under it again)
        self.compute, self.autocast = compute, autocast


# Where each weight sits in the node's inputs: the norms' (0, 9, and Qwen3's per-head 16, 17) keep
# their dtype, the projections' (each weight followed by its bias or None) compute in the call's.
_NORMS = (0, 9, 16, 17)


def _weights(layer, form: str) -> list:
    attn, mlp = layer.self_attn, layer.mlp
    out = [layer.input_layernorm.weight]
    for m in [getattr(attn, n) for n in _PROJECTIONS]:
        out += [m.weight, m.bias]
    out.append(layer.post_attention_layernorm.weight)
    for m in [getattr(mlp, n) for n in _MLP]:
        out += [m.weight, m.bias]
    if form == "qwen3":
        out += [attn.q_norm.weight, attn.k_norm.weight]
    return out


def decoder_call(layer, hidden_states, args, kwargs, *, recompute: bool = False, offload=None):
    """The layer's output through the fused node, or None where this call must take the stock path.
    `recompute` keeps only the input for the backward (gradient checkpointing); `offload`, an
    ActivationOffload, takes that input to CPU memory."""
    form = layer.__dict__.get("_atlas_fused_decoder")
    if form is None or args or any(kwargs.get(k) is not None for k in _CACHE_KWARGS):
        return None
    pe = kwargs.get("position_embeddings")
    x = hidden_states
    if pe is None or not isinstance(x, torch.Tensor) or x.dim() != 3:
        return None
    attn = layer.self_attn
    if attn.training and attn.attention_dropout:
        return None
    if getattr(layer, "gradient_checkpointing", False) and layer.training:
        return None  # transformers' own checkpointing wraps this call: the stock layer is what it expects
    if (_hooked(layer) or not all(type(getattr(attn, n)) is nn.Linear for n in _PROJECTIONS)
            or not all(type(getattr(layer.mlp, n)) is nn.Linear for n in _MLP)):
        return None
    from atlas_kernels._dispatch import TRITON_DTYPES, use_triton

    cos, sin = pe
    weights = _weights(layer, form)
    dtype = x.dtype
    if (dtype not in TRITON_DTYPES or cos.dtype != dtype or sin.dtype != dtype or cos.requires_grad
            or any(w is not None and w.dtype != dtype for w in weights) or not use_triton(x, cos)):
        return None
    compute, autocast = dtype, torch.is_autocast_enabled(x.device.type)
    if autocast and torch.get_autocast_dtype(x.device.type) != dtype:
        compute = torch.get_autocast_dtype(x.device.type)
        if dtype != torch.float32 or compute not in (torch.bfloat16, torch.float16):
            return None
    B, T, _ = x.shape
    if (cos.dim() != 3 or cos.shape[0] not in (1, B) or cos.shape[1] != T or sin.shape != cos.shape
            or cos.shape[2] != attn.head_dim or attn.head_dim % 2 or sin.requires_grad):
        return None  # partial rotary widths included: the stock layer's own error is the one to raise
    akw = {k: v for k, v in kwargs.items() if k not in ("attention_mask", "position_embeddings", *_CACHE_KWARGS)}
    akw.setdefault("position_ids", None)
    akw.setdefault("use_cache", False)
    call = _Call(layer, form, kwargs.get("attention_mask"), cos.contiguous(), sin.contiguous(), akw, recompute,
                 x.shape, compute, autocast)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(w is not None and w.requires_grad
                                                                      for w in weights))
    with torch.autocast(x.device.type, enabled=False):
        if not needs_grad:
            with torch.no_grad():
                return _forward(call, x, weights, graph=False)["out"]
        if offload is not None and recompute:
            with offload.hooks():
                return _DecoderLayerFn.apply(call, x, *weights)
        return _DecoderLayerFn.apply(call, x, *weights)


def _attention(call: _Call, q, k, v):
    attn = call.layer.self_attn
    g = unwrapped(type(attn).forward).__globals__
    interface = g["ALL_ATTENTION_FUNCTIONS"].get_interface(attn.config._attn_implementation,
                                                           g["eager_attention_forward"])
    extra = {"sliding_window": attn.sliding_window} if call.form != "llama" else {}
    with torch.autocast(q.device.type, dtype=call.compute, enabled=call.autocast):  # the caller's autocast
        out, _ = interface(attn, q, k, v, call.mask, dropout=0.0, scaling=attn.scaling, **extra,
                           **call.attention_kwargs)
    return out


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)` without the dispatch where it is one already: a layer's forward and backward
    make ~30 such casts, almost all no-ops outside autocast, each a few microseconds of host time
    at the short rows where the host sets the pace."""
    return t if t.dtype == dtype else t.to(dtype)


def _forward(call: _Call, x, w, graph: bool, output: bool = True) -> dict:
    """The layer's forward with its intermediates. `graph` records autograd over the attention
    alone (its inputs are fresh leaves), for the backward to differentiate. Without `output` it
    stops before the down projection, whose result no gradient needs (the recompute)."""
    from atlas_kernels.layers import rms_norm_forward, rope_forward, silu_mul_forward

    F = torch.nn.functional
    layer, (B, T, H), cd = call.layer, call.shape, call.compute
    attn, D = layer.self_attn, layer.self_attn.head_dim
    # the projections' weights in the compute dtype (the norms' stay as they are); a no-op without autocast
    wc = [_as(t, cd) if t is not None and i not in _NORMS else t for i, t in enumerate(w)]
    x2 = x.reshape(B * T, H).contiguous()
    h1, r1 = rms_norm_forward(x2, w[0], layer.input_layernorm.variance_epsilon)
    h1 = _as(h1, cd)
    q, k, v = (F.linear(h1, wc[i], wc[i + 1]) for i in (1, 3, 5))
    a = {"wc": wc, "x2": x2, "h1": h1, "r1": r1}
    if call.form == "qwen3":  # each head's RMSNorm, over rows of head_dim
        a["qp"], a["kp"] = q.view(-1, D), k.view(-1, D)
        q, a["rq"] = rms_norm_forward(a["qp"], w[16], attn.q_norm.variance_epsilon)
        k, a["rk"] = rms_norm_forward(a["kp"], w[17], attn.k_norm.variance_epsilon)
    q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
    qr, kr = rope_forward(q, k, call.cos, call.sin)
    a["layouts"] = (qr.stride(), q.dtype), (kr.stride(), k.dtype)
    if graph:
        qr, kr, v = (t.detach().requires_grad_() for t in (qr, kr, v))
        with torch.enable_grad():
            o = _attention(call, qr, kr, v)
        a.update(q=qr, k=kr, v=v, o=o)
        o = o.detach()
    else:
        o = _attention(call, qr, kr, v)
    o2 = _as(o.reshape(B * T, -1), cd)
    xm = x2 + F.linear(o2, wc[7], wc[8])
    h2, r2 = rms_norm_forward(xm, w[9], layer.post_attention_layernorm.variance_epsilon)
    h2 = _as(h2, cd)
    g, u = F.linear(h2, wc[10], wc[11]), F.linear(h2, wc[12], wc[13])
    a.update(o2=o2, xm=xm, h2=h2, r2=r2, g=g, u=u, m=silu_mul_forward(g, u))
    if output:
        # a tensor of its own, not a view: autograd refuses in-place edits (a forward hook that
        # scales the layer's output) of views made inside a custom Function
        a["out"] = xm.view(B, T, H) + F.linear(a["m"], wc[14], wc[15]).view(B, T, H)
    return a


_SAVED = ("x2", "h1", "r1", "o2", "xm", "h2", "r2", "g", "u", "m", "qp", "kp", "rq", "rk")  # and wc, the weights' casts


class _DecoderLayerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call, x, *weights):
        a = _forward(call, x, weights, graph=not call.recompute)
        ctx.call, ctx.weights = call, weights
        if call.recompute:
            ctx.save_for_backward(x)
        else:
            ctx.save_for_backward(*(a.get(n) for n in _SAVED))
            ctx.attention = a["q"], a["k"], a["v"], a["o"], a["layouts"], a["wc"]
        return a["out"]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        call, w = ctx.call, ctx.weights
        if call.recompute:
            (x,) = ctx.saved_tensors
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                a = _forward(call, x, w, graph=True, output=False)
            del x
        else:
            if not hasattr(ctx, "attention"):
                raise RuntimeError("a fused decoder layer without gradient checkpointing differentiates once: backward "
                                   "through its graph a second time (retain_graph=True) needs fused_decoder=False")
            a = dict(zip(_SAVED, ctx.saved_tensors))
            a["q"], a["k"], a["v"], a["o"], a["layouts"], a["wc"] = ctx.attention
            del ctx.attention
        with torch.autocast(dout.device.type, enabled=False):
            grads = _backward(call, a, w, dout, ctx.needs_input_grad[2:])
        return None, grads[0], *grads[1:]


def _backward(call: _Call, a: dict, w, dout, needs: tuple) -> list:
    """d(x) and each weight's gradient (None where not needed), by hand: every GEMM's two gradients
    are GEMMs, the fused kernels have their backward launches, attention goes through autograd."""
    from atlas_kernels.layers import rms_norm_backward, rope_backward, silu_mul_backward

    layer, (B, T, H), cd = call.layer, call.shape, call.compute
    wc = a.pop("wc")
    dw = [None] * len(w)

    def weight_grads(i, dy, inp):  # weight i and its bias i + 1 of y = inp @ w[i].T + w[i + 1]
        if needs[i]:
            dw[i] = _as(dy.t().mm(inp), w[i].dtype)
        if w[i + 1] is not None and needs[i + 1]:
            dw[i + 1] = _as(dy.sum(0), w[i + 1].dtype)

    # Each intermediate is dropped after its last use, so the layer's backward holds no more than
    # autograd's would. Gradients reach each projection's output in its (compute) dtype, and each
    # norm's output in the norm's.
    d = dout.reshape(B * T, H)
    dc = _as(d, cd)
    weight_grads(14, dc, a.pop("m"))
    dg, du = silu_mul_backward(a.pop("g"), a.pop("u"), dc.mm(wc[14]))
    del dc
    h2 = a.pop("h2")
    weight_grads(10, dg, h2)
    weight_grads(12, du, h2)
    del h2
    dh2 = dg.mm(wc[10]).addmm_(du, wc[12])
    del dg, du
    dxm, dw[9] = rms_norm_backward(a.pop("xm"), w[9], a.pop("r2"), dh2, weight_grad=needs[9])
    del dh2
    dxm += d
    dxc = _as(dxm, cd)
    weight_grads(7, dxc, a.pop("o2"))
    o = a.pop("o")
    do = _as(dxc.mm(wc[7]).view(o.shape), o.dtype)
    del dxc
    dq, dk, dv = torch.autograd.grad(o, (a.pop("q"), a.pop("k"), a.pop("v")), do)
    del o, do
    dq, dk = rope_backward(dq, dk, call.cos, call.sin, a["layouts"])
    dq, dk, dv = (t.transpose(1, 2).reshape(B * T, -1) for t in (dq, dk, dv))
    if call.form == "qwen3":
        D = layer.self_attn.head_dim
        dq, dw[16] = rms_norm_backward(a.pop("qp"), w[16], a.pop("rq"), dq.reshape(-1, D), weight_grad=needs[16])
        dk, dw[17] = rms_norm_backward(a.pop("kp"), w[17], a.pop("rk"), dk.reshape(-1, D), weight_grad=needs[17])
        dq, dk = dq.view(B * T, -1), dk.view(B * T, -1)
    h1 = a.pop("h1")
    for i, dy in ((1, dq), (3, dk), (5, dv)):
        weight_grads(i, dy, h1)
    del h1
    dh1 = dq.mm(wc[1]).addmm_(dk, wc[3]).addmm_(_as(dv, cd), wc[5])
    del dq, dk, dv
    dx, dw[0] = rms_norm_backward(a.pop("x2"), w[0], a.pop("r1"), dh1, weight_grad=needs[0])
    dx += dxm
    return [dx.view(B, T, H), *dw]
