"""Data: multimodal chat/text files -> packed micro-batches with document boundaries (see datamodule.py)."""

from .datamodule import MultimodalPackingDataModule
from .packing import build_micro_batch
from .planning import EpochPackPlan, plan_packs
from .sampler import PackSampler

__all__ = ["EpochPackPlan", "MultimodalPackingDataModule", "PackSampler", "build_micro_batch", "plan_packs"]
