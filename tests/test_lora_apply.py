"""apply_lora: target resolution and errors, exact trainable counts per group, frozen base, gradients, the grouped
expert path against its loop, adapter-only checkpoints, in-place merge, PEFT round trip, config parsing."""

from __future__ import annotations

import copy
import json
from unittest import mock

import pytest
import torch
from lora_helpers import adapter_state_dict, load_peft_adapter
from tiny_configs import make_config
from torch import nn

from qmoe_lightning.lora import (LoRAGroupedExperts, LoraConfig, apply_lora, check_adapter_state_dict, is_adapter_key,
                                 keep_adapters_only, lora_modules, merge_lora_, reset_lora_parameters,
                                 save_peft_adapter, summarize)
from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration
from qmoe_lightning.models.moe import GroupedExperts


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared 2-core machine: threads only spin
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return Qwen3_5MoeForConditionalGeneration.from_config(make_config("base")).eval()


def fresh(base_model):
    return copy.deepcopy(base_model)


def _randomize_adapters(model, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_key(name):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def lora(r, n_in, n_out):
    return r * (n_in + n_out)


def test_trainable_counts_per_group_exact(base_model):
    model = fresh(base_model)
    report = apply_lora(model, LoraConfig(rank=4, alpha=8, expert_rank=2))  # default targets
    t = make_config("base").text_config
    H, E, I, Is = t.hidden_size, t.num_experts, t.moe_intermediate_size, t.shared_expert_intermediate_size
    D, Hq, Hkv = t.head_dim, t.num_attention_heads, t.num_key_value_heads
    qkv = 2 * t.linear_num_key_heads * t.linear_key_head_dim + t.linear_num_value_heads * t.linear_value_head_dim
    vdim = t.linear_num_value_heads * t.linear_value_head_dim
    n_full = t.layer_types.count("full_attention")
    n_lin = t.layer_types.count("linear_attention")
    L = t.num_hidden_layers
    expected = {
        # per expert: gate_up A (H, r_e) + B (r_e, 2I); down A (I, r_e) + B (r_e, H)
        "routed_experts": L * E * (lora(2, H, 2 * I) + lora(2, I, H)),
        "shared_expert": L * (2 * lora(4, H, Is) + lora(4, Is, H)),
        "attention": n_full * (lora(4, H, 2 * Hq * D) + 2 * lora(4, H, Hkv * D) + lora(4, Hq * D, H)),
        "linear_attention": n_lin * (lora(4, H, qkv) + lora(4, H, vdim) + lora(4, vdim, H)),
    }
    assert report.trainable == expected
    assert report.modules == {"routed_experts": L, "shared_expert": 3 * L, "attention": 4 * n_full,
                              "linear_attention": 3 * n_lin}
    assert expected["routed_experts"] == 14336  # the figure printed in the table, computed by hand once
    # the only trainable tensors are the adapters; the report's counts are those of the model
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(is_adapter_key(n) for n in trainable)
    assert sum(trainable.values()) == report.total_trainable
    assert report.frozen == sum(p.numel() for p in base_model.parameters())
    table = report.table()
    for group in ("routed_experts", "shared_expert", "attention", "linear_attention", "other"):
        assert group in table
    assert "14,336" in table and "NOT adapted" not in table


def test_unmatched_target_or_exclusion_raises_naming_it(base_model):
    model = fresh(base_model)
    with pytest.raises(ValueError, match="'q_prj'"):
        apply_lora(model, LoraConfig(targets=["attention", "q_prj"]))
    with pytest.raises(ValueError, match="lora exclusion 're:.*layers.*9"):
        apply_lora(model, LoraConfig(targets=["attention"], exclude=[r"re:.*layers\.9\..*"]))
    with pytest.raises(ValueError, match="self_attn"):  # a module that is not a Linear / experts block
        apply_lora(model, LoraConfig(targets=["self_attn"]))
    # nothing was changed by the failed calls
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="removed every target"):
        apply_lora(model, LoraConfig(targets=["attention"], exclude=["attention"]))
    apply_lora(model, LoraConfig(targets=["attention"]))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoraConfig(targets=["attention"]))
    with pytest.raises(ValueError, match="unknown lora option"):
        LoraConfig.from_any({"rank": 4, "rnak": 2})


def test_all_linear_includes_experts_and_a_miss_is_visible(base_model):
    model = fresh(base_model)
    report = apply_lora(model, LoraConfig(rank=2, targets=["all-linear"]))
    n_layers = make_config("base").text_config.num_hidden_layers
    assert report.modules["routed_experts"] == n_layers
    assert all(isinstance(model.model.language_model.layers[i].mlp.experts, LoRAGroupedExperts)
               for i in range(n_layers))
    assert "vision" not in report.modules and "lm_head" not in " ".join(report.adapted)
    # excluding the experts is possible, and the table says so
    model = fresh(base_model)
    report = apply_lora(model, LoraConfig(rank=2, targets=["all-linear"], exclude=["experts"]))
    assert report.trainable.get("routed_experts", 0) == 0
    line = next(ln for ln in report.table().splitlines() if ln.startswith("routed_experts"))
    assert "NOT adapted" in line and f"{n_layers} expert blocks" in line


