"""Tests for atlas_fast.data: loading, aliases, split, prompt rendering, the resumable sampler."""

import json

import datasets
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from atlas_fast.data import (
    PromptSampler,
    epoch_permutation,
    is_conversational,
    load_dataset_any,
    render_prompt,
    train_eval_split,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(chat_template=CHAT_TEMPLATE):
    from transformers import PreTrainedTokenizerFast

    words = "[PAD] [UNK] <|user|> <|assistant|> <|system|> hello world what is two".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", chat_template=chat_template
    )


def rows(n):
    return [{"prompt": f"p{i}", "ground_truth": str(i), "idx": i} for i in range(n)]


def iterable(records):
    return datasets.IterableDataset.from_generator(lambda: iter(records))


def idx(batch):
    return [row["idx"] for row in batch]


# -- loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"problem": "q", "answer": "1"}, {"prompt": "q", "ground_truth": "1"}),
        ({"question": "q", "solution": "1"}, {"prompt": "q", "ground_truth": "1"}),
        # `problem` is preferred over `question`, `answer` over `solution`; the loser stays as is.
        (
            {"problem": "a", "question": "b", "answer": "1", "solution": "s"},
            {"prompt": "a", "question": "b", "ground_truth": "1", "solution": "s"},
        ),
        # A target that already exists is never overwritten.
        (
            {"prompt": "p", "question": "q", "ground_truth": "g", "answer": "a"},
            {"prompt": "p", "question": "q", "ground_truth": "g", "answer": "a"},
        ),
    ],
)
def test_aliases_renamed_only_when_target_absent(record, expected):
    ds = load_dataset_any([record])
    assert isinstance(ds, datasets.Dataset)
    assert ds[0] == expected


def test_accepts_dataset_and_keeps_other_columns():
    ds = load_dataset_any(datasets.Dataset.from_list([{"question": "q", "level": 3}]))
    assert ds.column_names == ["prompt", "level"]


def test_iterable_dataset_aliases():
    ds = load_dataset_any(
        iterable([{"problem": "q0", "answer": "0"}, {"problem": "q1", "answer": "1"}])
    )
    assert isinstance(ds, datasets.IterableDataset)
    assert list(ds) == [
        {"prompt": "q0", "ground_truth": "0"},
        {"prompt": "q1", "ground_truth": "1"},
    ]


def test_missing_prompt_names_existing_columns():
    with pytest.raises(ValueError, match="no 'prompt' column") as err:
        load_dataset_any([{"text": "x", "label": 1}])
    assert "text" in str(err.value) and "label" in str(err.value)


@pytest.mark.parametrize(
    "source",
    [[], datasets.Dataset.from_list([{"prompt": "x"}]).select([]), iterable([])],
    ids=["list", "dataset", "iterable"],
)
def test_empty_dataset_raises(source):
    with pytest.raises(ValueError, match="empty"):
        load_dataset_any(source)


def test_missing_file_raises(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError, match="not found") as err:
        load_dataset_any(missing)
    assert str(missing) in str(err.value)


def test_jsonl_file(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [{"question": "What is two?", "answer": 2}, {"question": "x?", "answer": "x + 1"}]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    for source in (path, str(path)):
        ds = load_dataset_any(source)
        assert ds.column_names == ["prompt", "ground_truth"]
        # Mixed int / str answers are kept as text rather than failing Arrow's type inference.
        assert ds["ground_truth"][:] == ["2", "x + 1"]


def test_json_file_list_and_wrapper(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"prompt": "p", "ground_truth": "1"}]))
    (tmp_path / "b.json").write_text(json.dumps({"data": [{"prompt": "p", "ground_truth": "1"}]}))
    assert load_dataset_any(tmp_path / "a.json")[0] == {"prompt": "p", "ground_truth": "1"}
    assert load_dataset_any(tmp_path / "b.json")[0] == {"prompt": "p", "ground_truth": "1"}


def test_bad_jsonl_line_reports_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_dataset_any(path)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt\nx\n")
    with pytest.raises(ValueError, match="Unsupported"):
        load_dataset_any(path)


def test_conversational_prompts_survive_loading():
    convo = [{"role": "user", "content": "hello"}]
    ds = load_dataset_any([{"prompt": convo, "ground_truth": "1"}])
    assert ds[0]["prompt"] == convo


# -- split -------------------------------------------------------------------------------------


def test_split_sizes_and_determinism():
    ds = load_dataset_any(rows(100))
    train, ev = train_eval_split(ds)
    assert (len(train), len(ev)) == (90, 10)
    assert sorted(train["idx"][:] + ev["idx"][:]) == list(range(100))
    train2, ev2 = train_eval_split(ds, seed=42)
    assert ev2["idx"][:] == ev["idx"][:]
    _, ev3 = train_eval_split(ds, seed=7)
    assert ev3["idx"][:] != ev["idx"][:]


