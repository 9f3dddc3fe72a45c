"""The vocabulary of state-dict adapters (HF checkpoint <-> native tensors), shared by every model family.

A conversion from HF is a list of `Assignment`s (a native key, optionally an expert index and a column slice, and the
tensor to copy there), or a `Skip` saying why a checkpoint key is knowingly not loaded. Loaders (`checkpoint.py`,
`parallel/loading.py`) only speak this vocabulary; the family's adapter knows the names and layouts.
`MoeStateDictAdapter` is the adapter of transformers-named MoE families; a family subclass sets its expert layouts.
Native-only state (`is_native_only_key`: the routers' balancing bias, see moe.py) has no HF tensor: the adapter
exports nothing for it and loaders neither require it from an HF checkpoint nor accept it in one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .moe import is_balancing_bias_key


@dataclass
class Assignment:
    native_key: str
    tensor: torch.Tensor
    expert: int | None = None  # write into [expert] of the native tensor
    cols: slice | None = None  # and into these columns (last dim)

    @property
    def slot(self) -> str:
        return f"{self.native_key}[{self.expert},{self.cols}]" if self.expert is not None else self.native_key


@dataclass
class Skip:
    reason: str  # "mtp" (kept aside), "vision" (text-only model), "ignorable"


# expert layouts of a checkpoint file: "hf" = fused in transformers' in-memory layout, (E, 2I, H) / (E, H, I);
# "native" = fused as ours (x @ W), (E, H, 2I) / (E, I, H), which is how the published Qwen3-VL-MoE checkpoints store
# them; "per_expert" = one tensor per expert and projection, `experts.{e}.{gate,up,down}_proj.weight` (nn.Linear
# layout), how the published Qwen3-MoE checkpoints store them (always read, whatever a family declares)
HF, NATIVE, PER_EXPERT = "hf", "native", "per_expert"

_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")
# keys that carry no learnt state (old checkpoints saved rotary buffers)
_IGNORABLE = re.compile(r"(\.rotary_emb\.inv_freq|\.rotary_pos_emb\.inv_freq)$")


def is_native_only_key(fqn: str) -> bool:
    """A native state-dict key with no Hugging Face tensor (training state of this implementation: the routers'
    balancing bias). Exports skip it; HF loaders leave it as it is (an HF checkpoint cannot hold it)."""
    return is_balancing_bias_key(fqn)


class MoeStateDictAdapter:
    """HF <-> native names and layouts of a MoE family with transformers' naming (`model.language_model.*`,
    `model.visual.*`, `lm_head`). A family sets which fused expert layouts its checkpoints hold:

    READ_EXPERT_LAYOUTS: accepted when reading. A tensor whose shape is transformers' in-memory one is read as that
        layout, else as the native one if accepted: transformers' own rule (`Transpose(check_dims=True)` of its
        conversion mapping), so both always read a file the same way, also when the two shapes coincide (H == 2I).
    WRITE_EXPERT_LAYOUT: what `to_hf` writes (a fused layout whose shapes coincide with the in-memory one's is
        written in the in-memory layout, the only one transformers then reads correctly); PER_EXPERT writes one
        tensor per expert and projection.

    Also read: per-expert tensors (`...mlp.experts.{e}.{gate,up,down}_proj.weight`, what older transformers
    wrote), `lm_head.weight` or `model.lm_head.weight`, text-only prefixes (`model.`). A text-only model reading a
    vision-language checkpoint skips (and counts) the vision tower. `mtp.*` (multi-token prediction): a model with
    an MTP module (`mtp_layers` > 0) loads them into it under the same names (experts fused natively; the checkpoint's
    expert layout, per expert or fused, is what `mtp_expert_layout` writes back); a model without one keeps them
    aside, counted, and copied through unchanged on export, never dropped silently.
    Native names differ from HF ones only in the experts (`gate_and_up_projs`, `down_projs`) and the shared expert
    (`shared_experts`, plural, as NeMo Automodel).

    A conversion from HF is a list of `Assignment`s, so the loader streams per-expert tensors straight into their
    slice of the native parameter: a checkpoint is never held twice in memory.
    """

    READ_EXPERT_LAYOUTS: tuple[str, ...] = (HF,)
    WRITE_EXPERT_LAYOUT: str = HF
    # how `to_hf` writes MTP experts of a model built without a checkpoint: "fused" (the family's fused layout) or
    # "per_expert"; a loaded checkpoint's own layout replaces it (written back as read)
    MTP_EXPERT_LAYOUT: str = "fused"

    def __init__(self, config, text_only: bool, mtp_layers: int = 0):
        """config: the model's config (the VL config or its text config); text_only: a text-only native model;
        mtp_layers: depths of the model's MTP module (0: `mtp.*` tensors are passed through)."""
        self.text_only = text_only
        self.mtp_layers = mtp_layers
        self.mtp_expert_layout = self.MTP_EXPERT_LAYOUT
        text = config.get_text_config()  # transformers': the VL config's text_config, a text config itself
        self.num_experts = text.num_experts
        self.intermediate = text.moe_intermediate_size
        self.hidden = text.hidden_size
        self.tied = bool(config.tie_word_embeddings)  # declared by both families' VL and text configs
        self._decoder = "model." if text_only else "model.language_model."

    def _shapes(self, proj: str) -> dict[str, tuple[int, int, int]]:
        E, I, H = self.num_experts, self.intermediate, self.hidden
        if proj == "gate_up":
            return {HF: (E, 2 * I, H), NATIVE: (E, H, 2 * I)}
        return {HF: (E, H, I), NATIVE: (E, I, H)}

    # ---- HF -> native -------------------------------------------------------------------------------------------
    def hf_key_to_native(self, key: str) -> str | Skip:
        """Rename only (no tensor work). Expert keys map to their fused native key."""
        if key.startswith("mtp.") and not self.mtp_layers:
            return Skip("mtp")
        if _IGNORABLE.search(key):
            return Skip("ignorable")
        if key in ("lm_head.weight", "model.lm_head.weight"):
            return "lm_head.weight"
        if key.startswith("model.visual."):
            return Skip("vision") if self.text_only else key
        if key.startswith("model.language_model."):
            key = self._decoder + key[len("model.language_model."):]
        elif key.startswith("model.") and not key.startswith("mtp."):
            key = self._decoder + key[len("model."):]
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
        I, H = self.intermediate, self.hidden
        m = _PER_EXPERT.match(key)
        if m:
            e = int(m["e"])
            _check(key, tensor, {"per-expert": (H, I) if m["proj"] == "down" else (I, H)})
            cols = {"gate": slice(0, I), "up": slice(I, 2 * I), "down": None}[m["proj"]]
            return [Assignment(native, tensor.t(), expert=e, cols=cols)]
        if native.endswith((".gate_and_up_projs", ".down_projs")):
            shapes = self._shapes("gate_up" if native.endswith(".gate_and_up_projs") else "down")
            accepted = {layout: shapes[layout] for layout in self.READ_EXPERT_LAYOUTS}
            _check(key, tensor, accepted)
            if tuple(tensor.shape) == shapes[HF] and HF in accepted:
                return [Assignment(native, tensor.transpose(1, 2))]
            return [Assignment(native, tensor)]
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
                                    in_memory: bool = False) -> list[tuple[str, torch.Tensor]]:
        """Rename one native tensor to its HF name, experts in the family's file layout (contiguous).
        in_memory=True: experts in transformers' in-memory layout, as views sharing the native storage (an in-memory
        transformers model for generation)."""
        if fqn == "lm_head.weight" and self.tied:
            return []  # tied to the embedding, which is saved under its own name
        if is_native_only_key(fqn):
            return []  # the HF router has no bias: the export routes by the probabilities alone
        key = fqn.replace(".mlp.shared_experts.", ".mlp.shared_expert.")
        per_expert = self.mtp_expert_layout == "per_expert" if key.startswith("mtp.") \
            else self.WRITE_EXPERT_LAYOUT == PER_EXPERT
        if per_expert and not in_memory and key.endswith((".mlp.experts.gate_and_up_projs", ".mlp.experts.down_projs")):
            return self._per_expert(fqn, key, tensor)
        for native, hf, proj in ((".mlp.experts.gate_and_up_projs", "gate_up_proj", "gate_up"),
                                 (".mlp.experts.down_projs", "down_proj", "down")):
            if not key.endswith(native):
                continue
            if tensor.shape[0] != self.num_experts:
                raise ValueError(
                    f"{fqn} holds {tensor.shape[0]} of {self.num_experts} experts (an expert-parallel shard?): gather "
                    "all experts before writing a Hugging Face checkpoint")
            shapes = self._shapes(proj)
            # fused MTP experts of a family whose decoder experts are written per expert: transformers' layout,
            # the only fused one such a family reads
            fused = HF if self.WRITE_EXPERT_LAYOUT == PER_EXPERT else self.WRITE_EXPERT_LAYOUT
            layout = HF if in_memory or shapes[HF] == shapes[NATIVE] else fused
            out = tensor.transpose(1, 2) if layout == HF else tensor
            return [(key[: -len(native)] + ".mlp.experts." + hf, out if in_memory else out.contiguous())]
        return [(key, tensor)]

    def _per_expert(self, fqn: str, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Fused native experts -> `...experts.{e}.{gate,up,down}_proj.weight` (as Qwen3.5-35B-A3B stores MTP)."""
        if tensor.shape[0] != self.num_experts:
            raise ValueError(f"{fqn} holds {tensor.shape[0]} of {self.num_experts} experts: gather them first")
        prefix, I = key.rsplit(".", 1)[0], self.intermediate
        out = []
        for e in range(self.num_experts):
            if key.endswith("gate_and_up_projs"):
                out += [(f"{prefix}.{e}.gate_proj.weight", tensor[e, :, :I].t().contiguous()),
                        (f"{prefix}.{e}.up_proj.weight", tensor[e, :, I:].t().contiguous())]
            else:
                out.append((f"{prefix}.{e}.down_proj.weight", tensor[e].t().contiguous()))
        return out

    def to_hf(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for fqn, tensor in state_dict.items():
            out.update(self.convert_single_tensor_to_hf(fqn, tensor))
        return out


def _check(key: str, tensor: torch.Tensor, accepted: dict[str, tuple[int, ...]]) -> None:
    if tuple(tensor.shape) not in {tuple(s) for s in accepted.values()}:
        expected = " or ".join(f"{tuple(s)} ({layout} layout)" for layout, s in accepted.items())
        raise ValueError(
            f"checkpoint tensor {key!r} has shape {tuple(tensor.shape)}, expected {expected}; is the config the one "
            "this checkpoint was saved with?"
        )
