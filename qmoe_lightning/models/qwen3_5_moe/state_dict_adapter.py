"""HF <-> native state-dict conversion for Qwen3.5-MoE (`Qwen3_5MoeStateDictAdapter`).

HF layouts read:
- official fused experts: `...mlp.experts.gate_up_proj (E, 2I, H)` (gate rows, then up), `...experts.down_proj (E, H, I)`;
- per-expert (what transformers' save_pretrained writes): `...mlp.experts.{e}.{gate,up,down}_proj.weight`;
- `lm_head.weight` or `model.lm_head.weight`; VL prefixes (`model.language_model.`, `model.visual.`) or text-only
  prefixes (`model.`). A text-only model reading a VL checkpoint skips (and counts) the vision tower.
- `mtp.*` (multi-token prediction) tensors have no native module yet: they are kept aside, counted, and copied
  through unchanged on export, never dropped silently.

Native layout (x @ W): `...experts.gate_and_up_projs (E, H, 2I)`, `...experts.down_projs (E, I, H)`, and the shared
expert is `shared_experts` (plural), as in NeMo Automodel. Everything else keeps its HF name. `to_hf` writes the
official fused layout, which transformers loads as its in-memory layout.

A conversion from HF is a list of `Assignment`s: a native key, optionally an expert index and a column slice, and
the tensor to copy there. That lets the loader stream per-expert tensors straight into their slice of the native
parameter, so a checkpoint is never held twice in memory.
"""

from __future__ import annotations

import re

import torch

from ..conversion import Assignment, Skip

_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")
# keys that carry no learnt state (old checkpoints saved rotary buffers)
_IGNORABLE = re.compile(r"(\.rotary_emb\.inv_freq|\.rotary_pos_emb\.inv_freq)$")


class Qwen3_5MoeStateDictAdapter:
    def __init__(self, config, text_only: bool):
        """config: the model's config (Qwen3_5MoeConfig or Qwen3_5MoeTextConfig); text_only: native CausalLM."""
        self.text_only = text_only
        text = getattr(config, "text_config", config)
        self.num_experts = text.num_experts
        self.intermediate = text.moe_intermediate_size
        self.hidden = text.hidden_size
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self._decoder = "model." if text_only else "model.language_model."

    # ---- HF -> native -------------------------------------------------------------------------------------------
    def hf_key_to_native(self, key: str) -> str | Skip:
        """Rename only (no tensor work). Expert keys map to their fused native key."""
        if key.startswith("mtp."):
            return Skip("mtp")
        if _IGNORABLE.search(key):
            return Skip("ignorable")
        if key in ("lm_head.weight", "model.lm_head.weight"):
            return "lm_head.weight"
        if key.startswith("model.visual."):
            return Skip("vision") if self.text_only else key
        if key.startswith("model.language_model."):
            key = self._decoder + key[len("model.language_model.") :]
        elif key.startswith("model."):
            key = self._decoder + key[len("model.") :]
        key = key.replace(".mlp.shared_expert.", ".mlp.shared_experts.")
        m = _PER_EXPERT.match(key)
        if m:
            return m["prefix"] + (".down_projs" if m["proj"] == "down" else ".gate_and_up_projs")
        if key.endswith(".mlp.experts.gate_up_proj"):
            return key[: -len("gate_up_proj")] + "gate_and_up_projs"
        if key.endswith(".mlp.experts.down_proj"):
            return key[: -len("down_proj")] + "down_projs"
        return key

    def convert_single_tensor_from_hf(self, key: str, tensor: torch.Tensor) -> list[Assignment] | Skip:
        native = self.hf_key_to_native(key)
        if isinstance(native, Skip):
            return native
        E, I, H = self.num_experts, self.intermediate, self.hidden
        m = _PER_EXPERT.match(key)
        if m:
            e = int(m["e"])
            expected = (H, I) if m["proj"] == "down" else (I, H)
            _check(key, tensor, expected)
            cols = {"gate": slice(0, I), "up": slice(I, 2 * I), "down": None}[m["proj"]]
            return [Assignment(native, tensor.t(), expert=e, cols=cols)]
        if native.endswith(".gate_and_up_projs"):
            _check(key, tensor, (E, 2 * I, H))
            return [Assignment(native, tensor.transpose(1, 2))]
        if native.endswith(".down_projs"):
            _check(key, tensor, (E, H, I))
            return [Assignment(native, tensor.transpose(1, 2))]
        return [Assignment(native, tensor)]

    def from_hf(self, hf_state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Whole-dict conversion. Returns (native state dict, tensors kept aside: mtp.*)."""
        native: dict[str, torch.Tensor] = {}
        aside: dict[str, torch.Tensor] = {}
        for key, tensor in hf_state_dict.items():
            conv = self.convert_single_tensor_from_hf(key, tensor)
            if isinstance(conv, Skip):
                if conv.reason == "mtp":
                    aside[key] = tensor
                continue
            for a in conv:
                if a.expert is None:
                    native[a.native_key] = a.tensor.contiguous()
                    continue
                if a.native_key not in native:
                    cols = 2 * self.intermediate if a.native_key.endswith("gate_and_up_projs") else self.hidden
                    rows = self.hidden if a.native_key.endswith("gate_and_up_projs") else self.intermediate
                    native[a.native_key] = torch.empty(self.num_experts, rows, cols, dtype=a.tensor.dtype)
                target = native[a.native_key][a.expert]
                (target if a.cols is None else target[:, a.cols]).copy_(a.tensor)
        return native, aside

    # ---- native -> HF -------------------------------------------------------------------------------------------
    def convert_single_tensor_to_hf(self, fqn: str, tensor: torch.Tensor,
                                    contiguous: bool = True) -> list[tuple[str, torch.Tensor]]:
        """Rename one native tensor to the official HF name, transposing experts to the fused HF layout.
        contiguous=False: experts as transposed views sharing the native storage (an in-memory transformers model
        for generation; files need contiguous tensors)."""
        if fqn == "lm_head.weight" and self.tied:
            return []  # tied to the embedding, which is saved under its own name
        key = fqn.replace(".mlp.shared_experts.", ".mlp.shared_expert.")
        if key.endswith((".mlp.experts.gate_and_up_projs", ".mlp.experts.down_projs")) and \
                tensor.shape[0] != self.num_experts:
            raise ValueError(
                f"{fqn} holds {tensor.shape[0]} of {self.num_experts} experts (an expert-parallel shard?): gather "
                "all experts before writing a Hugging Face checkpoint")
        for native, hf in ((".mlp.experts.gate_and_up_projs", "gate_up_proj"), (".mlp.experts.down_projs", "down_proj")):
            if key.endswith(native):
                hf_tensor = tensor.transpose(1, 2)
                return [(key[: -len(native)] + ".mlp.experts." + hf, hf_tensor.contiguous() if contiguous else hf_tensor)]
        return [(key, tensor)]

    def to_hf(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for fqn, tensor in state_dict.items():
            out.update(self.convert_single_tensor_to_hf(fqn, tensor))
        return out


def _check(key: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(
            f"checkpoint tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(expected)} "
            "(HF layout: gate_up_proj (E, 2I, H), down_proj (E, H, I), per-expert gate/up (I, H), down (H, I)); "
            "is the config the one this checkpoint was saved with?"
        )
