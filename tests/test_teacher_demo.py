"""The teacher demo: its shipped models behave as designed, and `atlas-fast train
recipe=teacher_demo` raises the student's guided accuracy by at least 10 points, above its baseline."""
import json
import re

import torch
from transformers import AutoModelForCausalLM

from atlas_fast import cli, demo
from atlas_fast.demo import build_teacher
from atlas_fast.modeling import load_tokenizer
from atlas_fast.rewards import extract_answer

ASSETS = demo.ASSETS / "teacher"


def greedy(model, tok, prompts):
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_shipped_student_uses_a_right_hint_and_needs_one():
    tok = load_tokenizer(ASSETS / "student")
    student = AutoModelForCausalLM.from_pretrained(ASSETS / "student").eval()
    rows = [json.loads(line) for line in (ASSETS / "eval.jsonl").read_text().splitlines()][:60]
    pairs = [tuple(map(int, r["prompt"][:-1].split("+"))) for r in rows]
    hinted = [build_teacher.student_guided_prompt(build_teacher.carry_hint(int(build_teacher.has_carry(a, b))), r["prompt"])
              for (a, b), r in zip(pairs, rows)]
    right = lambda texts: sum(extract_answer(t) == r["ground_truth"] for t, r in zip(texts, rows)) / len(rows)  # noqa: E731
    alone, with_hint = right(greedy(student, tok, [r["prompt"] for r in rows])), right(greedy(student, tok, hinted))
    assert with_hint >= 0.9 and alone <= 0.75 and with_hint - alone >= 0.2, (alone, with_hint)


def test_teacher_demo_raises_guided_accuracy(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the user's run: CPU tensors take the PyTorch path
    assert cli.main(["train", "recipe=teacher_demo", f"output_dir={tmp_path}", "trainer.disable_tqdm=true"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.fullmatch(r"guided accuracy: ([\d.]+)% -> ([\d.]+)% \(baseline ([\d.]+)%\)", line)
    assert match, line
    before, after, baseline = map(float, match.groups())
    assert after - before >= 10 and after > baseline, line
    exchanges = [json.loads(x) for x in (tmp_path / "teaching_exchanges.jsonl").read_text().splitlines()]
    assert exchanges and all(not re.search(rf"\b{e['ground_truth']}\b", e["guidance"]) for e in exchanges)
    assert (tmp_path / "final" / "model.safetensors").exists()
