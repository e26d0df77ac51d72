"""Build the teacher-student demo assets (a tiny student, a tiny teacher, task data), offline.

    python -m atlas_fast.demo.build_teacher [--out DIR]

The task is two-digit addition ("37+45=" -> "<solution>82</solution>"), where the only hard step
for a small model is the carry out of the units column. Two models share the embedded demo's
character tokenizer:

- the student (frozen during teacher training) answers alone like a careless pupil: it drops the
  units carry 65% of the time, so its greedy answer is right only on carry-free problems (~55%).
  Given a hint `carry 0` or `carry 1` in front of the problem it follows the hint faithfully, right
  or wrong; any other guidance leaves it as careless as before. Asked for a probe (`37+45=?`) it
  states its unchecked guess.
- the teacher sees the problem, the student's probe and the tier's instruction
  (`37+45=72|hint>`) and writes one line of guidance. It was warmed up on guidance of varied
  quality: the correct carry hint, a carry hint that forgets the carry (65% of the time when
  there is one), and an unhelpful `add units`. Its greedy guidance is therefore `carry 0` on every
  problem: helpful only where the student needed no help. GRPO has to find that `carry 1` on
  carry problems is what lifts the student. A quarter of its warm-up rates probes
  (`37+45=72|rate>` -> `1`, a right guess -> `5`), the teacher's half of the diagnostic.

Neither model ever writes the sum in its guidance, and the teaching reward scores any guidance
that contains the answer as a leak (see atlas_fast/teaching/reward.py), so the teacher cannot
learn to hand the answer over.

Everything is seeded and the build runs on one thread, so a rebuild on the same torch version
writes bit-identical weights and data (checked: the shipped safetensors hash the same). It costs
about 4 minutes of CPU time (student 96x3, 333k parameters; teacher 64x2, 105k).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from atlas_fast.demo import ASSETS
from atlas_fast.demo.build import (build_tokenizer, extract_answer, format_completion, format_prompt, sft_batches,
                                   supervised_warmup)

SEED = 4321
OUT = ASSETS / "teacher"
N_EVAL = 200
N_TRAIN = 2000
FORGET = 0.65  # the student's (and the warm teacher's) chance of dropping a units carry
USELESS_HINT = "add units"  # guidance that tells the student nothing it can use
USELESS_RATE = 0.15  # share of the warm teacher's guidance that is unhelpful
RATING_RATE = 0.25  # share of the teacher's warm-up spent rating probes (the diagnostic's teacher half)
TIER_TAGS = ("walk", "hint", "check")  # low / medium / high tier instructions of configs/teaching/demo.yaml


# ---------------------------------------------------------------------- the task
def has_carry(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def sum_with_carry(a: int, b: int, carry: int) -> int:
    """a + b computed with the given units carry (the correct sum when carry == has_carry)."""
    return (a // 10 + b // 10 + carry) * 10 + (a % 10 + b % 10) % 10


def careless_sum(a: int, b: int, rng: random.Random) -> int:
    return sum_with_carry(a, b, int(has_carry(a, b) and rng.random() >= FORGET))


def carry_hint(carry: int) -> str:
    return f"carry {carry}"


def student_guided_prompt(guidance: str, problem: str) -> str:
    return f"{guidance}|{problem}"  # configs/teaching/demo.yaml: student_with_guidance


def teacher_prompt(problem: str, probe: str, tier_tag: str) -> str:
    return f"{problem}{probe}|{tier_tag}>"  # configs/teaching/demo.yaml: guidance


def rating_prompt(problem: str, probe: str) -> str:
    return f"{problem}{probe}|rate>"  # configs/teaching/demo.yaml: rating


def warm_teacher_guidance(a: int, b: int, rng: random.Random) -> str:
    if rng.random() < USELESS_RATE:
        return USELESS_HINT
    return carry_hint(int(has_carry(a, b) and rng.random() >= FORGET))


# ---------------------------------------------------------------------- supervised examples
def student_example(a: int, b: int, rng: random.Random) -> tuple[str, str]:
    """(prompt, completion) drawn from the student's four behaviours."""
    problem = format_prompt(a, b)
    kind = rng.random()
    if kind < 0.30:  # alone
        return problem, format_completion(str(careless_sum(a, b, rng)))
    if kind < 0.45:  # probe: the unchecked guess
        return problem + "?", str(careless_sum(a, b, rng))
    if kind < 0.85:  # a carry hint, right or wrong, is followed
        carry = rng.randrange(2)
        return student_guided_prompt(carry_hint(carry), problem), format_completion(str(sum_with_carry(a, b, carry)))
    # any other guidance (the unhelpful hint, or a garbled one) does not help
    junk = USELESS_HINT if rng.random() < 0.5 else "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(rng.randint(1, 10)))
    return student_guided_prompt(junk, problem), format_completion(str(careless_sum(a, b, rng)))


def teacher_example(a: int, b: int, rng: random.Random) -> tuple[str, str]:
    probe = str(careless_sum(a, b, rng))
    if rng.random() < RATING_RATE:  # rate the probe: 5 when the guess is right, 1 when not
        return rating_prompt(format_prompt(a, b), probe), "5" if probe == str(a + b) else "1"
    return teacher_prompt(format_prompt(a, b), probe, rng.choice(TIER_TAGS)), warm_teacher_guidance(a, b, rng)


