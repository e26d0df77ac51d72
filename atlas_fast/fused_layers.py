"""The policy's RMSNorms, SwiGLU activations and rotary embeddings through atlas_kernels' fused
kernels (`fused_layers`).

What is fused is the elementwise work between the GEMMs, forward and backward: each RMSNorm
(input, post-attention, final; Qwen3's per-head q/k norms) becomes one kernel each way instead of
~6 and ~10, and each SwiGLU MLP's silu(gate) * up one kernel each way instead of 2 and ~5. The
projections stay the modules they are (LoRA adapters apply). The kernels round where the modules
round, so outputs match the stock forward (tests/test_fused_layers.py). Only modules whose
computation is known are swapped: those whose class's forward compiles to the same code as
transformers' Llama RMSNorm or Llama MLP (the Qwen2/Qwen3/Mistral/OLMo2 copies of them, with a SiLU
activation for the MLP). Look-alikes that scale, clamp, drop out or round elsewhere (OLMo2's norm
rounds after the weight; Falcon-H1's MLP scales) are left as they are, as is anything unknown.

The attention modules keep their computation but for the rotary embedding of queries and keys,
which HF runs as ~10 kernels forward (rotate_half's concatenation and negation, products, sums, for
q and for k) and ~20 backward: ~150 ms of a Qwen2.5-1.5B GRPO step over 8 x 8448 tokens on an H200
in a profile, where a fused Triton rope (Liger's) took ~14 ms; atlas_kernels.rope is one kernel each
way for q and k together. The attention forward calls its modeling file's module-global
`apply_rotary_pos_emb`: the swap binds a copy of the class's forward whose globals are a copy of
that file's with the name mapped to the fused version, so transformers' module, and every other
model in the process, stay as they are. It does so only where that file's `apply_rotary_pos_emb`
and the `rotate_half` it calls compile to Llama's code; at call time only the call the kernel
computes (4 arguments, [batch, heads, tokens, head_dim] queries and keys, cos/sin without grad)
takes it, anything else runs the stock function. The copied globals are a snapshot taken at the
first swap of a class: names rebound in transformers' module afterwards are not seen.

The rotary swap has its own switch (`rotary=True`, `GRPOConfig.fused_rotary`, on by default).
The kernel matches transformers' function bit for bit only when each product is rounded before
the sum, as PyTorch rounds it: the sm_90 build fused them into one `fma.rn.bf16` until its launch
turned floating-point fusion off (a CPU test checks the compiled PTX; the CUDA test compares with
HF). On an H200 it took a Qwen2.5-1.5B update from 2.918 to 2.704 s at 8 x 8448 tokens.

The swap binds a new `forward` on each module instance, so `copy.deepcopy` of the model (a
reference model) keeps it, bound to the copy; `unfuse_layers` puts the class's forward back.
"""
from __future__ import annotations

import functools
import types

from torch import nn


def _code(forward) -> tuple:
    c = forward.__code__
    return c.co_code, c.co_names, c.co_consts


def unwrapped(fn):
    """`fn` under its functools.wraps wrappers (transformers 5.24 wraps forwards in deprecate_kwarg)."""
    while isinstance(getattr(fn, "__wrapped__", None), types.FunctionType):
        fn = fn.__wrapped__
    return fn


@functools.lru_cache(maxsize=None)
def _stock_code(kind: str) -> tuple | None:
    """The compiled forward (or function) whose computation the kernels reproduce (compared by code,
    so the families' "copied from Llama" classes and functions match and anything edited does not);
    None where this transformers has no plain function of that name, which then matches nothing."""
    from transformers.models.llama import modeling_llama as llama

    stock = {"norm": llama.LlamaRMSNorm.forward, "mlp": llama.LlamaMLP.forward,
             "apply_rotary_pos_emb": getattr(llama, "apply_rotary_pos_emb", None),
             "rotate_half": getattr(llama, "rotate_half", None)}[kind]
    return _code(stock) if isinstance(stock, types.FunctionType) else None


def _computes_like(module: nn.Module, kind: str) -> bool:
    forward = getattr(type(module), "forward", None)
    return getattr(forward, "__code__", None) is not None and _code(forward) == _stock_code(kind)


def own_swap(m: nn.Module) -> bool:
    """Whether the forward bound on `m` is one of fuse_layers' swaps, not a patch laid on it (by
    accelerate's hooks or a user) before or after."""
    fn = getattr(m.__dict__.get("forward"), "__func__", None)
    return fn is not None and (fn is _rms_norm_forward or fn is _swiglu_forward
                               or fn is _fused_attention_forward(type(m).forward))


def _own_forward(m: nn.Module) -> bool:
    """No forward bound on the instance, or only our own swap: nobody else's patch to replace."""
    return "forward" not in m.__dict__ or own_swap(m)


def plain_rms_norm(m: nn.Module) -> bool:
    """The families' own RMSNorm (weight * (x / rms(x)).to(x.dtype)), unwrapped and unhooked:
    safe to compute from its weight and epsilon by our kernels. Anything else is called as a module."""
    return (type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), nn.Parameter)
            and isinstance(getattr(m, "variance_epsilon", None), float) and not m._forward_hooks
            and not m._forward_pre_hooks and _own_forward(m) and _computes_like(m, "norm"))


