"""The embedded demo: its assets load as built, and `atlas-fast train` with no arguments learns."""
import json
import re

import pytest

from atlas_fast import cli, demo
from atlas_fast.modeling import load_tokenizer


def test_assets_load_and_round_trip():
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(demo.MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(demo.MODEL_DIR)
    assert model.config.vocab_size >= len(tok)
    ids = tok("37+45=<solution>82</solution>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "37+45=<solution>82</solution>"
    rows = [json.loads(line) for line in demo.EVAL_FILE.read_text().splitlines()]
    train = {json.loads(line)["prompt"] for line in demo.TRAIN_FILE.read_text().splitlines()}
    assert len(rows) == 200 and not train & {r["prompt"] for r in rows}
    assert all(int(a) + int(b) == int(r["ground_truth"]) for r in rows for a, b in [r["prompt"][:-1].split("+")])


def test_default_command_runs_the_demo_and_accuracy_rises(tmp_path, monkeypatch, capsys):
    # The user's run, exactly: CPU tensors take the PyTorch path, not the Triton interpreter.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert cli.main(["train", f"output_dir={tmp_path}", "trainer.disable_tqdm=true"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.fullmatch(r"held-out accuracy: ([\d.]+)% -> ([\d.]+)%", line)
    assert match, line
    before, after = map(float, match.groups())
    assert after - before >= 15, line
    assert (tmp_path / "metrics.png").exists() and (tmp_path / "final" / "model.safetensors").exists()
