"""RIMReward: templates, JSON repair, escalation, consistency, aggregation, configs, and a local
HF judge in-process. HTTP judges are in test_rim_http.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from rim_helpers import ScriptedClient, judgement, rim_config
from tiny import char_tokenizer, tiny_model

import atlas_fast
from atlas_fast.rewards.rim import (
    ConsistencyConfig,
    HFClient,
    JudgementError,
    PromptTemplate,
    RIMReward,
    apply_consistency,
    load_rim_config,
    parse_judgement,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def rim(respond, large=None, **overrides):
    small_client = ScriptedClient(respond)
    large_client = ScriptedClient(large or respond)
    reward = RIMReward(rim_config(**overrides), small_client=small_client, large_client=large_client)
    return reward, small_client, large_client


# -- templates ---------------------------------------------------------------------------------


def test_template_inserts_inputs_with_braces_verbatim():
    t = PromptTemplate('Q: {question}\nA: {response}\nReply as {"score": {"value": 1}}',
                       ["question", "response"])
    nasty = "f(x) = {x: {y}} and {response} and {0} and {{ }} and }{"
    out = t.render({"question": nasty, "response": "\\boxed{4}"})
    assert out == f'Q: {nasty}\nA: \\boxed{{4}}\nReply as {{"score": {{"value": 1}}}}'


def test_template_rejects_unknown_placeholders_at_load():
    with pytest.raises(ValueError, match=r"prompts.accuracy: unknown placeholder\(s\) \{questoin\}"):
        PromptTemplate("{questoin}", ["question"], name="prompts.accuracy")
    bad = rim_config(prompts={"accuracy": "Judge {questoin}"})
    with pytest.raises(ValueError, match="questoin"):
        RIMReward(bad, small_client=ScriptedClient(None), large_client=ScriptedClient(None))


def test_rim_prompts_survive_braces_in_every_input():
    reward, small, _ = rim(lambda call: judgement(0.9))
    braces = "{question} {} {{x}} {0} }{ {ground_truth}"
    out = reward([braces], [braces], ground_truth=[braces], student_plan=[braces],
                 teacher_trace=[braces], student_baseline_answer=[braces])
    assert out == [pytest.approx(0.9)]
    assert all(braces in call.user for call in small.calls)


# -- judge output parsing ----------------------------------------------------------------------

VALID = {"principles": [{"name": "a", "weight": 0.5}, {"name": "b", "weight": 0.5}],
         "score": 0.8, "rationale": "fine", "uncertainty": 0.2}


@pytest.mark.parametrize("text", [
    "```json\n" + json.dumps(VALID) + "\n```",
    "Here is my evaluation:\n" + json.dumps(VALID) + "\nThanks!",
    'Scores lie in {0, 1}. Context: {"note": "draft"}. Final: ' + json.dumps(VALID),  # braces in prose
    '{"evaluation": ' + json.dumps(VALID) + "}",  # wrapped in another object
    json.dumps(VALID)[:-1] + ",}",  # trailing comma
    "{'principles': [{'name': 'a', 'weight': 0.5}, {'name': 'b', 'weight': 0.5},], "
    "'score': 0.8, 'rationale': 'fine', 'uncertainty': 0.2, 'final': True}",  # Python-style
], ids=["fence", "prose", "prose-braces", "wrapped", "trailing-comma", "single-quotes"])
def test_malformed_json_is_repaired_where_safe(text):
    j = parse_judgement(text)
    assert (j.score, j.uncertainty, j.rationale, j.repaired) == (0.8, 0.2, "fine", True)
    assert [(p.name, p.weight) for p in j.principles] == [("a", 0.5), ("b", 0.5)]


def _judged(score):
    return json.dumps({**VALID, "score": score})


@pytest.mark.parametrize("text, score", [
    ("Draft: " + _judged(0.2) + "\nOn reflection:\n" + _judged(0.9), 0.9),  # the verdict comes last
    ("<think>maybe " + _judged(0.1) + "</think>\n" + _judged(0.9), 0.9),
    ('Format: {"principles": [{"name": "...", "weight": 0.5}], "score": 0.0, "rationale": "...", '
     '"uncertainty": 0.0}\nMy evaluation: ' + _judged(0.9), 0.9),  # an echoed format example
    ("Checking " + " ".join(rf"\frac{{{i}}}{{{i + 1}}}" for i in range(1, 12)) + ": right.\n" + _judged(0.9), 0.9),
    ('{"principles": [{"name": "a", "weight": 1}], "score": 0.8, "rationale": "line 1\nline 2", '
     '"uncertainty": 0.1}', 0.8),  # a raw newline inside a string
], ids=["draft-then-verdict", "think", "echoed-format", "latex-braces", "raw-newline"])
def test_the_verdict_is_the_last_valid_judgement_in_the_reply(text, score):
    assert parse_judgement(text).score == score


def test_repair_keeps_string_contents():
    text = "{'principles': [{'name': 'x', 'weight': 1}], 'score': 0.5, 'uncertainty': 0.1, " \
           "'rationale': 'a, b,} \"quoted\" True'}"
    assert parse_judgement(text).rationale == 'a, b,} "quoted" True'


@pytest.mark.parametrize("obj, problem", [
    ({**VALID, "score": 1.5}, "outside"),
    ({**VALID, "score": "high"}, "not a number"),
    ({k: v for k, v in VALID.items() if k != "uncertainty"}, "missing 'uncertainty'"),
    ({**VALID, "principles": []}, "non-empty"),
    ({**VALID, "principles": [{"name": "a"}]}, "no numeric weight"),
], ids=["range", "type", "missing", "no-principles", "no-weight"])
def test_invalid_judgements_are_errors(obj, problem):
    with pytest.raises(JudgementError, match=problem):
        parse_judgement(json.dumps(obj))
    with pytest.raises(JudgementError, match="no parsable JSON"):
        parse_judgement("The score is 0.8, I am fairly sure.")


def test_principle_weights_are_normalised_to_one():
    j = parse_judgement(json.dumps({**VALID, "principles": [{"name": "a", "weight": 2},
                                                             {"name": "b", "weight": 6}]}))
    assert [p.weight for p in j.principles] == [0.25, 0.75] and j.renormalised


# -- consistency -------------------------------------------------------------------------------


def test_consistency_rules_and_margins_come_from_config():
    rules = ConsistencyConfig()
    out, notes = apply_consistency(
        {"accuracy": 0.2, "process": 0.9, "helpfulness": 0.9, "diagnostic": 0.95}, rules)
    # process capped at accuracy + 0.1 = 0.3; then process < 0.5 caps helpfulness at 0.5
    assert out == pytest.approx({"accuracy": 0.2, "process": 0.3, "helpfulness": 0.5, "diagnostic": 0.95})
    assert len(notes) == 2
    out, _ = apply_consistency({"helpfulness": 0.9, "diagnostic": 0.4}, rules)
    assert out["helpfulness"] == pytest.approx(0.5)  # diagnostic + 0.1
    wide = ConsistencyConfig(process_over_accuracy=0.5, low_process_threshold=0.1,
                             helpfulness_over_diagnostic=0.3)
    out, _ = apply_consistency(
        {"accuracy": 0.2, "process": 0.9, "helpfulness": 0.9, "diagnostic": 0.4}, wide)
    assert out == pytest.approx({"accuracy": 0.2, "process": 0.7, "helpfulness": 0.7, "diagnostic": 0.4})


def test_consistency_rule_needs_both_judges_active():
    rules = ConsistencyConfig()
    assert apply_consistency({"process": 0.9, "helpfulness": 0.9}, rules)[0] == {"process": 0.9, "helpfulness": 0.9}
    assert apply_consistency({"process": 0.2, "accuracy": 1.0}, rules)[0]["process"] == 0.2
    off = ConsistencyConfig(enabled=False)
    assert apply_consistency({"accuracy": 0.0, "process": 1.0}, off)[0] == {"accuracy": 0.0, "process": 1.0}


# -- aggregation and escalation ----------------------------------------------------------------

SCORES = {"accuracy": 1.0, "helpfulness": 0.6, "process": 0.8, "diagnostic": 0.7}


def test_reward_is_the_mean_over_active_judges_with_info():
    reward, small, large = rim(lambda call: judgement(SCORES[call.judge], rationale=f"{call.judge} ok"))
    rewards, infos = reward(["2+2?", "3+3?"], ["4", "6"], ground_truth=["4", "6"], return_info=True)
    assert rewards == [pytest.approx(sum(SCORES.values()) / 4)] * 2
    info = infos[0]
    assert info["rewards"] == pytest.approx(SCORES)
    assert info["explanations"]["process"] == "process ok"
    assert [p["name"] for p in info["principles"]["accuracy"]] == ["correctness", "clarity"]
    assert [s["temperature"] for s in info["samples"]["helpfulness"]] == [0.2, 0.5, 0.8]
    assert info["escalated"] is False and info["escalation_reasons"] == {} and info["failed"] == {}
    assert reward.last_info == infos
    assert reward.last_metrics["rim_rewards/process"] == pytest.approx(0.8)
    assert reward.last_metrics["rim/escalation_rate"] == 0.0
    assert len(small.calls) == 2 * 4 * 3 and large.calls == []
    assert {c.temperature for c in small.calls} == {0.2, 0.5, 0.8}
    name, rows = reward.last_table
    assert name == "rim_explanations" and rows[1]["explanations"]["accuracy"] == "accuracy ok"


def test_lowest_uncertainty_sample_stands():
    u = {0.2: 0.25, 0.5: 0.05, 0.8: 0.15}
    s = {0.2: 0.70, 0.5: 0.75, 0.8: 0.80}
    reward, *_ = rim(lambda c: judgement(s[c.temperature], u[c.temperature]), judges=["accuracy"])
    _, [info] = reward(["q"], ["a"], return_info=True)
    assert info["rewards"]["accuracy"] == 0.75 and info["uncertainty"]["accuracy"] == 0.05


def test_escalates_on_score_spread_and_shows_tier1_to_the_large_judge():
    spread = {0.2: 0.1, 0.5: 0.5, 0.8: 0.9}

    def small(call):
        return judgement(spread[call.temperature], rationale=f"small at {call.temperature}")

    reward, _, large = rim(small, large=lambda call: judgement(0.4, rationale="large says"),
                           judges=["accuracy", "process"])
    _, [info] = reward(["q"], ["a"], return_info=True)
    assert info["escalated"] and "variance_threshold 0.15" in info["escalation_reasons"]["accuracy"]
    assert info["rewards"] == {"accuracy": 0.4, "process": 0.4} and info["tier"]["accuracy"] == 2
    assert info["explanations"]["accuracy"] == "large says"
    shown = large.calls[0].user
    assert all(f"small at {t}" in shown for t in (0.2, 0.5, 0.8)) and '"correctness"' in shown
    assert {c.model for c in large.calls} == {"large-judge"} and {c.temperature for c in large.calls} == {0.3}
    # the same samples under a wider threshold stand at tier 1
    reward, _, large = rim(small, judges=["accuracy"], variance_threshold=0.5)
    _, [info] = reward(["q"], ["a"], return_info=True)
    assert not info["escalated"] and large.calls == []


def test_escalates_on_uncertainty_threshold_from_config():
    reward, _, large = rim(lambda c: judgement(0.9, uncertainty=0.35),
                           large=lambda c: judgement(0.6, uncertainty=0.1), judges=["process"])
    _, [info] = reward(["q"], ["a"], return_info=True)
    assert "uncertainty 0.350 > uncertainty_threshold 0.3" == info["escalation_reasons"]["process"]
    assert info["rewards"]["process"] == 0.6 and len(large.calls) == 1
    reward, *_ = rim(lambda c: judgement(0.9, uncertainty=0.35), judges=["process"],
                     uncertainty_threshold=0.4)
    assert reward(["q"], ["a"]) == [0.9]


def test_escalates_when_nothing_parsed_and_scores_zero_when_large_fails_too():
    reward, small, large = rim(lambda c: "I think it is fine.", large=lambda c: "still not JSON",
                               judges=["accuracy", "helpfulness"], consistency={"enabled": False})
    rewards, [info] = reward(["q"], ["a"], return_info=True)
    assert rewards == [0.0]
    assert info["escalation_reasons"] == {j: "no tier-1 sample parsed" for j in ("accuracy", "helpfulness")}
    assert set(info["failed"]) == {"accuracy", "helpfulness"}
    assert "large judge failed" in info["failed"]["accuracy"] and "no parsable JSON" in info["failed"]["accuracy"]
    assert all("error" in s for s in info["samples"]["accuracy"])
    # parse_retries=1: every unparsable reply is asked for once more before it counts as failed
    assert len(small.calls) == 2 * 3 * 2 and len(large.calls) == 2 * 2
    assert reward.last_metrics["rim/failure_rate"] == 1.0


def test_one_judge_failing_does_not_sink_the_others():
    def small(call):
        return "garbage" if call.judge == "diagnostic" else judgement(0.8)

    reward, *_ = rim(small, large=lambda c: "garbage", consistency={"enabled": False})
    rewards, [info] = reward(["q"], ["a"], return_info=True)
    assert info["rewards"] == {"accuracy": 0.8, "helpfulness": 0.8, "process": 0.8, "diagnostic": 0.0}
    assert rewards == [pytest.approx(0.6)] and list(info["failed"]) == ["diagnostic"]


def test_consistency_is_applied_before_the_mean():
    scores = {"accuracy": 0.0, "process": 0.9}
    reward, *_ = rim(lambda c: judgement(scores[c.judge]), judges=["accuracy", "process"])
    rewards, [info] = reward(["q"], ["a"], return_info=True)
    assert info["raw_rewards"] == scores and info["rewards"]["process"] == pytest.approx(0.1)
    assert rewards == [pytest.approx(0.05)] and info["consistency"]


def test_columns_fill_prompt_fields_by_alias():
    reward, small, _ = rim(lambda c: judgement(0.5), judges=["helpfulness"])
    reward([[{"role": "user", "content": "What is 6*7?"}]], [[{"role": "assistant", "content": "Think of 6*7."}]],
           answer=["42"], baseline=["41"], probe=["I will multiply"], student_answer=["42"])
    user = small.calls[0].user
    for text in ("user: What is 6*7?", "Think of 6*7.", "42", "41", "I will multiply"):
        assert text in user
    reward(["q"], ["a"])
    assert "(not provided)" in small.calls[-1].user


def test_bad_columns_are_clear_errors():
    reward, *_ = rim(lambda c: judgement(0.5))
    with pytest.raises(ValueError, match="column 'ground_truth' has 1 entries for 2"):
        reward(["q", "q"], ["a", "b"], ground_truth=["x"])


# -- configs -----------------------------------------------------------------------------------


def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None, job_name="test"):
        return hydra_compose("train", overrides=list(overrides))


def test_reward_system_switches_by_hydra_override():
    full = compose("reward_system=interpretation").reward_system
    offline = compose("reward_system=interpretation_offline", "reward_system.variance_threshold=0.05").reward_system
    assert list(full.judges) == ["accuracy", "helpfulness", "process", "diagnostic"]
    assert list(offline.judges) == ["helpfulness", "process"]
    clients = dict(small_client=ScriptedClient(lambda c: judgement(0.7)), large_client=ScriptedClient(None))
    a, b = RIMReward(full, **clients), RIMReward(offline, **clients)
    assert a.config.judges != b.config.judges and b.config.variance_threshold == 0.05
    assert "Judge the ACCURACY" in a.config.prompts["accuracy"]  # prompts came from prompts/default.yaml
    b(["q"], ["a"])
    assert set(b.last_info[0]["rewards"]) == {"helpfulness", "process"}
    assert compose().get("reward_system") is None  # off unless asked for


def test_config_from_path_dict_and_omegaconf_agree():
    offline = load_rim_config(CONFIGS / "reward_system" / "interpretation_offline.yaml")
    assert offline.judges == ["helpfulness", "process"]
    assert offline.small_model.model == "Qwen/Qwen2.5-7B-Instruct"  # from interpretation.yaml
    path = CONFIGS / "reward_system" / "interpretation.yaml"
    from_path = load_rim_config(str(path))
    from_node = load_rim_config(OmegaConf.load(path))  # prompts: the shipped default set
    from_dict = load_rim_config(OmegaConf.to_container(OmegaConf.load(path)))
    assert from_path == from_node == from_dict
    assert offline.prompts == from_path.prompts and offline.temperatures == [0.2, 0.5, 0.8]


@pytest.mark.parametrize("overrides, message", [
    ({"judges": ["accuracy", "honesty"]}, "reward_system.judges: unknown judge 'honesty'"),
    ({"variance_treshold": 0.2}, "variance_treshold"),
    ({"small_model": {"backend": "grpc"}}, "reward_system.small_model.backend"),
    ({"large_model": {"base_url": None}}, "reward_system.large_model.base_url"),
    ({"temperatures": []}, "reward_system.temperatures"),
    ({"max_parallel": 0}, "reward_system.max_parallel"),
    ({"timeout_s": "soon"}, "timeout_s"),
    ({"prompts": {"system": ""}}, "reward_system.prompts.system"),
    ({"small_model": "gpt-4o"}, "reward_system.small_model must be a mapping"),
], ids=["judge", "typo", "backend", "url", "temps", "parallel", "type", "prompt", "model-as-string"])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_rim_config(rim_config(**overrides))


def test_a_missing_local_judge_model_is_named():
    with pytest.raises(ValueError, match="reward_system.small_model.model: /no/such/judge does not exist"):
        RIMReward(rim_config(small_model={"backend": "hf", "model": "/no/such/judge"}))


def test_lazy_export_and_litellm_is_optional():
    assert atlas_fast.RIMReward is RIMReward
    from atlas_fast.rewards import RIMReward as again

    assert again is RIMReward
    try:
        import litellm  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install litellm"):
            RIMReward(rim_config(small_model={"backend": "litellm", "model": "gemini/gemini-flash"}))


# -- a local HF judge in-process ---------------------------------------------------------------


def test_local_hf_judge_with_junk_output_counts_as_failed(tmp_path):
    tok = char_tokenizer()
    tiny_model(tok).save_pretrained(tmp_path / "judge")
    tok.save_pretrained(tmp_path / "judge")
    judge = {"backend": "hf", "model": str(tmp_path / "judge"), "max_tokens": 8}
    reward = RIMReward(rim_config(small_model=judge, large_model=judge, judges=["accuracy", "process"],
                                  temperatures=[0.7, 1.0]))
    assert reward.large is reward.small  # one model loaded for both tiers
    rewards, [info] = reward(["1+1="], ["2"], ground_truth=["2"], return_info=True)
    assert rewards == [0.0] and set(info["failed"]) == {"accuracy", "process"}
    assert "invalid judgement" in info["samples"]["accuracy"][0]["error"]
    # 2 judges x 2 temperatures, then 2 escalations, each asked again after a junk reply
    assert reward.small.stats["requests"] == (4 + 2) * 2


CANNED = '{"principles":[{"name":"exact","weight":1.0}],"score":0.75,"rationale":"canned","uncertainty":0.05}'


def test_local_hf_judge_end_to_end_with_a_canned_vocabulary(tmp_path):
    """A model whose logits are all zero, greedy, picks token 0 forever; token 0 is a whole JSON
    judgement, so the reply is that judgement repeated and the first object parses."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {CANNED: 0, "<pad>": 1, "<eos>": 2, "<unk>": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    model = tiny_model(tok)
    model.get_output_embeddings().weight.data.zero_()  # tied: every logit is 0
    batches = []
    generate = model.generate
    model.generate = lambda **kw: batches.append(kw["input_ids"].shape[0]) or generate(**kw)
    client = HFClient(model, tok, batch_size=8)  # objects in-process (the path form is tested above)
    judge = {"backend": "hf", "model": "canned", "max_tokens": 3}
    reward = RIMReward(rim_config(small_model=judge, large_model=judge, judges=["accuracy", "process"],
                                  temperatures=[0.0], large_temperature=0.0),
                       small_client=client, large_client=client)
    rewards, infos = reward(["1+1=", "2+2=", "3+3="], ["2", "4", "no idea"], return_info=True)
    assert rewards == [0.75] * 3 and infos[2]["explanations"]["accuracy"] == "canned"
    assert infos[0]["samples"]["process"][0]["repaired"] is True
    assert batches == [6]  # every judge call of the batch in one generate
