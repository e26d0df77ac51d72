"""TeacherGRPOTrainer on tiny models: the seed's API and errors, the protocol end to end, four
batched generate calls per generation batch, the loss on the exact teacher prompt, a frozen
(and optionally offloaded) student."""
import contextlib
import json

import pytest
import torch
from tokenizers import decoders

from atlas_fast import DiagnosticResult, GRPOConfig, TeacherGRPOTrainer, TeacherTrainer
from atlas_fast.teaching import protocol
from tiny import arithmetic_rows, char_tokenizer, tiny_model

# Short prompts in the tiny tokenizer's alphabet keep every generation a few tokens long.
TEACHING = {
    "templates": {"baseline": "{problem}", "probe": "{problem}?", "rating": "{problem}{probe}r",
                  "guidance": "{problem}{probe}:{tier_instruction}>", "student_with_guidance": "{guidance}:{problem}",
                  "tiers": {"low": "a", "medium": "b", "high": "c"}},
    "use_chat_template": False, "probe_max_tokens": 4, "student_max_tokens": 4, "guidance_tag": None,
    "exchanges_per_step": 2,
}


class Spy:
    """A rollout backend wrapper that records every generate call."""

    def __init__(self, inner, name, log):
        self.inner, self.name, self.log = inner, name, log

    def generate(self, prompt_ids, sampling):
        self.log.append({"who": self.name, "prompts": [list(p) for p in prompt_ids], "n": sampling.n})
        return self.inner.generate(prompt_ids, sampling)

    def update_weights(self, model):
        self.inner.update_weights(model)

    def close(self):
        self.inner.close()


def char_tok():
    tok = char_tokenizer()
    tok.backend_tokenizer.decoder = decoders.Fuse()  # decode "2+3=" as written, not "2 + 3 ="
    return tok


def first_token(prompts, completions, completion_ids, **_):
    return [float(ids[0]) for ids in completion_ids]  # random students are never right: give GRPO a signal


def make_trainer(tmp_path, reward_funcs=None, **overrides):
    tok = char_tok()
    args = dict(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8, max_steps=2,
                max_completion_length=5, max_prompt_length=None, report_to=(), disable_tqdm=True,
                learning_rate=1e-2, seed=3)
    args.update(overrides)
    return TeacherGRPOTrainer(GRPOConfig(**args), model=tiny_model(tok, seed=0), tokenizer=tok,
                              train_dataset=arithmetic_rows(16), eval_dataset=arithmetic_rows(4, seed=1),
                              reward_funcs=reward_funcs, student_model=tiny_model(tok, seed=1), student_tokenizer=tok, teaching_config=TEACHING)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return make_trainer(tmp_path_factory.mktemp("teacher"))


def test_classes_and_exports(trainer):
    assert isinstance(trainer, TeacherTrainer)
    assert TeacherGRPOTrainer.__mro__[1].__name__ == "GRPOTrainer"


# ---------------------------------------------------------------------- the seed's single-task API
def test_diagnostic_probe_contract_and_determinism(trainer):
    d = trainer.diagnostic_probe("2+3=", max_tokens=3)
    assert isinstance(d, DiagnosticResult)
    assert 0 <= d.capability_level <= 1 and 0 <= d.confidence_score <= 1
    assert isinstance(d.identified_gaps, list) and all(isinstance(g, str) for g in d.identified_gaps)
    assert set(d.response_quality) >= {"mean_token_prob", "teacher_rating", "rating_prob_mass"}
    assert 1 <= d.probe_tokens <= 3
    assert trainer.diagnostic_probe("2+3=", max_tokens=3) == d  # greedy probe, forward rating: deterministic


def test_generate_guidance_follows_the_tier(trainer):
    d = trainer.diagnostic_probe("2+3=", max_tokens=3)
    seen = []
    real = trainer.rollout
    trainer.rollout = Spy(real, "teacher", seen)
    try:
        for level, tag in ((0.1, "a"), (0.5, "b"), (0.9, "c")):
            diag = DiagnosticResult(capability_level=level, confidence_score=1.0, probe="5")
            text = trainer.generate_guidance("2+3=", diag, max_tokens=10)
            assert isinstance(text, str) and text
            assert trainer.tokenizer.decode(seen[-1]["prompts"][0]) == f"2+3=5:{tag}>"
    finally:
        trainer.rollout = real
    assert isinstance(trainer.generate_guidance("2+3=", d, max_tokens=10), str)


