"""Lightning callbacks for MoE fine-tuning: aux-loss logging, expert-load statistics, run summary figure, Hugging
Face export (merged, or the PEFT adapter of a LoRA run), a checkpoint on SIGTERM, predictions.jsonl, tokens per
second, the data / model match, the resumed position on another layout, one step's measured peak memory."""

from .data_check import DataMatchesModel
from .expert_load import ExpertLoadStats
from .hf_export import HFExport
from .lora_export import LoraExport
from .moe_aux_loss import MoEAuxLossLogger
from .predictions import PredictionWriter
from .preemption import PreemptionCheckpoint
from .resume_position import ResumePosition
from .run_checkpoint import RunCheckpoint
from .run_report import RunReport, StepProgressBar
from .run_summary import RunSummaryPlot
from .step_memory import StepMemoryProbe
from .throughput import TokensPerSecond

__all__ = ["DataMatchesModel", "ExpertLoadStats", "HFExport", "LoraExport", "MoEAuxLossLogger", "PredictionWriter",
           "PreemptionCheckpoint", "ResumePosition", "RunCheckpoint", "RunReport", "RunSummaryPlot", "StepMemoryProbe",
           "StepProgressBar", "TokensPerSecond"]
