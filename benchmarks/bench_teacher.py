#!/usr/bin/env python
"""One TeacherGRPOTrainer step, broken down by phase, on one GPU.

Workload (issue 9): a 0.5B-shaped teacher and a 0.5B-shaped student (Qwen2.5-0.5B dimensions,
random bf16 weights, which never emit EOS, so every generation has its full length), 8 problems
x 8 guidances, 256-token guidance and 256-token student answers, 50-token probes. Problems are
~100 tokens; the teacher prompt adds the probe and the tier instruction, the guided student
prompt the guidance.

Phases (CUDA-synchronised wall time, one warm-up step then the median of --steps steps):
    baseline        the student's answers alone            (1 generate call, 8 prompts)
    probe           the student's probes (1 call) + the teacher's rating forward
    guidance        the teacher's guidance                 (1 call, 8 prompts x n=8)
    guided answers  the student with each guidance         (1 call, 64 prompts)
    judges          the reward functions (the teaching reward; with --rim CONFIG also RIMReward)
    update          the optimizer step: policy forward, loss, backward, AdamW
    other           the rest of the step (tokenising, advantages, bookkeeping)

    source benchmarks/gpu_env.sh && python benchmarks/bench_teacher.py          # H200: ~1 min
    python benchmarks/bench_teacher.py --backend engine                          # our decode engine
    python benchmarks/bench_teacher.py --device cpu --quick                      # harness smoke, tiny shapes

The table is printed and written into --out (default benchmarks/RESULTS.md on CUDA) between
`<!-- teacher-BACKEND:start/end -->` markers (one section per backend), leaving the rest alone.
"""
from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_e2e import SHAPES, load_tok, prompt_texts, save_model  # noqa: E402
from bench_kernels import _git_commit  # noqa: E402
import results_md  # noqa: E402  (benchmarks/ is on sys.path)

PHASES = ("baseline", "probe", "guidance", "guided answers", "judges", "update", "other")


class PhaseClock:
    """Accumulates synchronised wall time per phase for the current step."""

    def __init__(self, device: str):
        self.device = device
        self.step: dict[str, float] = defaultdict(float)

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            self.sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.step[phase] += time.perf_counter() - t0

        timed.__name__ = getattr(fn, "__name__", phase)
        return timed


def build_trainer(args, folder: Path, clock: PhaseClock):
    from atlas_fast import GRPOConfig, TeacherGRPOTrainer

    shape = SHAPES[args.shape]
    teacher_path = save_model(shape, folder / "teacher", args.device)
    student_path = save_model(shape, folder / "student", args.device)
    tok = load_tok(teacher_path, eos=False)
    problems = prompt_texts(args.problems * (args.steps + 1), shape.vocab, (args.problem_tokens,) * 2, seed=0)
    rows = [{"prompt": p, "ground_truth": f"tok{i % 7 + 2}"} for i, p in enumerate(problems)]
    config = GRPOConfig(
        output_dir=str(folder / "run"), report_to=(), disable_tqdm=True, max_steps=args.steps + 1,
        num_generations=args.guidances, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.problems * args.guidances // args.micro_batch,
        max_prompt_length=None, max_completion_length=args.guidance_tokens, temperature=1.0, beta=0.0,
        learning_rate=1e-6, rollout_backend=args.backend, gradient_checkpointing=True, shuffle_dataset=False,
        use_cpu=args.device == "cpu", logging_steps=1,
    )
    teaching = {"probe_max_tokens": args.probe_tokens, "student_max_tokens": args.answer_tokens,
                "use_chat_template": False, "guidance_tag": None, "exchanges_per_step": 0}
    funcs = ["teaching"]
    if args.rim:
        from atlas_fast import RIMReward

        funcs.append(RIMReward(args.rim))
    trainer = TeacherGRPOTrainer(config, model=str(teacher_path), tokenizer=tok, train_dataset=rows,
                                 reward_funcs=funcs, student_model=str(student_path),
                                 student_tokenizer=load_tok(student_path, eos=False), teaching_config=teaching)
    # Time the protocol's four calls (and the rating forward) and every reward function.
    trainer.student_baselines = clock.wrap("baseline", trainer.student_baselines)
    trainer.student_probes = clock.wrap("probe", trainer.student_probes)
    trainer.teacher_ratings = clock.wrap("probe", trainer.teacher_ratings)
    trainer.teacher_guidance = clock.wrap("guidance", trainer.teacher_guidance)
    trainer.guided_answers = clock.wrap("guided answers", trainer.guided_answers)
    trainer.reward_funcs = [(name, clock.wrap("judges", fn)) for name, fn in trainer.reward_funcs]
    return trainer


