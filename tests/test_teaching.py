"""The teaching package's pure parts: DiagnosticResult, the probe estimate, tiers, the teaching
reward, teacher metrics and the templates config."""
import math

import pytest

from atlas_fast.teaching import DiagnosticResult, TeachingConfig, TeachingReward, TeachingRewardWeights, capability_tier
from atlas_fast.teaching.config import load_teaching_config
from atlas_fast.teaching.diagnostic import assess_probe, expected_rating
from atlas_fast.teaching.reward import answer_leaked, teacher_metrics, teaching_reward_value


# ---------------------------------------------------------------------- DiagnosticResult and tiers
def test_diagnostic_result_fields_and_ranges():
    d = DiagnosticResult(capability_level=0.4, confidence_score=1.0, identified_gaps=["x"],
                         response_quality={"mean_token_prob": 0.5}, probe_tokens=7)
    assert (d.capability_level, d.confidence_score, d.identified_gaps, d.probe_tokens) == (0.4, 1.0, ["x"], 7)
    assert d.tier == "medium"
    for bad in (-0.01, 1.01, float("nan")):
        with pytest.raises(ValueError, match="capability_level"):
            DiagnosticResult(capability_level=bad, confidence_score=0.5)
        with pytest.raises(ValueError, match="confidence_score"):
            DiagnosticResult(capability_level=0.5, confidence_score=bad)
    with pytest.raises(ValueError, match="probe_tokens"):
        DiagnosticResult(capability_level=0.5, confidence_score=0.5, probe_tokens=-1)


@pytest.mark.parametrize("capability, tier", [(0.0, "low"), (0.299, "low"), (0.3, "medium"), (0.5, "medium"),
                                              (0.699, "medium"), (0.7, "high"), (1.0, "high")])
def test_capability_tiers(capability, tier):
    assert capability_tier(capability) == tier


def test_assess_probe_combines_student_certainty_and_teacher_rating():
    # The student is sure (p = 0.9 per token) and the teacher puts all its mass on "5".
    sure = assess_probe([math.log(0.9)] * 4, True, [0, 0, 0, 0, 1.0], "plan")
    assert sure.capability_level == pytest.approx(0.5 * 0.9 + 0.5 * 1.0)
    assert sure.confidence_score == pytest.approx(1 - abs(0.9 - 1.0))
    assert sure.tier == "high" and sure.probe_tokens == 4 and sure.identified_gaps == []
    assert sure.response_quality["teacher_rating"] == pytest.approx(5.0)
    # Unsure student, teacher says "1": low tier, gaps named.
    lost = assess_probe([math.log(0.1)] * 3, False, [0.4, 0, 0, 0, 0], "")
    rated = 0.4 * 0.0 + 0.6 * 0.5  # only 40% of the teacher's mass was on digits: shrunk toward 0.5
    assert lost.capability_level == pytest.approx(0.5 * 0.1 + 0.5 * rated) and lost.tier == "low"
    # A truncated probe halves the confidence.
    assert lost.confidence_score == pytest.approx((1 - abs(0.1 - rated)) * 0.4 * 0.5)
    assert any("truncated" in g for g in lost.identified_gaps) and any("empty" in g for g in lost.identified_gaps)
    assert any("unsure" in g for g in lost.identified_gaps) and any("rated" in g for g in lost.identified_gaps)
    # student_weight moves the mix, and both numbers always stay in [0, 1].
    assert assess_probe([0.0], True, [1, 0, 0, 0, 0], "x", student_weight=1.0).capability_level == 1.0
    empty = assess_probe([], True, [0, 0, 0, 0, 0], "")
    assert 0 <= empty.capability_level <= 1 and empty.confidence_score == 0


def test_expected_rating():
    assert expected_rating([0.25, 0, 0, 0, 0.25]) == (3.0, 0.5)
    assert expected_rating([0, 0, 0, 0, 0]) == (3.0, 0.0)


# ---------------------------------------------------------------------- the teaching reward
W = TeachingRewardWeights()


