"""Tests for atlas_fast.checkpoint: round trips, atomicity, discovery, pruning, identity checks."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from atlas_fast import checkpoint as ckpt
from atlas_fast.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

VOCAB = 50


def make_model(hidden_size: int = 32, seed: int = 0, tie: bool = True) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return Qwen2ForCausalLM(config)


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"<unk>": VOCAB - 2, "<pad>": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")


def train_step(model, optimizer, scheduler):
    input_ids = torch.randint(0, VOCAB, (2, 6))
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def make_training(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    train_step(model, optimizer, scheduler)
    return optimizer, scheduler


def simple_state(step: int) -> dict:
    return {"global_step": step, "epoch": 0, "log_history": [{"step": step, "reward": 0.5}]}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def test_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path, tokenizer):
    model = make_model()
    optimizer, scheduler = make_training(model)
    trainer_state = {
        "optimizer": optimizer,  # objects with state_dict() are converted on save
        "scheduler": scheduler.state_dict(),
        "sampler": {"epoch": 1, "position": 17, "seed": 3},
        "global_step": 1,
        "epoch": 0,
        "log_history": [{"step": 1, "reward": 0.25, "kl": None}],
    }
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = save_checkpoint(tmp_path, 1, model, tokenizer, trainer_state)
    expected = (random.random(), np.random.rand(), torch.rand(3))

    assert path == tmp_path / "checkpoint-1"
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    meta = json.loads((path / "meta.json").read_text())
    assert meta["model_class"] == "Qwen2ForCausalLM"
    assert meta["fingerprint"]["hidden_size"] == 32 and meta["fingerprint"]["vocab_size"] == VOCAB
    # PreTrainedTokenizerFast, not AutoTokenizer: config.json says qwen2, which would
    # select a Qwen2 tokenizer class that ignores this toy word-level vocabulary.
    assert PreTrainedTokenizerFast.from_pretrained(path)("w1 w2").input_ids == [1, 2]

    # Diverge everything, then restore into fresh objects.
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    fresh = make_model(seed=123)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda step: 1.0 / (1 + step))
    state = load_checkpoint(path, fresh)
    fresh_opt.load_state_dict(state["optimizer"])
    fresh_sched.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])

    assert_same_weights(model, fresh)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # tying survives the load
    assert (random.random(), np.random.rand()) == expected[:2]
    torch.testing.assert_close(torch.rand(3), expected[2])
    assert state["sampler"] == {"epoch": 1, "position": 17, "seed": 3}
    assert state["global_step"] == 1 and state["log_history"] == trainer_state["log_history"]
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()
    for key, value in optimizer.state_dict()["state"][0].items():
        torch.testing.assert_close(fresh_opt.state_dict()["state"][0][key], value)

    # Continuing training from either copy gives identical weights.
    torch.manual_seed(5)
    train_step(model, optimizer, scheduler)
    torch.manual_seed(5)
    train_step(fresh, fresh_opt, fresh_sched)
    assert_same_weights(model, fresh)


def test_untied_model_round_trip_without_tokenizer(tmp_path):
    model = make_model(tie=False)
    path = save_checkpoint(tmp_path, 2, model, None, simple_state(2))
    fresh = make_model(tie=False, seed=9)
    assert load_checkpoint(path, fresh)["global_step"] == 2
    assert_same_weights(model, fresh)


def test_rng_capture_restore_replays_the_same_numbers():
    state = capture_rng_state()
    first = (random.random(), np.random.rand(), np.random.randn(), torch.rand(4))
    torch.rand(100), random.random()
    restore_rng_state(state)
    second = (random.random(), np.random.rand(), np.random.randn(), torch.rand(4))
    assert first[:3] == second[:3]
    torch.testing.assert_close(first[3], second[3])


def test_trainer_state_loads_with_weights_only(tmp_path):
    path = save_checkpoint(tmp_path, 1, make_model(), None, simple_state(1))
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    assert state["global_step"] == 1 and "rng" in state


class _Payload:
    """Unpickling this would run code: what a tampered trainer_state.pt looks like."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ["ATLAS_TEST_PWNED"]),))


