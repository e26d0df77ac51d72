"""The teacher-student protocol: a teacher trained with GRPO to write guidance that lifts a frozen
student.

    diagnostic.py   DiagnosticResult, how a probe is assessed, capability tiers
    config.py       TeachingConfig: templates (configs/teaching/*.yaml), budgets, reward weights
    reward.py       the teaching reward (baseline vs guided outcome) and teacher metrics
    protocol.py     TeacherTrainer: the protocol as a mixin (student, probe, guidance, four batched calls)
    trainer.py      TeacherGRPOTrainer(GRPOTrainer, TeacherTrainer)
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "DiagnosticResult": "atlas_fast.teaching.diagnostic",
    "capability_tier": "atlas_fast.teaching.diagnostic",
    "TeachingConfig": "atlas_fast.teaching.config",
    "TeachingTemplates": "atlas_fast.teaching.config",
    "load_teaching_config": "atlas_fast.teaching.config",
    "TeachingReward": "atlas_fast.teaching.reward",
    "TeachingRewardWeights": "atlas_fast.teaching.reward",
    "TeacherTrainer": "atlas_fast.teaching.protocol",
    "TeachingBatch": "atlas_fast.teaching.protocol",
    "TeacherGRPOTrainer": "atlas_fast.teaching.trainer",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'atlas_fast.teaching' has no attribute {name!r}")
