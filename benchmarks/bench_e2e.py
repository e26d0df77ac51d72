#!/usr/bin/env python
"""End-to-end GRPO steps: atlas-fast against TRL 1.16 (with and without Liger), through each
trainer's own `train()`, on one GPU, in one run.

Models: Qwen2.5-0.5B and -1.5B shapes, random weights, bf16, saved once to a scratch folder so
both trainers load the same checkpoint (TRL builds its reference model from the policy's path).
Tokenizer: word-level, `tok0 ... tokN` over the model's vocabulary (pad is `tok0`, fed to the model
but masked). Every completion has exactly the requested length, so every system does the same
work: the model has no EOS; TRL, which needs one, gets an EOS id outside the model's vocabulary
(never sampled); atlas-fast gets the tokenizer without one (its engine indexes a vocabulary-sized
stop mask with the EOS ids, so an id past the vocabulary cannot be given to it).

Cases
  update   the update phase: fixed completions from a rollout function (random ids, same for
           every system), so a step is reference log-probs + policy forward + loss + backward +
           optimizer step. 8 generations of one prompt (256 tokens) per step, completions of
           1k-8k tokens, beta = 0.04.
  fit      the longest completion that fits at 8 generations: the update step at doubling lengths
           until the first out-of-memory.
  step     the whole GRPO step with generation (issue 7's workload: 0.5B shape, 8 prompts x 8
           generations x 512 tokens, prompts of 30-256 tokens): the atlas-fast system below with
           its default GPU rollout backend against TRL with HF `generate` at its defaults; both
           with beta = 0, micro-batches of 8, one generation batch per optimizer step.
Systems
  atlas-fast       gradient checkpointing (TRL's default) + padding-free micro-batches + fused RMSNorm
                   and SwiGLU (fused_layers; what use_liger_kernel patches in TRL+Liger)
  atlas-fast offload  the above + frozen reference in CPU memory (streamed layer by layer) + AdamW
                   moments in CPU memory (streamed through the GPU for the step): the default's numbers
  atlas-fast lean  the offload system + activation offload and forward passes of at most
                   LEAN_FORWARD_TOKENS tokens: the longest completions
  TRL / TRL+Liger  TRL 1.16 GRPOTrainer at its defaults (gradient checkpointing on), use_liger_kernel
                   off / on

Timing: a callback marks the end of every optimizer step (CUDA-synchronised); a step's time is
the interval since the previous step's end, so it holds everything the trainer does for that step
(generation or the rollout function, scoring, log-probs, update, logging) whatever the order of
its hooks. Peak memory is `torch.cuda.max_memory_allocated` over the same interval (reset at each
step end). Warm-up steps (2 for the update case), then the median of the timed steps.

    source benchmarks/gpu_env.sh && python benchmarks/bench_e2e.py --quick   # ~5 min on an H200
    python benchmarks/bench_e2e.py                                            # everything
    python benchmarks/bench_e2e.py --device cpu                               # harness smoke, tiny shapes

The tables are printed and written into --out (default benchmarks/RESULTS.md on CUDA) between
the markers below, leaving the rest of that file alone.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import datetime as dt
import gc
import importlib.metadata
import itertools
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_kernels import _git_commit  # noqa: E402
import results_md  # noqa: E402  (benchmarks/ is on sys.path)
from shapes import QWEN_05B, QWEN_15B, Shape  # noqa: E402

DEFAULT_OUT = HERE / "RESULTS.md"
G = 8  # generations per prompt, every case
PROMPT_TOKENS = 256  # update and fit cases (benchmarking.md)
BETA = 0.04  # update and fit: the reference model takes part
STEP_PROMPTS, STEP_TOKENS, STEP_PROMPT_LENS = 8, 512, (30, 256)  # issue 7's workload


SHAPES = {
    "0.5b": QWEN_05B,
    "1.5b": QWEN_15B,
    "tiny": Shape("tiny (CPU smoke)", 64, 2, 4, 2, 128, 500),
}

SYSTEMS = ("atlas-fast", "atlas-fast offload", "atlas-fast lean", "TRL", "TRL+Liger")
# lean's max_forward_tokens: whole micro-batches at the update case's 8 x 1280 tokens, one
# sequence per pass once completions pass ~16k (activation memory then stops growing with the batch).
LEAN_FORWARD_TOKENS = 16384
PROFILE = False  # --profile: a kernel table of the first step after the warm-up (that step's time is not a result)
HOST_PROFILE = False  # --host-profile: the host's Python functions in that step instead (cProfile)
_TRACE_COUNT = itertools.count()
LEFTOVER_GIB = 0.25  # memory allocated before a case starts that its row calls out
TRACE_DIR: str | None = None  # --trace DIR: with --profile, host ops too, and a Chrome trace of the step in DIR
OVERRIDES: dict = {}  # --set KEY=VALUE: GRPOConfig fields for every atlas-fast system (A/B runs)
ATLAS_OPTIONS = {
    "atlas-fast": dict(gradient_checkpointing=True, padding_free=True, fused_layers=True),
    "atlas-fast offload": dict(offload_untrained_models=True, optimizer_state_offload=True),
    "atlas-fast lean": dict(offload_untrained_models=True, optimizer_state_offload=True, activation_offload=True,
                            max_forward_tokens=LEAN_FORWARD_TOKENS),
}


@dataclass
class Result:
    case: str
    shape: str
    system: str
    completion: int
    step_s: float | None = None
    peak_gib: float | None = None
    tokens: int | None = None  # completion tokens per step
    error: str | None = None
    notes: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.step_s is not None


# ---------------------------------------------------------------------- model and tokenizer
def save_model(shape: Shape, folder: Path, device: str) -> Path:
    """Random-weight bf16 model + word-level tokenizer, saved where both trainers can load them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = folder / shape.name.replace(" ", "_")
    if (path / "config.json").exists():
        return path
    vocab = {f"tok{i}": i for i in range(shape.vocab)}
    vocab["<eos>"] = shape.vocab  # outside the model's logits: never sampled, so lengths are fixed
    backend = Tokenizer(models.WordLevel(vocab, unk_token="tok1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="tok0", eos_token="<eos>", unk_token="tok1")
    cfg = Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      # room for the fit ladder's top rung (262144 completion tokens after the prompt)
                      num_key_value_heads=shape.kv_heads, max_position_embeddings=524288, rope_theta=1e6,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=0, eos_token_id=None,
                      bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    return path


def load_tok(path: Path, eos: bool = True):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(path))  # as saved (not rebuilt as Qwen2Tokenizer)
    if not eos:
        tok.eos_token = None
    return tok


def prompt_texts(n: int, vocab: int, lens: tuple[int, int], seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lens[0], lens[1] + 1, (n,), generator=g).tolist()
    return [" ".join(f"tok{i}" for i in torch.randint(2, vocab, (k,), generator=g).tolist()) for k in lengths]


def fixed_completions(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n, length), generator=g).tolist()


