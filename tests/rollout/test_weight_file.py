"""The file push's two ends without a server: the trainer's in-place safetensors file and the
worker extension's persistent mapping of it."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from atlas_fast.rollout.vllm_worker_ext import MappedWeights
from atlas_fast.rollout.weight_file import WeightFile


def pairs(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [("model.embed_tokens.weight", torch.randn(37, 12, generator=g, dtype=dtype)),
            ("model.layers.0.mlp.up_proj.weight", torch.randn(5, 12, generator=g, dtype=dtype)),
            ("model.norm.weight", torch.randn(12, generator=g, dtype=dtype)),
            ("model.layers.0.self_attn.q_proj.bias", torch.randn(3, generator=g, dtype=dtype))]


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_the_file_is_valid_safetensors_and_casts_on_the_way(tmp_path):
    file = WeightFile(tmp_path / "w.safetensors")
    src = pairs(0)
    written = file.write(src, torch.bfloat16)
    got = read(file.path)
    assert set(got) == {name for name, _ in src}
    for name, t in src:
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], t.to(torch.bfloat16)), name
    assert written == sum(t.numel() * 2 for _, t in src)
    file.discard()
    assert not file.path.exists()


def test_a_second_push_rewrites_the_same_file_in_place(tmp_path):
    file = WeightFile(tmp_path / "w.safetensors")
    file.write(pairs(0))
    inode = os.stat(file.path).st_ino
    file.write(pairs(1))
    assert os.stat(file.path).st_ino == inode  # same pages, no new file
    got = read(file.path)
    for name, t in pairs(1):
        assert torch.equal(got[name], t), name
    # a new shape is a new layout: a new file replaces the old one
    changed = pairs(2)[:-1] + [("model.layers.0.self_attn.q_proj.bias", torch.ones(4))]
    file.write(changed)
    assert torch.equal(read(file.path)["model.layers.0.self_attn.q_proj.bias"], torch.ones(4))
    assert not file.path.with_name(file.path.name + ".partial").exists()
    file.discard()


def test_mixed_dtypes_are_laid_out_aligned(tmp_path):
    # a bf16 tensor of odd length before an fp32 one would leave the fp32 one misaligned
    src = [("a", torch.arange(3, dtype=torch.bfloat16)), ("b", torch.arange(5, dtype=torch.float32)),
           ("c", torch.tensor([True, False, True]))]
    file = WeightFile(tmp_path / "w.safetensors")
    file.write(src)
    got = read(file.path)
    for name, t in src:
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    file.discard()


def test_unsupported_dtype_is_named(tmp_path):
    with pytest.raises(TypeError, match="complex"):
        WeightFile(tmp_path / "w.safetensors").write([("z", torch.zeros(2, dtype=torch.complex64))])


def test_the_workers_mapping_follows_in_place_pushes_and_notices_a_new_file(tmp_path):
    file = WeightFile(tmp_path / "w.safetensors")
    file.write(pairs(0), torch.bfloat16)
    mapped = MappedWeights(str(file.path))
    # in file order (offsets), as the trainer laid them out
    assert [name for name, _ in mapped.tensors] == [name for name, _ in pairs(0)]
    for (name, t), (_, ref) in zip(mapped.tensors, pairs(0)):
        assert torch.equal(t, ref.to(torch.bfloat16)), name
    file.write(pairs(1), torch.bfloat16)
    assert mapped.current()
    for (name, t), (_, ref) in zip(mapped.tensors, pairs(1)):
        assert torch.equal(t, ref.to(torch.bfloat16)), name  # the same mapping sees the new values
    file.write(pairs(1), torch.float32)  # a new dtype: a new file under the same name
    assert not mapped.current()
    fresh = MappedWeights(str(file.path))
    assert all(t.dtype == torch.float32 for _, t in fresh.tensors)
    file.discard()
    assert not fresh.current()


def test_a_file_written_by_safetensors_itself_maps_too(tmp_path):
    from safetensors.torch import save_file

    src = dict(pairs(3))
    save_file(src, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    mapped = MappedWeights(str(tmp_path / "w.safetensors"))
    assert {name: t for name, t in mapped.tensors}.keys() == src.keys()
    for name, t in mapped.tensors:
        assert torch.equal(t, src[name]), name
