"""Tests for atlas_fast.rewards: resolution, calling (sync/async), errors, combination, metrics,
answer extraction and the reward-model wrapper."""

import asyncio
import functools
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from atlas_fast.rewards import (
    BUILTIN_REWARDS,
    RewardModel,
    accuracy_reward,
    answers_match,
    combine_rewards,
    completion_text,
    compute_rewards,
    extract_answer,
    format_reward,
    make_format_reward,
    normalize_answer,
    prepare_reward_funcs,
    reward_metrics,
)

NAN = float("nan")


def call(funcs, completions, prompts=None, **columns):
    prompts = prompts or ["p"] * len(completions)
    named = prepare_reward_funcs(funcs)
    return compute_rewards(named, prompts, completions, [[1, 2]] * len(completions), columns)


def same(a, b):
    """Tensor equality that treats NaN == NaN."""
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    return (
        a.shape == b.shape
        and torch.equal(torch.isnan(a), torch.isnan(b))
        and torch.allclose(a.nan_to_num(), b.nan_to_num())
    )


# -- resolution --------------------------------------------------------------------------------


def length_reward(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


class Scorer:
    def __call__(self, prompts, completions, **kwargs):
        return [1.0] * len(completions)


def test_prepare_names_functions_objects_partials_and_builtins():
    scaled = functools.partial(length_reward)
    named = prepare_reward_funcs([length_reward, Scorer(), scaled, "accuracy", "format"])
    assert [n for n, _ in named] == [
        "length_reward",
        "Scorer",
        "length_reward_2",
        "accuracy_reward",
        "format_reward",
    ]
    assert named[3][1] is BUILTIN_REWARDS["accuracy"] is accuracy_reward
    assert named[4][1] is format_reward


def test_prepare_accepts_a_single_item_and_module_references():
    assert prepare_reward_funcs(length_reward) == [("length_reward", length_reward)]
    [(name, func)] = prepare_reward_funcs("atlas_fast.rewards:accuracy_reward")
    assert (name, func) == ("accuracy_reward", accuracy_reward)
    [(name, _)] = prepare_reward_funcs("accuracy_reward")  # a built-in by its function name
    assert name == "accuracy_reward"


@pytest.mark.parametrize(
    "funcs, message",
    [
        ([], "No reward functions"),
        (None, "No reward functions"),
        ("no_such_reward", "Unknown reward 'no_such_reward'"),
        ("no_such_module_xyz:f", "cannot import module"),
        ("atlas_fast.rewards:nope", "no attribute 'nope'"),
        ("atlas_fast.rewards:BUILTIN_REWARDS", "not a callable"),
    ],
)
def test_prepare_errors(funcs, message):
    with pytest.raises(ValueError, match=message):
        prepare_reward_funcs(funcs)


def test_prepare_rejects_non_callables():
    with pytest.raises(TypeError, match="int"):
        prepare_reward_funcs([3])


# -- calling -----------------------------------------------------------------------------------


def test_compute_rewards_shape_none_and_kwargs():
    seen = {}

    def needs_columns(prompts, completions, completion_ids, ground_truth, trainer_state, **kwargs):
        seen.update(
            ground_truth=ground_truth, trainer_state=trainer_state, ids=completion_ids, extra=kwargs
        )
        return [None if c == "skip" else 0.5 for c in completions]

    named = prepare_reward_funcs([length_reward, needs_columns])
    out = compute_rewards(
        named,
        ["p1", "p2", "p3"],
        ["ab", "skip", "abcd"],
        [[1], [2], [3]],
        {"ground_truth": ["1", "2", "3"], "level": [1, 1, 2]},
        trainer_state="S",
    )
    assert out.dtype == torch.float32
    assert same(out, [[2.0, 0.5], [4.0, NAN], [4.0, 0.5]])
    assert seen == {
        "ground_truth": ["1", "2", "3"],
        "trainer_state": "S",
        "ids": [[1], [2], [3]],
        "extra": {"level": [1, 1, 2]},
    }


def test_functions_without_kwargs_get_only_what_they_name():
    def strict(completions, level):
        return [float(lv) for lv in level]

    assert same(call(strict, ["a", "b"], level=[3, 4]), [[3.0], [4.0]])


def test_missing_argument_is_a_clear_error():
    def wants_answer(completions, answer):
        return [1.0] * len(completions)

    with pytest.raises(ValueError, match="'wants_answer' requires argument.*answer"):
        call(wants_answer, ["a"], ground_truth=["1"])


def test_column_length_mismatch():
    with pytest.raises(ValueError, match="'ground_truth' has 1 entries but there are 2"):
        call(length_reward, ["a", "b"], ground_truth=["1"])


def test_wrong_length_names_function_and_counts():
    def short(prompts, completions, **kwargs):
        return [1.0] * (len(completions) - 1)

    with pytest.raises(ValueError, match=r"'short' returned 3 rewards, expected 4"):
        call(short, ["a", "b", "c", "d"])


@pytest.mark.parametrize("bad", ["1.0", [1.0], {"x": 1}])
def test_non_number_names_function_and_index(bad):
    def sloppy(prompts, completions, **kwargs):
        return [1.0, bad]

    with pytest.raises(ValueError, match=r"'sloppy' returned a non-number at index 1"):
        call(sloppy, ["a", "b"])


def test_non_list_and_infinite_results_are_rejected():
    with pytest.raises(ValueError, match="'forgot' returned NoneType"):
        call(lambda_named("forgot", lambda **kw: None), ["a"])
    with pytest.raises(ValueError, match="must be finite"):
        call(lambda_named("inf", lambda **kw: [math.inf]), ["a"])


def test_tensor_numpy_and_bool_results_are_accepted():
    import numpy as np

    out = call(
        [
            lambda_named("t", lambda **kw: torch.tensor([1.0, 2.0])),
            lambda_named("n", lambda **kw: np.array([3.0, 4.0], dtype=np.float32)),
            lambda_named("b", lambda **kw: [True, False]),
        ],
        ["a", "b"],
    )
    assert same(out, [[1.0, 3.0, 1.0], [2.0, 4.0, 0.0]])


def lambda_named(name, fn):
    fn.__name__ = name
    return fn


def test_raising_function_names_function_and_first_failing_sample():
    def fragile(prompts, completions, **kwargs):
        return [1.0 / len(c) for c in completions]  # ZeroDivisionError on ""

    with pytest.raises(RuntimeError) as err:
        call(fragile, ["ok", "fine", "", "also", ""])
    message = str(err.value)
    assert "'fragile'" in message and "ZeroDivisionError" in message
    assert "index 2" in message
    assert isinstance(err.value.__cause__, ZeroDivisionError)


def test_batch_only_failure_is_reported_as_such():
    def batch_only(prompts, completions, **kwargs):
        if len(completions) > 1:
            raise RuntimeError("too many")
        return [0.0]

    with pytest.raises(RuntimeError, match="'batch_only'.*no single sample reproduces it"):
        call(batch_only, ["a", "b"])


def test_async_functions_run_concurrently():
    # Each function waits for the other's event: run one after the other, both would time out.
    first_started, second_started = asyncio.Event(), asyncio.Event()

    async def first(prompts, completions, **kwargs):
        first_started.set()
        await asyncio.wait_for(second_started.wait(), timeout=5)
        return [1.0] * len(completions)

    async def second(prompts, completions, **kwargs):
        second_started.set()
        await asyncio.wait_for(first_started.wait(), timeout=5)
        return [2.0] * len(completions)

    out = call([first, length_reward, second], ["abc", "de"])
    assert same(out, [[1.0, 3.0, 2.0], [1.0, 2.0, 2.0]])


def test_async_callable_object_and_none():
    class AsyncJudge:
        async def __call__(self, prompts, completions, **kwargs):
            await asyncio.sleep(0)
            return [None, 0.25]

    out = compute_rewards(prepare_reward_funcs(AsyncJudge()), ["p", "q"], ["a", "b"], None, {})
    assert same(out, [[NAN], [0.25]])


def test_async_failure_names_function_and_sample():
    async def async_fragile(prompts, completions, **kwargs):
        if "bad" in completions:
            raise KeyError("boom")
        return [1.0] * len(completions)

    with pytest.raises(RuntimeError, match=r"'async_fragile' raised KeyError.*index 1") as err:
        call(async_fragile, ["good", "bad"])
    assert isinstance(err.value.__cause__, KeyError)


def test_sync_failure_skips_pending_async_functions():
    started = []

    async def expensive_judge(prompts, completions, **kwargs):
        started.append(True)
        return [1.0] * len(completions)

    def broken(prompts, completions, **kwargs):
        raise ValueError("nope")

    with pytest.raises(RuntimeError, match="'broken' raised ValueError"):
        call([expensive_judge, broken], ["a"])
    assert started == []


# -- combining and metrics ---------------------------------------------------------------------


def test_combine_rewards_weights_and_missing_values():
    per_func = torch.tensor([[1.0, 2.0], [NAN, 3.0], [NAN, NAN], [0.5, NAN]])
    assert same(combine_rewards(per_func), [3.0, 3.0, NAN, 0.5])
    assert same(combine_rewards(per_func, [2.0, -1.0]), [0.0, -3.0, NAN, 1.0])


def test_combine_rewards_validates_weights():
    with pytest.raises(ValueError, match="3 entries but there are 2"):
        combine_rewards(torch.zeros(2, 2), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        combine_rewards(torch.zeros(2, 2), [1.0, NAN])


def test_reward_metrics_names_and_nan_aware_values():
    per_func = torch.tensor([[1.0, NAN, NAN], [3.0, 4.0, NAN], [5.0, NAN, NAN]])
    metrics = reward_metrics(per_func, ["acc", "fmt", "never"])
    assert set(metrics) == {
        f"rewards/{n}/{s}" for n in ("acc", "fmt", "never") for s in ("mean", "std")
    }
    assert metrics["rewards/acc/mean"] == pytest.approx(3.0)
    assert metrics["rewards/acc/std"] == pytest.approx(2.0)  # Bessel-corrected
    assert metrics["rewards/fmt/mean"] == pytest.approx(4.0)
    assert math.isnan(metrics["rewards/fmt/std"])
    assert math.isnan(metrics["rewards/never/mean"])
    with pytest.raises(ValueError, match="names"):
        reward_metrics(per_func, ["a"])


# -- answers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so the result is \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"first \boxed{1}, finally \boxed{x^{2} + {y}}", r"x^{2} + {y}"),
        (r"\boxed{5} and then a truncated \boxed{7", "5"),
        (r"<solution>12</solution> but \boxed{13}", "13"),  # boxed wins
        ("<solution>draft</solution> ... <solution> 17 </solution>", "17"),
        ("<SOLUTION>Paris</SOLUTION>", "Paris"),
        ("The answer is 9.", "9"),
        ("So the final answer is: **-3**", "-3"),
        ("Answer: 1,000 apples", "1,000 apples"),
        ("Final Answer:\n\n7/8", "7/8"),
        ("The answer is 12, since 3 * 4 = 12 and 5 > 1.", "12"),
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
        ("I got 3 apples and then 15 more", "15"),
        ("the temperature fell to -12 degrees", "-12"),
        ("x = -5", "-5"),
        ("pages 3-5 are blank", "5"),
        ("it costs $1,234.50 in total", "1,234.50"),
        ("nothing numeric here", None),
        ("", None),
        (r"\boxed{}", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "pred, truth",
    [
        ("1,000", "1000"),
        ("+5", "5"),
        ("4.0", "4"),
        ("4", 4),
        ("3.14159", "3.14"),
        ("2.675", "2.68"),  # half-up on the exact decimal, not the binary float
        (r"\frac{1}{2}", "0.5"),
        (r"-\dfrac{3}{4}", "-0.75"),
        ("1/3", "0.33"),
        ("$5", "5"),
        ("50%", "50"),
        (r"\text{Paris}.", "paris"),
        ("  New   York ", "new york"),
        ("3.5 cm", "3.5"),
        ("$\\boxed{7}$", "7"),
        ("B", ["A", "b"]),
        (r"\$18", "18"),  # LaTeX's escaped dollar
        (r"\$1,234.50", "1234.5"),
        (r"1{,}000", "1000"),  # LaTeX's thousands separator
    ],
)
def test_answers_match(pred, truth):
    assert answers_match(pred, truth)


@pytest.mark.parametrize(
    "pred, truth",
    [
        ("4.01", "4"),
        ("1001", "1000"),
        ("-5", "5"),
        ("2", "2 pi"),
        (None, "1"),
        ("", ""),
        ("London", "Paris"),
        ("1,2", "12"),
        ("2.001", "2"),  # not a rounding of an integer answer
        ("0.004", "0"),
        ("2", "2.4"),
        ("0.3", "1/3"),  # one place is not a rounding this accepts
    ],
)
def test_answers_do_not_match(pred, truth):
    assert not answers_match(pred, truth)


@pytest.mark.parametrize("text", ["Final Answer: The final answer is $42$. I hope it is correct.",
                                  "Answer: the answer is 42", "**Final answer:** the answer is 42."])
def test_a_phrase_inside_an_answer_phrase_gives_the_answer(text):
    assert answers_match(extract_answer(text), "42")


def test_normalize_answer_canonical_forms():
    assert normalize_answer("1,000.50") == "1000.5"
    assert normalize_answer("-0") == "0"
    assert normalize_answer("12345678901234567890") == "12345678901234567890"
    assert normalize_answer(r"\text{Yes}.") == "yes"


def test_accuracy_reward_strings_conversations_and_missing_truth():
    completions = [
        "Thinking... the answer is 72.",
        [{"role": "assistant", "content": r"So \boxed{1,000}"}],
        "I think it's 5",
        "whatever",
    ]
    truths = ["She sold 48 + 24 = 72 clips.\n#### 72", "1000", "6", None]
    assert accuracy_reward(["p"] * 4, completions, truths) == [1.0, 1.0, 0.0, None]


def test_accuracy_reward_through_compute_rewards():
    out = call("accuracy", ["<solution>42</solution>", "41"], ground_truth=["42", "42"])
    assert same(out, [[1.0], [0.0]])


def test_completion_text():
    assert completion_text("x") == "x"
    assert completion_text([{"role": "assistant", "content": "a"}]) == "a"
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "hi"}]}]
    assert completion_text(parts) == "hi"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<solution>4</solution>", 1.0),
        ("reasoning <solution>\n4\n</solution> done", 1.0),
        ("<solution>4</solution><solution>5</solution>", 1.0),
        ("<solution></solution>", 0.0),
        ("<solution>4", 0.0),
        ("4</solution>", 0.0),
        ("</solution>4<solution>", 0.0),
        ("<solution><solution>4</solution></solution>", 0.0),
        ("no tags", 0.0),
    ],
)
def test_format_reward(text, expected):
    assert format_reward(["p"], [text]) == [expected]