def reward(completion_ids, **kwargs) -> list[float]:
    """Cheap and varied, so advantages are not all zero: the share of even ids among the first 64."""
    return [sum(t % 2 == 0 for t in ids[:64]) / max(len(ids[:64]), 1) for ids in completion_ids]


# ---------------------------------------------------------------------- measuring inside train()
class StepClock:
    """HF-style callback: time and peak memory between consecutive optimizer-step ends."""

    def __init__(self, device: str, profile_after: int = 0) -> None:
        self.device = device
        # > 0: profile the step after this many step ends, the first after the warm-up (run one step more for it)
        self.profile_after = profile_after
        self.times: list[float] = []
        self.peaks: list[int] = []
        self.lengths: list[float] = []
        self.phases: list[dict[str, float]] = []  # atlas-fast's time/<phase>_s, one dict per logged step
        self._last: float | None = None
        self._ends = 0
        self._profiler = None
        self.profiled: int | None = None

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def start(self) -> None:
        self._sync()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        if self.device == "cuda":
            self.peaks.append(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        self._ends += 1
        if self.profile_after and self._ends == self.profile_after:  # autotuning and compilation are done
            self._profiler = self._new_profiler()
            self._profiler.__enter__()
        elif self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            print(self._profile_table(), flush=True)
            self._profiler = None
            self.profiled = len(self.times) - 1  # slowed by the profiler: not a timing
        self._last = time.perf_counter()  # the profiler's start, stop and table count toward no step

    def on_train_end(self, args, state, control, **kwargs):
        if self._profiler is not None:  # a run that ended on the profiled step: its table all the same
            self._profiler.__exit__(None, None, None)
            print(self._profile_table(), flush=True)
            self._profiler = None

    def _new_profiler(self):
        if HOST_PROFILE:
            import cProfile

            return cProfile.Profile()
        activities = [torch.profiler.ProfilerActivity.CUDA if self.device == "cuda" else torch.profiler.ProfilerActivity.CPU]
        if TRACE_DIR and self.device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CPU)
        return torch.profiler.profile(activities=activities)

    def _profile_table(self) -> str:
        if not HOST_PROFILE:
            table = kernel_table(self._profiler, self.device)
            if TRACE_DIR:
                import gzip

                path = Path(TRACE_DIR) / f"trace-{os.getpid()}-{next(_TRACE_COUNT)}.json"
                self._profiler.export_chrome_trace(str(path))
                with open(path, "rb") as raw, gzip.open(f"{path}.gz", "wb") as packed:
                    packed.write(raw.read())
                path.unlink()
                table += f"\nChrome trace of this step: {path}.gz (benchmarks/trace_gaps.py reads it)"
            return table
        import io
        import pstats

        # Where the host's time goes while the GPU waits for launches: cumulative time per function
        # (callees included), then own time, for the one profiled step.
        out = io.StringIO()
        stats = pstats.Stats(self._profiler, stream=out).strip_dirs()
        stats.sort_stats("cumulative").print_stats(45)
        stats.sort_stats("tottime").print_stats(30)
        return out.getvalue()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        for key in ("completions/mean_length", "completion_length"):
            if key in logs:
                self.lengths.append(float(logs[key]))
        times = {k[len("time/"):-len("_s")]: float(v) for k, v in logs.items() if k.startswith("time/") and k.endswith("_s")}
        if times:
            self.phases.append(times)
        # atlas-fast resets the peak counter at each phase of its step to log memory/<phase>_peak_gib;
        # the step's peak is the largest of those and of what followed the last reset.
        phases = [v for k, v in logs.items() if k.startswith("memory/") and k.endswith("_peak_gib")]
        if phases and self.peaks:
            self.peaks[-1] = max(self.peaks[-1], int(max(phases) * 2**30))

    def __getattr__(self, name):  # every other callback event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def summary(self, warmup: int) -> tuple[float | None, int | None]:
        keep = [i for i in range(warmup, len(self.times)) if i != self.profiled]
        times, peaks = [self.times[i] for i in keep], [self.peaks[i] for i in keep if i < len(self.peaks)]
        return (statistics.median(times) if times else None), (max(peaks) if peaks else None)


