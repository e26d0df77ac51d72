"""TeacherTrainer: the teacher-student protocol as a mixin any trainer can reuse.

Per problem, two passes through a frozen student around one teacher step:

    1. baseline   the student answers alone                                  (student, greedy)
    2. probe      the student sketches its approach; the teacher rates it    (student, greedy, log-probs)
                  -> DiagnosticResult -> tier (low / medium / high)           (teacher forward, no sampling)
    3. guidance   the teacher writes guidance G times from a prompt holding   (teacher, sampled, n = G)
                  the problem, the probe and the tier's instruction
    4. guided     the student answers again with each guidance               (student, greedy)

Each numbered step is ONE call to a rollout backend for the whole generation batch (never one
per problem): the student's backend for 1, 2 and 4, the host trainer's `self.rollout` (the
policy) for 3. The teacher's rating in step 2 is a forward pass over all rating prompts at once.

The host provides `self.model` (the teacher), `self.tokenizer`, `self.rollout` and `self.device`;
`setup_teaching` adds the student. With `offload` the student lives on the CPU and visits the
compute device for steps 1-2 and for step 4 only.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from atlas_fast.data import is_conversational
from atlas_fast.memory import module_device, on_device
from atlas_fast.modeling import load_causal_lm, load_tokenizer
from atlas_fast.rollout import RolloutOutput, SamplingParams, build_backend, left_pad, resolve_backend

from .config import TeachingConfig, load_teaching_config
from .diagnostic import DiagnosticResult, assess_probe, capability_tier
from .reward import grade_labelled, teacher_metrics

GUIDANCE_MIN_TOKENS = 10  # the seed's floor for generate_guidance's max_tokens
RESIDENT_BACKENDS = ("engine", "vllm")  # in-process backends that hold the model's weights on the GPU


@dataclass
class TeachingBatch:
    """One generation batch of the protocol: P problems, G guidances each (rows p*G .. p*G+G-1)."""

    problems: list[str]  # [P]
    baseline: RolloutOutput  # [P] the student alone
    probe: RolloutOutput  # [P] the student's approach, with its log-probs
    diagnostics: list[DiagnosticResult]  # [P]
    teacher_prompt_ids: list[list[int]]  # [P] the exact ids each problem's guidance was sampled from
    guidance: RolloutOutput  # [P*G] the teacher's completions
    guidance_text: list[str]  # [P*G] the guidance the student read
    guided: RolloutOutput  # [P*G] the student with each guidance
    texts: dict[str, list[str]] = field(default_factory=dict)  # decoded baseline / probe / guided answers

    @property
    def group_size(self) -> int:
        return len(self.guidance.completion_ids) // max(len(self.problems), 1)


class TeacherTrainer:
    """Student management, diagnostic probe, guidance, templates: the protocol without a loop."""

    teaching: TeachingConfig
    student: torch.nn.Module
    student_tokenizer: Any
    student_rollout: Any

    # ------------------------------------------------------------------ set-up
    def setup_teaching(self, student_model: torch.nn.Module | str | Path, student_tokenizer: Any = None,
                       teaching_config: Any = None, *, offload: bool = False, backend: str = "hf",
                       trust_remote_code: bool = False) -> None:
        if student_model is None:
            raise ValueError("the teacher-student protocol needs a student_model (a model or a local path / hub id)")
        self.teaching = load_teaching_config(teaching_config)
        if isinstance(student_model, (str, Path)):
            source = student_model
            student_model = load_causal_lm(student_model, trust_remote_code, dtype="auto")  # frozen: as saved (often bf16)
        else:
            source = getattr(getattr(student_model, "config", None), "_name_or_path", None)
        if student_tokenizer is None:
            if not source:
                raise ValueError("pass student_tokenizer: it cannot be inferred from a student built in memory")
            student_tokenizer = load_tokenizer(source, trust_remote_code)
        if student_tokenizer.pad_token_id is None:
            student_tokenizer.pad_token = student_tokenizer.eos_token
        # Frozen for good: eval mode (no dropout) and no parameter ever asks for a gradient.
        student_model.eval().requires_grad_(False)
        self.student = student_model
        self.student_tokenizer = student_tokenizer
        self.student_offload = offload
        self.student.to(torch.device("cpu") if offload else self.device)
        name = resolve_backend(self.teaching.student_backend or backend, self.student)
        if offload and name in RESIDENT_BACKENDS:
            # These keep the weights (CUDA graphs, a colocated engine) on the GPU: moving the
            # student away between uses would leave them pointing at freed memory.
            if self.teaching.student_backend:
                raise ValueError(f"teaching.student_backend={name} keeps the student on the GPU; it cannot be "
                                 "combined with offload_untrained_models (use hf, or vllm_server)")
            name = "hf"
        if name == "vllm_server" and not self.teaching.student_backend_options.get("base_url"):
            # The client's default address is the teacher's own server: the "frozen student" would
            # be the policy being trained.
            raise ValueError("teaching: a vllm_server student needs its own server, "
                             "teaching.student_backend_options.base_url (the default is the teacher's)")
        self.student_rollout = build_backend(name, self.student, student_tokenizer, **self.teaching.student_backend_options)
        digits = [first_token_id(self.tokenizer, d) for d in self.teaching.rating_digits]
        if len(set(digits)) != len(digits):
            # e.g. SentencePiece vocabularies that encode "1" as ["▁", "1"]: every rating would read the same
            raise ValueError(f"teaching.rating_digits {list(self.teaching.rating_digits)} start with the token ids "
                             f"{digits} in the teacher's tokenizer, which must differ: give digits that are one "
                             "token each")
        self._rating_ids = torch.tensor(digits, dtype=torch.long)

    @contextlib.contextmanager
    def student_on_device(self) -> Iterator[torch.nn.Module]:
        """The student on the compute device for a block; back on the CPU after it when offloading."""
        if not self.student_offload:
            yield self.student
            return
        with on_device(self.student, self.device) as model:
            yield model

    # ------------------------------------------------------------------ prompts
    def problem_text(self, prompt: Any) -> str:
        """The problem as text: a string prompt, or the last user message of a conversation."""
        if isinstance(prompt, str):
            return prompt
        if is_conversational(prompt):
            users = [m["content"] for m in prompt if m["role"] == "user"]
            return str(users[-1] if users else prompt[-1]["content"])
        raise TypeError(f"a problem must be a string or chat messages, got {type(prompt).__name__}")

    def encode_prompt(self, text: str, tokenizer: Any) -> list[int]:
        """Token ids of a rendered template, as a user turn when the tokenizer has a chat template
        (the teacher's with the trainer's chat_template_kwargs, as plain GRPO prompts get them)."""
        if self.teaching.use_chat_template and getattr(tokenizer, "chat_template", None):
            options = (self.args.chat_template_kwargs or {}) if tokenizer is self.tokenizer else {}
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True, **options)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def teacher_prompt_ids(self, problems: Sequence[str], diagnostics: Sequence[DiagnosticResult]) -> list[list[int]]:
        t = self.teaching.templates
        out = []
        for problem, d in zip(problems, diagnostics):
            tier = capability_tier(d.capability_level)
            text = t.render("guidance", problem=problem, probe=d.probe, tier=tier, tier_instruction=t.tiers[tier],
                            capability=f"{d.capability_level:.2f}")
            ids = self.encode_prompt(text, self.tokenizer)
            limit = getattr(getattr(self, "args", None), "max_prompt_length", None)
            # Cut before sampling, so the ids the loss conditions on are the ids sampled from.
            out.append(ids[-limit:] if limit else ids)
        return out

    def extract_guidance(self, text: str) -> str:
        tag = self.teaching.guidance_tag
        if tag:
            name = re.escape(tag)  # a tag is text, not a pattern: "hint(s)" means those characters
            closed = re.findall(rf"<{name}>(.*?)</{name}>", text, flags=re.DOTALL)
            if closed:
                return closed[-1].strip()
            start = text.rfind(f"<{tag}>")
            if start >= 0:  # truncated before the closing tag: keep what was written
                return text[start + len(tag) + 2 :].strip()
        return text.strip()

    # ------------------------------------------------------------------ the four batched steps
    def _student_generate(self, texts: Sequence[str], sampling: SamplingParams, what: str) -> RolloutOutput:
        ids = [self.encode_prompt(t, self.student_tokenizer) for t in texts]
        return _generate(self.student_rollout, ids, sampling, f"student model failed to generate {what}")

    def _student_sampling(self, max_tokens: int | None = None, logprobs: bool = False) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens or self.teaching.student_max_tokens,
                              temperature=self.teaching.student_temperature, logprobs=logprobs)

    def student_baselines(self, problems: Sequence[str]) -> RolloutOutput:
        texts = [self.teaching.templates.render("baseline", problem=p) for p in problems]
        return self._student_generate(texts, self._student_sampling(), "baseline answers")

    def student_probes(self, problems: Sequence[str], max_tokens: int | None = None) -> RolloutOutput:
        texts = [self.teaching.templates.render("probe", problem=p) for p in problems]
        greedy = SamplingParams(max_tokens=max_tokens or self.teaching.probe_max_tokens, temperature=0.0, logprobs=True)
        return self._student_generate(texts, greedy, "the diagnostic probe")

    @torch.no_grad()
    def teacher_ratings(self, problems: Sequence[str], probes: Sequence[str]) -> list[list[float]]:
        """The teacher's next-token probabilities of the five rating digits after each rating
        prompt: one forward pass over the batch (what a one-token greedy reply would read)."""
        ids = [self.encode_prompt(self.teaching.templates.render("rating", problem=p, probe=g), self.tokenizer)
               for p, g in zip(problems, probes)]
        device = module_device(self.model)
        input_ids, mask = left_pad(ids, self.tokenizer.pad_token_id, device)
        was_training = self.model.training
        self.model.eval()
        try:
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                logits_to_keep=1, use_cache=False).logits[:, -1].float()  # [P, V]
        except Exception as err:
            raise RuntimeError(f"teacher model failed to rate the probe: {err}") from err
        finally:
            self.model.train(was_training)
        probs = logits.softmax(-1)[:, self._rating_ids.to(device)]  # [P, 5]
        return probs.tolist()  # host sync: the tiers decide the next prompt

    def diagnose(self, problems: Sequence[str], probe: RolloutOutput) -> list[DiagnosticResult]:
        from atlas_fast.rollout import FINISH_STOP

        texts = self.student_tokenizer.batch_decode(probe.completion_ids, skip_special_tokens=True)
        ratings = self.teacher_ratings(problems, texts)
        logps = probe.logprobs or [[] for _ in texts]
        return [assess_probe(lp, reason == FINISH_STOP, r, t.strip(), student_weight=self.teaching.student_weight)
                for lp, reason, r, t in zip(logps, probe.finish_reasons, ratings, texts)]

    def teacher_guidance(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> RolloutOutput:
        return _generate(self.rollout, prompt_ids, sampling, "teacher model failed to generate guidance")

    def guided_answers(self, problems: Sequence[str], guidance: Sequence[str]) -> RolloutOutput:
        """`guidance` holds G entries per problem, grouped; one student answer for each."""
        G = len(guidance) // max(len(problems), 1)
        texts = [self.teaching.templates.render("student_with_guidance", problem=problems[i // G], guidance=g)
                 for i, g in enumerate(guidance)]
        return self._student_generate(texts, self._student_sampling(), "answers with guidance")

    def teach(self, problems: Sequence[str], guidance_sampling: SamplingParams) -> TeachingBatch:
        """The whole protocol for a batch: four backend calls, whatever the number of problems."""
        problems = list(problems)
        with self.student_on_device():
            baseline = self.student_baselines(problems)
            probe = self.student_probes(problems)
        diagnostics = self.diagnose(problems, probe)
        prompt_ids = self.teacher_prompt_ids(problems, diagnostics)
        guidance = self.teacher_guidance(prompt_ids, guidance_sampling)
        raw = self.tokenizer.batch_decode(guidance.completion_ids, skip_special_tokens=True)
        guidance_text = [self.extract_guidance(t) for t in raw]
        with self.student_on_device():
            guided = self.guided_answers(problems, guidance_text)
        decode = lambda out: self.student_tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)  # noqa: E731
        return TeachingBatch(problems, baseline, probe, diagnostics, prompt_ids, guidance, guidance_text, guided,
                             texts={"baseline": decode(baseline), "probe": [d.probe for d in diagnostics],
                                    "guided": decode(guided), "guidance_raw": raw})

    @torch.no_grad()
    def evaluate_teaching(self, prompts: Sequence[Any], ground_truth: Sequence[Any], max_tokens: int,
                          batch_size: int | None = None) -> tuple[dict[str, float], TeachingBatch | None]:
        """Teacher metrics of the greedy protocol (one guidance per problem) on held-out problems:
        student_accuracy is the student's accuracy with the teacher's guidance, baseline_accuracy
        its accuracy alone. Also returns the last chunk's TeachingBatch for inspection."""
        problems = [self.problem_text(p) for p in prompts]
        greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        step = batch_size or len(problems) or 1
        base_ok: list[bool] = []
        guided_ok: list[bool] = []
        lengths: dict[str, list[int]] = {"guidance": [], "baseline": [], "student": []}
        batch = None
        for i in range(0, len(problems), step):
            batch = self.teach(problems[i : i + step], greedy)
            rows, base, guided = grade_labelled(ground_truth[i : i + step], batch.texts["baseline"], batch.texts["guided"])
            base_ok += base
            guided_ok += guided
            lengths["guidance"] += [len(batch.guidance.completion_ids[k]) for k in rows]
            lengths["baseline"] += [len(batch.baseline.completion_ids[k]) for k in rows]
            lengths["student"] += [len(batch.guided.completion_ids[k]) for k in rows]
        metrics = teacher_metrics(base_ok, guided_ok, lengths["guidance"], lengths["baseline"], lengths["student"])
        return metrics, batch

    # ------------------------------------------------------------------ the seed's single-task API
    def diagnostic_probe(self, task: str, max_tokens: int = 50) -> DiagnosticResult:
        """Probe the student's understanding of `task` (see diagnostic.py for the estimate).

        Raises ValueError for an empty task or max_tokens < 1, TypeError for a task that is not a
        string, RuntimeError when the student (or the teacher rating it) fails to generate."""
        _check_task(task)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        with self.student_on_device():
            probe = self.student_probes([task], max_tokens)
        return self.diagnose([task], probe)[0]

    def generate_guidance(self, task: str, diagnostic: DiagnosticResult, max_tokens: int = 200) -> str:
        """Teaching guidance for `task`, shaped by the diagnostic's tier (greedy).

        Raises ValueError for an empty task, max_tokens < 10 or a None diagnostic, TypeError for a
        task that is not a string (or a diagnostic that is not a DiagnosticResult), RuntimeError
        when the teacher fails to generate (an error, or no guidance text at all)."""
        _check_task(task)
        if diagnostic is None:
            raise ValueError("diagnostic is None: run diagnostic_probe(task) first")
        if not isinstance(diagnostic, DiagnosticResult):
            raise TypeError(f"diagnostic must be a DiagnosticResult, got {type(diagnostic).__name__}")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < GUIDANCE_MIN_TOKENS:
            raise ValueError(f"max_tokens must be an integer >= {GUIDANCE_MIN_TOKENS}, got {max_tokens!r}")
        ids = self.teacher_prompt_ids([task], [diagnostic])
        out = self.teacher_guidance(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        text = self.extract_guidance(self.tokenizer.decode(out.completion_ids[0], skip_special_tokens=True))
        if not text:
            raise RuntimeError("teacher model failed to generate guidance: the reply held no guidance text")
        return text


# ---------------------------------------------------------------------- plain functions
def _check_task(task: Any) -> None:
    if not isinstance(task, str):
        raise TypeError(f"task must be a string, got {type(task).__name__}")
    if not task.strip():
        raise ValueError("task is empty")


def _generate(backend: Any, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams, failure: str) -> RolloutOutput:
    try:
        out = backend.generate(prompt_ids, sampling)
    except Exception as err:
        raise RuntimeError(f"{failure}: {type(err).__name__}: {err}") from err
    if len(out.completion_ids) != len(prompt_ids) * sampling.n:
        raise RuntimeError(f"{failure}: {len(out.completion_ids)} completions for {len(prompt_ids)} prompts x {sampling.n}")
    return out


def first_token_id(tokenizer: Any, text: str) -> int:
    """The token id a one-token reply `text` starts with."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"teaching.rating_digits: {text!r} encodes to no token")
    return int(ids[0])

