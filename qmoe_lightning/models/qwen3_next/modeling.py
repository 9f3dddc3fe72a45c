"""Qwen3-Next: `Qwen3NextForCausalLM`, the text-only forward (`text_only.TextMoeCausalLM`) over the shared hybrid
decoder (`hybrid_decoder.py`: Gated DeltaNet and gated attention with partial plain RoPE, MoE with a sigmoid-gated
shared expert, zero-centred norms) and the multi-token prediction module (`mtp.*`, as Qwen3.5's).

What is Qwen3-Next's own:
- the Gated DeltaNet projections fused per key head (`in_proj_qkvz`, `in_proj_ba`; see `gated_deltanet.py`), held
  natively as published, so loaders, exporters and PEFT adapters take them unchanged;
- dense SwiGLU layers where `mlp_only_layers` / `decoder_sparse_step` say (the 80B checkpoints have none);
- the checkpoint layout: the published checkpoints store every expert's projections apart
  (`model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight`, the MTP layer's too), which is what exports write;
  transformers' fused in-memory layout is read as well.
"""

from __future__ import annotations

from torch import nn
from transformers import Qwen3NextConfig

from ..conversion import HF, PER_EXPERT, MoeStateDictAdapter
from ..hybrid_decoder import HybridDecoderBackend, HybridMoeBlock, mtp_block_factory
from ..norms import ZeroCenteredRMSNorm
from ..text_only import TextMoeCausalLM


class Qwen3NextStateDictAdapter(MoeStateDictAdapter):
    READ_EXPERT_LAYOUTS = (HF,)  # and per expert, always
    WRITE_EXPERT_LAYOUT = PER_EXPERT
    MTP_EXPERT_LAYOUT = "per_expert"  # the MTP layer's experts are stored apart like the decoder's


class Qwen3NextBlock(HybridMoeBlock):
    GROUPED_PROJECTIONS = True
    DENSE_LAYERS = True


class Qwen3NextForCausalLM(TextMoeCausalLM):
    HF_ARCHITECTURE = "Qwen3NextForCausalLM"
    MODEL_TYPES = ("qwen3_next",)
    STATE_DICT_ADAPTER = Qwen3NextStateDictAdapter

    def __init__(self, config: Qwen3NextConfig, mtp_layers: int = 0, mtp_loss_scale: float = 0.1):
        """mtp_layers: build the multi-token prediction module (`mtp.*`) with this many depths (0: none)."""
        super().__init__()
        self.config = self.text_config = config
        self.model = HybridDecoderBackend(config, Qwen3NextBlock)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.add_mtp(mtp_layers, mtp_loss_scale, mtp_block_factory(Qwen3NextBlock), ZeroCenteredRMSNorm)
