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

The trainer rewrites one file in place at every push; the worker keeps it mapped (`MappedWeights`)
and hands vLLM views of the mapping, so a push neither parses nor faults in the file again.

The module is self-contained (torch only): `atlas-fast vllm-serve` copies it next
to a server that lives in a virtualenv of its own, where atlas_fast is not installed.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import time
from typing import Iterable

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class WeightReloadExtension:
    """Methods added to vLLM's worker; `self` is the worker."""

    def atlas_fast_load_safetensors(self, path: str) -> dict:
        """Load every tensor of the safetensors file at `path` (checkpoint names) into the model."""
        start = time.perf_counter()
        maps = self.__dict__.setdefault("_atlas_fast_maps", {})
        for other in [p for p, m in maps.items() if not m.current()]:
            del maps[other]  # replaced or deleted (a trainer that closed): its pages go with the mapping
        mapped = maps.get(path) or maps.setdefault(path, MappedWeights(path))
        self.atlas_fast_load_named_tensors(mapped.tensors)
        return {"tensors": len(mapped.tensors), "seconds": time.perf_counter() - start}

    def atlas_fast_forget(self, path: str) -> bool:
        """Drop the mapping of `path` (its trainer is done): the file's memory goes with it."""
        return self.__dict__.get("_atlas_fast_maps", {}).pop(path, None) is not None

    def atlas_fast_load_named_tensors(self, weights: Iterable) -> None:
        """Load `(checkpoint name, tensor)` pairs into the running model, in place."""
        loaded: set = set()

        def noted():
            for name, tensor in weights:
                loaded.add(name)
                yield name, tensor

        self.reload_weights(weights_iterator=noted())
        refresh_shared_layers(self.model_runner.get_model(), loaded)


def refresh_shared_layers(model, loaded: set | None = None) -> int:
    """Re-run the post-load processing of layers whose weight is another layer's (tied heads).
    A layer whose own `<name>.weight` was the one name of its group among the `loaded` names was
    processed by the reload itself: packing the embedding's 150k x H weight again would cost
    ~0.1 s a push."""
    owners: dict[int, list] = {}
    for name, module in model.named_modules():
        weight = module.__dict__.get("_parameters", {}).get("weight")
        method = getattr(module, "quant_method", None)
        # Unquantized methods only: re-processing is idempotent there (a fresh pack of the
        # weight), while a quantized method would quantize its own output again.
        if weight is not None and type(method).__name__.startswith("Unquantized"):
            owners.setdefault(id(weight), []).append((name, module))
    refreshed = 0
    for modules in owners.values():
        if len(modules) > 1:
            # With two tied names sent (a PEFT modules_to_save of both), vLLM loads one: which one
            # the reload processed is then unknown, and all are processed again.
            named = [name for name, _ in modules if loaded is not None and f"{name}.weight" in loaded]
            for name, module in modules:
                if named == [name]:
                    continue
                module.quant_method.process_weights_after_loading(module)
                refreshed += 1
    return refreshed


class MappedWeights:
    """A safetensors file mapped once and read through the same mapping at every push.

    The trainer rewrites the file in place (`atlas_fast.rollout.weight_file`), so the pages mapped
    here already hold the new weights: a fresh mapping per push would fault in every page of the
    file again. The mapping is current while the file at `path` is still the one mapped (a new
    layout, or a push that failed, replaces the file and unlinks this one)."""

    def __init__(self, path: str):
        self.path = path
        # Writable and shared where we may: should a loader ever write into a tensor it is handed,
        # the page takes the write (the trainer rewrites every byte at the next push) instead of a
        # read-only page faulting. A server running as another user maps a private copy instead.
        shared = os.access(path, os.W_OK)
        self.fd = -1  # set once everything below worked: a failed init must not close it twice
        fd = os.open(path, os.O_RDWR if shared else os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))  # the file mapped, not the path's now
            header = json.loads(os.pread(fd, length, 8))
            header.pop("__metadata__", None)
            self.map = mmap.mmap(fd, size, access=mmap.ACCESS_WRITE if shared else mmap.ACCESS_COPY)
            data = torch.frombuffer(self.map, dtype=torch.uint8)[8 + length:]
            self.tensors = []
            for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                begin, end = entry["data_offsets"]
                dtype = DTYPES.get(entry["dtype"])
                if dtype is None:
                    raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}, which this loader does not "
                                     f"read ({', '.join(DTYPES)})")
                self.tensors.append((name, data[begin:end].view(dtype).view(entry["shape"])))
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def current(self) -> bool:
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self.fd)
        return mine.st_nlink > 0 and (now.st_dev, now.st_ino, now.st_size) == (mine.st_dev, mine.st_ino, mine.st_size)

    def __del__(self):
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1
