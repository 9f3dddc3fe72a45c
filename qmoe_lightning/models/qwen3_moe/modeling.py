"""Qwen3-MoE: `Qwen3MoeForCausalLM`, the text-only forward (`text_only.TextMoeCausalLM`) over the shared
attention-only decoder (`attention_decoder.py`: GQA with q/k RMSNorm, plain RoPE, MoE on the layers
`decoder_sparse_step` / `mlp_only_layers` select and a dense MLP elsewhere, top-k renormalised when `norm_topk_prob`).

What is Qwen3-MoE's own is its checkpoint layout: the published checkpoints store every expert's projections apart
(`model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight`, nn.Linear layout), which is what exports write;
transformers' fused in-memory layout (`experts.gate_up_proj (E, 2I, H)`, `down_proj (E, H, I)`) is read too.
Sliding-window attention (`use_sliding_window`) is refused: no published Qwen3-MoE checkpoint uses it.
"""

from __future__ import annotations

from torch import nn
from transformers import Qwen3MoeConfig

from ..attention_decoder import AttentionDecoderBackend
from ..conversion import HF, PER_EXPERT, MoeStateDictAdapter
from ..text_only import TextMoeCausalLM


class Qwen3MoeStateDictAdapter(MoeStateDictAdapter):
    READ_EXPERT_LAYOUTS = (HF,)  # and per expert, always
    WRITE_EXPERT_LAYOUT = PER_EXPERT


class Qwen3MoeForCausalLM(TextMoeCausalLM):
    HF_ARCHITECTURE = "Qwen3MoeForCausalLM"
    MODEL_TYPES = ("qwen3_moe",)
    STATE_DICT_ADAPTER = Qwen3MoeStateDictAdapter

    def __init__(self, config: Qwen3MoeConfig):
        super().__init__()
        if config.use_sliding_window:
            raise NotImplementedError("Qwen3-MoE with use_sliding_window: sliding-window attention is not "
                                      "implemented (no published Qwen3-MoE checkpoint uses it)")
        self.config = self.text_config = config
        self.model = AttentionDecoderBackend(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