@pytest.mark.parametrize("call, error, match", [
    (lambda t: t.diagnostic_probe(""), ValueError, "empty"),
    (lambda t: t.diagnostic_probe("   "), ValueError, "empty"),
    (lambda t: t.diagnostic_probe("1+1=", max_tokens=0), ValueError, "max_tokens"),
    (lambda t: t.diagnostic_probe(12), TypeError, "string"),
    (lambda t: t.diagnostic_probe(None), TypeError, "string"),
    (lambda t: t.generate_guidance("1+1=", None), ValueError, "diagnostic"),
    (lambda t: t.generate_guidance("1+1=", DiagnosticResult(0.5, 0.5), max_tokens=9), ValueError, "max_tokens"),
    (lambda t: t.generate_guidance("", DiagnosticResult(0.5, 0.5)), ValueError, "empty"),
    (lambda t: t.generate_guidance(["1+1="], DiagnosticResult(0.5, 0.5)), TypeError, "string"),
    (lambda t: t.generate_guidance("1+1=", {"capability_level": 0.5}), TypeError, "DiagnosticResult"),
])
def test_documented_errors(trainer, call, error, match):
    with pytest.raises(error, match=match):
        call(trainer)


class Broken:
    def generate(self, prompt_ids, sampling):
        raise torch.cuda.OutOfMemoryError("no memory left")


def test_model_failures_raise_runtime_error_with_the_cause(trainer):
    real_student, real_teacher = trainer.student_rollout, trainer.rollout
    try:
        trainer.student_rollout = Broken()
        with pytest.raises(RuntimeError, match="student model failed") as info:
            trainer.diagnostic_probe("1+1=")
        assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)
        trainer.student_rollout = real_student
        trainer.rollout = Broken()
        with pytest.raises(RuntimeError, match="teacher model failed") as info:
            trainer.generate_guidance("1+1=", DiagnosticResult(0.5, 0.5, probe="2"))
        assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)
    finally:
        trainer.student_rollout, trainer.rollout = real_student, real_teacher


def test_constructor_errors(tmp_path):
    tok = char_tok()
    cfg = GRPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=2, report_to=())
    with pytest.raises(ValueError, match="student_model"):
        TeacherGRPOTrainer(cfg, model=tiny_model(tok), tokenizer=tok, train_dataset=arithmetic_rows(2))
    with pytest.raises(ValueError, match="rollout_func"):
        TeacherGRPOTrainer(cfg, model=tiny_model(tok), tokenizer=tok, train_dataset=arithmetic_rows(2),
                           rollout_func=lambda prompts, trainer: [], student_model=tiny_model(tok), student_tokenizer=tok)


# ---------------------------------------------------------------------- the protocol in training
def test_training_step_runs_the_protocol_in_four_batched_calls_and_trains_on_the_teacher_prompt(tmp_path):
    trainer = make_trainer(tmp_path, reward_funcs=["teaching", first_token], max_steps=1)
    calls, batches = [], []
    trainer.rollout = Spy(trainer.rollout, "teacher", calls)
    trainer.student_rollout = Spy(trainer.student_rollout, "student", calls)
    loss = trainer._loss
    trainer._loss = lambda mb: (batches.append(mb), loss(mb))[1]
    student_before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    trainer.train()

    # One generation batch (2 problems x 4 guidances): baseline, probe, guidance, guided answers.
    P, G = 2, 4
    assert [(c["who"], len(c["prompts"]), c["n"]) for c in calls] == [
        ("student", P, 1), ("student", P, 1), ("teacher", P, G), ("student", P * G, 1)]
    tok = trainer.tokenizer
    baseline, probe, guidance, guided = (c["prompts"] for c in calls)
    problems = [tok.decode(p) for p in baseline]
    assert [tok.decode(p) for p in probe] == [p + "?" for p in problems]
    for p, prompt in zip(problems, guidance):  # problem + probe + tier instruction
        text = tok.decode(prompt)
        assert text.startswith(p) and text[-3:] in (":a>", ":b>", ":c>")
    teaching = trainer.last_teaching
    expected = [f"{g}:{problems[i // G]}" for i, g in enumerate(teaching.guidance_text)]  # each guidance, read
    assert guided == [tok(t, add_special_tokens=False)["input_ids"] for t in expected]

    # The loss's micro-batch holds, row by row, exactly the ids the guidance was sampled from.
    (mb,) = batches
    C = mb.completion_ids.shape[1]
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(mb.input_ids[:, :-C], mb.attention_mask[:, :-C])]
    assert rows == [p for p in guidance for _ in range(G)]
    assert all(len(r) > len(tok(p)["input_ids"]) for r, p in zip(rows, problems))  # not the raw question
    done = [c[: int(m.sum())] for c, m in zip(mb.completion_ids.tolist(), mb.completion_mask)]
    assert done == [c[: len(d)] for c, d in zip(teaching.guidance.completion_ids, done)]

    # Only the teacher learned; the student is frozen, in eval mode and never saw a gradient.
    assert any(not torch.equal(teacher_before[k], v) for k, v in trainer.model.state_dict().items())
    assert all(torch.equal(student_before[k], v) for k, v in trainer.student.state_dict().items())
    assert not trainer.student.training
    assert all(not p.requires_grad and p.grad is None for p in trainer.student.parameters())

    # Teacher metrics are logged and exchanges written to output_dir.
    logged = trainer.state.log_history[-1]
    for key in ("student_accuracy", "baseline_accuracy", "accuracy_delta", "improvement_rate", "degradation_rate",
                "teaching_length_mean", "teaching_length_std", "token_efficiency", "rewards/teaching_reward/mean"):
        assert key in logged, key
    records = [json.loads(line) for line in (tmp_path / "teaching_exchanges.jsonl").read_text().splitlines()]
    assert len(records) == 2 and {"problem", "probe", "tier", "guidance", "baseline_answer", "student_answer",
                                  "outcome", "teacher_prompt"} <= set(records[0])
    assert {r["step"] for r in records} <= {h["step"] for h in trainer.state.log_history}  # numbered as the logs are


