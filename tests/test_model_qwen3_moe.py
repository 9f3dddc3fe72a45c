"""What only Qwen3-MoE (text-only) has: its tiny configs cover what they claim (dense MLP layers by mlp_only_layers and
by decoder_sparse_step, head_dim given and omitted, norm_topk_prob on and off, tied embeddings), norm_topk_prob is
honoured (a negative control: the flipped flag breaks the match with transformers), transformers' save_pretrained
writes the per-expert layout the tests call published, and the published Qwen3-30B-A3B and 235B-A22B key sets and shapes
are exactly what our export writes from a model built on the meta device. The properties every family shares (logits,
loss, gradients, packed rows, round trips, export loaded by transformers) are tested in test_model_parity.py,
test_model_packing.py and test_model_checkpoint.py.
"""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, native_slots_of, reference_pair
from safetensors.torch import load_file
from tiny_configs import QWEN3_MOE_VARIANTS, per_expert_layout, text_doc

from qmoe_lightning.models import checkpoint as ckpt
from qmoe_lightning.models.registry import family_of

TOL = 1e-4
FAMILY = FAMILIES["qwen3_moe"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """variant -> (transformers model, native model loaded from transformers' save_pretrained directory, directory)."""
    out = {}
    for v in QWEN3_MOE_VARIANTS:
        path = tmp_path_factory.mktemp(f"qwen3_moe_{v}")
        out[v] = (*reference_pair(FAMILY, v, path), path)
    return out


def test_tiny_configs_cover_dense_layers_head_dims_routing_and_tying(pairs):
    kinds = {v: [layer.is_moe for layer in nat.text_model.layers] for v, (_, nat, _) in pairs.items()}
    assert kinds == {"base": [True, False, True, True],  # mlp_only_layers=[1]
                     "alt": [False, True, False, True, False],  # decoder_sparse_step=2
                     "wide": [False, True, True]}  # mlp_only_layers=[0]
    # head_dim given (24 != 64 / 4, 32 != 96 / 6) and omitted (64 / 8 = 8), as transformers reads it
    assert {v: nat.text_model.layers[0].self_attn.head_dim for v, (_, nat, _) in pairs.items()} == \
        {"base": 24, "alt": 8, "wide": 32}
    for _, (hf, nat, _) in pairs.items():
        assert nat.text_model.layers[0].self_attn.head_dim == hf.model.layers[0].self_attn.head_dim
    assert {v: {nat.text_model.layers[i].mlp.gate.normalize for i in nat.text_model.moe_layers}
            for v, (_, nat, _) in pairs.items()} == {"base": {True}, "alt": {False}, "wide": {True}}
    tied = {v: nat.lm_head.weight is nat.text_model.embed_tokens.weight for v, (_, nat, _) in pairs.items()}
    assert tied == {"base": False, "alt": False, "wide": True}


@pytest.mark.parametrize("variant", ["base", "alt"])
def test_flipped_norm_topk_prob_breaks_the_match(pairs, variant, monkeypatch):
    """Negative control: the parity tests pass because the router renormalises (or not) as the config says; with the
    flag flipped on every router the logits leave transformers' by far more than the tolerance."""
    hf, nat, _ = pairs[variant]
    batch = text_doc(41, seed=8)
    with torch.no_grad():
        ref = hf(**batch).logits
        assert (nat(**batch).logits - ref).abs().max() <= TOL
        for i in nat.text_model.moe_layers:
            gate = nat.text_model.layers[i].mlp.gate
            monkeypatch.setattr(gate, "normalize", not gate.normalize)
        assert (nat(**batch).logits - ref).abs().max() > 1e-2


def test_transformers_saves_the_per_expert_layout(pairs):
    """What transformers' save_pretrained writes is `per_expert_layout` of its in-memory state, bitwise: the layout
    the checkpoint tests call published, and what the 30B-A3B key-set test below derives from a meta model."""
    hf, _, path = pairs["alt"]
    on_disk = {}
    for f in ckpt.safetensors_files(path):
        on_disk.update(load_file(str(f)))
    expected = per_expert_layout(dict(hf.state_dict()))
    assert set(on_disk) == set(expected)
    assert "model.layers.1.mlp.experts.15.gate_proj.weight" in on_disk  # layer 1 is MoE, 16 experts
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in on_disk)
    for k, v in expected.items():
        assert torch.equal(on_disk[k], v), k