def test_split_rounds_eval_up_and_can_be_disabled():
    ds = load_dataset_any(rows(15))
    train, ev = train_eval_split(ds, eval_fraction=0.1)
    assert (len(train), len(ev)) == (13, 2)
    train, ev = train_eval_split(ds, eval_fraction=0.0)
    assert ev is None and len(train) == 15


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="eval_fraction"):
        train_eval_split(load_dataset_any(rows(10)), eval_fraction=fraction)


def test_split_rejects_iterable():
    with pytest.raises(ValueError, match="IterableDataset"):
        train_eval_split(iterable(rows(10)))


# -- prompts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ([{"role": "user", "content": "hi"}], True),
        ([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}], True),
        ("hi", False),
        ([], False),
        ([{"role": "user"}], False),
        (["hi"], False),
        (None, False),
    ],
)
def test_is_conversational(prompt, expected):
    assert is_conversational(prompt) is expected


def test_render_prompt():
    tok = tiny_tokenizer()
    assert render_prompt("plain text", tok) == "plain text"
    assert render_prompt("plain text", None) == "plain text"
    convo = [{"role": "system", "content": "s"}, {"role": "user", "content": "hello"}]
    assert render_prompt(convo, tok) == "<|system|> s <|user|> hello <|assistant|>"


def test_render_prompt_continues_a_prefilled_assistant_turn():
    tok = tiny_tokenizer()
    convo = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    assert render_prompt(convo, tok) == "<|user|> hello <|assistant|> world"


def test_render_prompt_without_chat_template_is_a_clear_error():
    with pytest.raises(ValueError, match="chat template"):
        render_prompt([{"role": "user", "content": "hello"}], tiny_tokenizer(chat_template=None))
    with pytest.raises(ValueError, match="chat template"):
        render_prompt([{"role": "user", "content": "hello"}], None)
    with pytest.raises(TypeError, match="string or a list"):
        render_prompt(42, tiny_tokenizer())


# -- sampler -----------------------------------------------------------------------------------


def stream(sampler, num_batches):
    return [idx(next(sampler)) for _ in range(num_batches)]


def test_sampler_batches_are_full_and_cover_each_epoch():
    ds = load_dataset_any(rows(10))
    sampler = PromptSampler(ds, prompts_per_batch=4, seed=3)
    flat = [i for batch in stream(sampler, 5) for i in batch]  # 20 rows = exactly 2 epochs
    assert flat[:10] == epoch_permutation(10, 3, 0)
    assert flat[10:] == epoch_permutation(10, 3, 1)
    assert sorted(flat[:10]) == sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # reshuffled per epoch
    assert sampler.epoch == 2 and sampler.position == 0


def test_sampler_rows_carry_every_column():
    ds = load_dataset_any(rows(5))
    batch = next(PromptSampler(ds, prompts_per_batch=2, shuffle=False))
    assert batch == [
        {"prompt": "p0", "ground_truth": "0", "idx": 0},
        {"prompt": "p1", "ground_truth": "1", "idx": 1},
    ]


def test_sampler_is_deterministic_per_seed():
    ds = load_dataset_any(rows(12))
    a = stream(PromptSampler(ds, 5, seed=1), 6)
    b = stream(PromptSampler(ds, 5, seed=1), 6)
    c = stream(PromptSampler(ds, 5, seed=2), 6)
    assert a == b
    assert a != c


def test_sampler_without_shuffle_reads_in_order_and_wraps():
    ds = load_dataset_any(rows(5))
    assert stream(PromptSampler(ds, 3, shuffle=False), 3) == [[0, 1, 2], [3, 4, 0], [1, 2, 3]]


def test_sampler_epoch_flags_and_callbacks():
    events = []
    ds = load_dataset_any(rows(10))
    sampler = PromptSampler(
        ds,
        4,
        shuffle=False,
        on_epoch_begin=lambda e: events.append(("begin", e)),
        on_epoch_end=lambda e: events.append(("end", e)),
    )
    flags = []
    for _ in range(5):
        next(sampler)
        flags.append((sampler.epochs_begun, sampler.epochs_ended, sampler.epoch))
    assert flags == [
        ((0,), (), 0),
        ((), (), 0),
        ((1,), (0,), 1),  # rows 8, 9 of epoch 0, then rows 0, 1 of epoch 1
        ((), (), 1),
        ((), (1,), 2),  # ends exactly on the batch boundary
    ]
    assert events == [("begin", 0), ("end", 0), ("begin", 1), ("end", 1)]


