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


class _Unquantized:
    """Stands in for vLLM's UnquantizedLinearMethod: records which layers it re-processes."""

    def __init__(self, log):
        self.log = log

    def process_weights_after_loading(self, module):
        self.log.append(module.tag)


_UnquantizedMethod = type("UnquantizedEmbeddingMethod", (_Unquantized,), {})


def tied_model(log):
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.embed_tokens = torch.nn.Module()
    model.lm_head = torch.nn.Module()
    weight = torch.nn.Parameter(torch.zeros(4, 2))
    for module, tag in ((model.model.embed_tokens, "embed"), (model.lm_head, "head")):
        module.weight, module.tag, module.quant_method = weight, tag, _UnquantizedMethod(log)
    return model


@pytest.mark.parametrize("loaded,expected", [
    ({"model.embed_tokens.weight", "model.norm.weight"}, ["head"]),  # the reload packed the embedding
    ({"model.embed_tokens.weight", "lm_head.weight"}, ["embed", "head"]),  # which one vLLM kept is unknown
    ({"model.norm.weight"}, ["embed", "head"]),
    (None, ["embed", "head"]),
])
def test_tied_layers_are_packed_again_unless_the_reload_did(loaded, expected):
    from atlas_fast.rollout.vllm_worker_ext import refresh_shared_layers

    log = []
    assert refresh_shared_layers(tied_model(log), loaded) == len(expected)
    assert log == expected


def test_the_worker_drops_mappings_of_files_that_are_gone(tmp_path):
    from atlas_fast.rollout.vllm_worker_ext import WeightReloadExtension

    class Worker(WeightReloadExtension):
        def __init__(self):
            self.seen = []
            self.model_runner = type("Runner", (), {"get_model": lambda _: torch.nn.Linear(2, 2)})()

        def reload_weights(self, weights_iterator):
            self.seen.append({name: t.clone() for name, t in weights_iterator})

    worker = Worker()
    first, second = WeightFile(tmp_path / "a" / "w.safetensors"), WeightFile(tmp_path / "b" / "w.safetensors")
    first.write(pairs(0))
    reply = worker.atlas_fast_load_safetensors(str(first.path))
    assert reply["tensors"] == 4 and set(worker._atlas_fast_maps) == {str(first.path)}
    first.write(pairs(1))
    worker.atlas_fast_load_safetensors(str(first.path))
    assert torch.equal(worker.seen[-1]["model.norm.weight"], dict(pairs(1))["model.norm.weight"])
    first.discard()  # that trainer closed; another one pushes to the same server
    second.write(pairs(2))
    worker.atlas_fast_load_safetensors(str(second.path))
    assert set(worker._atlas_fast_maps) == {str(second.path)}
    second.discard()


def test_a_file_the_worker_cannot_read_is_named_and_leaves_no_descriptor(tmp_path):
    import json
    import struct

    path = tmp_path / "w.safetensors"
    header = json.dumps({"x": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError, match="tensor x has dtype F8_E4M3"):
        MappedWeights(str(path))
    import gc
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before


def test_the_worker_forgets_a_mapping_on_request(tmp_path):
    from atlas_fast.rollout.vllm_worker_ext import WeightReloadExtension

    class Worker(WeightReloadExtension):
        model_runner = type("Runner", (), {"get_model": lambda _: torch.nn.Linear(2, 2)})()

        def reload_weights(self, weights_iterator):
            list(weights_iterator)

    worker, file = Worker(), WeightFile(tmp_path / "w.safetensors")
    file.write(pairs(0))
    worker.atlas_fast_load_safetensors(str(file.path))
    assert worker.atlas_fast_forget(str(file.path)) and not worker._atlas_fast_maps
    assert not worker.atlas_fast_forget(str(file.path))
    file.discard()
