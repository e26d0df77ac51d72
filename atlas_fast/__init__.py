"""atlas-fast: a lean GRPO trainer with fused Triton kernels (`atlas_kernels`)."""
from .config import GRPOConfig
from .trainer import EvalPrediction, GRPOTrainer

__all__ = ["GRPOConfig", "GRPOTrainer", "EvalPrediction"]
__version__ = "0.1.0"
