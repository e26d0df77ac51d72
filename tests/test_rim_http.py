"""RIMReward against judges served over real HTTP on 127.0.0.1 (an OpenAI-compatible
/v1/chat/completions server in a thread): keys, malformed replies, timeouts, retries, caching,
bounded concurrency, and a GRPO run that logs the judges."""
from __future__ import annotations

import json
import logging
import threading

import pytest
import torch
from rim_helpers import JudgeServer, judgement, rim_config
from tiny import arithmetic_rows, char_tokenizer, tiny_model

from atlas_fast import GRPOConfig, GRPOTrainer
from atlas_fast.metrics import read_metrics
from atlas_fast.rewards.rim import OpenAIClient, RIMReward

SECRET = "sk-test-0123456789abcdef"


def test_judges_over_http_with_escalation_to_a_second_server():
    spread = {0.2: 0.1, 0.5: 0.5, 0.8: 0.9}

    def small(call, headers):
        return judgement(spread[call.temperature] if call.judge == "accuracy" else 0.8)

    with JudgeServer(small) as s, JudgeServer(lambda c, h: judgement(0.55, rationale="large")) as lg:
        reward = RIMReward(rim_config(s.base_url, lg.base_url, judges=["accuracy", "helpfulness"],
                                      consistency={"enabled": False}))
        rewards, [info] = reward(["What is 2+2?"], ["4"], ground_truth=["4"], return_info=True)
    assert rewards == [pytest.approx((0.55 + 0.8) / 2)]
    assert info["tier"] == {"accuracy": 2, "helpfulness": 1}
    assert [c.model for c in lg.calls] == ["large-judge"] and lg.calls[0].escalated
    assert {c.model for c in s.calls} == {"small-judge"} and len(s.calls) == 2 * 3
    assert s.headers[0].get("Authorization") is None  # no api_key_env: no header


def test_api_key_comes_from_the_environment_and_never_leaks(monkeypatch, caplog):
    monkeypatch.setenv("RIM_TEST_KEY", SECRET)

    def echo_error(call, headers):  # a server that echoes the credentials it got
        if call.escalated:
            return 500, json.dumps({"error": f"bad key {headers.get('Authorization')}"}).encode()
        return 401, json.dumps({"error": f"rejected {headers.get('Authorization')}"}).encode()

    caplog.set_level(logging.DEBUG)
    with JudgeServer(echo_error) as server:
        cfg = rim_config(server.base_url, judges=["accuracy"],
                         small_model={"api_key_env": "RIM_TEST_KEY"}, large_model={"api_key_env": "RIM_TEST_KEY"})
        reward = RIMReward(cfg)
        rewards, infos = reward(["q"], ["a"], return_info=True)
    assert server.headers[0]["Authorization"] == f"Bearer {SECRET}"
    assert rewards == [0.0] and "HTTP 500" in infos[0]["failed"]["accuracy"]
    assert "HTTP 401" in infos[0]["samples"]["accuracy"][0]["error"]
    assert "***" in infos[0]["failed"]["accuracy"]  # the echoed key was scrubbed
    for text in (json.dumps(infos), repr(reward), repr(reward.small.client), str(reward.config),
                 json.dumps(reward.last_table), caplog.text):
        assert SECRET not in text
    # 401 is not retried; 500 is (max_retries=1)
    assert len(server.calls) == 3 + 2

    monkeypatch.delenv("RIM_TEST_KEY")
    with pytest.raises(ValueError, match="reward_system.small_model: .*RIM_TEST_KEY is not set"):
        RIMReward(cfg)


def test_malformed_json_is_repaired_or_counted_as_failed():
    def sloppy(call, headers):
        if call.judge == "accuracy":  # fenced, trailing comma, prose around it: repairable
            return "Sure!\n```json\n" + judgement(0.9)[:-1] + ",}\n```\nHope this helps."
        return "{'score': 0.7, 'uncertainty': 0.1, 'rationale': 'no principles'"  # truncated

    with JudgeServer(sloppy) as server:
        reward = RIMReward(rim_config(server.base_url, judges=["accuracy", "process"],
                                      consistency={"enabled": False}))
        rewards, [info] = reward(["q"], ["a"], return_info=True)
    assert info["rewards"] == {"accuracy": 0.9, "process": 0.0}
    assert all(s["repaired"] for s in info["samples"]["accuracy"])
    assert set(info["failed"]) == {"process"}
    assert reward.last_metrics["rim/tier1_parse_rate"] == 0.5
    # process: 3 tier-1 + 1 escalation calls, each asked twice (parse_retries=1); accuracy: 3
    assert len(server.calls) == 3 + 4 * 2