def test_reward_orders_outcomes():
    improved = teaching_reward_value(False, True, 10, 10, 50, False, W)
    both = teaching_reward_value(True, True, 10, 10, 50, False, W)
    wrong = teaching_reward_value(False, False, 10, 10, 50, False, W)
    degraded = teaching_reward_value(True, False, 10, 10, 50, False, W)
    assert improved > both > wrong > degraded
    assert improved == pytest.approx(1 + 0.5 * 0.5 * 100 / 150)  # guidance half of the bonus, no shortening
    assert wrong == 0.0 and degraded == -1.0
    # Shorter guidance and a shorter student answer earn more; never past the bonus cap.
    assert teaching_reward_value(True, True, 10, 5, 10, False, W) > both
    assert teaching_reward_value(True, True, 10, 0, 0, False, W) == pytest.approx(0.5)
    # A leak costs the leak weight whatever the outcome.
    assert teaching_reward_value(False, True, 10, 10, 5, True, W) == -1.0


def test_reward_weights_are_configurable_and_checked():
    w = TeachingRewardWeights(improvement=2.0, degradation=-0.5, efficiency=0.0)
    assert teaching_reward_value(False, True, 10, 1, 1, False, w) == 2.0
    assert teaching_reward_value(True, False, 10, 1, 1, False, w) == -0.5
    with pytest.raises(ValueError, match="answer_share"):
        TeachingRewardWeights(answer_share=2.0).validate()
    with pytest.raises(ValueError, match="unknown key"):
        TeachingConfig.from_dict({"reward": {"improvment": 1.0}})


def test_answer_leak_detection():
    assert answer_leaked("the sum is 82, check it", "82")
    assert answer_leaked("it is 1,200 apples", "1200")
    assert not answer_leaked("carry 1", "82")
    assert not answer_leaked("carry 1", "1.5")
    assert answer_leaked("the capital is Paris.", "paris")
    assert not answer_leaked("think about it", None)
    assert answer_leaked("x = 3/4", "#### 0.75")


def test_answer_leaks_in_latex_count_and_step_labels_do_not():
    assert answer_leaked(r"so we get \frac{1}{2}", r"\frac{1}{2}")
    assert answer_leaked(r"which is \dfrac{3}{4} of the cake", "0.75")
    assert answer_leaked(r"\frac34 of it", "#### 0.75")
    assert not answer_leaked(r"\frac{1}{3} of the rest", "0.75")
    assert not answer_leaked("Step 2: multiply both sides by 3", "2")
    assert not answer_leaked("1. Add the two numbers\n2. Divide by the count\n(3) Check", "2")
    assert answer_leaked("Step 3: the total is 2", "2")  # a label elsewhere hides nothing
    assert answer_leaked("there are 2 left", "2")
    assert answer_leaked("2.5 is the rate", "2.5")


@pytest.mark.parametrize("guidance,truth,leaked", [
    (r"so x = -\frac{1}{2}", "-1/2", True),  # the sign before \frac stays with it
    (r"so x = -\frac{1}{2}", "-0.5", True),
    (r"so x = -\frac{1}{2}", "1/2", False),
    (r"then -\dfrac{3}{4}", r"\boxed{-\frac{3}{4}}", True),
    (r"\frac{1}{2.5} of it", "0.4", True),  # a decimal denominator: its value, not 1/2
    (r"\frac{3}{4.5} of it", "0.75", False),
    ("to get\n42. Then check.", "42", True),  # a number opening a line is a list item only in a list
    ("the result is:\n42.\n", "42", True),
    ("\n(42) apples", "42", True),
    ("After the last step 42 apples remain", "42", True),  # no punctuation: a quantity
    ("step 0.5 of the way", "0.5", True),
    ("in step 1,000 of them", "1000", True),
    ("in step 2, divide", "2", False),
])
def test_leak_check_signs_decimals_and_labels(guidance, truth, leaked):
    assert answer_leaked(guidance, truth) is leaked


def test_teaching_reward_function_reads_protocol_columns():
    reward = TeachingReward()
    out = reward(prompts=["1+1="] * 5, completions=["g"] * 5, ground_truth=["2", "2", "2", "2", None],
                 baseline_answer=["<solution>3</solution>", "<solution>2</solution>", "<solution>2</solution>",
                                  "<solution>3</solution>", "x"],
                 student_answer=["<solution>2</solution>", "<solution>2</solution>", "<solution>5</solution>",
                                 "<solution>2</solution>", "x"],
                 guidance=["carry 0", "carry 0", "carry 0", "the answer is 2", "x"],
                 baseline_tokens=[5] * 5, student_tokens=[5] * 5, guidance_tokens=[2] * 5)
    assert out[0] > 1 and 0 < out[1] < 1 and out[2] == -1.0 and out[3] == -1.0 and out[4] is None
    with pytest.raises(ValueError, match=r"teaching_reward needs the column\(s\) \['baseline_answer'"):
        reward(prompts=["1+1="], completions=["g"], ground_truth=["2"])