def test_make_format_reward_with_several_tags():
    teacher = make_format_reward(("thinking", "teaching"), name="teacher_format")
    assert teacher.__name__ == "teacher_format"
    good = "<thinking>why</thinking><teaching>how</teaching>"
    assert teacher(["p", "p"], [good, "<thinking>why</thinking>"]) == [1.0, 0.0]
    assert make_format_reward("solution")(["p"], ["<solution>1</solution>"]) == [1.0]
    with pytest.raises(ValueError, match="tag names"):
        make_format_reward(["<bad>"])


# -- reward model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model_path(tmp_path_factory):
    from tokenizers import decoders
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForSequenceClassification

    # A byte-level vocabulary with no merges: one token per byte. AutoTokenizer rebuilds a
    # Qwen2Tokenizer from a qwen2 checkpoint, and this vocabulary survives that rebuild.
    torch.manual_seed(0)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    config = Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=0,
    )
    path = tmp_path_factory.mktemp("models") / "tiny-rm"
    Qwen2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def reference_scores(model, tokenizer, texts):
    """Unbatched forward passes: no padding, so nothing for pooling to get wrong."""
    scores = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            scores.append(model(input_ids=ids).logits[0, 0].item())
    return scores


def test_reward_model_loaded_by_path_scores_prompt_plus_completion(reward_model_path):
    [(name, rm)] = prepare_reward_funcs(str(reward_model_path))
    assert name == "tiny-rm" and isinstance(rm, RewardModel)
    assert rm.model.config.num_labels == 1
    assert not any(p.requires_grad for p in rm.model.parameters())

    prompts = ["the answer is ", "the answer is ", "the "]
    completions = ["one", "two three four good", "bad"]  # different lengths: padding is exercised
    texts = [p + c for p, c in zip(prompts, completions, strict=True)]
    expected = reference_scores(rm.model, rm.tokenizer, texts)
    assert len(set(expected)) == 3  # the tiny model does distinguish the samples

    out = compute_rewards([(name, rm)], prompts, completions, None, {"ground_truth": ["1"] * 3})
    assert out.shape == (3, 1)
    assert torch.allclose(out[:, 0], torch.tensor(expected), atol=1e-5)

    rm.batch_size = 2  # micro-batched scoring gives the same numbers
    assert rm(prompts, completions) == pytest.approx(expected, abs=1e-5)
    assert rm.to("cpu") is rm


def test_reward_model_from_instance_and_conversations(reward_model_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(reward_model_path)
    [(name, rm)] = prepare_reward_funcs([], reward_model=model)
    assert name == "tiny-rm"  # the tokenizer and name come from the model's path
    convo = [{"role": "user", "content": "the answer is"}]
    with pytest.raises(ValueError, match="chat template"):
        rm([convo], [[{"role": "assistant", "content": "one"}]])

    rm.tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    )
    [score] = rm([convo], [[{"role": "assistant", "content": "one"}]])
    [expected] = reference_scores(
        rm.model, rm.tokenizer, ["<|user|> the answer is <|assistant|> one "]
    )
    assert score == pytest.approx(expected, abs=1e-5)
