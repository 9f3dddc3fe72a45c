"""Data: multimodal chat/text files -> packed micro-batches with document boundaries (see datamodule.py)."""

from .datamodule import MultimodalPackingDataModule
from .packing import build_micro_batch, plan_packs
from .sampler import PackSampler

__all__ = ["MultimodalPackingDataModule", "PackSampler", "build_micro_batch", "plan_packs"]
