"""Mixed precision (`torch.autocast`, Lightning's `bf16-mixed`) at the model's own kernels.

autocast casts the operands of the ops on its lists (linear, matmul, conv, SDPA ...) to its lower dtype and leaves
every other op alone. The model's grouped GEMMs (`torch._grouped_mm`, on no autocast list) and its fused LM head +
cross-entropy (`lm_loss`, matmuls with `out=` buffers) would therefore meet bf16 activations and fp32 weights, or
silently run in fp32. They ask `autocast_dtype` instead and cast both operands themselves, as autocast would for a
linear layer: the matmuls run in the autocast dtype, the weights' gradients come back in the weights' dtype (fp32
masters) through the casts. The gated delta rule goes the other way (fp32 with autocast off, `delta_rule.py`).
"""

from __future__ import annotations

import torch


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives matmuls on x's device when it is on there (and x is floating point), else None."""
    kind = x.device.type
    if not x.is_floating_point() or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)