def test_a_state_that_needs_unpickling_is_refused_naming_the_file(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("ATLAS_TEST_PWNED", str(marker))
    for extra in ({"order": np.arange(5)}, {"payload": _Payload()}):
        out = tmp_path / f"run{len(extra)}{next(iter(extra))}"
        path = save_checkpoint(out, 1, make_model(), None, simple_state(1) | {"sampler": extra})
        with pytest.raises(ValueError, match=r"Cannot load .*checkpoint-1/trainer_state\.pt.*never unpickles"):
            load_checkpoint(path, make_model())
    assert not marker.exists()


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, tokenizer, monkeypatch):
    model = make_model()
    good = save_checkpoint(tmp_path, 10, model, tokenizer, simple_state(10))
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def exploding_writer(directory, state):
        (directory / "trainer_state.pt").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_write_trainer_state", exploding_writer)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 20, model, tokenizer, simple_state(20))

    assert not (tmp_path / "checkpoint-20").exists()
    assert latest_checkpoint(tmp_path) == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert load_checkpoint(good, make_model())["global_step"] == 10


def test_stale_tmp_folder_is_ignored_and_cleaned_by_next_save(tmp_path):
    model = make_model()
    save_checkpoint(tmp_path, 1, model, None, simple_state(1))
    # What a SIGKILL mid-save leaves behind: a hidden, incomplete folder.
    stale = tmp_path / ".tmp-checkpoint-5"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    # A visible folder without meta.json (e.g. copied by hand) is not trusted either.
    (tmp_path / "checkpoint-9").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    with pytest.raises(ValueError, match="meta.json"):
        load_checkpoint(tmp_path / "checkpoint-9", model)

    save_checkpoint(tmp_path, 2, model, None, simple_state(2))
    assert not stale.exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"


def test_truncated_file_makes_checkpoint_incomplete(tmp_path):
    model = make_model()
    save_checkpoint(tmp_path, 1, model, None, simple_state(1))
    path = save_checkpoint(tmp_path, 2, model, None, simple_state(2))
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    with pytest.raises(ValueError, match="incomplete: model.safetensors"):
        load_checkpoint(path, model)


def test_missing_folder_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "checkpoint-404", make_model())
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_save_total_limit_prunes_oldest_and_keeps_newest(tmp_path):
    model = make_model()
    for step in (5, 10, 15, 20):
        save_checkpoint(tmp_path, step, model, None, simple_state(step), save_total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-15", "checkpoint-20"]
    # A limit below one still never deletes what was just written.
    save_checkpoint(tmp_path, 25, model, None, simple_state(25), save_total_limit=0)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-25"]
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_just_saved_checkpoint_survives_pruning_even_with_a_lower_step(tmp_path):
    model = make_model()
    for step in (10, 20):
        save_checkpoint(tmp_path, step, model, None, simple_state(step))
    save_checkpoint(tmp_path, 5, model, None, simple_state(5), save_total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-20"]


def test_resaving_same_step_replaces_it(tmp_path):
    model = make_model()
    save_checkpoint(tmp_path, 3, model, None, simple_state(3) | {"tag": "first"})
    with torch.no_grad():
        model.model.norm.weight.fill_(2.0)
    path = save_checkpoint(tmp_path, 3, model, None, simple_state(3) | {"tag": "second"})
    fresh = make_model(seed=4)
    assert load_checkpoint(path, fresh)["tag"] == "second"
    assert torch.all(fresh.model.norm.weight == 2.0)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]


def test_interrupted_resave_is_recovered_by_next_save(tmp_path):
    model = make_model()
    path = save_checkpoint(tmp_path, 3, model, None, simple_state(3))
    # Crash between moving the old copy aside and moving the new one in.
    path.rename(tmp_path / ".tmp-old-checkpoint-3")
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 4, model, None, simple_state(4))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]


def test_loading_into_a_different_model_names_the_difference(tmp_path):
    path = save_checkpoint(tmp_path, 1, make_model(hidden_size=32), None, simple_state(1))
    with pytest.raises(ValueError, match=r"different model.*hidden_size: checkpoint=32, model=64"):
        load_checkpoint(path, make_model(hidden_size=64))
    with pytest.raises(ValueError, match="tie_word_embeddings: checkpoint=True, model=False"):
        load_checkpoint(path, make_model(tie=False))


def test_peft_model_round_trips_adapter_weights(tmp_path):
    peft = pytest.importorskip("peft")
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(make_model(), peft.LoraConfig(**lora))
    path = save_checkpoint(tmp_path, 1, model, None, simple_state(1))
    assert (path / "adapter_model.safetensors").is_file()

    fresh = peft.get_peft_model(make_model(), peft.LoraConfig(**lora))  # same base, new adapter init
    load_checkpoint(path, fresh)
    assert_same_weights(model, fresh)

    with pytest.raises(ValueError, match="is_peft: checkpoint=True, model=False"):
        load_checkpoint(path, make_model())
    other_rank = peft.get_peft_model(make_model(), peft.LoraConfig(**(lora | {"r": 8})))
    with pytest.raises(ValueError, match="adapters"):
        load_checkpoint(path, other_rank)
