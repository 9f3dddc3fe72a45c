"""Qwen3-VL-MoE checkpoints: both fused expert layouts read (published (E, H, 2I) / (E, I, H), transformers'
save_pretrained (E, 2I, H) / (E, H, I)), our export in the published layout loads in transformers'
AutoModelForImageTextToText with the same logits, and the real Qwen3-VL-30B-A3B / 235B-A22B key sets load strictly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_configs import make_hf_vl_moe_model, make_vl_moe_config, vision_doc

from qmoe_lightning.models import checkpoint as ckpt
from qmoe_lightning.models.conversion import NATIVE
from qmoe_lightning.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeStateDictAdapter
from qmoe_lightning.models.registry import config_from, family_of

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def hf_and_dir(tmp_path_factory):
    hf = make_hf_vl_moe_model(make_vl_moe_config("alt"), seed=7)
    path = tmp_path_factory.mktemp("vl_hf")
    hf.save_pretrained(path)
    return hf, path


def read_all(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in ckpt.safetensors_files(path):
        out.update(load_file(str(f)))
    return out


def published_layout(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layout of the checkpoints on the hub: fused experts transposed relative to transformers' memory."""
    return {k: (v.transpose(1, 2).contiguous() if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
                else v) for k, v in hf_state.items()}


def test_transformers_saves_its_in_memory_layout(hf_and_dir):
    hf, path = hf_and_dir
    on_disk, in_memory = read_all(path), hf.state_dict()
    key = "model.language_model.layers.1.mlp.experts.gate_up_proj"
    cfg = hf.config.text_config
    assert on_disk[key].shape == in_memory[key].shape == (cfg.num_experts, 2 * cfg.moe_intermediate_size,
                                                          cfg.hidden_size)


