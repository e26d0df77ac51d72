"""The file push's safetensors file, kept mapped and rewritten in place at every push.

Why in place: a new 1 GB file in /dev/shm costs ~0.5 s of page allocation (every page faulted in
and zeroed by the kernel) before the first byte of a weight is copied, while copying into the
pages of the previous push costs ~0.09 s (Qwen2.5-0.5B in bf16, 2 CPU cores). The layout, header
and offsets, is fixed by the first push and redone only when a name, shape or dtype changes.

The server reads the file only inside the load request of a push, which the trainer waits for;
after a failed push the file is dropped (`discard`), so a server still reading it keeps its
own pages and the next push starts a new file. Its blocks are reserved when it is made, so a
full /dev/shm is an error, not a SIGBUS on the first write.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import struct
from pathlib import Path
from typing import Sequence

import torch

from .vllm_worker_ext import DTYPES

# The codes the worker extension reads back (it lives beside the server, so it owns the table).
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}


class WeightFile:
    """`write(pairs)` lays `(name, tensor)` pairs out as the safetensors file at `path`, casting to
    `dtype` on the way (the copy does the cast: no second tensor per weight)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._layout: tuple | None = None
        self._slots: list[tuple[int, int, torch.dtype, tuple[int, ...]]] = []
        self._map: mmap.mmap | None = None
        self._bytes: torch.Tensor | None = None

    def write(self, pairs: Sequence[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None) -> int:
        """Copy every tensor into the file; returns the bytes of tensor data written."""
        layout = tuple((name, tuple(t.shape), dtype or t.dtype) for name, t in pairs)
        for name, _, dt in layout:
            if dt not in DTYPE_CODES:
                raise TypeError(f"weight {name}: dtype {dt} has no safetensors code")
        if layout != self._layout:
            self._create(layout)
        order = {name: i for i, (name, _, _) in enumerate(layout)}
        for name, t in pairs:
            offset, size, dt, shape = self._slots[order[name]]
            self._bytes[offset:offset + size].view(dt).view(shape).copy_(t.detach())
        return sum(size for _, size, _, _ in self._slots)

    def _create(self, layout: tuple) -> None:
        self.discard()
        # Widest dtypes first, so that every tensor starts at a multiple of its element size and the
        # mapped bytes can be viewed as it (safetensors itself needs no order or alignment).
        ranked = sorted(layout, key=lambda e: -e[2].itemsize)
        header, offset = {}, 0
        placed = {}
        for name, shape, dt in ranked:
            size = torch.Size(shape).numel() * dt.itemsize
            header[name] = {"dtype": DTYPE_CODES[dt], "shape": list(shape), "data_offsets": [offset, offset + size]}
            placed[name] = (offset, size, dt, shape)
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
        start = 8 + len(text)
        total = start + offset
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        try:
            with open(partial, "wb") as f:
                f.write(struct.pack("<Q", len(text)))
                f.write(text)
                f.truncate(total)
                reserve(f.fileno(), total)
        except OSError as err:
            partial.unlink(missing_ok=True)
            raise OSError(err.errno, f"the weight push needs {total / 2**30:.2f} GiB in {self.path.parent} "
                                     f"({err.strerror}); give the backend a weight_dir with room for it") from err
        os.replace(partial, self.path)  # a reader never finds a file without its header
        fd = os.open(self.path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, total) if total else None
        finally:
            os.close(fd)
        data = torch.frombuffer(self._map, dtype=torch.uint8) if total else torch.empty(0, dtype=torch.uint8)
        self._bytes = data[start:]
        self._slots = [placed[name] for name, _, _ in layout]
        self._layout = layout

    def discard(self) -> None:
        """Drop the mapping and delete the file (a reader that has it open keeps its pages). The
        mapping is not closed by hand: torch.frombuffer views do not pin it, and a view read after
        an explicit close would fault; unreferenced, it is unmapped with its last view."""
        self._bytes = None
        self._slots = []
        self._layout = None
        self._map = None
        self.path.unlink(missing_ok=True)


def reserve(fd: int, size: int) -> None:
    """Allocate the file's blocks now. A sparse file in a full tmpfs fails only when a page is first
    written through the mapping, with SIGBUS, which no Python code can catch; this fails with ENOSPC."""
    if not hasattr(os, "posix_fallocate"):  # not Linux: the sparse file it is
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
