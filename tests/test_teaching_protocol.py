"""The teacher-student protocol's setup and its metrics: what a teacher sees and how it is graded."""
from types import SimpleNamespace

import pytest
import torch

from atlas_fast.config import GRPOConfig
from atlas_fast.teaching import DiagnosticResult, protocol
from atlas_fast.teaching.trainer import TeacherGRPOTrainer
from tiny import char_tokenizer, tiny_model


class Host(protocol.TeacherTrainer):
    pass


def _host(tok, **config):
    host = Host()
    host.tokenizer, host.device, host.model = tok, torch.device("cpu"), tiny_model(tok)
    host.args = GRPOConfig(max_prompt_length=None, **config)
    return host


def test_teacher_prompts_use_the_trainers_chat_template_kwargs():
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<a>{% if enable_thinking is defined and not enable_thinking %}"
                         "nothink{% endif %}{% endif %}")
    host = _host(tok, chat_template_kwargs={"enable_thinking": False})
    host.setup_teaching(tiny_model(tok, seed=1), tok, {"templates": {"guidance": "{problem}>"}})
    prompt = tok.decode(host.teacher_prompt_ids(["1+1="], [DiagnosticResult(0.5, 0.5)])[0]).replace(" ", "")
    assert prompt.endswith("<a>nothink")


def test_a_vllm_server_student_needs_a_server_of_its_own():
    tok = char_tokenizer()
    host = _host(tok)
    with pytest.raises(ValueError, match="student_backend_options.base_url"):
        host.setup_teaching(tiny_model(tok, seed=1), tok, None, backend="vllm_server")


def test_rating_digits_that_share_a_first_token_are_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # SentencePiece-style: "1" encodes as ["▁", "1"], so every digit would start with "▁"
    vocab = {"<unk>": 0, "▁": 1, "1": 2, "2": 3, "3": 4, "4": 5, "5": 6, "<eos>": 7, "<pad>": 8}
    spm = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    spm.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=spm, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    host = _host(tok)
    with pytest.raises(ValueError, match="rating_digits .* must differ"):
        host.setup_teaching(tiny_model(tok, seed=1), tok, None)


def test_problems_without_a_ground_truth_count_in_no_accuracy():
    d = DiagnosticResult(0.5, 0.5)
    columns = dict(ground_truth=["4", None, ""], baseline_answer=["4", "7", "7"], student_answer=["4", "7", "7"],
                   guidance=["x", "y", "z"], baseline_tokens=[3, 3, 3], student_tokens=[3, 3, 3],
                   guidance_tokens=[5, 5, 5])
    metrics = TeacherGRPOTrainer._teaching_metrics(None, SimpleNamespace(diagnostics=[d, d, d]), columns)
    assert (metrics["student_accuracy"], metrics["baseline_accuracy"], metrics["leak_rate"]) == (1.0, 1.0, 0.0)
