"""Embedded demo: a tiny causal LM and a two-digit addition task, small enough to run GRPO on CPU.

Prompts look like ``"37+45="`` and the expected completion is ``"<solution>82</solution>"``
followed by EOS. Each row of ``train.jsonl``/``eval.jsonl`` holds ``prompt`` and ``ground_truth``
(the answer as a plain string, e.g. ``"82"``). The shipped model was warmed up on answers from
a sloppy teacher that drops each carry 65% of the time: it always uses the tag format and
often samples the right answer, but its greedy answer is mostly right only when no carry is
involved (~1/3 of held-out prompts), so a correctness reward has a lot to fix. Rebuild everything with
``python -m atlas_fast.demo.build``.
"""

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
MODEL_DIR = ASSETS / "model"
TRAIN_FILE = ASSETS / "train.jsonl"
EVAL_FILE = ASSETS / "eval.jsonl"