def test_base_is_shared_frozen_and_unchanged_at_init(base_model):
    model = fresh(base_model)
    before = dict(model.named_parameters())
    keys_before = set(model.state_dict())
    ids = torch.randint(0, 400, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    apply_lora(model, LoraConfig(rank=4, targets=["all-linear", "vision"]))
    after = dict(model.named_parameters())
    # base Parameters are the same objects (no copy), under the same names, frozen
    for name, p in before.items():
        assert after[name] is p and not p.requires_grad
    assert {k for k in model.state_dict() if not is_adapter_key(k)} == keys_before
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)  # B = 0: the model is unchanged


def test_expert_adapters_receive_gradients(base_model):
    model = fresh(base_model).train()
    apply_lora(model, LoraConfig(rank=4, expert_rank=3))
    ids = torch.randint(0, 400, (2, 21), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    experts = [m for m in lora_modules(model).values() if isinstance(m, LoRAGroupedExperts)]
    assert experts
    for m in experts:  # at init B = 0, so only B has a gradient
        assert m.gate_and_up_lora_B.grad.abs().sum() > 0 and m.down_lora_B.grad.abs().sum() > 0
    _randomize_adapters(model)
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    for m in experts:
        for A, B in m.adapter_pairs().values():
            assert A.grad.abs().sum() > 0 and B.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not is_adapter_key(n))


@pytest.mark.parametrize("rank", [3, 8])
def test_grouped_path_matches_loop_forward_and_backward(rank):
    torch.manual_seed(0)
    E, H, I, N, K = 6, 32, 16, 40, 2
    base = GroupedExperts(E, H, I)
    m = LoRAGroupedExperts(base, rank=rank, alpha=2 * rank)
    _randomize_adapters(m)
    x = torch.randn(N, H, requires_grad=True)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    idx[:5] = 0  # an uneven load; expert E-1 may get nothing
    w = torch.softmax(torch.randn(N, K), -1)
    target = torch.randn(N, H)

    def run(fn):
        for p in (x, *m.parameters()):
            p.grad = None
        y = fn(x, idx, w)
        ((y - target) ** 2).sum().backward()
        return y.detach(), [p.grad.clone() for p in (x, *(t for pair in m.adapter_pairs().values() for t in pair))]

    def loop(*args):  # the segment-loop path (fp64, fp32 on CUDA) on the same inputs
        with mock.patch("qmoe_lightning.models.moe.grouped_mm_supported", lambda *a: False):
            return m(*args)

    y1, g1 = run(m.forward)
    y2, g2 = run(loop)
    assert (y1 - y2).abs().max() <= 1e-5
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() <= 1e-4
    # merged weights reproduce the adapted experts
    plain = m.to_base(m.merged_weights())
    assert (plain(x, idx, w) - y1).abs().max() <= 1e-5
    # bf16 runs through grouped GEMMs too (rank rows padded to 16 bytes) and stays close to fp32
    mb = copy.deepcopy(m).to(torch.bfloat16)
    yb = mb(x.detach().bfloat16(), idx, w.bfloat16()).float()
    assert (yb - y1).abs().max() <= 0.05 * y1.abs().max()