def run(args) -> dict[str, float]:
    clock = PhaseClock(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer(args, Path(scratch), clock)
        steps: list[dict[str, float]] = []
        refill = trainer._refill
        trainer._refill = clock.wrap("_refill", refill)
        step = trainer._optimizer_step

        def timed_step():
            clock.step.clear()
            clock.sync()
            t0 = time.perf_counter()
            out = step()
            clock.sync()
            total = time.perf_counter() - t0
            phases = dict(clock.step)
            generation = phases.pop("_refill", 0.0)
            phases["update"] = total - generation
            phases["other"] = generation - sum(phases.get(p, 0.0) for p in PHASES[:5])
            phases["total"] = total
            steps.append(phases)
            return out

        trainer._optimizer_step = timed_step
        trainer.train()
        tokens = (args.problems * (args.answer_tokens + args.probe_tokens)
                  + args.problems * args.guidances * (args.guidance_tokens + args.answer_tokens))
        timed = steps[1:] or steps
        result = {k: statistics.median(s.get(k, 0.0) for s in timed) for k in (*PHASES, "total")}
        result["generated_tokens"] = float(tokens)
        if args.device == "cuda":
            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return result


def table(args, r: dict[str, float]) -> str:
    total = r["total"]
    lines = ["| phase | time (s) | share |", "|---|---|---|"]
    for p in PHASES:
        lines.append(f"| {p} | {r[p]:.3f} | {100 * r[p] / total:.0f}% |")
    lines.append(f"| **step** | **{total:.3f}** | 100% |")
    return "\n".join(lines)


def header(args) -> str:
    if args.device == "cuda":
        card = f"{torch.cuda.get_device_name()}"
    else:
        card = "CPU: harness smoke run, numbers mean nothing"
    shape = SHAPES[args.shape]
    return (f"## Teacher step by phase ({shape.name} teacher and student, `{args.backend}` rollout backend)\n\n"
            f"{card}, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {_git_commit()}, torch "
            f"{torch.__version__}. `benchmarks/bench_teacher.py{' --quick' if args.quick else ''}"
            f"{' --backend ' + args.backend if args.backend != 'hf' else ''}`: {args.problems} problems x "
            f"{args.guidances} guidances, guidance {args.guidance_tokens} and answers {args.answer_tokens} tokens, "
            f"probes {args.probe_tokens}, problems {args.problem_tokens} tokens; random bf16 weights (fixed "
            f"lengths); gradient checkpointing, micro-batches of {args.micro_batch}; one warm-up step, median of "
            f"{args.steps} steps.\n")


def write_section(path: Path, body: str, backend: str) -> None:
    results_md.write_section(path, f"teacher-{backend}", body)  # one section per rollout backend


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes and lengths (CPU smoke)")
    p.add_argument("--backend", default="hf", help="rollout backend of teacher and student")
    p.add_argument("--shape", default="0.5b", choices=sorted(SHAPES))
    p.add_argument("--problems", type=int, default=8)
    p.add_argument("--guidances", type=int, default=8)
    p.add_argument("--guidance-tokens", type=int, default=256)
    p.add_argument("--answer-tokens", type=int, default=256)
    p.add_argument("--probe-tokens", type=int, default=50)
    p.add_argument("--problem-tokens", type=int, default=100)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    p.add_argument("--rim", default=None, help="a RIMReward config (name or path) to time as a judge")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.shape = "tiny"
        args.guidance_tokens = args.answer_tokens = 16
        args.probe_tokens, args.problem_tokens, args.steps = 8, 12, 1
    result = run(args)
    body = header(args) + "\n" + table(args, result) + "\n"
    if "peak_gib" in result:
        body += f"\nPeak GPU memory {result['peak_gib']:.1f} GiB; {result['generated_tokens']:.0f} tokens generated per step.\n"
    print(body)
    out = args.out or (HERE / "RESULTS.md" if args.device == "cuda" else None)
    if out is not None:
        write_section(out, body, args.backend)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
