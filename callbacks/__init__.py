"""Lightning callbacks for MoE fine-tuning: aux-loss logging, expert-load statistics, run summary figure, Hugging
Face export."""

from .expert_load import ExpertLoadStats
from .hf_export import HFExport
from .moe_aux_loss import MoEAuxLossLogger
from .run_checkpoint import RunCheckpoint
from .run_report import RunReport, StepProgressBar
from .run_summary import RunSummaryPlot

__all__ = ["ExpertLoadStats", "HFExport", "MoEAuxLossLogger", "RunCheckpoint", "RunReport", "RunSummaryPlot",
           "StepProgressBar"]