def test_rewards_see_the_protocol_columns(tmp_path):
    seen = {}

    def spy_reward(prompts, completions, **columns):
        seen.update(prompts=prompts, completions=completions, **columns)
        return [0.0] * len(prompts)

    tok = char_tok()
    cfg = GRPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=4, max_steps=1,
                     max_completion_length=4, max_prompt_length=None, report_to=(), disable_tqdm=True)
    trainer = TeacherGRPOTrainer(cfg, model=tiny_model(tok), tokenizer=tok, train_dataset=arithmetic_rows(4),
                                 reward_funcs=["teaching", spy_reward], student_model=tiny_model(tok, seed=1),
                                 student_tokenizer=tok, teaching_config=TEACHING)
    trainer.train()
    assert [name for name, _ in trainer.reward_funcs] == ["teaching_reward", "spy_reward"]
    for key in ("baseline_answer", "student_answer", "probe", "guidance", "teacher_prompt", "tier", "capability",
                "ground_truth", "baseline_tokens", "student_tokens", "guidance_tokens"):
        assert len(seen[key]) == 4, key
    assert seen["prompts"][0] in [r["prompt"] for r in arithmetic_rows(4)]  # the problem, for judges
    assert set(trainer.rollout_columns) <= set(seen)


def test_student_is_offloaded_between_uses_when_asked(tmp_path, monkeypatch):
    events = []
    real = protocol.on_device

    @contextlib.contextmanager
    def recording(model, device):
        events.append("in")
        with real(model, device) as m:
            yield m
        events.append("out")

    monkeypatch.setattr(protocol, "on_device", recording)
    for offload in (True, False):
        events.clear()
        trainer = make_trainer(tmp_path / str(offload), max_steps=1, offload_untrained_models=offload)
        inside = []
        student = trainer.student_rollout

        class Checked(Spy):
            def generate(self, prompt_ids, sampling):
                inside.append(events[-1:] == ["in"])  # every student call happens on the device
                return super().generate(prompt_ids, sampling)

        trainer.student_rollout = Checked(student, "student", [])
        trainer.train()
        if offload:
            # Two visits per generation batch (baseline + probe, then guided answers), then back.
            assert events == ["in", "out", "in", "out"] and inside == [True, True, True]
            assert next(trainer.student.parameters()).device.type == "cpu"
        else:
            assert events == [] and len(inside) == 3


def test_offload_refuses_a_student_backend_that_keeps_weights_on_the_gpu(tmp_path):
    with pytest.raises(ValueError, match="teaching.student_backend=engine .* offload_untrained_models"):
        TeacherGRPOTrainer(GRPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=2,
                                      report_to=(), offload_untrained_models=True),
                           model=tiny_model(char_tok()), tokenizer=char_tok(), train_dataset=arithmetic_rows(2),
                           student_model=tiny_model(char_tok()), student_tokenizer=char_tok(),
                           teaching_config={**TEACHING, "student_backend": "engine"})


def test_evaluate_reports_guided_and_baseline_accuracy(trainer):
    metrics = trainer.evaluate()
    for key in ("eval/student_accuracy", "eval/baseline_accuracy", "eval/accuracy_delta", "eval/token_efficiency"):
        assert key in metrics and metrics[key] == metrics[key], key


def test_rim_reward_judges_the_teaching_from_the_protocol_columns(tmp_path):
    from rim_helpers import JudgeServer, judgement, rim_config

    from atlas_fast import RIMReward

    with JudgeServer(lambda call, headers: judgement(0.7)) as server:
        rim = RIMReward(rim_config(server.base_url, judges=["helpfulness"]))
        trainer = make_trainer(tmp_path, reward_funcs=["teaching", rim], max_steps=1)
        trainer.train()
    teaching = trainer.last_teaching
    prompts = [c.user for c in server.calls]
    assert 0 < len(prompts) <= 8 * 3  # each distinct guidance judged at three temperatures
    G = teaching.group_size
    for i, raw in enumerate(teaching.texts["guidance_raw"]):
        p = i // G
        judged = [u for u in prompts if f"Teaching given to the student:\n{raw}\n" in u
                  and f"first answer, without help:\n{teaching.texts['baseline'][p]}\n" in u
                  and f"described approach:\n{teaching.texts['probe'][p]}\n" in u]
        assert judged, (raw, prompts[0])
    assert trainer.state.log_history[-1]["rim_rewards/helpfulness"] == pytest.approx(0.7)
