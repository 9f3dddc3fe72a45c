"""HF <-> native state-dict conversion for Qwen3-VL-MoE (`Qwen3VLMoeStateDictAdapter`).

Two fused expert layouts exist:
- the published checkpoints (Qwen/Qwen3-VL-30B-A3B-*, 235B-A22B-*): `...mlp.experts.gate_up_proj (E, H, 2I)` and
  `...experts.down_proj (E, I, H)`, i.e. x @ W, which is our native layout;
- transformers' in-memory layout `(E, 2I, H)` / `(E, H, I)`, which transformers 5.23's save_pretrained writes
  (its conversion mapping transposes published files on load, `Transpose(1, 2, check_dims=True)`, and nothing back
  on save).
Both are read (by shape, transformers' rule); `to_hf` writes the published layout, which transformers, vLLM and SGLang
load. No shared expert, no MTP; dense MLP layers keep their HF names (`mlp.{gate,up,down}_proj`).
"""

from __future__ import annotations

from ..conversion import HF, NATIVE, MoeStateDictAdapter


class Qwen3VLMoeStateDictAdapter(MoeStateDictAdapter):
    READ_EXPERT_LAYOUTS = (HF, NATIVE)
    WRITE_EXPERT_LAYOUT = NATIVE