def silu_activation(mlp: nn.Module) -> bool:
    act = getattr(mlp, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def swiglu_mlp(m: nn.Module) -> bool:
    """An MLP computing down(silu(gate(x)) * up(x)) with those three projections as modules."""
    return (type(m).__name__.endswith("MLP") and silu_activation(m)
            and all(isinstance(getattr(m, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
            and not m._forward_hooks and not m._forward_pre_hooks and _own_forward(m) and _computes_like(m, "mlp"))


def rope_attention(m: nn.Module) -> bool:
    """An attention module whose forward calls its modeling file's stock apply_rotary_pos_emb (see
    the module's docstring), not already bound to another forward by someone else."""
    forward = getattr(type(m), "forward", None)
    return (type(m).__name__.endswith("Attention") and "forward" not in m.__dict__
            and isinstance(forward, types.FunctionType) and _fused_attention_forward(forward) is not None)


@functools.lru_cache(maxsize=None)
def _fused_attention_forward(forward):
    """The class's forward reading `apply_rotary_pos_emb` from a copy of its module's globals where
    the name is the fused version; None where its module's function is not the stock one. One per
    class, shared by its instances."""
    inner = unwrapped(forward)
    module_globals = getattr(inner, "__globals__", None)
    if (not isinstance(inner, types.FunctionType) or "apply_rotary_pos_emb" not in inner.__code__.co_names
            or not all(_stock_code(name) is not None and isinstance(module_globals.get(name), types.FunctionType)
                       and _code(module_globals[name]) == _stock_code(name)
                       for name in ("apply_rotary_pos_emb", "rotate_half"))):
        return None
    fused = {**module_globals, "apply_rotary_pos_emb": _fused_rotary(module_globals["apply_rotary_pos_emb"])}
    return _with_globals(forward, module_globals, fused)


def _with_globals(fn, old_globals: dict, new_globals: dict):
    """`fn` rebuilt to read `new_globals` where it read `old_globals`, through the functools.wraps
    wrappers around it (transformers 5.24 wraps the attention forwards in deprecate_kwarg): a wrapper
    is copied with the closure cell holding the wrapped function pointing to that function's copy.
    None where a layer is not a plain function or holds what it wraps some other way."""
    if not isinstance(fn, types.FunctionType):
        return None
    wrapped, closure, fn_globals = getattr(fn, "__wrapped__", None), fn.__closure__, new_globals
    if wrapped is None:
        if fn.__globals__ is not old_globals:
            return None
    else:
        copied = _with_globals(wrapped, old_globals, new_globals)
        holders = [c for c in closure or () if _holds(c, wrapped)]
        if copied is None or len(holders) != 1:
            return None
        closure = tuple(types.CellType(copied) if c is holders[0] else c for c in closure)
        fn_globals = fn.__globals__
    new = types.FunctionType(fn.__code__, fn_globals, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    new.__qualname__, new.__doc__, new.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    if wrapped is not None:
        new.__wrapped__ = copied
    return new


def _holds(cell, value) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False


def _fused_rotary(stock):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        from atlas_kernels import rope
        from atlas_kernels.layers import rope_problem

        if args or kwargs or rope_problem(q, k, cos, sin) is not None:
            return stock(q, k, cos, sin, *args, **kwargs)
        return rope(q, k, cos, sin)

    return apply_rotary_pos_emb


def _rms_norm_forward(self, hidden_states):
    from atlas_kernels import rms_norm

    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_forward(self, x):
    from atlas_kernels import silu_mul

    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def fuse_layers(model: nn.Module, rotary: bool = True, decoder: bool = False) -> int:
    """Swap the forward of every stock RMSNorm and SwiGLU MLP in `model` for the fused kernels, and
    with `rotary` every attention's rotary embedding; with `decoder` too, whole Llama/Qwen2/Qwen3
    decoder layers become one autograd node each (fused_decoder.py, which rotates with our kernel, so
    not without `rotary`; the swapped parts serve the calls that node hands back to the stock
    forward). Returns how many modules were swapped (0: nothing this knows, the model runs as it was)."""
    swapped = 0
    if decoder and rotary:
        from .fused_decoder import fuse_decoder_layers

        swapped += fuse_decoder_layers(model)
    for module in model.modules():
        if "_atlas_fused" in module.__dict__:
            continue
        if plain_rms_norm(module):
            module.forward = types.MethodType(_rms_norm_forward, module)
        elif swiglu_mlp(module):
            module.forward = types.MethodType(_swiglu_forward, module)
        elif rotary and rope_attention(module):
            module.forward = types.MethodType(_fused_attention_forward(type(module).forward), module)
        else:
            continue
        module._atlas_fused = True
        swapped += 1
    return swapped


def unfuse_layers(model: nn.Module) -> None:
    from .fused_decoder import unfuse_decoder_layers

    unfuse_decoder_layers(model)
    for module in model.modules():
        if module.__dict__.pop("_atlas_fused", False) and own_swap(module):
            del module.forward  # the instance's binding goes; the class's forward is found again
