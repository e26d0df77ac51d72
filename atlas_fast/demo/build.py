"""Build the embedded demo assets (tokenizer, tiny model, task data) from scratch, offline.

    python -m atlas_fast.demo.build [--out DIR]

Everything is seeded, so a rebuild on the same torch version gives the same data and, up to
floating-point reduction order, the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import string
import time
from pathlib import Path

# The round-trip check below must exercise the same offline loading path that users hit.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from atlas_fast.demo import ASSETS

SEED = 1234
OPEN_TAG, CLOSE_TAG = "<solution>", "</solution>"
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ANSWER_RE = re.compile(re.escape(OPEN_TAG) + r"(.*?)" + re.escape(CLOSE_TAG))

N_EVAL = 200
N_TRAIN = 2000
TARGET_ACCURACY = (0.15, 0.55)

# The chat template renders messages verbatim (assistant turns closed by EOS) and adds no
# generation prompt, so a conversational prompt tokenizes exactly like the plain-text one.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def format_prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def format_completion(answer: str) -> str:
    return f"{OPEN_TAG}{answer}{CLOSE_TAG}"


def extract_answer(text: str) -> str | None:
    match = ANSWER_RE.search(text)
    return match.group(1).strip() if match else None


def build_tokenizer() -> PreTrainedTokenizerFast:
    # Character-level vocabulary: digits must stay single tokens, otherwise the model would
    # have to learn arithmetic over arbitrary digit chunks. The tags are atomic tokens so a
    # completion is only ~5 tokens long.
    chars = list(string.printable[:95]) + ["\n"]
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, OPEN_TAG, CLOSE_TAG] + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    # Tags are non-special added tokens: matched before pre-tokenization, yet kept by
    # decode(skip_special_tokens=True) so reward functions can see them.
    core.add_tokens([OPEN_TAG, CLOSE_TAG])
    core.add_special_tokens([PAD, BOS, EOS, UNK])

    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=128,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_splits(rng: random.Random) -> dict[str, list[tuple[int, int]]]:
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    return {
        "eval": pairs[:N_EVAL],
        "train": pairs[N_EVAL : N_EVAL + N_TRAIN],
        "sft": pairs[N_EVAL + N_TRAIN :],
    }


def build_model(tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    # Llama rather than Qwen2: transformers 5 rebuilds a qwen2 folder's tokenizer as
    # Qwen2Tokenizer (own normaliser and split regex), which would change the ids.
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,  # head_dim 32: the smallest vLLM's attention backends accept
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config)


def sloppy_sum(a: int, b: int, forget: float, rng: random.Random) -> int:
    """a + b as computed by a teacher who drops each carry with probability `forget`."""
    units = a % 10 + b % 10
    carry = units >= 10 and rng.random() >= forget
    tens = a // 10 + b // 10 + carry
    if tens >= 10 and rng.random() < forget:
        tens -= 10
    return tens * 10 + units % 10


def sft_batches(tok, pairs, make, batch_size, steps, rng):
    """Yield `steps` batches of (input_ids, labels), the loss on completion tokens (+ EOS) only.
    `make(a, b, rng)` -> (prompt, completion) is called on every visit of a pair, so sampled labels
    are re-drawn each time and the model learns their distribution rather than memorising them."""
    order: list[tuple[int, int]] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order = pairs[:]
            rng.shuffle(order)
        batch, order = order[:batch_size], order[batch_size:]
        seqs, labels = [], []
        for a, b in batch:
            prompt, completion = make(a, b, rng)
            p = tok.encode(prompt, add_special_tokens=False)
            c = tok.encode(completion, add_special_tokens=False) + [tok.eos_token_id]
            seqs.append(p + c)
            labels.append([-100] * len(p) + c)
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        lab = torch.full((len(seqs), width), -100)
        for i, (s, l) in enumerate(zip(seqs, labels)):
            ids[i, : len(s)] = torch.tensor(s)
            lab[i, : len(l)] = torch.tensor(l)
        yield ids, lab


def sloppy_example(forget: float):
    """Examples labelled by the sloppy teacher (sloppy_sum): what the demo policy is warmed up on."""
    def make(a: int, b: int, rng: random.Random) -> tuple[str, str]:
        return format_prompt(a, b), format_completion(str(sloppy_sum(a, b, forget, rng)))
    return make


def supervised_warmup(model, batches, steps: int, lr: float, *, log_every: int = 100, name: str = "sft") -> None:
    """Next-token training on `steps` (ids, labels) batches: AdamW, 20 warm-up steps, then a linear
    decay to zero (it lets the model settle on the label frequencies; a noisy late learning rate
    would leave the greedy answer on carry problems to chance). Shared by both demos' builders."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = 20
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm)))
    )
    for step, (ids, lab) in enumerate(batches):
        # Right padding only ever follows the labelled tokens, so no attention mask is needed.
        loss = model(input_ids=ids, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0:
            print(f"  {name} step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    model.eval()


@torch.no_grad()
def evaluate(model, tok, rows: list[dict], batch_size: int = 256) -> dict[str, float]:
    correct = formatted = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = tok([r["prompt"] for r in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, do_sample=False, max_new_tokens=16)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for text, row in zip(texts, chunk):
            answer = extract_answer(text)
            formatted += answer is not None
            correct += answer == row["ground_truth"]
    return {"accuracy": correct / len(rows), "format": formatted / len(rows)}


def to_rows(pairs):
    return [{"prompt": format_prompt(a, b), "ground_truth": str(a + b)} for a, b in pairs]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def check_round_trip(model_dir: Path, tok: PreTrainedTokenizerFast, texts: list[str]) -> None:
    loaded = AutoTokenizer.from_pretrained(model_dir)
    for text in texts:
        want = tok.encode(text, add_special_tokens=False)
        got = loaded.encode(text, add_special_tokens=False)
        assert got == want, f"tokenizer round trip changed ids for {text!r}: {want} -> {got}"
        # With default special-token handling too, since trainers call the tokenizer directly.
        assert loaded(text)["input_ids"] == tok(text)["input_ids"], text
        assert loaded.decode(got) == text, text
    messages = [{"role": "user", "content": texts[0]}]
    rendered = loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == texts[0], rendered
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(loaded, name) == getattr(tok, name), name
    assert len(loaded) == len(tok) and loaded.padding_side == "left"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSETS)
    parser.add_argument("--sft-steps", type=int, default=1500)
    parser.add_argument("--sft-lr", type=float, default=1e-3)
    parser.add_argument("--sft-batch", type=int, default=64)
    parser.add_argument("--forget", type=float, default=0.65, help="teacher's carry-drop probability")
    args = parser.parse_args(argv)

    start = time.time()
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    rng = random.Random(SEED)

    tok = build_tokenizer()
    splits = make_splits(rng)
    assert len(set().union(*splits.values())) == sum(map(len, splits.values())), "splits overlap"
    rows = {name: to_rows(pairs) for name, pairs in splits.items()}
    model = build_model(tok)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, vocab {len(tok)}")

    batches = sft_batches(tok, splits["sft"], sloppy_example(args.forget), args.sft_batch, args.sft_steps, rng)
    supervised_warmup(model, batches, args.sft_steps, args.sft_lr)
    metrics = evaluate(model, tok, rows["eval"])
    print(f"held-out greedy accuracy {metrics['accuracy']:.3f}, tag format {metrics['format']:.3f}")
    # The demo only shows RL working if the warm-up leaves both headroom and reachable answers.
    lo, hi = TARGET_ACCURACY
    if not (lo <= metrics["accuracy"] <= hi and metrics["format"] >= 0.95):
        raise SystemExit(f"warm-up landed outside the target band {TARGET_ACCURACY}: {metrics}")

    out: Path = args.out
    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_new_tokens=16,
        do_sample=False,
    )
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    # transformers 5 writes its own class name, which 4.x (still pinned by some vLLM builds)
    # cannot resolve; the 4.x name maps back to the same backend class in 5.
    tok_config = model_dir / "tokenizer_config.json"
    tok_settings = json.loads(tok_config.read_text())
    tok_settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config.write_text(json.dumps(tok_settings, indent=2) + "\n")
    write_jsonl(out / "train.jsonl", rows["train"])
    write_jsonl(out / "eval.jsonl", rows["eval"])

    sample = [r["prompt"] + format_completion(r["ground_truth"]) for r in rows["eval"][:50]]
    check_round_trip(model_dir, tok, sample + ["Hello, world!\n  x = [1, 2]; y ~ {z}"])
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    assert evaluate(reloaded, tok, rows["eval"]) == metrics, "saved model differs from trained one"
    print(f"wrote {out} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
