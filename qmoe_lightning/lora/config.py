"""`LoraConfig`: what the YAML `lora:` section holds, and how its target strings are resolved.

Target strings (in `targets` and `exclude`) take three forms:
- `default` (the default `targets`): the model family's own default targets (`models.registry`; Qwen3.5-MoE:
  attention, linear_attention, shared_expert, experts; Qwen3-Next: attention, linear_attention, experts; Qwen3-MoE:
  attention, experts; Qwen3-VL-MoE: attention, dense_mlp, experts);
- an alias naming a group of the model: `attention` (self_attn q/k/v/o), `linear_attention` (Gated DeltaNet
  in_proj_qkv / in_proj_z / out_proj, or Qwen3-Next's in_proj_qkvz / out_proj), `shared_expert` (shared expert
  gate/up/down), `dense_mlp` (gate/up/down of the dense MLP layers, `mlp_only_layers` / `decoder_sparse_step`),
  `experts` (the routed experts,
  3-D grouped weights), `vision` (every Linear of the vision tower), `mtp` (every Linear and expert block of the
  multi-token prediction module; the attention / experts aliases match its modules too, so `exclude: [mtp]` keeps
  it adapter-free), `all-linear` (see below);
- `re:<regex>`: full-matched against the native module name (`model.language_model.layers.3.self_attn.q_proj`);
- anything else: a module-name suffix at a dot boundary (`q_proj`, `mlp.shared_experts.down_proj`, `mlp.experts`).

`all-linear` means every `nn.Linear` of the language model except the LM head, PLUS the routed experts. That is the
notable choice: in other tools "all-linear" skips the 3-D expert weights without a word, which on a MoE leaves
most of the model's parameters untouched. Here the experts are included, and the apply report lists the routed
experts group on its own line, so a run without expert adapters is visible. Exclude them explicitly with
`exclude: [experts]`.

Every target and exclusion must match at least one module, otherwise `apply_lora` raises naming it (a typo must
not silently train something else).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from qmoe_lightning.models.checkpoint import torch_dtype_named
from qmoe_lightning.models.settings import section_from

# the model family's defaults (`ModelFamily.lora_targets`), resolved against the model by apply_lora
DEFAULT_TARGETS = ("default",)

ALIASES: dict[str, str] = {
    # alias -> regex over native module names (full match)
    "attention": r".*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
    "linear_attention": r".*\.linear_attn\.(in_proj_qkv|in_proj_z|in_proj_qkvz|out_proj)",
    "shared_expert": r".*\.mlp\.shared_experts\.(gate_proj|up_proj|down_proj)",
    "dense_mlp": r".*\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)",
    "experts": r".*\.mlp\.experts",
    "vision": r"model\.visual\..*",
    "mtp": r"mtp\..*",
    # resolved specially in apply.py (Linear modules of the language model except lm_head, + routed experts)
    "all-linear": r"(?!model\.visual\.)(?!lm_head$).*",
}

EXPERT_PROJECTIONS = ("gate_up", "down")


@dataclass
class LoraConfig:
    """LoRA hyper-parameters and targets (the YAML `lora:` section).

    Args:
        rank: rank r of Linear targets.
        alpha: scale numerator; the update is `alpha / r * B A` (PEFT's lora_alpha, no rsLoRA).
        dropout: dropout on the input of the LoRA branch of Linear targets (training only). Routed experts take no
            dropout: PEFT cannot express it for 3-D parameters and it would cost a second copy of the routed tokens.
        targets: aliases, suffixes or `re:` regexes (see the module doc). Default: the model family's defaults
            (Qwen3.5-MoE: attention, linear attention, shared expert and routed experts; Qwen3-VL-MoE: attention,
            dense MLP layers, routed experts).
        exclude: same syntax; removes modules matched by `targets` (e.g. `re:.*layers\\.0\\..*`).
        expert_rank: rank of the routed-expert adapters (default `rank`). Each expert gets its own A/B, so the
            expert adapter has E times the parameters of one Linear adapter; a smaller rank keeps it in check.
        expert_alpha: alpha of the expert adapters (default `alpha`).
        expert_projections: which expert weights get adapters: `gate_up` (the fused gate|up), `down`.
        init_seed: seed of the A initialisation (None: the global RNG).
        adapter_dtype: dtype of the adapter parameters when the base is 16-bit: "float32" (default: fp32 master
            weights and optimizer state for the adapters, cast to the activation dtype in forward) or null (the
            base dtype; needed where one flat parameter must hold one dtype, e.g. FSDP1 wrapping base + adapter).
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    exclude: list[str] = field(default_factory=list)
    expert_rank: int | None = None
    expert_alpha: float | None = None
    expert_projections: list[str] = field(default_factory=lambda: list(EXPERT_PROJECTIONS))
    init_seed: int | None = 0
    adapter_dtype: str | None = "float32"

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        self.targets, self.exclude = list(self.targets), list(self.exclude)
        self.expert_projections = list(self.expert_projections)
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.expert_rank is not None and self.expert_rank < 1:
            raise ValueError(f"lora.expert_rank must be >= 1, got {self.expert_rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("lora.targets is empty: name at least one target (e.g. all-linear)")
        bad = [p for p in self.expert_projections if p not in EXPERT_PROJECTIONS]
        if bad or not self.expert_projections:
            raise ValueError(f"lora.expert_projections must be a non-empty subset of {EXPERT_PROJECTIONS}, got "
                             f"{self.expert_projections}")
        if self.adapter_dtype is not None and torch_dtype_named(self.adapter_dtype) is None:
            raise ValueError(f"lora.adapter_dtype must be a torch dtype name (float32, bfloat16) or null, got "
                             f"{self.adapter_dtype!r}")
        for spec in self.targets + self.exclude:
            if spec.startswith("re:"):
                try:
                    re.compile(spec[3:])
                except re.error as err:
                    raise ValueError(f"lora target {spec!r} is not a valid regex: {err}") from None

    def adapter_dtype_for(self, base_dtype: torch.dtype) -> torch.dtype:
        """The adapters' dtype for a base of `base_dtype`: widened only when the base is 16-bit."""
        if self.adapter_dtype is None or base_dtype not in (torch.float16, torch.bfloat16):
            return base_dtype
        return torch_dtype_named(self.adapter_dtype)

    @property
    def r_experts(self) -> int:
        return self.expert_rank or self.rank

    @property
    def alpha_experts(self) -> float:
        return self.alpha if self.expert_alpha is None else self.expert_alpha

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_any(cls, value) -> LoraConfig | None:
        """None / False -> None (no LoRA); a dict (YAML) -> LoraConfig; a LoraConfig as is."""
        if value is None or value is False:
            return None
        return section_from(cls, value, "lora")


def spec_matches(spec: str, name: str) -> bool:
    """Does the target string `spec` match the native module name `name`?"""
    if spec in ALIASES:
        return re.fullmatch(ALIASES[spec], name) is not None
    if spec.startswith("re:"):
        return re.fullmatch(spec[3:], name) is not None
    return name == spec or name.endswith("." + spec)
