"""atlas-fast: a lean GRPO trainer with fused Triton kernels (`atlas_kernels`)."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Resolved on first use: `import atlas_fast.batch` (or the CLI's --help) should not pay for
# importing transformers, datasets and the trainer.
_EXPORTS = {
    "GRPOConfig": "atlas_fast.config",
    "GRPOTrainer": "atlas_fast.trainer",
    "EvalPrediction": "atlas_fast.trainer",
    "TeacherGRPOTrainer": "atlas_fast.teaching.trainer",
    "TeacherTrainer": "atlas_fast.teaching.protocol",
    "DiagnosticResult": "atlas_fast.teaching.diagnostic",
    "RIMReward": "atlas_fast.rewards.rim",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'atlas_fast' has no attribute {name!r}")
