"""What only Qwen3-VL-MoE checkpoints have: transformers saves its in-memory expert layout (E, 2I, H) / (E, H, I)
while the published checkpoints hold the experts transposed, a square expert shape (2I == H) follows transformers'
rule, the real Qwen3-VL-30B-A3B / 235B-A22B key sets load strictly, and there is no text-only model. Round trips
through both layouts and our export loading in transformers are tested for every family in test_model_checkpoint.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from families import FAMILIES
from safetensors.torch import load_file
from tiny_configs import make_hf_vl_moe_model, make_vl_moe_config

from qmoe_lightning.models import checkpoint as ckpt
from qmoe_lightning.models.conversion import NATIVE
from qmoe_lightning.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeStateDictAdapter
from qmoe_lightning.models.registry import config_from, family_of

published_layout = FAMILIES["qwen3_vl_moe"].published_layout
DATA = Path(__file__).parents[1] / "qmoe_lightning" / "plan" / "known_configs"


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


def test_transformers_saves_its_in_memory_layout(hf_and_dir):
    hf, path = hf_and_dir
    on_disk, in_memory = read_all(path), hf.state_dict()
    key = "model.language_model.layers.1.mlp.experts.gate_up_proj"
    cfg = hf.config.text_config
    assert on_disk[key].shape == in_memory[key].shape == (cfg.num_experts, 2 * cfg.moe_intermediate_size,
                                                          cfg.hidden_size)


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


@pytest.mark.parametrize("name", ["Qwen--Qwen3-VL-30B-A3B-Instruct.json", "Qwen--Qwen3-VL-235B-A22B-Instruct.json"])
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
