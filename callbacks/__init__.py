"""Lightning callbacks for MoE fine-tuning: aux-loss logging, expert-load statistics, Hugging Face export."""

from .expert_load import ExpertLoadStats
from .hf_export import HFExport
from .moe_aux_loss import MoEAuxLossLogger
from .run_checkpoint import RunCheckpoint

__all__ = ["ExpertLoadStats", "HFExport", "MoEAuxLossLogger", "RunCheckpoint"]
