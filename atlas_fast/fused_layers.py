"""The policy's RMSNorms and SwiGLU activations through atlas_kernels' fused kernels (`fused_layers`).

What is fused is the elementwise work between the GEMMs, forward and backward: each RMSNorm
(input, post-attention, final; Qwen3's per-head q/k norms) becomes one kernel each way instead of
~6 and ~10, and each SwiGLU MLP's silu(gate) * up one kernel each way instead of 2 and ~5. The
projections stay the modules they are (LoRA adapters apply). The kernels round where the modules
round, so outputs match the stock forward (tests/test_fused_layers.py). Only modules whose
computation is known are swapped: those whose class's forward compiles to the same code as
transformers' Llama RMSNorm or Llama MLP (the Qwen2/Qwen3/Mistral/OLMo2 copies of them, with a SiLU
activation for the MLP). Look-alikes that scale, clamp, drop out or round elsewhere (OLMo2's norm
rounds after the weight; Falcon-H1's MLP scales) are left as they are, as is anything unknown.

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


@functools.lru_cache(maxsize=None)
def _stock_code(kind: str) -> tuple:
    """The compiled forward whose computation the kernels reproduce (compared by code, so the
    families' "copied from Llama" classes match and anything edited does not)."""
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    return _code({"norm": LlamaRMSNorm, "mlp": LlamaMLP}[kind].forward)


def _computes_like(module: nn.Module, kind: str) -> bool:
    forward = getattr(type(module), "forward", None)
    return getattr(forward, "__code__", None) is not None and _code(forward) == _stock_code(kind)


def plain_rms_norm(m: nn.Module) -> bool:
    """The families' own RMSNorm (weight * (x / rms(x)).to(x.dtype)), unwrapped and unhooked:
    safe to compute from its weight and epsilon by our kernels. Anything else is called as a module."""
    return (type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), nn.Parameter)
            and isinstance(getattr(m, "variance_epsilon", None), float) and not m._forward_hooks
            and not m._forward_pre_hooks and _computes_like(m, "norm"))


def silu_activation(mlp: nn.Module) -> bool:
    act = getattr(mlp, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def swiglu_mlp(m: nn.Module) -> bool:
    """An MLP computing down(silu(gate(x)) * up(x)) with those three projections as modules."""
    return (type(m).__name__.endswith("MLP") and silu_activation(m)
            and all(isinstance(getattr(m, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
            and not m._forward_hooks and not m._forward_pre_hooks and _computes_like(m, "mlp"))


def _rms_norm_forward(self, hidden_states):
    from atlas_kernels import rms_norm

    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_forward(self, x):
    from atlas_kernels import silu_mul

    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def fuse_layers(model: nn.Module) -> int:
    """Swap the forward of every stock RMSNorm and SwiGLU MLP in `model` for the fused kernels;
    returns how many modules were swapped (0: nothing this knows, the model runs as it was)."""
    swapped = 0
    for module in model.modules():
        if "_atlas_fused" in module.__dict__:
            continue
        if plain_rms_norm(module):
            module.forward = types.MethodType(_rms_norm_forward, module)
        elif swiglu_mlp(module):
            module.forward = types.MethodType(_swiglu_forward, module)
        else:
            continue
        module._atlas_fused = True
        swapped += 1
    return swapped


def unfuse_layers(model: nn.Module) -> None:
    for module in model.modules():
        if module.__dict__.pop("_atlas_fused", False):
            del module.forward  # the instance's binding goes; the class's forward is found again
