"""RMSNorm variants of the Qwen3.5-MoE and Qwen3-VL-MoE decoders, plus a mixin that keeps chosen tensors fp32 through dtype casts.

- `ZeroCenteredRMSNorm`: `y = x_hat * (1 + w)` with w initialised to 0 (input/post norms, final norm, q/k norms).
  The product is taken in fp32 and cast once at the end, as transformers does (`(x * w).to(dtype)`, not Llama's
  `x.to(dtype) * w`): the order changes bf16 results.
- `RMSNorm` (Qwen3-VL-MoE): Llama's `w * x_hat.to(dtype)` with w initialised to 1: the cast comes BEFORE the
  weight here, the opposite order of `ZeroCenteredRMSNorm`, again as transformers does for that family.
- `GatedRMSNorm`: Gated DeltaNet output norm, NOT zero-centred: `w * x_hat` cast to the input dtype, then multiplied
  by `silu(z)` computed in fp32.
- `KeepFp32Mixin`: `module.to(torch.bfloat16)` must not round A_log / dt_bias / rotary inv_freq. The fp32 values
  are saved before the cast and put back afterwards (a cast back to fp32 would not restore the lost bits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


class KeepFp32Mixin:
    """Parameters / buffers named in `_fp32_names` stay (at least) float32 through `.to(bf16)` / `.half()`."""

    _fp32_names: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        # Keep a COPY of the fp32 values: nn.Module._apply casts a Parameter in place (`param.data = fn(param.data)`),
        # so holding on to the object would only give back its already-rounded values (Lightning's bf16-true
        # `convert_module` does exactly such a `.to(bf16)` after configure_model). The tensors named here are small.
        saved = {}
        for name in self._fp32_names:
            t = getattr(self, name, None)
            if t is not None:
                saved[name] = t.detach().clone() if t.dtype == torch.float32 and not t.is_meta else None
        super()._apply(fn, recurse)
        for name, old in saved.items():
            new = getattr(self, name)
            if new.dtype in (torch.float32, torch.float64):  # only guard against LOWER precision
                continue
            if old is not None and not new.is_meta:
                fixed = old.to(device=new.device)
            else:
                fixed = new.detach().float()
            if isinstance(new, nn.Parameter) and is_traceable_wrapper_subclass(new):
                # DTensor (FSDP2): `.data =` would change the wrapper's dtype but not its local tensor; swap whole
                # tensors as nn.Module._apply itself does for subclasses (FSDP2 re-registers its shard afterwards)
                torch.utils.swap_tensors(new, nn.Parameter(fixed, requires_grad=new.requires_grad))
            elif isinstance(new, nn.Parameter):
                new.data = fixed
            else:
                setattr(self, name, fixed)
        return self


def _normalized(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, in fp32."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


class ZeroCenteredRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (_normalized(x, self.eps) * (1.0 + self.weight.float())).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * _normalized(x, self.eps).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """`RMSNorm` (cast, then weight) times silu(gate) in fp32, cast back."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return (super().forward(x) * F.silu(gate.float())).to(x.dtype)