def kernel_table(prof, device: str, rows: int = 25) -> str:
    """The profiled step's GPU kernels (on the CPU: ops, by self time) by total time: where a
    trainer's step goes, kernel by kernel."""
    if device == "cuda":
        kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        time_of = lambda e: e.device_time_total  # noqa: E731
    else:
        kernels = list(prof.key_averages())
        time_of = lambda e: e.self_cpu_time_total  # noqa: E731
    kernels.sort(key=time_of, reverse=True)
    total = sum(time_of(e) for e in kernels) / 1e3
    lines = [f"profiled step: {total:.1f} ms of {'GPU kernel' if device == 'cuda' else 'CPU op'} time in "
             f"{sum(e.count for e in kernels)} calls", f"{'ms':>9} {'share':>6} {'calls':>6}  kernel"]
    for e in kernels[:rows]:
        ms = time_of(e) / 1e3
        lines.append(f"{ms:9.2f} {ms / total:6.1%} {e.count:6d}  {e.key[:110]}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- the two trainers
@dataclass
class Workload:
    prompts: list[str]  # one row per prompt (each trainer repeats it G times)
    completion: int
    per_device: int  # completions per micro-batch
    accumulation: int  # micro-batches per optimizer step (= one generation batch)
    beta: float
    fixed: list[list[int]] | None  # None: generate


def run_atlas(path: Path, work: Workload, steps: int, device: str, system: str, scratch: Path,
              profile_after: int = 0) -> StepClock:
    from atlas_fast import GRPOConfig, GRPOTrainer
    from atlas_fast.rollout import BACKENDS

    clock = StepClock(device, profile_after)
    fixed = work.fixed

    def rollout(prompts, trainer):
        return [fixed[i % len(fixed)] for i in range(len(prompts))]

    options = {**ATLAS_OPTIONS["atlas-fast"], **ATLAS_OPTIONS[system], **OVERRIDES}
    # bf16 weights as TRL loads them; `--set 'model_init_kwargs={"dtype": "float32"}'` times the
    # trainer's own default (float32 weights under bf16 autocast)
    init = options.pop("model_init_kwargs", {"dtype": "bfloat16"})
    backend = "engine" if device == "cuda" and "engine" in BACKENDS else "hf"
    config = GRPOConfig(
        output_dir=str(scratch / "atlas"), max_steps=steps, num_generations=G, per_device_train_batch_size=work.per_device,
        gradient_accumulation_steps=work.accumulation, max_completion_length=work.completion,
        max_prompt_length=None, learning_rate=1e-6, beta=work.beta, temperature=1.0, seed=0, disable_tqdm=True,
        report_to="none", rollout_backend=backend, model_init_kwargs=init,
        bf16=device == "cuda", **options,
    )
    trainer = GRPOTrainer(config, model=str(path), tokenizer=load_tok(path, eos=False), train_dataset=[{"prompt": p} for p in work.prompts],
                          reward_funcs=[reward], callbacks=[clock], rollout_func=rollout if fixed is not None else None)
    clock.notes = {"rollout_backend": backend if fixed is None else "fixed"}
    clock.start()
    trainer.train()
    del trainer
    return clock


def run_trl(path: Path, work: Workload, steps: int, device: str, liger: bool, scratch: Path,
            profile_after: int = 0) -> StepClock:
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    clock = StepClock(device, profile_after)
    fixed = work.fixed
    tok = load_tok(path)

    def rollout(prompts, trainer):
        prompt_ids = tok(prompts, add_special_tokens=False)["input_ids"]
        return {"prompt_ids": prompt_ids, "completion_ids": [fixed[i % len(fixed)] for i in range(len(prompts))],
                "logprobs": None}

    config = GRPOConfig(
        output_dir=str(scratch / "trl"), max_steps=steps, num_generations=G, per_device_train_batch_size=work.per_device,
        gradient_accumulation_steps=work.accumulation, max_completion_length=work.completion, learning_rate=1e-6,
        beta=work.beta, temperature=1.0, seed=0, disable_tqdm=True, report_to="none", save_strategy="no",
        logging_steps=1, use_liger_kernel=liger, bf16=device == "cuda", use_cpu=device != "cuda",
        model_init_kwargs={"dtype": "bfloat16"},
    )
    trainer = GRPOTrainer(model=str(path), reward_funcs=[reward], args=config, processing_class=tok,
                          train_dataset=datasets.Dataset.from_dict({"prompt": work.prompts}), callbacks=[clock],
                          rollout_func=rollout if fixed is not None else None)
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # no per-step log dicts on stdout
    clock.start()
    trainer.train()
    del trainer
    return clock


def run_case(case: str, shape: Shape, path: Path, system: str, work: Workload, steps: int, warmup: int,
             device: str) -> Result:
    result = Result(case=case, shape=shape.name, system=system, completion=work.completion,
                    tokens=work.per_device * work.accumulation * work.completion)
    scratch = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    clock = None
    # --profile: the first step after the warm-up runs under the profiler and is left out of the
    # timings, so one more step keeps their count. The fit case (one step, no warm-up) is not profiled.
    profile_after = warmup if (PROFILE or HOST_PROFILE) and case != "fit" else 0
    steps += int(profile_after > 0)
    if device == "cuda":
        # Peaks are absolute: memory that an earlier row left allocated would count as this row's.
        result.notes["leftover_gib"] = torch.cuda.memory_allocated() / 2**30
        if result.notes["leftover_gib"] > LEFTOVER_GIB:
            print(f"  note: {result.notes['leftover_gib']:.2f} GiB still allocated before this case; its peak includes it",
                  flush=True)
    try:
        if system.startswith("atlas"):
            clock = run_atlas(path, work, steps, device, system, scratch=scratch, profile_after=profile_after)
        else:
            clock = run_trl(path, work, steps, device, liger=system.endswith("Liger"), scratch=scratch,
                            profile_after=profile_after)
        result.step_s, peak = clock.summary(warmup)
        result.peak_gib = None if peak is None else peak / 2**30
        result.notes["step_times"] = [round(t, 4) for t in clock.times]
        result.notes["profiled"] = clock.profiled
        if clock.lengths:
            result.notes["mean_length"] = clock.lengths[-1]
        timed = [p for i, p in enumerate(clock.phases) if i >= warmup and i != clock.profiled]
        if timed:  # per timed step on average: phases that not every step runs (generation) count fairly
            names = {k for step in timed for k in step}
            result.notes["phases"] = {k: sum(step.get(k, 0.0) for step in timed) / len(timed) for k in names}
        result.notes.update(getattr(clock, "notes", {}) or {})
    except torch.cuda.OutOfMemoryError:
        result.error = "OOM"
    except Exception as exc:  # a peer that fails is reported, and the run goes on
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        traceback.print_exc()
    finally:
        del clock
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"  {case:6s} {shape.name:14s} C={work.completion:<6d} {system:16s} "
          + (f"{result.step_s:8.3f} s  {fmt(result.peak_gib, '.2f')} GiB" if result.ok else str(result.error)),
          flush=True)
    return result