def test_teacher_metrics():
    m = teacher_metrics([False, True, True, False], [True, True, False, False], [10, 20, 30, 40], [8, 8, 8, 8], [4, 4, 4, 4])
    assert m["student_accuracy"] == 0.5 and m["baseline_accuracy"] == 0.5 and m["accuracy_delta"] == 0.0
    assert m["improvement_rate"] == 0.25 and m["degradation_rate"] == 0.25
    assert m["teaching_length_mean"] == 25 and m["teaching_length_std"] == pytest.approx(math.sqrt(125))
    assert m["token_efficiency"] == pytest.approx(0.5)


# ---------------------------------------------------------------------- templates in config
def test_shipped_configs_load_and_override():
    default = load_teaching_config("default")
    assert default == TeachingConfig()  # the YAML and the dataclass defaults agree
    demo = load_teaching_config("demo")
    assert demo.templates.render("guidance", problem="37+45=", probe="72", tier="medium",
                                 tier_instruction=demo.templates.tiers["medium"], capability="0.5") == "37+45=72|hint>"
    custom = load_teaching_config({"templates": {"baseline": "Q: {problem}"}, "probe_max_tokens": 9})
    assert custom.templates.baseline == "Q: {problem}" and custom.probe_max_tokens == 9
    assert custom.templates.probe == TeachingConfig().templates.probe  # untouched keys keep their default


def test_templates_reject_unknown_placeholders_and_keep_braces_in_values():
    with pytest.raises(ValueError, match=r"templates.guidance: unknown placeholder\(s\) \{answer\}"):
        load_teaching_config({"templates": {"guidance": "{problem} {answer}"}})
    with pytest.raises(ValueError, match="tiers must hold exactly"):
        load_teaching_config({"templates": {"tiers": {"low": "a", "medium": "b"}}})
    with pytest.raises(ValueError, match="probe_max_tokens"):
        load_teaching_config({"probe_max_tokens": 0})
    t = TeachingConfig().templates
    text = t.render("student_with_guidance", problem="f(x) = {x^2}", guidance="use {problem} literally")
    assert "f(x) = {x^2}" in text and "use {problem} literally" in text


def test_gsm8k_and_math_ground_truths_are_read_for_their_final_answer():
    from atlas_fast.teaching.reward import is_correct

    gsm8k, math_solution = "3 + 4 = 7 apples.\n#### 7", r"so x = \boxed{5}"
    assert is_correct("The answer is 7", gsm8k) and not is_correct("The answer is 3", gsm8k)
    assert is_correct(r"\boxed{5}", math_solution)
    assert answer_leaked("so it comes to 5", math_solution) and not answer_leaked("add 3 and 4", gsm8k)
    out = TeachingReward()(["q"], ["g"], ground_truth=[gsm8k], baseline_answer=["8"], student_answer=["The answer is 7"],
                           guidance=["count them"], baseline_tokens=[5], student_tokens=[5], guidance_tokens=[3])
    assert out[0] > 1  # wrong -> right, plus the efficiency bonus


def test_teaching_settings_of_the_wrong_type_are_named():
    assert TeachingConfig.from_dict({"rating_digits": 12345}).rating_digits == "12345"  # a command line's number
    for values, message in (({"student_temperature": "abc"}, "teaching.student_temperature must be a number"),
                            ({"templates": "x"}, "teaching.templates must be a mapping"),
                            ({"guidance_tag": 3}, "teaching.guidance_tag must be a string or null")):
        with pytest.raises(ValueError, match=message):
            TeachingConfig.from_dict(values)


def test_a_guidance_tag_is_matched_as_text():
    from types import SimpleNamespace

    from atlas_fast.teaching.protocol import TeacherTrainer

    holder = SimpleNamespace(teaching=TeachingConfig(guidance_tag="hint(s)"))
    assert TeacherTrainer.extract_guidance(holder, "x <hint(s)>carry 1</hint(s)> y") == "carry 1"
    holder.teaching.guidance_tag = "teach(ing"
    assert TeacherTrainer.extract_guidance(holder, "<teach(ing>go on") == "go on"
