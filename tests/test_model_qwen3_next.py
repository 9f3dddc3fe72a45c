"""What only Qwen3-Next has, beside the family-parametrized parity, packing and checkpoint tests that cover it
(tests/families.py): the Gated DeltaNet projections fused per key head (`in_proj_qkvz`, `in_proj_ba`), which the
forward regroups into Qwen3.5's separate layout -- the same computation, with a negative control that a contiguous
split is not --, the tiny configs' coverage, and the published Qwen3-Next-80B-A3B key set (names and shapes of the
released checkpoint, built from its config on the meta device), MTP layer included, loading strictly and saving back
identically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from families import FAMILIES, native_slots_of
from tiny_configs import per_expert_layout

from qmoe_lightning.models.decoder import is_sparse_layer
from qmoe_lightning.models.gated_deltanet import GatedDeltaNet
from qmoe_lightning.models.packing import build_sequence_info
from qmoe_lightning.models.registry import config_from, family_of

FAMILY = FAMILIES["qwen3_next"]
DATA = Path(__file__).parents[1] / "qmoe_lightning" / "plan" / "known_configs"


def _separate_from_grouped(cfg, grouped: GatedDeltaNet, contiguous: bool = False) -> GatedDeltaNet:
    """A Qwen3.5-layout Gated DeltaNet holding `grouped`'s weights: rows regrouped per key head as transformers'
    `fix_query_key_value_ordering` reads them, or (contiguous=True, the negative control) split as if the fused
    tensor were [q | k | v | z] of all heads."""
    sep = GatedDeltaNet(cfg, grouped_projections=False).double()
    nk, dk, dv = grouped.num_k_heads, grouped.head_k_dim, grouped.head_v_dim
    r = grouped.num_v_heads // nk
    W, BA = grouped.in_proj_qkvz.weight, grouped.in_proj_ba.weight  # (nk*(2dk+2r*dv), H), (2*nv, H)
    if contiguous:
        qkv, z = W.split([grouped.conv_dim, grouped.value_dim])
        b, a = BA.split([grouped.num_v_heads] * 2)
    else:
        q, k, v, z = W.view(nk, -1, W.shape[-1]).split([dk, dk, r * dv, r * dv], dim=1)
        qkv = torch.cat([q.reshape(-1, W.shape[-1]), k.reshape(-1, W.shape[-1]), v.reshape(-1, W.shape[-1])])
        z = z.reshape(-1, W.shape[-1])
        b, a = (t.reshape(-1, W.shape[-1]) for t in BA.view(nk, 2 * r, -1).split([r, r], dim=1))
    state = {k: v for k, v in grouped.state_dict().items() if not k.startswith(("in_proj_qkvz", "in_proj_ba"))}
    state.update({"in_proj_qkv.weight": qkv, "in_proj_z.weight": z, "in_proj_b.weight": b, "in_proj_a.weight": a})
    sep.load_state_dict(state, strict=True)
    return sep


@pytest.mark.parametrize("variant", FAMILY.variants)
def test_grouped_projections_are_qwen3_5s_separate_ones_regrouped(variant):
    cfg = FAMILY.make_config(variant)
    torch.manual_seed(0)
    grouped = GatedDeltaNet(cfg, grouped_projections=True).double()
    with torch.no_grad():
        for p in grouped.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 19, cfg.hidden_size, dtype=torch.float64)
    info = build_sequence_info(2, 19, x.device, None, None, None, None)
    with torch.no_grad():
        ours = grouped(x, info)
        assert (ours - _separate_from_grouped(cfg, grouped)(x, info)).abs().max() <= 1e-12
        # negative control: the fused rows read as [q | k | v | z] of all heads are another model
        assert (ours - _separate_from_grouped(cfg, grouped, contiguous=True)(x, info)).abs().max() > 1e-2


def test_tiny_configs_cover_value_head_groups_dense_layers_routing_and_tying():
    configs = {v: FAMILY.make_config(v) for v in FAMILY.variants}
    assert {c.linear_num_value_heads // c.linear_num_key_heads for c in configs.values()} == {1, 2, 3}
    dense = {(v, c.layer_types[i]) for v, c in configs.items() for i in range(c.num_hidden_layers)
             if not is_sparse_layer(c, i)}
    assert {t for _, t in dense} == {"linear_attention", "full_attention"}  # dense layers of both mixers
    assert {c.norm_topk_prob for c in configs.values()} == {True, False}
    assert {c.tie_word_embeddings for c in configs.values()} == {True, False}
    assert {c.rope_parameters["partial_rotary_factor"] for c in configs.values()} == {0.25, 0.5, 1.0}
    assert {c.linear_conv_kernel_dim for c in configs.values()} == {3, 4}


def test_published_80b_a3b_key_set_loads_strictly_and_saves_back_identically():
    """Qwen3-Next-80B-A3B on meta (no memory): our export names exactly the tensors, with the shapes, of the published
    checkpoint (transformers' key set for the config in the per-expert layout it writes, plus the `mtp.*` layer:
    fc, the two pre-fc norms, one full-attention MoE block, norm), and reading those names back fills every native
    tensor exactly once."""
    from transformers import Qwen3NextForCausalLM as HF

    config = config_from(DATA / "Qwen--Qwen3-Next-80B-A3B-Instruct.json")
    assert family_of(config.model_type).name == "Qwen3-Next"
    assert config.layer_types.count("full_attention") == 12 and config.layer_types[3] == "full_attention"
    native = FAMILY.native.from_config(config, dtype=torch.bfloat16, device="meta", mtp_layers=1)
    with torch.device("meta"):
        hf = HF(config)
    expected = {k: tuple(v.shape) for k, v in per_expert_layout(dict(hf.state_dict())).items()}
    # the MTP layer: the names of a full-attention decoder layer (layer 3) under mtp.layers.0, and its own four
    mtp = {"mtp.layers.0." + k[len("model.layers.3."):]: s for k, s in expected.items()
           if k.startswith("model.layers.3.")}
    H = config.hidden_size
    mtp.update({"mtp.fc.weight": (H, 2 * H), "mtp.pre_fc_norm_embedding.weight": (H,),
                "mtp.pre_fc_norm_hidden.weight": (H,), "mtp.norm.weight": (H,)})
    expected.update(mtp)
    adapter = native.state_dict_adapter()
    exported = {k: tuple(v.shape) for k, v in adapter.to_hf(native.state_dict()).items()}
    assert exported == expected
    G = 2 * 128 + 2 * (32 // 16) * 128  # per key head: q, k, r value heads, r gates
    assert exported["model.layers.0.linear_attn.in_proj_qkvz.weight"] == (16 * G, H)
    assert exported["model.layers.0.linear_attn.in_proj_ba.weight"] == (2 * 32, H)
    assert exported["model.layers.0.linear_attn.conv1d.weight"] == (2 * 16 * 128 + 32 * 128, 1, 4)
    assert exported["model.layers.3.self_attn.q_proj.weight"] == (2 * 16 * 256, H)  # query and gate per head
    assert exported["mtp.layers.0.mlp.experts.511.down_proj.weight"] == (H, 512)
    assert exported["model.layers.47.mlp.shared_expert_gate.weight"] == (1, H)
    main = sum(torch.Size(s).numel() for k, s in exported.items() if not k.startswith("mtp."))
    assert main == 79_674_391_296  # the card's 80B; 79B without embedding and LM head
    assert main - 2 * 151936 * H == pytest.approx(79.05e9, rel=1e-3)
    # and back: every published tensor lands in exactly one native slot, covering every native tensor
    native_slots_of(adapter, expected, native)
    assert native.text_model.rotary_emb.inv_freq.numel() == 256 // 4 // 2  # a quarter of the head rotates
    # the JSON is the raw file's spelling, read by transformers' own config class as it is
    assert json.loads((DATA / "Qwen--Qwen3-Next-80B-A3B-Instruct.json").read_text())["partial_rotary_factor"] == 0.25