def update_workload(shape: Shape, completion: int) -> Workload:
    return Workload(prompts=prompt_texts(4, shape.vocab, (PROMPT_TOKENS, PROMPT_TOKENS), seed=1), completion=completion,
                    per_device=G, accumulation=1, beta=BETA,
                    fixed=fixed_completions(G, completion, shape.vocab, seed=2))


def step_workload(shape: Shape, completion: int, prompts: int, prompt_lens: tuple[int, int]) -> Workload:
    return Workload(prompts=prompt_texts(prompts * 3, shape.vocab, prompt_lens, seed=3), completion=completion,
                    per_device=G, accumulation=prompts, beta=0.0, fixed=None)


# ---------------------------------------------------------------------- device-path checks
def check_memory_paths(device: str) -> str:
    """The CUDA halves of atlas_fast.memory (streams, pinned copies, varlen attention) checked against
    the plain path on a small model, before any timing: the CPU tests cannot reach them."""
    import copy

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from atlas_fast.batch import MicroBatch, completion_logits
    from atlas_fast.memory import (OffloadedAdamW, StreamedAdamW, enable_activation_checkpointing, offload_frozen, on_device,
                                   packed_completion_logits, prepare_packing)

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)
    base = Qwen2ForCausalLM(cfg).to(device)
    g = torch.Generator().manual_seed(0)
    B, P, C = 6, 40, 60
    ids = torch.randint(2, 1000, (B, P + C), generator=g)
    mask = torch.ones_like(ids)
    for b in range(B):  # ragged: left-padded prompts, right-padded completions
        mask[b, : int(torch.randint(0, P - 1, (1,), generator=g))] = 0
        mask[b, P + int(torch.randint(1, C, (1,), generator=g)):] = 0
    ids = ids * mask
    mb = MicroBatch(ids.to(device), mask.to(device), ids[:, P:].to(device), mask[:, P:].bool().to(device),
                    torch.randn(B).to(device), None, None, float(mask[:, P:].sum()))

    # k_proj's bias cancels in the softmax: its gradient is rounding noise, left out of every comparison.
    def compared(model):
        return [p for n, p in model.named_parameters() if not n.endswith("k_proj.bias")]

    def loss_grads(model, fn=completion_logits, dtype=None):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext():
            logits = fn(model, mb)
        loss = (logits.float().log_softmax(-1).gather(-1, mb.completion_ids[..., None])[..., 0]
                * mb.completion_mask).sum() / mb.completion_mask.sum()
        loss.backward()
        return loss.detach(), [p.grad.detach().clone() for p in compared(model)]

    def gap(a, b):  # loss difference, and the worst gradient difference relative to that gradient's norm
        (la, ga), (lb, gb) = a, b
        return max([float((la - lb).abs())] + [float((x - y).norm() / (y.norm() + 1e-12)) for x, y in zip(ga, gb)])

    rows = []

    def record(name, diff, limit, note=""):
        rows.append(f"| {name} | {diff:.2e} | {limit:.0e} | {'pass' if diff <= limit else 'FAIL'} | {note} |")

    plain = loss_grads(base)
    m = copy.deepcopy(base)
    enable_activation_checkpointing(m)
    record("checkpointing, fp32", gap(loss_grads(m), plain), 1e-5)
    m = copy.deepcopy(base)
    offloader = enable_activation_checkpointing(m, offload=True)
    record("checkpointing + activation offload, fp32", gap(loss_grads(m), plain), 1e-5,
           f"stashed on {offloader.stream is not None and 'side stream' or 'cpu'}")
    m = copy.deepcopy(base)
    assert prepare_packing(m)
    impl = m.config._attn_implementation
    packed_fp32 = gap(loss_grads(m, packed_completion_logits), plain)
    record(f"padding-free ({impl}), fp32", packed_fp32, 1e-4, "fp32 takes the block-mask path")
    bf16 = copy.deepcopy(base)
    plain_bf16 = loss_grads(bf16, dtype=torch.bfloat16)
    record(f"padding-free ({impl}), bf16 autocast vs padded bf16", gap(loss_grads(m, packed_completion_logits,
           dtype=torch.bfloat16), plain_bf16), 5e-2, "different kernels: bf16 rounding")
    s = copy.deepcopy(base)  # what packed_attention="auto" runs for rows of long sequences
    assert prepare_packing(s, attention="sequences")
    record("padding-free (atlas_sequences), fp32", gap(loss_grads(s, packed_completion_logits), plain), 1e-4,
           "SDPA per sequence")
    record("padding-free (atlas_sequences), bf16 autocast vs padded bf16",
           gap(loss_grads(s, packed_completion_logits, dtype=torch.bfloat16), plain_bf16), 5e-2,
           "different kernels: bf16 rounding")
    frozen = copy.deepcopy(base).eval()
    with torch.no_grad():
        expected = completion_logits(frozen, mb)
    for mode in ("layer", "model"):
        f = copy.deepcopy(frozen)
        off = offload_frozen(f, device, mode=mode)
        with torch.no_grad():
            got = completion_logits(f, mb)
            with on_device(f, torch.device(device)):
                got_visit = completion_logits(f, mb)
        between = off.on_device_tensors()
        record(f"frozen offload ({mode})", float(max((got - expected).abs().max(), (got_visit - expected).abs().max())),
               1e-5, f"{between} tensors on the GPU between forwards, weights pinned: "
               f"{all(p.is_pinned() for p in f.parameters()) if device == 'cuda' else 'n/a'}")
    def optimizer_gap(make, dtype, params):
        """Worst parameter difference after 3 steps of `make(parameters)` against fused AdamW on the device."""
        a, b = copy.deepcopy(base).to(dtype), copy.deepcopy(base).to(dtype)
        opt_a = torch.optim.AdamW(a.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
        opt_b = make(b.parameters())
        worst = 0.0
        for _ in range(3):
            for model, opt in ((a, opt_a), (b, opt_b)):
                loss_grads(model)
                opt.step()
                opt.zero_grad(set_to_none=True)
            worst = max(worst, max(float((x.float() - y.float()).abs().max()) for x, y in zip(params(a), params(b))))
        return worst, opt_b

    worst, opt = optimizer_gap(lambda ps: OffloadedAdamW(ps, lr=1e-3, weight_decay=0.01, chunk_bytes=2**20),
                               torch.float32, compared)
    record("optimizer offload (3 steps, fp32) vs fused AdamW on the GPU", worst, 1e-4,
           f"{len(opt._chunks)} chunks; CPU and GPU AdamW round differently")
    # Every parameter, k_proj's bias included: the same kernel on the same numbers leaves no rounding noise.
    worst, opt = optimizer_gap(lambda ps: StreamedAdamW(ps, lr=1e-3, weight_decay=0.01, chunk_bytes=2**16),
                               torch.bfloat16, lambda m: list(m.parameters()))
    record("optimizer state offload (3 steps, bf16) vs fused AdamW on the GPU", worst, 0.0,
           f"moments pinned: {all(s['exp_avg'].is_pinned() for s in opt.state.values())}; 64 KiB slots")
    head = ["**Device-path checks** (a 4-layer model against the plain path: loss difference and worst "
            "per-parameter gradient difference relative to its norm; frozen offload: logits; optimizer: parameters)", "",
            "| path | difference | limit | result | note |", "|---|---|---|---|---|"]
    return "\n".join(head + rows)


# ---------------------------------------------------------------------- tables
def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def ratio(a: Result, b: Result | None, attr: str) -> str:
    if b is None or not a.ok or not b.ok or not getattr(b, attr):
        return "-"
    return f"{getattr(a, attr) / getattr(b, attr):.2f}x"


def result_table(rows: list[Result], title: str) -> str:
    lines = [f"**{title}**", "", "| shape | completion | system | step time | peak memory | time vs TRL | time vs TRL+Liger "
             "| memory vs TRL | memory vs TRL+Liger |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key = (r.case, r.shape, r.completion)
        trl = next((x for x in rows if (x.case, x.shape, x.completion) == key and x.system == "TRL"), None)
        liger = next((x for x in rows if (x.case, x.shape, x.completion) == key and x.system == "TRL+Liger"), None)
        shown_time = f"{r.step_s:.3f} s" if r.ok else (r.error or "-")
        lines.append(f"| {r.shape} | {r.completion} | {r.system} | {shown_time} | {fmt(r.peak_gib, '.2f')} GiB | "
                     f"{ratio(r, trl, 'step_s') if r.system != 'TRL' else '1.00x'} | "
                     f"{ratio(r, liger, 'step_s') if r.system != 'TRL+Liger' else '1.00x'} | "
                     f"{ratio(r, trl, 'peak_gib') if r.system != 'TRL' else '1.00x'} | "
                     f"{ratio(r, liger, 'peak_gib') if r.system != 'TRL+Liger' else '1.00x'} |")
    held = [r for r in rows if r.notes.get("leftover_gib", 0.0) > LEFTOVER_GIB]
    if held:
        lines += ["", "Allocated before the case started (left by earlier rows, and counted in these rows' peaks): "
                  + "; ".join(f"{r.shape} / {r.completion} / {r.system}: {r.notes['leftover_gib']:.2f} GiB" for r in held)]
    return "\n".join(lines)


def phase_table(rows: list[Result]) -> str:
    """atlas-fast's own split of its step (time/<phase>_s, medians over the timed steps)."""
    timed = [r for r in rows if r.ok and r.notes.get("phases")]
    if not timed:
        return ""
    names = [p for p in ("generation", "reference", "update", "optimizer") if any(p in r.notes["phases"] for r in timed)]
    lines = ["**Where atlas-fast's step goes** (its `time/<phase>_s` metrics, mean per timed step: CUDA events "
             "around each phase on the compute stream; the rest of the step is scoring, batching, clipping, the "
             "learning-rate schedule and logging)", "",
             "| shape | completion | system | " + " | ".join(names) + " | step |",
             "|---|---|---|" + "---|" * (len(names) + 1)]
    for r in timed:
        cells = " | ".join(fmt(r.notes["phases"].get(p), ".3f") + " s" for p in names)
        lines.append(f"| {r.shape} | {r.completion} | {r.system} | {cells} | {r.step_s:.3f} s |")
    return "\n".join(lines)


def step_times_table(rows: list[Result], warmup: int) -> str:
    """Every step's time, warm-up first: how even the steps were that each median comes from."""
    runs = [r for r in rows if r.ok and r.notes.get("step_times")]
    if not runs:
        return ""
    lines = ["**Each step's time** (s; the warm-up before the slash and a step run under the profiler, marked p, "
             "are left out of the median)", "",
             "| shape | completion | system | steps |", "|---|---|---|---|"]
    for r in runs:
        times = r.notes["step_times"]
        marked = [f"{t:.3f}" + ("p" if i == r.notes.get("profiled") else "") for i, t in enumerate(times)]
        cells = " ".join(marked[:warmup]) + " / " + " ".join(marked[warmup:])
        lines.append(f"| {r.shape} | {r.completion} | {r.system} | {cells} |")
    return "\n".join(lines)


def fit_table(rows: list[Result]) -> str:
    lines = ["**Longest completion that fits, 8 generations, update step** (doubling lengths until the first OOM)", "",
             "| shape | system | longest that fits | first that failed | vs TRL | peak memory, step time at each length |",
             "|---|---|---|---|---|---|"]
    fits: dict[tuple[str, str], tuple[int | None, str | None]] = {}
    tried: dict[tuple[str, str], list[str]] = {}
    for r in rows:  # in the order tried: ascending lengths, stopping at the first failure
        fits_at, failed = fits.get((r.shape, r.system), (None, None))
        if r.ok:
            fits_at = r.completion
            tried.setdefault((r.shape, r.system), []).append(
                f"{r.completion}: {fmt(r.peak_gib, '.2f')} GiB, {r.step_s:.1f} s")
        elif failed is None:
            failed = f"{r.completion}" + ("" if r.error == "OOM" else f" ({r.error})")
        fits[(r.shape, r.system)] = (fits_at, failed)
    for (shape, system), (fits_at, failed) in fits.items():
        trl_at, trl_failed = fits.get((shape, "TRL"), (None, None))
        vs = "-"
        if fits_at and trl_at and system != "TRL":
            # A side that never failed may fit longer still: its ratio is a bound, not a measurement.
            bound = ">=" if failed is None and trl_failed is not None else "<=" if failed is not None and trl_failed is None else ""
            vs = "- (neither failed)" if failed is None and trl_failed is None else f"{bound}{fits_at / trl_at:.1f}x"
        lines.append(f"| {shape} | {system} | {fits_at or 'none'} | {failed or '-'} | {vs} | "
                     f"{'; '.join(tried.get((shape, system), [])) or '-'} |")
    return "\n".join(lines)


def step_table(rows: list[Result]) -> str:
    lines = [f"**Whole GRPO step, issue 7's workload** ({STEP_PROMPTS} prompts x {G} generations x {STEP_TOKENS} tokens, "
             f"prompts of {STEP_PROMPT_LENS[0]}-{STEP_PROMPT_LENS[1]} tokens, beta 0)", "",
             "| shape | system | generation | mean completion length | step time | completion tokens/s | peak memory "
             "| speed-up vs TRL |", "|---|---|---|---|---|---|---|---|"]
    trl = {r.shape: r for r in rows if r.system == "TRL"}  # each shape against its own TRL row
    for r in rows:
        base = trl.get(r.shape)
        speed = "-" if not (r.ok and base is not None and base.ok) else f"{base.step_s / r.step_s:.2f}x"
        gen = r.notes.get("rollout_backend", "HF generate") if r.system.startswith("atlas") else "HF generate"
        lines.append(f"| {r.shape} | {r.system} | {gen} | {fmt(r.notes.get('mean_length'), '.0f')} | "
                     f"{f'{r.step_s:.3f} s' if r.ok else r.error} | "
                     f"{fmt(r.tokens / r.step_s if r.ok else None, ',.0f')} | {fmt(r.peak_gib, '.2f')} GiB | {speed} |")
    return "\n".join(lines)


def provenance(device: str, argv: list[str]) -> str:
    """Where and how one run measured: each case's section carries its own, so sections written by
    different runs (a rerun of one case) each say where they come from."""
    if device == "cuda":
        card = torch.cuda.get_device_name()
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        card = f"{card} ({total:.0f} GiB)"
    else:
        card = f"CPU ({platform.processor() or platform.machine()}): harness smoke run, numbers mean nothing"
    versions = []
    for dist in ("torch", "transformers", "trl", "liger-kernel", "accelerate"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} not installed")
    command = "python benchmarks/bench_e2e.py " + shlex.join(argv)
    return (f"{card}, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {_git_commit()}; "
            f"{', '.join(versions)}; `{command}`")


HEADER = ("## End to end: GRPO steps against TRL (`bench_e2e.py`)\n\n"
          "Each trainer's own `train()`; peak = max allocated over a step. Random-weight bf16 models that "
          "cannot stop early (fixed lengths). atlas-fast = gradient checkpointing + padding-free + fused layers; "
          "offload = + frozen reference in CPU memory and AdamW moments in CPU memory, streamed through the GPU "
          "(the default's numbers); lean = offload + activation offload and forward passes of at most "
          f"{LEAN_FORWARD_TOKENS} tokens. TRL at its defaults (gradient checkpointing on). Each case "
          "below is its own section, rewritten only by a run of that case, and says which run produced it.\n")


def write_sections(path: Path, sections: dict[str, str]) -> None:
    for name, body in sections.items():
        results_md.write_section(path, name, body)


# ---------------------------------------------------------------------- main
@dataclass
class Plan:
    mode: str
    shapes: list[str]
    lengths: list[int]
    fit_shapes: list[str]
    fit_systems: tuple[str, ...]
    fit_lengths: list[int]
    step_shapes: list[str]
    steps: int
    warmup: int
    step_tokens: int
    step_prompts: int
    step_prompt_lens: tuple[int, int]
    # The update case's own count. Its steps are short (0.25-3 s), and TRL's are the most uneven: at
    # 1024 completion tokens on an H200 the median of 2 timed steps after 1 warm-up put TRL at 0.53-0.67
    # s per step and the median of 8 at 0.26-0.44 s, while atlas-fast's moved by under 0.04 s.
    update_warmup: int = 2
    update_timed: int = 8


def make_plan(device: str, quick: bool) -> Plan:
    if device != "cuda":  # smoke: the harness end to end at toy sizes
        return Plan("cpu smoke", ["tiny"], [16], ["tiny"], SYSTEMS, [16, 32], ["tiny"], 2, 1, 8, 2, (4, 12), 1, 1)
    if quick:
        return Plan("quick", ["0.5b", "1.5b"], [1024], ["1.5b"], ("atlas-fast lean", "TRL"), [2048, 4096, 8192, 16384],
                    ["0.5b"], 3, 1, STEP_TOKENS, STEP_PROMPTS, STEP_PROMPT_LENS)
    return Plan("full", ["0.5b", "1.5b"], [1024, 2048, 4096, 8192], ["0.5b", "1.5b"], SYSTEMS,
                [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144], ["0.5b", "1.5b"], 4, 1, STEP_TOKENS, STEP_PROMPTS,
                STEP_PROMPT_LENS)


def collect(plan: Plan, cases: set[str], systems: list[str], models: Path, device: str,
            rows: list[Result] | None = None, on_row: Callable[[], None] = lambda: None) -> list[Result]:
    """Run the cases, appending each result to `rows` and calling `on_row` after each."""
    rows = [] if rows is None else rows
    if "update" in cases:
        for key in plan.shapes:
            shape = SHAPES[key]
            path = save_model(shape, models, device)
            for C in plan.lengths:
                for system in systems:
                    rows.append(run_case("update", shape, path, system, update_workload(shape, C),
                                         plan.update_warmup + plan.update_timed, plan.update_warmup, device))
                    on_row()
    if "fit" in cases:
        for key in plan.fit_shapes:
            shape = SHAPES[key]
            path = save_model(shape, models, device)
            for system in [s for s in systems if s in plan.fit_systems]:
                for C in plan.fit_lengths:
                    r = run_case("fit", shape, path, system, update_workload(shape, C), 1, 0, device)
                    rows.append(r)
                    on_row()
                    if not r.ok:
                        break
    if "step" in cases:
        for key in plan.step_shapes:
            shape = SHAPES[key]
            path = save_model(shape, models, device)
            work = step_workload(shape, plan.step_tokens, plan.step_prompts, plan.step_prompt_lens)
            for system in [s for s in systems if s in ("atlas-fast", "TRL")]:
                rows.append(run_case("step", shape, path, system, work, plan.steps, plan.warmup, device))
                on_row()
    return rows


SCOPE_OPTIONS = ("--cases", "--shapes", "--lengths", "--fit-lengths")


def without_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """`argv` less the options `names`, in both spellings (`--name value` and `--name=value`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif not a.startswith(tuple(n + "=" for n in names)):
            out.append(a)
    return out


def liger_scopes(plan: Plan, cases: set[str]) -> list[list[list[str]]]:
    """The arguments of each TRL+Liger child process, in ladders (a fit ladder stops at its first
    failure): one process per update or fit case. With use_liger_kernel, TRL builds the reference
    model in the trainer's __init__ and Liger swaps transformers' Qwen2 norm and MLP classes at the
    start of train(), so in a user's run the reference keeps the stock layers. A second trainer in
    the same process would build its reference from Liger's classes: a faster step than any user's."""
    ladders = []
    if "update" in cases:
        ladders += [[["--cases", "update", "--shapes", key, "--lengths", str(C)]] for key in plan.shapes
                    for C in plan.lengths]
    if "fit" in cases and "TRL+Liger" in plan.fit_systems:
        ladders += [[["--cases", "fit", "--shapes", key, "--fit-lengths", str(C)] for C in plan.fit_lengths]
                    for key in plan.fit_shapes]
    return ladders


def run_isolated(argv: list[str], systems: list[str], models: Path) -> list[Result]:
    """Run some systems in a child process. Liger patches transformers' Qwen2 module functions
    (rotary embedding, norms) process-wide, so anything after it in the same process would run
    Liger's kernels: TRL+Liger gets a process of its own, one per case (see liger_scopes)."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "rows.json"
        cmd = [sys.executable, __file__, *argv, "--systems", ",".join(systems), "--models", str(models),
               "--child-json", str(dump)]
        done = subprocess.run(cmd)
        if done.returncode != 0 or not dump.exists():
            return [Result("update", "-", s, 0, error=f"child process failed (exit {done.returncode})") for s in systems]
        return [Result(**row) for row in json.loads(dump.read_text())]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="~5 min on an H200: update at 1k, fit on 1.5B, the step case")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="markdown file to update (default: benchmarks/RESULTS.md on CUDA)")
    ap.add_argument("--cases", default="check,update,fit,step", help="comma list of check, update, fit, step")
    ap.add_argument("--systems", default=None, help=f"comma list of {', '.join(SYSTEMS)} (default: all; "
                    "on the CPU all but TRL+Liger, whose kernels need a GPU)")
    ap.add_argument("--models", default=None, help="folder for the saved random models (default: a temp folder)")
    ap.add_argument("--fit-lengths", default=None, help="comma list of completion lengths for the fit case "
                    "(default: the plan's doubling ladder)")
    ap.add_argument("--shapes", default=None, help="comma list of model shapes for the update and fit cases "
                    f"({', '.join(SHAPES)}; default: the plan's)")
    ap.add_argument("--lengths", default=None, help="comma list of completion lengths for the update case "
                    "(default: the plan's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a GRPOConfig field for every atlas-fast system, e.g. --set fused_layers=False (A/B runs)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per update and step case (default: the "
                    "plan's)")
    ap.add_argument("--profile", action="store_true", help="print the GPU kernels of the first step after the "
                    "warm-up, by total time (that step is left out of the timings)")
    ap.add_argument("--host-profile", action="store_true", help="as --profile, but the host's Python functions "
                    "(cProfile): where a launch-bound step spends its time")
    ap.add_argument("--trace", default=None, metavar="DIR", help="as --profile, with the host's ops, and write "
                    "a Chrome trace of the step to DIR (benchmarks/trace_gaps.py lists where the GPU waited)")
    ap.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from atlas_fast import GRPOConfig

    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set takes KEY=VALUE, got {item!r}")
        if key not in fields:
            ap.error(f"--set {key}: GRPOConfig has no field {key!r}")
        try:
            OVERRIDES[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):  # a bare word: the string itself (--set offload_mode=layer)
            OVERRIDES[key] = value

    global PROFILE, HOST_PROFILE, TRACE_DIR
    PROFILE, HOST_PROFILE = args.profile, args.host_profile
    if args.trace:
        PROFILE, TRACE_DIR = True, args.trace
        Path(args.trace).mkdir(parents=True, exist_ok=True)
    device = args.device
    plan = make_plan(device, args.quick)
    if args.steps is not None:
        if args.steps < 1:
            ap.error(f"--steps must be >= 1, got {args.steps}")
        plan.steps = plan.warmup + args.steps
        plan.update_timed = args.steps
    if args.fit_lengths:
        plan.fit_lengths = [int(x) for x in args.fit_lengths.split(",")]
    if args.lengths:
        plan.lengths = [int(x) for x in args.lengths.split(",")]
    if args.shapes:
        unknown = [k for k in args.shapes.split(",") if k not in SHAPES]
        if unknown:
            ap.error(f"--shapes: unknown shape(s) {unknown}; known: {', '.join(SHAPES)}")
        plan.shapes = plan.fit_shapes = args.shapes.split(",")
    cases = set(args.cases.split(","))
    default = [s for s in SYSTEMS if device == "cuda" or s != "TRL+Liger"]
    systems = [s for s in SYSTEMS if s in (args.systems.split(",") if args.systems else default)]
    models = Path(args.models) if args.models else Path(tempfile.mkdtemp(prefix="bench_e2e_models_"))
    models.mkdir(parents=True, exist_ok=True)
    if args.child_json:
        rows = collect(plan, cases, systems, models, device)
        Path(args.child_json).write_text(json.dumps([r.__dict__ for r in rows]))
        return 0

    print(f"bench_e2e: {plan.mode} on {device}; models in {models}", flush=True)
    checks = []
    if "check" in cases:
        try:
            checks.append(check_memory_paths(device))
        except Exception as exc:  # reported, and the timings still run
            traceback.print_exc()
            checks.append(f"**Device-path checks** failed: {type(exc).__name__}: {exc}")
        print(checks[-1], flush=True)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    out = args.out if args.out is not None else (None if device != "cuda" else DEFAULT_OUT)
    order = {s: i for i, s in enumerate(SYSTEMS)}
    rows: list[Result] = []

    where = provenance(device, argv)
    stamp = where + "."

    def timed(warmup: int, count: int) -> str:
        return f"{where} ({plan.mode}: {warmup} warm-up step{'s' * (warmup != 1)}, then the median of {count} timed step{'s' * (count != 1)})."

    def body() -> dict[str, str]:
        def of(case):
            return sorted((r for r in rows if r.case == case),
                          key=lambda r: (r.shape, r.completion, order.get(r.system, 9)))

        sections = {"e2e": HEADER}
        if checks:
            sections["e2e_checks"] = stamp + "\n\n" + "\n\n".join(checks)
        if "update" in cases:
            sections["e2e_update"] = timed(plan.update_warmup, plan.update_timed) + "\n\n" + result_table(
                of("update"), "Update phase (reference log-probs, policy forward, loss, backward, optimizer step; "
                f"8 generations of a {PROMPT_TOKENS}-token prompt, fixed completions, beta {BETA})")
            for extra in (phase_table(of("update")), step_times_table(of("update"), plan.update_warmup)):
                if extra:
                    sections["e2e_update"] += "\n\n" + extra
        if "fit" in cases:
            sections["e2e_fit"] = stamp[:-1] + " (one step per length).\n\n" + fit_table(sorted(
                (r for r in rows if r.case == "fit"), key=lambda r: (r.shape, order.get(r.system, 9), r.completion)))
        if "step" in cases:
            sections["e2e_step"] = timed(plan.warmup, plan.steps - plan.warmup) + "\n\n" + step_table(of("step"))
            phases = phase_table(of("step"))
            if phases:
                sections["e2e_step"] += "\n\n" + phases
        return sections

    def publish() -> None:  # after every case: a run cut short by a time limit keeps what it measured
        if out is not None:
            write_sections(out, body())

    isolated = [s for s in systems if s == "TRL+Liger"]
    collect(plan, cases, [s for s in systems if s not in isolated], models, device, rows, publish)
    if isolated:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()  # the child needs the memory this process cached
        parent_argv = without_options(argv, ("--systems", *SCOPE_OPTIONS))
        for scopes in liger_scopes(plan, cases):
            for scope in scopes:  # a ladder (the fit case) stops at its first failure
                got = run_isolated(parent_argv + scope, isolated, models)
                rows += got
                if not all(r.ok for r in got):
                    break
    print("\n" + "\n\n".join(body().values()))
    if out is not None:
        publish()
        print(f"\nwritten to {out}")
    if not args.models:
        shutil.rmtree(models, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
