"""A vLLM worker extension: load a whole set of trained weights in one call, on any device.

vLLM mixes this class into its worker (`--worker-extension-cls` for `vllm serve`,
`worker_extension_cls=` for `vllm.LLM`), so its methods run in every worker process and are
reached through `collective_rpc`.

Why not vLLM's own `reload_weights` alone: it reloads layer by layer and skips a layer that
receives no tensor. A tied LM head (`tie_word_embeddings`, e.g. Qwen2.5-0.5B) never receives one,
since its weight is the embedding's. On GPU the head reads the embedding's storage, so it follows;
on CPU vLLM pre-packs each matmul weight (oneDNN / SGL kernels) when it loads, and the tied head
kept its stale pack: greedy output after a push differed from the trainer's in our CPU test.
So after the reload, every layer that shares its weight with another is processed again.

The module is self-contained (torch and safetensors only): `atlas-fast vllm-serve` copies it next
to a server that lives in a virtualenv of its own, where atlas_fast is not installed.
"""
from __future__ import annotations

from typing import Iterable


class WeightReloadExtension:
    """Methods added to vLLM's worker; `self` is the worker."""

    def atlas_fast_load_safetensors(self, path: str) -> int:
        """Load every tensor of the safetensors file at `path` (checkpoint names); returns the count."""
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            names = list(f.keys())
            # Read lazily, in file order: a layer is processed as soon as all its tensors arrived.
            self.atlas_fast_load_named_tensors((name, f.get_tensor(name)) for name in names)
        return len(names)

    def atlas_fast_load_named_tensors(self, weights: Iterable) -> None:
        """Load `(checkpoint name, tensor)` pairs into the running model, in place."""
        self.reload_weights(weights_iterator=iter(weights))
        refresh_shared_layers(self.model_runner.get_model())


def refresh_shared_layers(model) -> int:
    """Re-run the post-load processing of layers whose weight is another layer's (tied heads)."""
    owners: dict[int, list] = {}
    for module in model.modules():
        weight = module.__dict__.get("_parameters", {}).get("weight")
        method = getattr(module, "quant_method", None)
        # Unquantized methods only: re-processing is idempotent there (a fresh pack of the
        # weight), while a quantized method would quantize its own output again.
        if weight is not None and type(method).__name__.startswith("Unquantized"):
            owners.setdefault(id(weight), []).append(module)
    refreshed = 0
    for modules in owners.values():
        if len(modules) > 1:
            for module in modules:
                module.quant_method.process_weights_after_loading(module)
                refreshed += 1
    return refreshed