def test_sampler_batch_larger_than_dataset_spans_epochs():
    ds = load_dataset_any(rows(3))
    sampler = PromptSampler(ds, 8, shuffle=False)
    assert idx(next(sampler)) == [0, 1, 2, 0, 1, 2, 0, 1]
    assert sampler.epochs_begun == (0, 1, 2)
    assert sampler.epochs_ended == (0, 1)
    assert sampler.num_batches(epochs=2) == 1  # ceil(6 / 8)


@pytest.mark.parametrize("make", [lambda r: load_dataset_any(r), iterable], ids=["map", "iterable"])
@pytest.mark.parametrize("consumed", [0, 1, 2, 3, 4, 7])
def test_sampler_exact_resume_across_epoch_boundary(make, consumed):
    # 10 rows, batches of 4: batch 3 straddles epochs 0/1, batch 5 ends epoch 1 exactly.
    records = rows(10)
    reference = PromptSampler(make(records), 4, seed=5)
    expected = stream(reference, consumed + 5)

    interrupted = PromptSampler(make(records), 4, seed=5)
    assert stream(interrupted, consumed) == expected[:consumed]
    state = json.loads(json.dumps(interrupted.state_dict()))  # must survive a checkpoint file

    resumed = PromptSampler(make(records), 4, seed=5)
    resumed.load_state_dict(state)
    assert stream(resumed, 5) == expected[consumed:]
    assert resumed.epoch == reference.epoch and resumed.position == reference.position


def test_sampler_refuses_a_state_from_another_configuration():
    ds = load_dataset_any(rows(10))
    state = PromptSampler(ds, 4, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        PromptSampler(ds, 4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_rows"):
        PromptSampler(load_dataset_any(rows(11)), 4, seed=1).load_state_dict(state)


def test_iterable_sampler_reads_in_order_with_epoch_flags():
    sampler = PromptSampler(iterable(rows(5)), 3)
    assert idx(next(sampler)) == [0, 1, 2]
    assert (sampler.epochs_begun, sampler.epochs_ended) == ((0,), ())
    assert idx(next(sampler)) == [3, 4, 0]
    # The end of the stream is seen with its last row, not one batch late.
    assert (sampler.epochs_begun, sampler.epochs_ended) == ((1,), (0,))
    assert sampler.num_rows is None
    with pytest.raises(ValueError, match="unknown"):
        sampler.num_batches(1)


def test_iterable_resume_past_end_of_changed_stream_fails():
    sampler = PromptSampler(iterable(rows(5)), 2)
    sampler.load_state_dict({"epoch": 0, "position": 7})
    with pytest.raises(ValueError, match="Cannot resume"):
        next(sampler)


def test_sampler_rejects_empty_and_bad_batch_size():
    with pytest.raises(ValueError, match="prompts_per_batch"):
        PromptSampler(load_dataset_any(rows(3)), 0)
    with pytest.raises(ValueError, match="empty"):
        next(PromptSampler(iterable([]), 2))


@pytest.mark.parametrize("rows, per_batch", [(5, 2), (4, 2), (3, 7), (6, 6)])
def test_upcoming_epochs_foresee_what_the_next_batch_begins(rows, per_batch):
    sampler = PromptSampler([{"prompt": str(i)} for i in range(rows)], per_batch, shuffle=True, seed=1)
    for _ in range(7):
        foreseen = sampler.upcoming_epochs()
        sampler.next_batch()
        assert foreseen == sampler.epochs_begun


def test_a_column_missing_from_the_first_record_is_kept(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "1+1?"}\n{"question": "2+2?", "answer": "4"}\n')
    for source in (path, [{"prompt": "a"}, {"prompt": "b", "ground_truth": "4"}]):
        ds = load_dataset_any(source)
        assert set(ds.column_names) == {"prompt", "ground_truth"}
        assert ds["ground_truth"] == [None, "4"]


def test_fractional_epochs_count_whole_batches_without_rounding_noise():
    sampler = PromptSampler(datasets.Dataset.from_dict({"prompt": [str(i) for i in range(100)]}), 1)
    assert sampler.num_batches(0.07) == 7 and sampler.num_batches(0.075) == 8


def test_a_new_seed_resumes_an_unshuffled_sampler_and_is_refused_for_a_shuffled_one():
    rows = [{"prompt": str(i)} for i in range(7)]
    first = PromptSampler(rows, 3, shuffle=False, seed=0)
    next(first)
    state = first.state_dict()
    again = PromptSampler(rows, 3, shuffle=False, seed=1)  # the seed orders nothing here
    again.load_state_dict(state)
    assert [r["prompt"] for r in next(again)] == [r["prompt"] for r in next(first)]
    shuffled = PromptSampler(rows, 3, shuffle=True, seed=0)
    next(shuffled)
    with pytest.raises(ValueError, match="saved seed=0 but this sampler has seed=1"):
        PromptSampler(rows, 3, shuffle=True, seed=1).load_state_dict(shuffled.state_dict())