def qwen3_30b_a3b_config():
    """The published Qwen/Qwen3-30B-A3B config.json's values (nothing is downloaded)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, tie_word_embeddings=False,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_parameters=dict(rope_type="default", rope_theta=1e6),
        attention_bias=False, use_sliding_window=False, router_aux_loss_coef=0.001, bos_token_id=151643,
        eos_token_id=151645)


def qwen3_235b_a22b_config():
    """The published Qwen/Qwen3-235B-A22B(-Instruct-2507) config.json's values (nothing is downloaded)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=94, num_attention_heads=64,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=1536,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, tie_word_embeddings=False,
        max_position_embeddings=262144, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=5e6), attention_bias=False, use_sliding_window=False,
        router_aux_loss_coef=0.001, bos_token_id=151643, eos_token_id=151645)


PUBLISHED = {  # config, hidden, moe_intermediate, q heads, layers, parameters (the model cards' 30.5B / 235B)
    "30b_a3b": (qwen3_30b_a3b_config, 2048, 768, 32, 48, (30.4e9, 30.6e9)),
    "235b_a22b": (qwen3_235b_a22b_config, 4096, 1536, 64, 94, (234.5e9, 235.5e9)),
}


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_published_sizes_build_on_meta_and_export_transformers_key_set(size):
    """Our export of a Qwen3-30B-A3B / 235B-A22B model (built on meta: no memory, no weights) names exactly the
    tensors, with the shapes, that transformers' save_pretrained writes for the same config (its meta model's state
    dict in the per-expert layout, which test_transformers_saves_the_per_expert_layout checks is what it writes),
    and reading those names back fills every native tensor exactly once."""
    from transformers import Qwen3MoeForCausalLM as HF

    make_config, H, I, heads, L, params = PUBLISHED[size]
    config = make_config()
    native = family_of("qwen3_moe").model_class(text_only=False).from_config(config, dtype=torch.bfloat16,
                                                                             device="meta")
    assert all(p.is_meta for p in native.parameters())
    with torch.device("meta"):
        hf = HF(config)
    expected = {k: tuple(v.shape) for k, v in per_expert_layout(dict(hf.state_dict())).items()}
    assert len(expected) == 3 + L * (4 + 2 + 2 + 1 + 128 * 3)  # embed, norm, lm_head; per layer attn, norms, experts
    adapter = native.state_dict_adapter()
    exported = {k: tuple(v.shape) for k, v in adapter.to_hf(native.state_dict()).items()}
    assert exported == expected
    assert exported[f"model.layers.{L - 1}.mlp.experts.127.gate_proj.weight"] == (I, H)
    assert exported["model.layers.0.mlp.experts.0.down_proj.weight"] == (H, I)
    assert exported["model.layers.0.self_attn.q_proj.weight"] == (heads * 128, H)
    assert exported["model.layers.0.self_attn.k_proj.weight"] == (4 * 128, H)
    assert exported["lm_head.weight"] == (151936, H)
    # the parameter count of the model card
    assert params[0] < sum(torch.Size(s).numel() for s in exported.values()) < params[1]
    # and back: every published tensor lands in exactly one native slot of the right shape, covering every tensor
    slots = native_slots_of(adapter, expected, native)
    experts = native.text_model.layers[0].mlp.experts
    assert tuple(experts.gate_and_up_projs.shape) == (128, H, 2 * I)
    assert {len(s) for k, s in slots.items() if k.endswith("gate_and_up_projs")} == {128 * 2}  # gate, up per expert
    assert {len(s) for k, s in slots.items() if k.endswith("down_projs")} == {128}
    assert native.text_model.rotary_emb.inv_freq.numel() == 128 // 2  # the whole head rotates
