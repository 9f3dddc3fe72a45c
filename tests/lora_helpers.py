"""LoRA helpers only the tests use: the adapter tensors of a model, and loading a PEFT export back into a native model
(the app resumes adapters from Lightning checkpoints and never reads its own `hf_adapter/` back)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from qmoe_lightning.lora import LoRALinear, experts_from_peft, is_adapter_key, lora_modules, peft_adapter_state
from qmoe_lightning.lora.peft_export import HF_EXPERT_PARAMS, PREFIX, hf_module_name


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of `model` (`lora_*` keys only), detached."""
    return {k: v.detach() for k, v in model.state_dict().items() if is_adapter_key(k)}


def load_peft_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Load a `hf_adapter/` written by `save_peft_adapter` into a model with the same adapters (strict)."""
    from safetensors.torch import load_file

    _, ours = peft_adapter_state(model)
    theirs = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    if set(ours) != set(theirs):
        raise ValueError(f"adapter keys differ: missing {sorted(set(ours) - set(theirs))[:5]}, "
                         f"unexpected {sorted(set(theirs) - set(ours))[:5]}")
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            key = PREFIX + hf_module_name(name)
            if isinstance(m, LoRALinear):
                m.lora_A.copy_(theirs[f"{key}.lora_A.weight"])
                m.lora_B.copy_(theirs[f"{key}.lora_B.weight"])
                continue
            ordered = [p for p in HF_EXPERT_PARAMS if p in m.projections]
            for depth, proj in enumerate(ordered):
                k = f"{key}." + "base_layer." * (len(ordered) - 1 - depth)
                A, B = experts_from_peft(theirs[f"{k}lora_A.weight"], theirs[f"{k}lora_B.weight"], m.num_experts)
                mA, mB = m.adapter_pairs()[proj]
                mA.copy_(A)
                mB.copy_(B)
