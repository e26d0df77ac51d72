"""TeacherGRPOTrainer: GRPO on a teacher whose completions are guidance for a frozen student.

GRPOTrainer's loop is unchanged; only its rollout seam (`_rollout_batch`) is replaced by the
protocol of TeacherTrainer (baseline, probe, guidance x G, guided answers: four batched backend
calls per generation batch). The policy's prompt for each guidance is the teacher prompt it was
sampled from, token for token, so the loss conditions on what the teacher actually saw (ATLAS
computed it on the raw question). Rewards see the problem as `prompts`, the guidance as
`completions`, and the protocol's outputs as columns: baseline_answer, student_answer, probe,
guidance, teacher_prompt, tier, capability and the token counts, which is what `TeachingReward`
and `RIMReward` read.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from atlas_fast.checkpoint import note_run_files
from atlas_fast.rollout import FINISH_STOP, SamplingParams
from atlas_fast.trainer import GRPOTrainer, Rollout

from .config import load_teaching_config
from .protocol import TeacherTrainer, TeachingBatch
from .reward import TeachingReward, answer_leaked, grade_labelled, is_correct, outcome, teacher_metrics

EXCHANGES_FILE = "teaching_exchanges.jsonl"


class TeacherGRPOTrainer(GRPOTrainer, TeacherTrainer):
    """GRPOTrainer's arguments, plus `student_model` (a model or a path), `student_tokenizer` and
    `teaching_config` (a TeachingConfig, a dict, a YAML path or a name in configs/teaching/).
    Reward functions default to `["teaching"]`, the teaching reward with the config's weights;
    the string "teaching" may be listed beside others (e.g. a RIMReward)."""

    # Reward-function columns the rollout adds to the dataset's own, one value per guidance.
    rollout_columns = ("baseline_answer", "student_answer", "probe", "guidance", "teacher_prompt", "tier",
                       "capability", "baseline_tokens", "student_tokens", "guidance_tokens")

    def __init__(self, *args: Any, student_model: Any = None, student_tokenizer: Any = None,
                 teaching_config: Any = None, **kwargs: Any):
        if student_model is None:
            raise ValueError("TeacherGRPOTrainer needs a student_model (a model or a local path / hub id)")
        bound = inspect.signature(GRPOTrainer.__init__).bind(None, *args, **kwargs)
        params = bound.arguments
        config = params.get("config")
        if params.get("rollout_func") is not None or getattr(config, "rollout_func", None) is not None:
            raise ValueError("rollout_func cannot be used with TeacherGRPOTrainer: the teaching protocol is the rollout")
        teaching = load_teaching_config(teaching_config)
        funcs = params.get("reward_funcs")
        funcs = ["teaching"] if funcs is None else (list(funcs) if isinstance(funcs, (list, tuple)) else [funcs])
        params["reward_funcs"] = [TeachingReward(teaching.reward) if f == "teaching" else f for f in funcs]
        super().__init__(*bound.args[1:], **bound.kwargs)
        self.setup_teaching(student_model, student_tokenizer, teaching, offload=self.args.offload_untrained_models,
                            backend=self.args.rollout_backend, trust_remote_code=self.args.trust_remote_code)
        self.last_teaching: TeachingBatch | None = None

    # ------------------------------------------------------------------ the rollout seam
    def _rollout_batch(self, rows: list[dict]) -> Rollout:
        c = self.args
        G = c.num_generations
        sampling = SamplingParams(max_tokens=c.max_completion_length, n=G, temperature=c.temperature, top_p=c.top_p,
                                  top_k=c.top_k, min_p=c.min_p or 0.0, repetition_penalty=c.repetition_penalty)
        batch = self.teach([self.problem_text(r["prompt"]) for r in rows], sampling)
        self.last_teaching = batch

        rep = lambda xs: [x for x in xs for _ in range(G)]  # noqa: E731  one entry per guidance
        columns = {k: rep([r[k] for r in rows]) for k in rows[0] if k != "prompt"}
        columns.update(
            baseline_answer=rep(batch.texts["baseline"]),
            student_answer=batch.texts["guided"],
            probe=rep(batch.texts["probe"]),
            guidance=batch.guidance_text,
            teacher_prompt=rep(self.tokenizer.batch_decode(batch.teacher_prompt_ids)),
            tier=rep([d.tier for d in batch.diagnostics]),
            capability=rep([d.capability_level for d in batch.diagnostics]),
            baseline_tokens=rep([len(x) for x in batch.baseline.completion_ids]),
            student_tokens=[len(x) for x in batch.guided.completion_ids],
            guidance_tokens=[len(x) for x in batch.guidance.completion_ids],
        )
        metrics = self._teaching_metrics(batch, columns)
        if c.output_dir and self.teaching.exchanges_per_step:
            self._write_exchanges(batch, columns)
        return Rollout(
            prompts=rep([r["prompt"] for r in rows]),
            prompt_ids=rep(batch.teacher_prompt_ids),
            completion_ids=batch.guidance.completion_ids,
            finished=[r == FINISH_STOP for r in batch.guidance.finish_reasons],
            columns=columns,
            metrics=metrics,
        )

    def _teaching_metrics(self, batch: TeachingBatch, columns: dict) -> dict[str, float]:
        n = len(batch.diagnostics)
        metrics = {
            "diagnostic/capability_mean": sum(d.capability_level for d in batch.diagnostics) / n,
            "diagnostic/confidence_mean": sum(d.confidence_score for d in batch.diagnostics) / n,
            "diagnostic/probe_tokens_mean": sum(d.probe_tokens for d in batch.diagnostics) / n,
            **{f"diagnostic/tier_{t}": sum(d.tier == t for d in batch.diagnostics) / n for t in ("low", "medium", "high")},
        }
        truths = columns.get("ground_truth")
        rows, base, guided = grade_labelled(truths, columns["baseline_answer"], columns["student_answer"])
        if not rows:
            return metrics
        pick = lambda name: [columns[name][k] for k in rows]  # noqa: E731
        labelled = [truths[k] for k in rows]
        metrics.update(teacher_metrics(base, guided, pick("guidance_tokens"), pick("baseline_tokens"),
                                       pick("student_tokens")))
        metrics["leak_rate"] = sum(answer_leaked(g, y) for g, y in zip(pick("guidance"), labelled)) / len(rows)
        return metrics

    def _write_exchanges(self, batch: TeachingBatch, columns: dict) -> None:
        """The first guidance of the first few problems: what the teacher saw, wrote and achieved."""
        G = batch.group_size
        path = Path(self.args.output_dir) / EXCHANGES_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        note_run_files(self.args.output_dir, [EXCHANGES_FILE])
        truths = columns.get("ground_truth")
        with path.open("a") as f:
            for p in range(min(self.teaching.exchanges_per_step, len(batch.problems))):
                i = p * G
                d = batch.diagnostics[p]
                record = {
                    "step": self.state.global_step + 1,  # the step that trains on it, as in metrics.jsonl
                    "problem": batch.problems[p], "probe": d.probe,
                    "capability": d.capability_level, "confidence": d.confidence_score, "tier": d.tier,
                    "gaps": d.identified_gaps, "teacher_prompt": columns["teacher_prompt"][i],
                    "guidance": columns["guidance"][i], "baseline_answer": columns["baseline_answer"][i],
                    "student_answer": columns["student_answer"][i],
                }
                if truths is not None:
                    ok_base, ok_guided = is_correct(record["baseline_answer"], truths[i]), is_correct(record["student_answer"], truths[i])
                    record.update(ground_truth=truths[i], outcome=outcome(ok_base, ok_guided))
                f.write(json.dumps(record, default=str) + "\n")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, eval_dataset: Any = None) -> dict:
        """The greedy protocol on held-out problems: eval/student_accuracy (with guidance),
        eval/baseline_accuracy (alone), and the other teacher metrics."""
        c = self.args
        rows = self._eval_rows(eval_dataset)
        if "ground_truth" not in rows[0]:
            raise ValueError("evaluating the teacher needs a ground_truth column to score the student's answers")
        found, _ = self.evaluate_teaching([r["prompt"] for r in rows], [r["ground_truth"] for r in rows],
                                          c.max_completion_length, c.per_device_eval_batch_size)
        return self._report_eval({f"eval/{k}": v for k, v in found.items()})