def build_model(tok, hidden: int, layers: int, seed: int = SEED) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 32, num_key_value_heads=max(1, hidden // 64), max_position_embeddings=128,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@torch.no_grad()
def greedy(model, tok, prompts: list[str], max_new_tokens: int = 12) -> list[str]:
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def sampled(model, tok, prompts: list[str], n: int, max_new_tokens: int = 12) -> list[str]:
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=None, top_p=None, num_return_sequences=n,
                         max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def check_models(student, teacher, tok, pairs) -> dict[str, float]:
    """The properties the demo rests on, measured on held-out problems."""
    problems = [format_prompt(a, b) for a, b in pairs]
    truth = [str(a + b) for a, b in pairs]
    carry = [has_carry(a, b) for a, b in pairs]
    acc = lambda texts: sum(extract_answer(t) == y for t, y in zip(texts, truth)) / len(truth)  # noqa: E731
    right_hint = [student_guided_prompt(carry_hint(int(c)), p) for c, p in zip(carry, problems)]
    probes = greedy(student, tok, [p + "?" for p in problems])
    teach = greedy(teacher, tok, [teacher_prompt(p, g, "hint") for p, g in zip(problems, probes)])
    samples = sampled(teacher, tok, [teacher_prompt(p, g, "hint") for p, g in zip(problems, probes)], n=8)
    ratings = greedy(teacher, tok, [rating_prompt(p, g) for p, g in zip(problems, probes)], max_new_tokens=1)
    right = [s.strip() == carry_hint(int(c)) for s, c in zip(samples, [c for c in carry for _ in range(8)])]
    carry_rows = [r for r, c in zip(right, [c for c in carry for _ in range(8)]) if c]
    return {
        "student_alone": acc(greedy(student, tok, problems)),
        "student_with_right_hint": acc(greedy(student, tok, right_hint)),
        "student_with_wrong_hint": acc(greedy(student, tok, [student_guided_prompt(carry_hint(1 - int(c)), p)
                                                            for c, p in zip(carry, problems)])),
        "student_with_useless_hint": acc(greedy(student, tok, [student_guided_prompt(USELESS_HINT, p) for p in problems])),
        "teacher_greedy_hint_right": sum(t.strip() == carry_hint(int(c)) for t, c in zip(teach, carry)) / len(carry),
        "teacher_sampled_hint_right_on_carry": sum(carry_rows) / max(len(carry_rows), 1),
        "carry_share": sum(carry) / len(carry),
        "teacher_rating_right": sum(r.strip() == ("5" if g.strip() == y else "1")
                                    for r, g, y in zip(ratings, probes, truth)) / len(truth),
    }


def save(model, tok, path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, max_new_tokens=16, do_sample=False)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    settings = json.loads((path / "tokenizer_config.json").read_text())
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"  # readable by transformers 4.x too
    (path / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def write_jsonl(path: Path, pairs) -> None:
    with path.open("w") as f:
        for a, b in pairs:
            f.write(json.dumps({"prompt": format_prompt(a, b), "ground_truth": str(a + b)}) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--student-steps", type=int, default=2500)
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--student-size", type=int, nargs=2, default=(96, 3), metavar=("HIDDEN", "LAYERS"))
    parser.add_argument("--teacher-size", type=int, nargs=2, default=(64, 2), metavar=("HIDDEN", "LAYERS"))
    args = parser.parse_args(argv)

    start = time.time()
    # One thread: the same reduction order on every machine (a deterministic rebuild), and on a
    # shared 2-core machine two threads were 9x slower per step than one.
    torch.set_num_threads(1)
    rng = random.Random(SEED)
    tok = build_tokenizer()
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    evaluation, train, sft = pairs[:N_EVAL], pairs[N_EVAL : N_EVAL + N_TRAIN], pairs[N_EVAL + N_TRAIN :]

    student = build_model(tok, *args.student_size, seed=SEED)
    teacher = build_model(tok, *args.teacher_size, seed=SEED + 1)
    print(f"student {sum(p.numel() for p in student.parameters()):,} parameters, "
          f"teacher {sum(p.numel() for p in teacher.parameters()):,}", flush=True)
    supervised_warmup(student, sft_batches(tok, sft, student_example, args.batch, args.student_steps, rng),
                      args.student_steps, args.lr, log_every=250, name="student sft")
    supervised_warmup(teacher, sft_batches(tok, sft, teacher_example, args.batch, args.teacher_steps, rng),
                      args.teacher_steps, args.lr, log_every=250, name="teacher sft")

    metrics = check_models(student, teacher, tok, evaluation)
    print(json.dumps({k: round(v, 3) for k, v in metrics.items()}, indent=1))
    # The demo shows teaching only if: the student needs help and uses a right hint; the warm
    # teacher's greedy guidance does not already give it; and its samples sometimes do.
    problems = []
    if not metrics["student_alone"] < 0.75:
        problems.append("the student is already good alone")
    if not metrics["student_with_right_hint"] >= 0.9:
        problems.append("the student does not use a right hint")
    if not metrics["teacher_greedy_hint_right"] <= 0.75:
        problems.append("the warm teacher already gives the right hint")
    if not 0.1 <= metrics["teacher_sampled_hint_right_on_carry"] <= 0.6:
        problems.append("the warm teacher's samples rarely (or too often) give the carry")
    if problems:
        raise SystemExit(f"warm-up outside the demo's design: {'; '.join(problems)}: {metrics}")

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    save(student, tok, out / "student")
    save(teacher, tok, out / "teacher")
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", evaluation)
    (out / "build_metrics.json").write_text(json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=1) + "\n")
    print(f"wrote {out} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