def test_a_hanging_judge_is_bounded_by_the_configured_timeout():
    def hang(call, headers):
        server.release.wait(timeout=30)  # replies only when the test is over
        return judgement(1.0)

    with JudgeServer(hang) as server:
        reward = RIMReward(rim_config(server.base_url, judges=["accuracy"], temperatures=[0.2],
                                      timeout_s=0.3, max_retries=1))
        rewards, [info] = reward(["q"], ["a"], return_info=True)
        assert server.completed == 0  # the call returned before any reply was written
    assert rewards == [0.0]
    assert "no complete reply within 0.3 s" in info["samples"]["accuracy"][0]["error"]
    assert info["samples"]["accuracy"][0]["attempts"] == 2  # timeouts are retried max_retries times
    assert "no complete reply within 0.3 s" in info["failed"]["accuracy"]
    assert len(server.calls) == 2 + 2  # tier 1 and the escalation, each sent twice


def test_transient_errors_are_retried_with_backoff():
    failures = {"left": 2}
    lock = threading.Lock()

    def flaky(call, headers):
        with lock:
            if failures["left"]:
                failures["left"] -= 1
                return 503, b'{"error": "overloaded"}'
        return judgement(0.8)

    with JudgeServer(flaky) as server:
        reward = RIMReward(rim_config(server.base_url, judges=["accuracy"], temperatures=[0.2],
                                      max_retries=2))
        assert reward(["q"], ["a"]) == [0.8]
    assert len(server.calls) == 3 and reward.small.stats["retries"] == 2


def test_identical_calls_are_served_from_the_cache():
    with JudgeServer(lambda c, h: judgement(0.6)) as server:
        reward = RIMReward(rim_config(server.base_url, judges=["accuracy", "process"]))
        # two identical samples in one batch: one set of requests
        first = reward(["2+2?", "2+2?"], ["4", "4"])
        sent = len(server.calls)
        assert sent == 2 * 3
        again = reward(["2+2?"], ["4"])
        assert len(server.calls) == sent and again == first[:1]
        assert all(s["cached"] for s in reward.last_info[0]["samples"]["process"])
        assert reward.last_metrics["rim/requests"] == 0 and reward.last_metrics["rim/cache_hits"] == 6
        reward(["2+2?"], ["5"])  # a different completion is a different call
        assert len(server.calls) == sent + 2 * 3
    assert len(set(server.peers)) <= 4  # max_parallel workers, each keeping its connection


def test_a_connection_the_server_dropped_is_replaced_without_a_retry():
    with JudgeServer(lambda c, h: judgement(0.6), close_after_reply=True) as server:
        reward = RIMReward(rim_config(server.base_url, judges=["accuracy"], max_parallel=1, max_retries=0))
        assert reward(["q1", "q2"], ["a", "b"]) == [0.6, 0.6]
    assert len(server.calls) == 6 and len(set(server.peers)) == 6


def test_cache_can_be_disabled():
    with JudgeServer(lambda c, h: judgement(0.6)) as server:
        reward = RIMReward(rim_config(server.base_url, judges=["accuracy"], cache_size=0))
        reward(["q"], ["a"])
        reward(["q"], ["a"])
    assert len(server.calls) == 2 * 3


def test_concurrency_is_bounded_by_max_parallel():
    gate = threading.Barrier(2, timeout=10)

    def slow(call, headers):
        try:
            gate.wait()  # two requests must be in flight together for either to proceed
        except threading.BrokenBarrierError:
            pass
        return judgement(0.5)

    with JudgeServer(slow) as server:
        reward = RIMReward(rim_config(server.base_url, judges=["accuracy", "process", "helpfulness"],
                                      max_parallel=2))
        reward(["q1", "q2"], ["a1", "a2"])
    assert server.max_in_flight == 2 and len(server.calls) == 2 * 3 * 3


def test_client_rejects_bad_urls_and_non_chat_replies():
    with pytest.raises(ValueError, match="http"):
        OpenAIClient("127.0.0.1:8000/v1")
    with pytest.raises(ValueError, match="must not hold credentials") as err:
        OpenAIClient(f"https://user:{SECRET}@judge.example/v1")
    assert SECRET not in str(err.value)
    with JudgeServer(lambda c, h: (200, b'{"object": "list"}')) as server:
        reward = RIMReward(rim_config(server.base_url, judges=["accuracy"], temperatures=[0.2]))
        _, [info] = reward(["q"], ["a"], return_info=True)
    assert "not a chat-completions reply" in info["samples"]["accuracy"][0]["error"]
    assert len(server.calls) == 2  # not retried: resending would get the same reply


# -- a GRPO run scored by RIM ------------------------------------------------------------------


