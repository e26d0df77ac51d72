"""atlas_kernels: fused Triton kernels for GRPO training.

Public API (stable): `selective_logprobs`, `group_advantages`, `grpo_loss`,
`grpo_loss_from_logits`, `kl_k3`, from hidden states (the LM head fused, no logits in memory)
`fused_linear_logprobs`, `fused_linear_grpo_loss`, and the decoder layer's `rms_norm`,
`silu_mul` and `rope` (forward and backward in one pass each). Each has a plain-PyTorch twin with the same signature in
`atlas_kernels.reference`. CUDA tensors run the Triton kernels; CPU tensors run the reference,
unless TRITON_INTERPRET=1, where the Triton kernels run on the CPU through the interpreter.
"""
from .advantages import group_advantages
from .fused_linear import fused_linear_grpo_loss, fused_linear_logprobs
from .grpo import grpo_loss, grpo_loss_from_logits
from .kl import kl_k3
from .layers import rms_norm, rope, silu_mul
from .logprobs import selective_logprobs

__all__ = ["selective_logprobs", "group_advantages", "grpo_loss", "grpo_loss_from_logits", "kl_k3",
           "fused_linear_logprobs", "fused_linear_grpo_loss", "rms_norm", "silu_mul", "rope"]
__version__ = "0.1.0"
