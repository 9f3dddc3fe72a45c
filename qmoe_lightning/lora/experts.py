"""`LoRAGroupedExperts`: per-expert LoRA on the routed experts, computed inside the grouped-GEMM path.

Parameters (native x @ W layout, E = experts, H = hidden, I = moe intermediate, r = expert rank):
    gate_and_up_lora_A (E, H, r)    gate_and_up_lora_B (E, r, 2I)     columns of B: gate | up, like the base
    down_lora_A        (E, I, r)    down_lora_B        (E, r, H)
Every adapter tensor has the expert on dim 0, exactly like `gate_and_up_projs (E, H, 2I)` / `down_projs (E, I, H)`,
so expert parallelism shards them with `Shard(0)` on the same mesh as the experts they adapt: an EP rank holds the
adapters of its own experts and nothing else.

Forward (the notable choice): the experts' own computation (`GroupedExperts.swiglu`, rows sorted by expert, local
or expert-parallel) with the adapter added by `adapt` after each projection, as two extra matmuls of the same kind
(grouped GEMM or segment loop) on the same rows and offsets:
    h  = xs @ W_gu[e]            + s * (xs @ A_gu[e]) @ B_gu[e]
    ys = act(h) @ W_down[e]      + s * (act(h) @ A_down[e]) @ B_down[e]
No per-step delta of the full expert weights (E*H*2I) is formed: the extra work is O(tokens * r * (in + out)),
a small fraction of the base GEMMs for r << I, and the backward only produces (E, in, r) / (E, r, out) gradients.
`torch._grouped_mm` wants 16-byte aligned strides, so a rank whose row is not a multiple of 16 bytes is zero-padded
on the fly (an adapter-sized copy; exact, the padded rank contributes 0). The scale alpha/r is applied on the r-wide
intermediate (cheapest place).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qmoe_lightning.models.moe import GroupedExperts, grouped_mm
from qmoe_lightning.models.norms import KeepFp32Mixin

PROJECTIONS = ("gate_up", "down")


class LoRAGroupedExperts(KeepFp32Mixin, GroupedExperts):
    def __init__(self, base: GroupedExperts, rank: int, alpha: float, projections=PROJECTIONS,
                 dtype: torch.dtype | None = None):
        nn.Module.__init__(self)  # GroupedExperts.__init__ would allocate (and init) a second set of experts
        self.num_experts = base.num_experts
        self.intermediate_size = base.intermediate_size
        self.gate_and_up_projs = base.gate_and_up_projs
        self.down_projs = base.down_projs
        self.dispatcher, self.num_local_experts = base.dispatcher, base.num_local_experts
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.projections = tuple(p for p in PROJECTIONS if p in projections)
        E, H, I2 = base.gate_and_up_projs.shape
        I = I2 // 2
        # dtype: the adapter may be wider than the base (fp32 masters under bf16); cast to the activations in forward
        factory = dict(device=base.gate_and_up_projs.device, dtype=dtype or base.gate_and_up_projs.dtype)

        def new(*shape):
            return nn.Parameter(torch.empty(*shape, **factory))

        gu, dn = "gate_up" in self.projections, "down" in self.projections
        self.gate_and_up_lora_A = new(E, H, rank) if gu else None
        self.gate_and_up_lora_B = new(E, rank, 2 * I) if gu else None
        self.down_lora_A = new(E, I, rank) if dn else None
        self.down_lora_B = new(E, rank, H) if dn else None
        # fp32 adapters (masters under a bf16 base) survive a later `.to(bf16)` of the model (Lightning's bf16-true)
        self._fp32_names = ("gate_and_up_lora_A", "gate_and_up_lora_B", "down_lora_A", "down_lora_B") \
            if factory["dtype"] == torch.float32 else ()
        if factory["device"].type != "meta":
            self.reset_lora_parameters()

    # ------------------------------------------------------------------ init
    def reset_lora_parameters(self) -> None:
        # PEFT's default for its (in -> r*E) lora_A Linear: kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
        for A, B in self.adapter_pairs().values():
            bound = 1.0 / math.sqrt(A.shape[1])
            nn.init.uniform_(A, -bound, bound)
            nn.init.zeros_(B)

    def reset_parameters(self, std: float = 0.02) -> None:  # meta-device init: base and adapters
        super().reset_parameters(std)
        self.reset_lora_parameters()

    def expert_tensors(self) -> dict[str, nn.Parameter]:
        """The base experts and the per-expert adapters (all with the expert on dim 0)."""
        out = super().expert_tensors()
        for projection, (A, B) in self.adapter_pairs().items():
            prefix = "gate_and_up" if projection == "gate_up" else "down"
            out[f"{prefix}_lora_A"], out[f"{prefix}_lora_B"] = A, B
        return out

    def adapter_pairs(self) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
        """projection -> (A, B) for the adapted projections."""
        out = {}
        if self.gate_and_up_lora_A is not None:
            out["gate_up"] = (self.gate_and_up_lora_A, self.gate_and_up_lora_B)
        if self.down_lora_A is not None:
            out["down"] = (self.down_lora_A, self.down_lora_B)
        return out

    # ------------------------------------------------------------------ forward
    def adapt(self, projection: str, x: torch.Tensor, y: torch.Tensor, offs: torch.Tensor, mm) -> torch.Tensor:
        """y + s * (x @ A[e]) @ B[e] on every expert's rows, in place (the matmuls' backward needs their inputs,
        not this output: no (rows, out) copy is kept)."""
        pair = self.adapter_pairs().get(projection)
        if pair is None:
            return y
        A, B = (t.to(x.dtype) for t in pair)  # no-op unless the adapter is kept wider than the activations
        if mm is grouped_mm:
            pad = (-A.shape[-1]) % (16 // x.element_size())  # grouped_mm: 16-byte aligned strides
            if pad:
                A = F.pad(A, (0, pad))  # (E, in, r + pad), zero columns
                B = F.pad(B, (0, 0, 0, pad))  # (E, r + pad, out), zero rows
        return y.add_(mm(mm(x, A, offs) * self.scaling, B, offs))

    # ------------------------------------------------------------------ merge
    def merged_weights(self) -> dict[str, torch.Tensor]:
        """{'gate_and_up_projs': W + s A B, 'down_projs': ...} (new tensors, native layout, base dtype).

        One batched GEMM per projection; accumulated in fp32 when the base is 16-bit."""
        return {"gate_and_up_projs" if proj == "gate_up" else "down_projs": self.merged_weights_one(proj)
                for proj in self.adapter_pairs()}

    def merged_weights_one(self, proj: str) -> torch.Tensor:
        A, B = self.adapter_pairs()[proj]
        W = self.gate_and_up_projs if proj == "gate_up" else self.down_projs
        return merge_expert_weights(W, A, B, self.scaling)

    def to_base(self, merged: dict[str, torch.Tensor] | None = None) -> GroupedExperts:
        """A plain GroupedExperts holding this module's base Parameters (or, per name, the given tensors)."""
        with torch.device("meta"):
            base = GroupedExperts(self.num_experts, self.gate_and_up_projs.shape[1], self.intermediate_size)
        for name, old in (("gate_and_up_projs", self.gate_and_up_projs), ("down_projs", self.down_projs)):
            new = (merged or {}).get(name)
            setattr(base, name, old if new is None else nn.Parameter(new, requires_grad=old.requires_grad))
        return base

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, rank={self.rank}, alpha={self.alpha}, projections={self.projections}"


def merge_expert_weights(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W (E, in, out) + scaling * A (E, in, r) @ B (E, r, out), one batched GEMM, in W's dtype (fp32 accumulation
    when W is 16-bit). A function of tensors so that exporters can merge gathered copies of sharded experts too."""
    acc = torch.float32 if W.dtype in (torch.float16, torch.bfloat16) else W.dtype
    return torch.baddbmm(W.detach().to(acc), A.detach().to(acc), B.detach().to(acc), alpha=scaling).to(W.dtype)