@pytest.fixture
def one_thread():
    # [8, 12, 32] matmuls: a second intra-op thread only adds synchronisation on a shared CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_grpo_trainer_logs_judges_and_writes_explanations(tmp_path, one_thread):
    def digits_judge(call, headers):
        answer = call.user.split("Work to judge:")[-1] if call.judge == "process" else call.user
        score = 0.9 if any(ch.isdigit() for ch in answer.split("Reference answer")[0][-20:]) else 0.2
        return judgement(score, rationale=f"{call.judge}: checked the digits")

    tok = char_tokenizer()
    with JudgeServer(digits_judge) as server:
        rim = RIMReward(rim_config(server.base_url, judges=["accuracy", "process"]))
        config = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=2, num_generations=4,
                            per_device_train_batch_size=8, max_completion_length=4, learning_rate=1e-3,
                            seed=0, use_kernels=False, disable_tqdm=True, report_to=["jsonl"])
        trainer = GRPOTrainer(config, model=tiny_model(tok), tokenizer=tok,
                              train_dataset=arithmetic_rows(8), reward_funcs=[rim])
        trainer.train()
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    assert len(records) == 2
    for r in records:
        assert 0.0 <= r["rim_rewards/accuracy"] <= 1.0 and 0.0 <= r["rim_rewards/process"] <= 1.0
        assert r["rewards/rim/mean"] == pytest.approx((r["rim_rewards/accuracy"] + r["rim_rewards/process"]) / 2,
                                                      abs=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "run" / "rim_explanations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 8 and {r["step"] for r in rows} == {r["step"] for r in records} == {1, 2}
    assert rows[0]["explanations"]["process"] == "process: checked the digits"
    assert set(rows[0]["rewards"]) == {"accuracy", "process"}


# -- the CLI -----------------------------------------------------------------------------------


def test_cli_appends_rim_with_its_weight():
    from atlas_fast import cli
    from omegaconf import OmegaConf

    def spec(*overrides):
        cfg = cli.compose_config(["reward=demo", *overrides])
        return cli.resolve(OmegaConf.to_container(cfg, resolve=True))

    plain = spec()
    assert plain.reward_system is None and plain.config.reward_weights == [1.0, 0.2]
    rim = spec("reward_system=interpretation_offline", "reward_system.weight=0.5")
    assert rim.reward_system["judges"] == ["helpfulness", "process"]
    assert rim.config.reward_weights == [1.0, 0.2, 0.5]  # funcs, then RIM
    unweighted = spec("reward=accuracy", "reward_system=interpretation", "reward_system.weight=2.0")
    assert unweighted.config.reward_weights == [1.0, 2.0]
    with pytest.raises(ValueError, match="reward_system.variance_threshold"):
        spec("reward_system=interpretation", "reward_system.variance_threshold=-1")


def test_cli_trains_with_rim_against_a_loopback_judge(tmp_path, capsys, one_thread):
    from atlas_fast import cli

    tok = char_tokenizer()
    tiny_model(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows(4)))
    out = tmp_path / "run"
    with JudgeServer(lambda c, h: judgement(0.7, rationale=f"{c.judge} fine")) as server:
        code = cli.main([
            "train", f"model.name_or_path={tmp_path / 'model'}", "data=jsonl",
            f"data.train_file={tmp_path / 'train.jsonl'}", "reward=accuracy", "recipe=default",
            "reward_system=interpretation_offline", f"reward_system.small_model.base_url={server.base_url}",
            f"reward_system.large_model.base_url={server.base_url}", "reward_system.backoff_s=0.01",
            "trainer.max_steps=1", "trainer.num_generations=2", "trainer.per_device_train_batch_size=2",
            "trainer.max_completion_length=2", "trainer.disable_tqdm=true", "evaluate_before_after=false",
            f"output_dir={out}",
        ])
    assert code == 0, capsys.readouterr().out
    [record] = [r for r in read_metrics(out / "metrics.jsonl") if "reward" in r]
    assert record["rim_rewards/helpfulness"] == pytest.approx(0.7) and "rim_rewards/accuracy" not in record
    assert record["rewards/rim/mean"] == pytest.approx(0.7)
    rows = (out / "rim_explanations.jsonl").read_text().splitlines()
    assert len(rows) == 2 and json.loads(rows[0])["explanations"]["process"] == "process fine"
    assert {c.model for c in server.calls} == {"Qwen/Qwen2.5-7B-Instruct"}


def test_teacher_cli_appends_rim_to_the_teaching_reward(tmp_path, capsys, one_thread):
    from atlas_fast import cli

    out = tmp_path / "teacher"
    with JudgeServer(lambda c, h: judgement(0.4, rationale=f"{c.judge} ok")) as server:
        code = cli.main([
            "train", "recipe=teacher_demo", "reward_system=interpretation_offline",
            f"reward_system.small_model.base_url={server.base_url}",
            f"reward_system.large_model.base_url={server.base_url}", "reward_system.backoff_s=0.01",
            "trainer.max_steps=1", "trainer.per_device_train_batch_size=16", "trainer.disable_tqdm=true",
            "evaluate_before_after=false", f"output_dir={out}",
        ])
    assert code == 0, capsys.readouterr().out
    [record] = [r for r in read_metrics(out / "metrics.jsonl") if "reward" in r]
    assert record["rim_rewards/process"] == pytest.approx(0.4)
    assert "rewards/teaching_reward/mean" in record and record["rewards/rim/mean"] == pytest.approx(0.4)
    assert len((out / "rim_explanations.jsonl").read_text().splitlines()) == 16