def test_adapter_only_checkpoint_round_trip(base_model, tmp_path):
    class Holder(nn.Module):  # stands for the LightningModule (keys "model.*")
        def __init__(self, model):
            super().__init__()
            self.model = model

    holder = Holder(fresh(base_model))
    apply_lora(holder.model, LoraConfig(rank=4, expert_rank=2))
    _randomize_adapters(holder.model, seed=3)
    sd = keep_adapters_only(holder.state_dict())
    assert sd and all(k.startswith("model.") and is_adapter_key(k) for k in sd)
    n_adapter = sum(t.numel() for t in sd.values())
    assert n_adapter == summarize(holder.model).total_trainable
    torch.save(sd, tmp_path / "ckpt.pt")

    other = Holder(fresh(base_model))
    apply_lora(other.model, LoraConfig(rank=4, expert_rank=2))
    loaded = torch.load(tmp_path / "ckpt.pt")
    check_adapter_state_dict(loaded, other)
    result = other.load_state_dict(loaded, strict=False)
    assert not result.unexpected_keys and all(not is_adapter_key(k) for k in result.missing_keys)
    ids = torch.randint(0, 400, (1, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(other.model(input_ids=ids).logits, holder.model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="missing"):
        check_adapter_state_dict({k: v for k, v in loaded.items() if "experts" not in k}, other)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        keep_adapters_only(Holder(fresh(base_model)).state_dict())
    assert set(adapter_state_dict(holder)) == set(sd)


def test_merge_in_place_and_peft_reload(base_model, tmp_path):
    model = fresh(base_model)
    apply_lora(model, LoraConfig(rank=4, expert_rank=2, targets=["all-linear"]))
    _randomize_adapters(model, seed=5)
    ids = torch.randint(0, 400, (2, 15), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    # the PEFT-format adapter loads back into a fresh LoRA model (our own loader, strict)
    save_peft_adapter(model, tmp_path / "hf_adapter", base_model_name_or_path="base")
    again = fresh(base_model)
    apply_lora(again, LoraConfig(rank=4, expert_rank=2, targets=["all-linear"]))
    load_peft_adapter(again, tmp_path / "hf_adapter")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, ref)
    # in-place merge: plain modules, base keys only, same function
    assert merge_lora_(model) == len(lora_modules(again))
    assert not lora_modules(model)
    assert set(model.state_dict()) == set(base_model.state_dict())
    with torch.no_grad():
        assert (model(input_ids=ids).logits - ref).abs().max() <= 1e-4


def test_meta_device_apply_then_reset():
    cfg = make_config("base")
    with torch.device("meta"):
        model = Qwen3_5MoeForConditionalGeneration(cfg)
    apply_lora(model, LoraConfig(rank=4))
    model.to_empty(device="cpu")
    model.reset_buffers()
    model.init_weights()
    reset_lora_parameters(model, seed=0)
    for name, p in model.named_parameters():
        if is_adapter_key(name):
            assert torch.isfinite(p).all()
            assert (p == 0).all() if "lora_B" in name else p.abs().sum() > 0
    ids = torch.randint(0, 400, (1, 9))
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_bf16_base_keeps_fp32_adapters(base_model, tmp_path):
    model = fresh(base_model).to(torch.bfloat16).train()
    apply_lora(model, LoraConfig(rank=4, expert_rank=4))  # adapter_dtype float32 by default
    adapters = {n: p for n, p in model.named_parameters() if is_adapter_key(n)}
    assert adapters and all(p.dtype == torch.float32 for p in adapters.values())
    _randomize_adapters(model, seed=1, std=0.05)
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(4))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16  # compute stays in the base dtype
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapters.values())
    # merged export of a bf16 model: bf16 weights, close to the adapted model
    from qmoe_lightning.lora import save_merged_pretrained

    model.eval()
    export = save_merged_pretrained(model, tmp_path / "merged")
    from safetensors import safe_open

    with safe_open(str(export / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"} | ({"F32"} & {  # A_log / dt_bias stay fp32
            f.get_slice(k).get_dtype() for k in f.keys() if k.endswith(("A_log", "dt_bias"))})
        assert not [k for k in f.keys() if "lora" in k]
    assert json.loads((export / "config.json").read_text())["dtype"] == "bfloat16"  # adapters do not count
    merged = Qwen3_5MoeForConditionalGeneration.from_pretrained(export, dtype=torch.bfloat16).eval()
    base_bf16 = fresh(base_model).to(torch.bfloat16).eval()
    with torch.no_grad():
        a, b = model(input_ids=ids).logits.float(), merged(input_ids=ids).logits.float()
        c = base_bf16(input_ids=ids).logits.float()
    # bf16 rounding (and the odd routing flip) separate merged from unmerged; the adapters' effect is far larger
    print("bf16 merged-vs-lora", (a - b).abs().mean().item(), "base-vs-lora", (a - c).abs().mean().item())
    assert (a - b).abs().mean() <= 0.2 * (a - c).abs().mean()
    with pytest.raises(ValueError, match="adapter_dtype"):
        LoraConfig(adapter_dtype="float31")


def test_tiny_lora_yaml_section_is_a_valid_config(base_model):
    import yaml
    from pathlib import Path

    doc = yaml.safe_load((Path(__file__).parents[1] / "configs" / "tiny_lora.yaml").read_text())
    cfg = LoraConfig.from_any(doc["model"]["lora"])
    report = apply_lora(fresh(base_model), cfg)
    assert set(report.modules) == {"routed_experts", "shared_expert", "attention", "linear_attention"}
    assert cfg.r_experts == 4 and cfg.rank == 8 and cfg.dropout > 0


def test_default_targets_are_the_model_familys(base_model):
    from qmoe_lightning.lora import resolve_targets
    from qmoe_lightning.models.registry import family_of_model

    model = fresh(base_model)
    family = family_of_model(model)
    assert LoraConfig().targets == ["default"]
    default, _, _ = resolve_targets(model, LoraConfig())
    explicit, _, _ = resolve_targets(model, LoraConfig(targets=list(family.lora_targets)))
    assert default == explicit and any(n.endswith("mlp.experts") for n in default)
    with_extra, _, _ = resolve_targets(model, LoraConfig(targets=["default", "vision"]))
    assert set(default) < set(with_extra)
    with pytest.raises(ValueError, match="not a registered model family; name the targets"):
        resolve_targets(nn.Sequential(nn.Linear(4, 4)), LoraConfig())


def test_every_family_default_target_is_a_known_alias():
    """Family defaults that a model lacks are skipped silently (`_expand_default`): a misspelt registry entry would
    never adapt anything, so each must be an alias."""
    from qmoe_lightning.lora.config import ALIASES
    from qmoe_lightning.models.registry import FAMILIES

    for family in FAMILIES.values():
        assert set(family.lora_targets) <= set(ALIASES), family.name
