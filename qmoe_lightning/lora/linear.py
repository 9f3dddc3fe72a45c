"""`LoRALinear`: an `nn.Linear` with a low-rank adapter, `y = W x + b + (alpha / r) * B A dropout(x)`.

Notable choices:
- It IS an `nn.Linear` (subclass) holding the very same `weight` / `bias` Parameter objects as the module it
  replaces, so the base keys of the state dict do not change (`...q_proj.weight`), checkpoints of the base load
  as before, and code that checks `isinstance(m, nn.Linear)` keeps working. The adapter adds `lora_A (r, in)` and
  `lora_B (out, r)`: PEFT's `lora_A.weight` / `lora_B.weight` layout, so export is a rename.
- B starts at zero (the model is unchanged at step 0); A uses PEFT's default (kaiming-uniform, a=sqrt(5)).
- Dropout acts on the input of the LoRA branch only, as in PEFT.
- The adapter may be kept in a wider dtype than the base (`dtype=torch.float32` under a bf16 base: fp32 master
  weights and AdamW state for the few trainable tensors); it is cast to the activation dtype in forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qmoe_lightning.models.norms import KeepFp32Mixin


class LoRALinear(KeepFp32Mixin, nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype | None = None):
        # nn.Module.__init__ only: nn.Linear.__init__ would allocate a second weight
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        factory = dict(device=base.weight.device, dtype=dtype or base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, **factory))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # fp32 adapters (masters under a bf16 base) survive a later `.to(bf16)` of the model (Lightning's bf16-true)
        self._fp32_names = ("lora_A", "lora_B") if factory["dtype"] == torch.float32 else ()
        if base.weight.device.type != "meta":
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def reset_parameters(self) -> None:  # meta-device init: base and adapter
        super().reset_parameters()
        self.reset_lora_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)  # no-op unless the adapter is kept wider
        return y + F.linear(F.linear(self.lora_dropout(x), A), B) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        return merge_linear_weight(self.weight, self.lora_A, self.lora_B, self.scaling)

    def to_base(self, weight: torch.Tensor | None = None) -> nn.Linear:
        """A plain nn.Linear sharing (or, with `weight`, replacing) this module's base parameters."""
        with torch.device("meta"):
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight = self.weight if weight is None else nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def merge_linear_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W (out, in) + scaling * B (out, r) @ A (r, in), in W's dtype (accumulated in fp32 when W is 16-bit).
    A function of tensors so that exporters can merge gathered (full) copies of sharded parameters too."""
    acc = torch.float32 if W.dtype in (torch.float16, torch.bfloat16) else W.dtype
    return torch.addmm(W.detach().to(acc), B.detach().to(acc), A.detach().to(acc), alpha=scaling).to(W.dtype)