@pytest.mark.parametrize("layout", ["transformers", "published"])
def test_hf_native_hf_round_trip_is_bitwise(hf_and_dir, layout):
    hf, _ = hf_and_dir
    in_memory = dict(hf.state_dict())
    source = in_memory if layout == "transformers" else published_layout(in_memory)
    adapter = Qwen3VLMoeStateDictAdapter(hf.config, text_only=False)
    native, aside = adapter.from_hf(source)
    assert not aside
    model = Qwen3VLMoeForConditionalGeneration(hf.config)
    assert {k: tuple(v.shape) for k, v in native.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    back = adapter.to_hf(native)  # always the published layout
    expected = published_layout(in_memory)
    assert set(back) == set(expected)
    for k, v in expected.items():
        assert torch.equal(back[k], v), k
    # and the in-memory conversion generation uses gives transformers' layout, as views of the native tensors
    for k, v in native.items():
        for hf_key, t in adapter.convert_single_tensor_to_hf(k, v, in_memory=True):
            assert torch.equal(t, in_memory[hf_key]) and t.data_ptr() == v.data_ptr(), hf_key


def test_published_layout_file_loads_like_transformers_file(hf_and_dir, tmp_path):
    hf, path = hf_and_dir
    save_file(published_layout(read_all(path)), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    a = Qwen3VLMoeForConditionalGeneration.from_pretrained(path)
    b = Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n


def test_our_export_loads_in_transformers_auto_class_with_same_logits(hf_and_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    _, path = hf_and_dir
    ours = Qwen3VLMoeForConditionalGeneration.from_pretrained(path).eval()
    with torch.no_grad():  # move weights away from the source so the test sees what was written
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    out_dir = ours.save_pretrained(tmp_path / "export", max_shard_size="200KB")
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    on_disk = read_all(out_dir)
    cfg = ours.text_config
    key = "model.language_model.layers.1.mlp.experts.gate_up_proj"
    assert on_disk[key].shape == (cfg.num_experts, cfg.hidden_size, 2 * cfg.moe_intermediate_size)  # published
    assert json.loads((out_dir / "config.json").read_text())["architectures"] == ["Qwen3VLMoeForConditionalGeneration"]
    reloaded, info = AutoModelForImageTextToText.from_pretrained(out_dir, output_loading_info=True)
    assert type(reloaded).__name__ == "Qwen3VLMoeForConditionalGeneration"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reloaded = reloaded.float().eval()
    reloaded.config.text_config._experts_implementation = "eager"
    batch = vision_doc([4, ("image", (1, 4, 6)), 7, ("video", (2, 2, 2)), 5], seed=9)
    with torch.no_grad():
        assert (reloaded(**batch).logits - ours(**batch).logits).abs().max() <= 1e-4
    again = Qwen3VLMoeForConditionalGeneration.from_pretrained(out_dir)  # and back, bitwise
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_square_expert_shapes_follow_transformers_rule():
    """H == 2I: the two layouts have the same shape. transformers then reads a file as its in-memory layout, so we
    read it that way too and write that layout (the only one transformers reads back correctly)."""
    config = make_vl_moe_config("base", moe_intermediate_size=32)  # 2I == H == 64
    adapter = Qwen3VLMoeStateDictAdapter(config, text_only=False)
    w = torch.randn(8, 64, 64)
    (a,) = adapter.convert_single_tensor_from_hf("model.language_model.layers.0.mlp.experts.gate_up_proj", w)
    assert torch.equal(a.tensor, w.transpose(1, 2))
    ((_, out),) = adapter.convert_single_tensor_to_hf("model.language_model.layers.0.mlp.experts.gate_and_up_projs",
                                                      a.tensor.contiguous())
    assert torch.equal(out, w)
    assert adapter.WRITE_EXPERT_LAYOUT == NATIVE


@pytest.mark.parametrize("name", ["qwen3_vl_30b_a3b_instruct_config.json", "qwen3_vl_235b_a22b_instruct_config.json"])
def test_real_config_key_set_loads_strictly_on_meta(name):
    """Every tensor of the published checkpoint (names and shapes from the real config, published expert layout)
    maps onto exactly one native tensor of the right shape, and every native tensor is covered."""
    from transformers import Qwen3VLMoeForConditionalGeneration as HF

    config = config_from(DATA / name)
    assert family_of(config.model_type).name == "Qwen3-VL-MoE"
    with torch.device("meta"):
        hf_state = {k: torch.empty(v.shape, device="meta") for k, v in HF(config).state_dict().items()}
        native = Qwen3VLMoeForConditionalGeneration(config)
    published = published_layout(hf_state)
    adapter = native.state_dict_adapter()
    want = {k: tuple(v.shape) for k, v in native.state_dict().items()}
    got: dict[str, tuple] = {}
    for key, tensor in published.items():
        for a in adapter.convert_single_tensor_from_hf(key, tensor):
            assert a.native_key in want, key
            assert a.native_key not in got, f"{key}: {a.native_key} written twice"
            got[a.native_key] = tuple(a.tensor.shape)
    assert got == want
    text = config.text_config
    experts = native.text_model.layers[0].mlp.experts
    assert tuple(experts.gate_and_up_projs.shape) == (text.num_experts, text.hidden_size,
                                                      2 * text.moe_intermediate_size)
    assert native.text_model.rotary_emb.inv_freq.numel() == text.head_dim // 2  # the whole head rotates


def test_text_only_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="Qwen3-VL-MoE has no text-only model"):
        family_of("qwen3_vl_moe").model_class(text_only=True)


def test_bf16_keeps_rotary_inv_freq_fp32(hf_and_dir):
    hf, path = hf_and_dir
    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.text_model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.model.visual.rotary_pos_emb.inv_freq.dtype == torch.float32
    fp32 = Qwen3VLMoeForConditionalGeneration.from_pretrained(path).eval()
    inv = fp32.text_model.rotary_emb.inv_freq.clone()
    fp32.to(torch.bfloat16)  # a cast of a loaded model must not round it either
    assert torch.equal(fp32.text_model.rotary_emb.inv_freq, inv)
    batch = vision_doc([4, ("image", (1, 4, 4)), 6], seed=2)
    with torch.no_grad():
        lo = model(**batch).logits.float()
        hi = Qwen3VLMoeForConditionalGeneration.from_pretrained(path).eval()(**batch).logits
    assert torch.isfinite(lo).all() and (lo - hi).abs().max() < 0.05 * hi.abs().max()
