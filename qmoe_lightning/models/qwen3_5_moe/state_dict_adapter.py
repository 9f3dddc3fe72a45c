"""HF <-> native state-dict conversion for Qwen3.5-MoE (`Qwen3_5MoeStateDictAdapter`).

HF layouts read: the official fused experts `...mlp.experts.gate_up_proj (E, 2I, H)` (gate rows, then up) and
`...experts.down_proj (E, H, I)` (transformers' in-memory layout, which its save_pretrained also writes), and
per-expert `...mlp.experts.{e}.{gate,up,down}_proj.weight`. `to_hf` writes the official fused layout. The shared
expert is `shared_expert` in HF names, `shared_experts` natively; `mtp.*` is copied through. Everything else, and the
mechanics, is the shared `conversion.MoeStateDictAdapter`.
"""

from __future__ import annotations

from ..conversion import HF, MoeStateDictAdapter


class Qwen3_5MoeStateDictAdapter(MoeStateDictAdapter):
    READ_EXPERT_LAYOUTS = (HF,)
    WRITE_EXPERT_LAYOUT = HF
