"""RIM: a reward from a panel of LLM judges (accuracy, helpfulness, process, diagnostic) with
escalation from a small to a large judge model. See `RIMReward`."""

from atlas_fast.rewards.rim.clients import (
    HFClient,
    JudgeCallError,
    JudgeCaller,
    JudgeRequest,
    LiteLLMClient,
    OpenAIClient,
    build_client,
)
from atlas_fast.rewards.rim.config import JUDGES, ConsistencyConfig, JudgeModelConfig, RIMConfig, load_rim_config
from atlas_fast.rewards.rim.judging import apply_consistency, escalation_reason, lowest_uncertainty
from atlas_fast.rewards.rim.parsing import Judgement, JudgementError, Principle, parse_judgement, repair_json
from atlas_fast.rewards.rim.reward import RIMReward
from atlas_fast.rewards.rim.templates import PromptTemplate

__all__ = [
    "JUDGES",
    "ConsistencyConfig",
    "HFClient",
    "JudgeCallError",
    "JudgeCaller",
    "JudgeModelConfig",
    "JudgeRequest",
    "Judgement",
    "JudgementError",
    "LiteLLMClient",
    "OpenAIClient",
    "Principle",
    "PromptTemplate",
    "RIMConfig",
    "RIMReward",
    "apply_consistency",
    "build_client",
    "escalation_reason",
    "load_rim_config",
    "lowest_uncertainty",
    "parse_judgement",
    "repair_json",
]
